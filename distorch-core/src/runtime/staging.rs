//! What the streamer does with one unit's tensors: staging host data ready to upload, the
//! upload, the cast to the compute dtype, and the pool the prefetch thread stages in.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::runtime::backend::DonorCopy;
use crate::runtime::device::{self, DeviceTensor, Source, Staged};
use crate::runtime::store::{Stored, StoredUnit, WeightStore};
use crate::runtime::stream::UnitWeights;

/// A streamed unit as the prefetch thread leaves it.
pub(crate) enum Prepared<B: Backend> {
    /// Host data, uploaded by the compute thread.
    Staged(Vec<Staged>),
    /// On the compute device already, in the storage dtype (one per tensor).
    Uploaded(Vec<DeviceTensor<B>>),
}

/// Runs `work` in a rayon pool of its own when `threads` asks for one (ndarray: staging
/// beside the kernels, not queued behind them on the global pool), else as it is.
pub(crate) fn staging_pool(threads: Option<usize>, work: impl FnOnce() + Send) {
    let pool = threads.and_then(|n| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("distorch-staging-{i}"))
            .build()
            .map_err(|e| tracing::warn!(%e, "no staging pool; staging on rayon's global pool"))
            .ok()
    });
    match pool {
        Some(pool) => pool.install(work),
        None => work(),
    }
}

pub(crate) fn resident_tensors<B: Backend>(
    u: &StoredUnit<B>,
    store: &WeightStore<B>,
) -> Vec<Tensor<B, 1>> {
    u.tensors
        .iter()
        .filter_map(|t| match &t.data {
            Stored::Device(d) => Some(d.materialize(store.compute_dtype, &store.decode_tables)),
            Stored::Donor(..) | Stored::Host(_) => None,
        })
        .collect()
}

/// Host data of a unit's host-home tensors and of its donor tensors that are copied through
/// the host (read back), in the form the compute device holds them, ready to upload; and the
/// host bytes that staging allocated.
pub(crate) fn stage<B: Backend>(u: &StoredUnit<B>, store: &WeightStore<B>) -> (Vec<Staged>, u64) {
    let mut allocated = 0;
    let staged = u
        .tensors
        .iter()
        .filter_map(|t| match &t.data {
            Stored::Device(_) | Stored::Donor(_, DonorCopy::Direct) => None,
            Stored::Donor(d, DonorCopy::ViaHost) => {
                allocated += d.bytes();
                Some(d.clone().into_data())
            }
            Stored::Host(h) => {
                let (s, a) = device::stage(&store.rule, Source::Home(&h.bytes), h.dtype, t.numel());
                allocated += a;
                Some(s)
            }
        })
        .collect();
    (staged, allocated)
}

/// A unit's tensors on the compute device in the compute dtype: uploaded here (the compute
/// thread) unless the prefetch thread did, then cast.
pub(crate) fn to_device<B: Backend>(
    u: &StoredUnit<B>,
    prepared: Prepared<B>,
    store: &WeightStore<B>,
) -> Vec<Tensor<B, 1>> {
    let on_device = match prepared {
        Prepared::Uploaded(d) => d,
        Prepared::Staged(staged) => upload(u, staged, store),
    };
    on_device
        .iter()
        .map(|d| d.materialize(store.compute_dtype, &store.decode_tables))
        .collect()
}

/// Enqueues a unit's uploads (and donor copies) to the compute device on the calling thread,
/// in the storage dtype.
pub(crate) fn upload<B: Backend>(
    u: &StoredUnit<B>,
    staged: Vec<Staged>,
    store: &WeightStore<B>,
) -> Vec<DeviceTensor<B>> {
    let (device, rule) = (store.compute(), &store.rule);
    let mut staged = staged.into_iter();
    u.tensors
        .iter()
        .map(|t| match &t.data {
            Stored::Device(d) => d.clone(),
            Stored::Donor(d, DonorCopy::Direct) => d.to_device(device),
            Stored::Donor(d, DonorCopy::ViaHost) => {
                let data = staged.next().unwrap_or_else(|| d.clone().into_data());
                data.upload::<B>(device)
            }
            Stored::Host(h) => {
                let data = staged.next().unwrap_or_else(|| {
                    device::stage(rule, Source::Home(&h.bytes), h.dtype, t.numel()).0
                });
                data.upload::<B>(device)
            }
        })
        .collect()
}

pub(crate) fn weights<B: Backend>(
    u: &StoredUnit<B>,
    mut tensors: Vec<Tensor<B, 1>>,
) -> UnitWeights<B> {
    // ComfyUI scaled fp8: the weight dequantised with its scale, in the compute dtype (as
    // ComfyUI's `weight.to(dtype) * scale_weight`).
    for &(w, s) in &u.scales {
        let scale = tensors[s].clone();
        tensors[w] = tensors[w].clone() * scale;
    }
    UnitWeights {
        tensors: u
            .tensors
            .iter()
            .zip(tensors)
            .map(|(s, t)| (s.name.clone(), s.shape.clone(), t))
            .collect(),
    }
}

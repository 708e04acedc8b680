//! [`Capabilities`]: what the weight store and the streamer need to know of a backend that
//! Burn 0.21 cannot be asked — whether it copies between its devices directly, and whether a
//! buffer uploaded on one thread may be used on another — in one place, read once per device.

use burn::tensor::backend::Backend;

/// A backend's capabilities the runtime depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// How a GPU donor's units reach the compute device.
    pub donor_copy: DonorCopy,
    /// Which thread uploads streamed units.
    pub upload_thread: UploadThread,
    /// Whether bringing a streamed unit in runs beside compute without slowing it: true on a
    /// GPU uploading from the prefetch thread, and on ndarray when rayon's global pool (the
    /// kernels') leaves a core to the prefetch thread's staging; false where the upload is
    /// the compute thread's (wgpu) or staging shares every core with the kernels (ndarray
    /// with rayon's default pool: widening weights takes the cores the kernels use). What
    /// predictions assume.
    pub transfers_overlap: bool,
    /// Threads of the prefetch thread's own pool, where staging must not queue behind the
    /// kernels: ndarray computes on rayon's global pool, so its prefetch thread widens
    /// weights in a pool of the cores the global pool leaves (at least one). `None`: staging
    /// uses the global pool (GPU backends: the host's cores are free).
    pub staging_threads: Option<usize>,
}

impl Capabilities {
    /// The capabilities of `device`'s backend: CubeCL's CUDA runtime copies device to device
    /// and orders cross-thread uploads by events; ndarray's tensors are host memory; wgpu
    /// (and any other backend) gets the safe choices. Burn 0.21 has no capability query, so
    /// this reads the backend's name — here only. On ndarray, run the kernels on fewer rayon
    /// threads than cores (`RAYON_NUM_THREADS`, or a smaller global pool built by the
    /// application) and streamed weights are widened beside compute.
    pub fn of<B: Backend>(device: &B::Device) -> Capabilities {
        let name = B::name(device);
        let cuda = name.contains("cuda");
        let host = name.contains("ndarray");
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let spare = cores.saturating_sub(rayon::current_num_threads());
        Capabilities {
            donor_copy: if cuda {
                DonorCopy::Direct
            } else {
                DonorCopy::ViaHost
            },
            upload_thread: if cuda || host {
                UploadThread::Prefetch
            } else {
                UploadThread::Compute
            },
            transfers_overlap: cuda || (host && spare > 0),
            staging_threads: host.then_some(spare.max(1)),
        }
    }
}

/// How a GPU donor's tensors reach the compute device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DonorCopy {
    /// A device-to-device copy (Burn's `to_device`), enqueued by the compute thread. Needs a
    /// backend that implements it: CubeCL's CUDA runtime does, its wgpu runtime does not.
    Direct,
    /// Read back to host memory on the prefetch thread, then uploaded like a host home.
    ViaHost,
}

/// Which thread enqueues a streamed unit's upload to the compute device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadThread {
    /// The prefetch thread, as soon as the unit is staged: the upload overlaps the compute
    /// thread's work. Needs a backend that orders a buffer written on one thread before its
    /// use on another: CubeCL's CUDA runtime does (a stream per thread, cross-stream use
    /// waits on an event); ndarray's tensors are host memory.
    Prefetch,
    /// The compute thread, when it asks for the unit (CubeCL's wgpu runtime: uploads from
    /// another thread were read stale).
    Compute,
}

/// The host-to-device link of `device`, timed: bytes per second of a 256 MiB upload (host
/// bytes marked file-backed, as the streamer's views of mapped weights are, so CubeCL's CUDA
/// runtime stages them through pinned memory as it does the weights), waited for by reading
/// one element back; the best of three. What a calibration takes for the link where a GPU
/// uploads beside compute. On ndarray an "upload" is a view: the rate is very high.
pub fn upload_rate<B: Backend>(device: &B::Device) -> u64 {
    use burn::tensor::{AllocationProperty, Bytes, DType, Tensor, TensorData};
    let n = 64 << 20;
    let host = bytes::Bytes::from(vec![1u8; 4 * n]);
    let best = (0..3)
        .map(|_| {
            let shared = Bytes::from_shared(host.clone(), AllocationProperty::File);
            let data = TensorData::from_bytes(shared, [n], DType::F32);
            let start = std::time::Instant::now();
            let t = Tensor::<B, 1>::from_data(data, device);
            let _ = t.slice(0..1).into_data();
            start.elapsed()
        })
        .min()
        .unwrap_or_default();
    let secs = best.as_secs_f64().max(1e-9);
    ((4 * n) as f64 / secs) as u64
}

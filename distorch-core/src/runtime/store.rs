//! [`WeightStore`]: every placement unit's tensors at their home, filled by
//! Load-Patch-Distribute (see `load.rs`).

use std::collections::HashMap;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use distorch_alloc::{ByteSize, DeviceId};

use std::path::PathBuf;
use std::sync::Arc;

use crate::home::{ComputeDtype, DeviceRule};
use crate::runtime::backend::{Capabilities, DonorCopy};
use crate::runtime::device::{DecodeTables, DeviceTensor};
use crate::runtime::fp8::PatchPrecision;
use crate::runtime::host::HostTensor;
use crate::runtime::load::Fingerprint;
use crate::safetensors::TensorInfo;

/// Where a stored tensor's data is.
#[derive(Debug, Clone)]
pub(crate) enum Stored<B: Backend> {
    /// On the compute device, as the store's [`DeviceRule`] holds it.
    Device(DeviceTensor<B>),
    /// On another device of the same backend (a GPU donor), held the same way.
    Donor(DeviceTensor<B>, DonorCopy),
    /// In host memory, in its storage dtype.
    Host(HostTensor),
}

/// One tensor of a unit, flattened; `shape` restores it.
#[derive(Debug, Clone)]
pub struct StoredTensor<B: Backend> {
    /// The tensor's key within its component (component prefix stripped).
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    pub(crate) data: Stored<B>,
    /// Where its pristine bytes are in the weights file (for re-patching).
    pub(crate) origin: TensorInfo,
}

impl<B: Backend> StoredTensor<B> {
    /// Elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the bytes are borrowed from the memory-mapped file (a host home, unchanged
    /// by loading): the store holds no copy of them.
    pub fn is_mapped(&self) -> bool {
        matches!(&self.data, Stored::Host(h) if h.is_mapped())
    }
}

/// A placement unit at its home.
#[derive(Debug, Clone)]
pub struct StoredUnit<B: Backend> {
    /// The unit's name.
    pub name: String,
    /// Its home: the plan's compute device, a donor device, or `cpu` (host memory).
    pub home: DeviceId,
    /// Bytes its tensors occupy at home, in the dtype they have there: the plan's number for
    /// this unit.
    pub bytes: ByteSize,
    /// Bytes one fetch of the unit moves to the compute device: its bytes at home when it is
    /// streamed (host or GPU donor), zero when resident.
    pub upload_bytes: ByteSize,
    pub(crate) tensors: Vec<StoredTensor<B>>,
    /// ComfyUI scaled fp8: (weight, its `scale_weight`) positions in `tensors`; the weight is
    /// multiplied by its scale on the compute device each time the unit is fetched.
    pub(crate) scales: Vec<(usize, usize)>,
}

impl<B: Backend> StoredUnit<B> {
    /// True when the unit lives on the compute device.
    pub fn is_resident(&self) -> bool {
        self.tensors
            .iter()
            .all(|t| matches!(t.data, Stored::Device(_)))
    }

    /// Its tensors.
    pub fn tensors(&self) -> &[StoredTensor<B>] {
        &self.tensors
    }
}

/// The Burn devices a plan's device ids stand for: the compute device, and any GPU donors
/// of the same backend. `cpu` needs no binding: it is host memory for every backend.
#[derive(Debug, Clone)]
pub struct DeviceMap<B: Backend> {
    pub(crate) compute: B::Device,
    pub(crate) donors: Vec<(DeviceId, B::Device, DonorCopy)>,
}

impl<B: Backend> DeviceMap<B> {
    /// Binds the plan's compute device to `compute`.
    pub fn new(compute: B::Device) -> DeviceMap<B> {
        DeviceMap {
            compute,
            donors: Vec::new(),
        }
    }

    /// Binds a donor device id of the plan (`cuda:1`, say) to a Burn device, copying with
    /// [`Capabilities::of`].
    pub fn with_donor(self, id: DeviceId, device: B::Device) -> DeviceMap<B> {
        let copy = Capabilities::of::<B>(&device).donor_copy;
        self.with_donor_copy(id, device, copy)
    }

    /// Binds a donor device, choosing how its tensors are copied.
    pub fn with_donor_copy(
        mut self,
        id: DeviceId,
        device: B::Device,
        copy: DonorCopy,
    ) -> DeviceMap<B> {
        self.donors.retain(|(d, _, _)| *d != id);
        self.donors.push((id, device, copy));
        self
    }

    /// The Burn compute device.
    pub fn compute(&self) -> &B::Device {
        &self.compute
    }

    pub(crate) fn donor(&self, id: DeviceId) -> Option<(&B::Device, DonorCopy)> {
        self.donors
            .iter()
            .find(|(d, _, _)| *d == id)
            .map(|(_, b, c)| (b, *c))
    }
}

/// A weight changed during loading, on the compute device at f32 (the LoRA crate implements
/// it; tests use simple patches).
pub trait WeightPatch<B: Backend>: Send + Sync {
    /// Returns the patched tensor for `key`, or `None` to leave it as it is. `weight` is the
    /// flattened tensor on the compute device; `shape` is its real shape.
    fn patch(&self, key: &str, weight: &Tensor<B, 1>, shape: &[usize]) -> Option<Tensor<B, 1>>;

    /// Whether [`WeightPatch::patch`] may change `key`. Tensors it rules out are not
    /// uploaded for patching: at a host home they stay borrowed from the mapped file.
    fn applies_to(&self, key: &str) -> bool {
        let _ = key;
        true
    }
}

/// A tensor a model expects, by its key within the component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedTensor {
    /// The key (component prefix stripped), e.g. `down_blocks.0.resnets.0.conv1.weight`.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
}

/// A tensor whose shape differs from the model's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeMismatch {
    /// The key.
    pub name: String,
    /// The shape the model expects.
    pub expected: Vec<usize>,
    /// The shape in the file.
    pub found: Vec<usize>,
}

/// How to load.
pub struct LoadOptions<'a, B: Backend> {
    /// A patch applied on the compute device at f32 while loading.
    pub patch: Option<&'a dyn WeightPatch<B>>,
    /// The tensors the model expects. Tensors the model does not expect are reported as
    /// unused and not loaded; missing or mis-shaped ones are errors unless allowed below.
    /// `None` loads every planned tensor.
    pub expected: Option<&'a [ExpectedTensor]>,
    /// Report missing expected tensors instead of failing.
    pub allow_missing: bool,
    /// Report (and load) tensors whose shape differs from the expected one instead of
    /// failing.
    pub allow_mismatched: bool,
    /// Fail on NaN or infinite weights (default). Checking reads every weight once, mapped
    /// ones included.
    pub check_finite: bool,
    /// Called after each tensor is placed with its bytes in the file (for a progress bar).
    pub progress: Option<&'a (dyn Fn(u64) + Sync)>,
    /// How patched tensors of fp8 files are stored (bf16 by default).
    pub precision: PatchPrecision,
    /// The dtype the forward pass computes in (f32 by default): fetched weights are cast to
    /// it on the compute device. Loading refuses one the device cannot compute in.
    pub compute: ComputeDtype,
}

impl<B: Backend> Default for LoadOptions<'_, B> {
    fn default() -> Self {
        LoadOptions {
            patch: None,
            expected: None,
            allow_missing: false,
            allow_mismatched: false,
            check_finite: true,
            progress: None,
            precision: PatchPrecision::High,
            compute: ComputeDtype::F32,
        }
    }
}

impl<'a, B: Backend> LoadOptions<'a, B> {
    /// The same options, expecting `expected` (a model's tensors).
    pub fn expecting<'b>(&self, expected: &'b [ExpectedTensor]) -> LoadOptions<'b, B>
    where
        'a: 'b,
    {
        LoadOptions {
            patch: self.patch,
            expected: Some(expected),
            allow_missing: self.allow_missing,
            allow_mismatched: self.allow_mismatched,
            check_finite: self.check_finite,
            progress: self.progress,
            precision: self.precision,
            compute: self.compute,
        }
    }
}

/// What loading did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Tensors loaded.
    pub tensors: usize,
    /// Keys a patch changed.
    pub patched: Vec<String>,
    /// Expected keys the file lacks (only when allowed; otherwise loading fails).
    pub missing: Vec<String>,
    /// Tensors whose shape is not the expected one (only when allowed).
    pub mismatched: Vec<ShapeMismatch>,
    /// Tensors of the component not loaded: no planned unit covers them, or the model does
    /// not expect them.
    pub unused: Vec<String>,
    /// Bytes held per home, compute device first.
    pub bytes_per_device: Vec<(DeviceId, ByteSize)>,
    /// Of the host's bytes, those borrowed from the memory-mapped file (no copy).
    pub host_mapped: ByteSize,
    /// Bytes copied out of the file (tensors not borrowed from the mapping).
    pub bytes_read: ByteSize,
}

/// The tensors of one component, each unit at the home its plan gives.
#[derive(Debug, Clone)]
pub struct WeightStore<B: Backend> {
    pub(crate) compute_id: DeviceId,
    pub(crate) compute: B::Device,
    pub(crate) units: Vec<StoredUnit<B>>,
    pub(crate) by_name: HashMap<String, usize>,
    /// The weights files it was loaded from (one, or a sharded model's shards).
    pub(crate) files: Arc<[PathBuf]>,
    /// Each file as it was when loaded.
    pub(crate) fingerprints: Vec<Fingerprint>,
    /// How patched fp8 tensors were stored.
    pub(crate) precision: PatchPrecision,
    /// How device homes hold each dtype.
    pub(crate) rule: DeviceRule,
    /// The dtype fetched weights are cast to.
    pub(crate) compute_dtype: ComputeDtype,
    /// fp8 decoding tables on the compute device (uploaded on first use).
    pub(crate) decode_tables: DecodeTables<B>,
}

impl<B: Backend> WeightStore<B> {
    /// The compute device's id in the plan.
    pub fn compute_id(&self) -> DeviceId {
        self.compute_id
    }

    /// The Burn compute device.
    pub fn compute(&self) -> &B::Device {
        &self.compute
    }

    /// Units in the plan's order.
    pub fn units(&self) -> &[StoredUnit<B>] {
        &self.units
    }

    /// How device homes hold each dtype on this backend.
    pub fn device_rule(&self) -> DeviceRule {
        self.rule
    }

    /// The dtype fetched weights are cast to.
    pub fn compute_dtype(&self) -> ComputeDtype {
        self.compute_dtype
    }

    /// Bytes held per home (compute device first): the same numbers as the plan's rows.
    pub fn bytes_per_device(&self) -> Vec<(DeviceId, ByteSize)> {
        let mut held: Vec<(DeviceId, ByteSize)> = Vec::new();
        for u in &self.units {
            match held.iter_mut().find(|(d, _)| *d == u.home) {
                Some((_, b)) => *b += u.bytes,
                None => held.push((u.home, u.bytes)),
            }
        }
        held.sort_by_key(|(d, _)| (*d != self.compute_id, *d));
        held
    }

    /// The position of a unit in the plan's order.
    pub fn position(&self, unit: &str) -> Option<usize> {
        self.by_name.get(unit).copied()
    }
}

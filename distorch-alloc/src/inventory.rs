//! [`Inventory`]: what a model is made of, as the planner sees it.

use std::collections::HashSet;
use std::fmt;

use crate::bytesize::ByteSize;
use crate::device::DeviceId;
use crate::error::Error;

/// What a placement unit is, which decides whether it may leave the compute device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum UnitKind {
    /// A matrix or convolution weight (with its bias): the bulk of a model, movable.
    Weight,
    /// A normalisation layer's scale and shift.
    Norm,
    /// A bias (or other 1-D parameter) with no weight beside it.
    Bias,
    /// An embedding table (token, position).
    Embedding,
}

impl UnitKind {
    /// Every kind, in report order.
    pub const ALL: [UnitKind; 4] = [
        UnitKind::Weight,
        UnitKind::Norm,
        UnitKind::Bias,
        UnitKind::Embedding,
    ];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            UnitKind::Weight => "weight",
            UnitKind::Norm => "norm",
            UnitKind::Bias => "bias",
            UnitKind::Embedding => "embedding",
        }
    }
}

impl fmt::Display for UnitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A placement unit: one leaf weight group (a Linear's, Conv's, Norm's or Embedding's tensors),
/// placed on one device as a whole.
///
/// A unit has one size per kind of home, because a backend may hold weights in another dtype
/// than the file's: [`Unit::bytes`] in host memory (`cpu` as a donor), [`Unit::device_bytes`]
/// on a device (the compute device, a GPU donor, or `cpu` when it is the compute device).
/// The planner counts each unit at the size it has where it is placed, so a plan's bytes per
/// device are the bytes the loaded weights occupy there.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Unit {
    /// The unit's name: the common key prefix of its tensors (`...attn1.to_q`).
    pub name: String,
    /// Bytes of all its tensors in host memory (as stored in the file, unless loading
    /// changes their dtype).
    pub bytes: ByteSize,
    /// Bytes of all its tensors at a device home (equal to `bytes` unless the backend holds
    /// them in another dtype: f32 on a backend without half types, say).
    pub device_bytes: ByteSize,
    /// Position in execution order (smaller runs earlier); ties keep insertion order.
    pub order: u32,
    /// What it is.
    pub kind: UnitKind,
    /// Its compute time in one pass at the input size planned for (zero: unknown). With it,
    /// plans predict the step time and [`crate::PlacementOrder::Auto`] can weigh transfers
    /// against compute.
    pub compute: std::time::Duration,
    /// Its transfer time from host memory to the compute device in one fetch, as measured
    /// (`None`: its bytes over the donor's link). Measured costs differ from bytes over a
    /// rate where staging is host work: on ndarray, widening a tensor above glibc's mmap
    /// threshold (32 MiB) faults in fresh pages at every fetch.
    pub transfer: Option<std::time::Duration>,
}

impl Unit {
    /// A unit of the same size at every home.
    pub fn new(name: impl Into<String>, bytes: ByteSize, order: u32, kind: UnitKind) -> Unit {
        Unit {
            name: name.into(),
            bytes,
            device_bytes: bytes,
            order,
            kind,
            compute: std::time::Duration::ZERO,
            transfer: None,
        }
    }

    /// The same unit, taking `compute` per pass.
    pub fn with_compute(mut self, compute: std::time::Duration) -> Unit {
        self.compute = compute;
        self
    }

    /// The same unit, occupying `bytes` at a device home.
    pub fn with_device_bytes(mut self, bytes: ByteSize) -> Unit {
        self.device_bytes = bytes;
        self
    }

    /// Its size at `device` when `compute` is the compute device: host bytes when `device` is
    /// `cpu` holding weights for another device, device bytes otherwise.
    pub fn bytes_on(&self, device: DeviceId, compute: DeviceId) -> ByteSize {
        if device == DeviceId::CPU && compute != DeviceId::CPU {
            self.bytes
        } else {
            self.device_bytes
        }
    }
}

/// The dtypes a component is planned with, shown in the plan's report.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct DtypeLabels {
    /// The weights' dtypes as stored (`F16`, or `F16+F32` for a mix).
    pub storage: String,
    /// How each home holds them, when that differs from storage (`f32 at device homes`).
    pub held: Option<String>,
    /// The dtype the forward pass computes in (`f32`, `f16`, `bf16`).
    pub compute: String,
}

/// The placement units of one model component, sorted by execution order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    component: String,
    units: Vec<Unit>,
    total: ByteSize,
    dtypes: Option<DtypeLabels>,
}

impl Inventory {
    /// An inventory for `component` (e.g. `unet`). Units are sorted by `order` (stable), names
    /// must be unique and the total must fit a `u64`.
    pub fn new(component: impl Into<String>, mut units: Vec<Unit>) -> Result<Inventory, Error> {
        let component = component.into();
        let mut seen = HashSet::with_capacity(units.len());
        // Both sizes must sum within a u64: any placement's total lies between them.
        let (mut total, mut device) = (ByteSize::ZERO, ByteSize::ZERO);
        for u in &units {
            if !seen.insert(u.name.as_str()) {
                return Err(Error::DuplicateUnit {
                    component,
                    name: u.name.clone(),
                });
            }
            let sums = total
                .checked_add(u.bytes)
                .zip(device.checked_add(u.device_bytes));
            (total, device) = sums.ok_or_else(|| Error::InventoryTooLarge {
                component: component.clone(),
            })?;
        }
        units.sort_by_key(|u| u.order);
        Ok(Inventory {
            component,
            units,
            total,
            dtypes: None,
        })
    }

    /// The same inventory, labelled with its dtypes (shown in plan reports).
    pub fn with_dtypes(mut self, dtypes: DtypeLabels) -> Inventory {
        self.dtypes = Some(dtypes);
        self
    }

    /// The same inventory, each unit named in `times` taking that compute time per pass
    /// (others keep theirs): what plans predict the pass from.
    pub fn with_compute(
        mut self,
        times: &std::collections::BTreeMap<String, std::time::Duration>,
    ) -> Inventory {
        self.set_named(times, |u, t| u.compute = t);
        self
    }

    /// The same inventory, each unit named in `times` taking that measured transfer time
    /// from host memory per fetch ([`Unit::transfer`]; others keep bytes over the link).
    pub fn with_transfer(
        mut self,
        times: &std::collections::BTreeMap<String, std::time::Duration>,
    ) -> Inventory {
        self.set_named(times, |u, t| u.transfer = Some(t));
        self
    }

    /// Applies `set` to each unit named in `times`, with its time.
    fn set_named(
        &mut self,
        times: &std::collections::BTreeMap<String, std::time::Duration>,
        set: impl Fn(&mut Unit, std::time::Duration),
    ) {
        for u in &mut self.units {
            if let Some(&t) = times.get(&u.name) {
                set(u, t);
            }
        }
    }

    /// Its dtype labels, if given.
    pub fn dtypes(&self) -> Option<&DtypeLabels> {
        self.dtypes.as_ref()
    }

    /// Sum of all units' bytes at `device` when `compute` computes ([`Unit::bytes_on`]).
    pub fn bytes_on(&self, device: DeviceId, compute: DeviceId) -> ByteSize {
        self.units.iter().map(|u| u.bytes_on(device, compute)).sum()
    }

    /// The same units in the order `order` names them (a model's real execution order);
    /// units it does not name keep their relative order after the named ones. Names that
    /// are not units are ignored.
    pub fn in_order<S: AsRef<str>>(&self, order: &[S]) -> Inventory {
        let rank: std::collections::HashMap<&str, usize> = order
            .iter()
            .enumerate()
            .map(|(i, s)| (s.as_ref(), i))
            .rev()
            .collect();
        let mut units = self.units.clone();
        units.sort_by_key(|u| rank.get(u.name.as_str()).copied().unwrap_or(usize::MAX));
        for (i, u) in units.iter_mut().enumerate() {
            u.order = i as u32;
        }
        Inventory {
            component: self.component.clone(),
            units,
            total: self.total,
            dtypes: self.dtypes.clone(),
        }
    }

    /// The component's name.
    pub fn component(&self) -> &str {
        &self.component
    }

    /// Units in execution order.
    pub fn units(&self) -> &[Unit] {
        &self.units
    }

    /// Sum of all units' bytes in host memory ([`Unit::bytes`]).
    pub fn total_bytes(&self) -> ByteSize {
        self.total
    }

    /// Number of units.
    pub fn len(&self) -> usize {
        self.units.len()
    }

    /// True when there are no units.
    pub fn is_empty(&self) -> bool {
        self.units.is_empty()
    }
}

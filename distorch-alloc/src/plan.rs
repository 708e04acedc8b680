//! [`Plan`]: where every unit goes, why, and the strings that reproduce it.

use std::fmt;

use crate::bytesize::ByteSize;
use crate::device::DeviceId;
use crate::inventory::UnitKind;
use crate::number::{Decimal, mul_div_floor};
use crate::request::PlacementOrder;
use crate::spec::{AllocSpec, Entry, Mode, Value};

/// A device's part in a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Runs the forward pass; holds the pinned units.
    Compute,
    /// Stores weights that are streamed to the compute device.
    Donor,
}

impl Role {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Compute => "compute",
            Role::Donor => "donor",
        }
    }
}

/// What a device was asked to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quota {
    /// At most this many bytes (ratios and fractions are converted to bytes first).
    Bytes(ByteSize),
    /// Whatever the other devices leave (`*`, or the default remainder device).
    Rest,
}

/// One device's line in a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRow {
    /// The device.
    pub device: DeviceId,
    /// Compute or donor.
    pub role: Role,
    /// Its total memory.
    pub total: ByteSize,
    /// Its free memory when planned.
    pub free: ByteSize,
    /// What it was asked to hold.
    pub quota: Quota,
    /// Bytes of the model placed on it.
    pub model_bytes: ByteSize,
    /// Units placed on it.
    pub units: usize,
    /// Of `model_bytes`, the bytes of units pinned to the compute device.
    pub pinned_bytes: ByteSize,
}

/// A unit and where the plan puts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedUnit {
    /// The unit's name.
    pub name: String,
    /// Its bytes.
    pub bytes: ByteSize,
    /// Its kind.
    pub kind: UnitKind,
    /// Its device.
    pub device: DeviceId,
    /// Whether it is pinned to the compute device (tiny, norm, bias or embedding).
    pub pinned: bool,
}

/// Something the user should know about a plan that still works.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Warning {
    /// The pinned units alone exceed the compute device's quota (the one case a quota is
    /// exceeded).
    PinnedOverQuota {
        /// The compute device.
        device: DeviceId,
        /// Bytes of pinned units.
        pinned: ByteSize,
        /// Its quota.
        quota: ByteSize,
    },
    /// A quota was larger than the device's free memory and was capped to it.
    QuotaAboveFree {
        /// The device.
        device: DeviceId,
        /// The quota asked for.
        quota: ByteSize,
        /// The free memory it was capped to.
        free: ByteSize,
    },
    /// No `*` was given, so the remainder went to `cpu`.
    RemainderToCpu {
        /// Bytes that went there.
        bytes: ByteSize,
    },
    /// Virtual VRAM asked to move more than the movable part of the model.
    VirtualVramAboveModel {
        /// Bytes asked for.
        requested: ByteSize,
        /// Bytes that can move (the model less its pinned units).
        movable: ByteSize,
    },
    /// A prediction needed a donor's link to the compute device and the device graph has
    /// none: this bandwidth was assumed.
    AssumedLink {
        /// The donor.
        device: DeviceId,
        /// Bytes per second assumed.
        bytes_per_sec: ByteSize,
    },
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::PinnedOverQuota {
                device,
                pinned,
                quota,
            } => write!(
                f,
                "the units pinned to compute device {device} (norms, biases, embeddings, tiny \
                 units: {pinned}) exceed its quota of {quota}; they stay there anyway"
            ),
            Warning::QuotaAboveFree {
                device,
                quota,
                free,
            } => write!(
                f,
                "{device}'s quota of {quota} is more than its {free} free; capped to {free}"
            ),
            Warning::RemainderToCpu { bytes } => write!(
                f,
                "no `*` entry: the remaining {bytes} went to cpu (write `cpu,*` to say so)"
            ),
            Warning::VirtualVramAboveModel { requested, movable } => write!(
                f,
                "virtual VRAM of {requested} is more than the {movable} that can move: \
                 everything movable is offloaded"
            ),
            Warning::AssumedLink {
                device,
                bytes_per_sec,
            } => write!(
                f,
                "{device}'s link to the compute device is not declared: predictions assume \
                 {bytes_per_sec}/s (declare it, e.g. `{device}=32gib@25gb/s`)"
            ),
        }
    }
}

/// The result of planning: every unit's device, a device table, and two allocation strings
/// that reproduce this exact placement when fed back as expert allocations (with the same
/// device graph, compute device, order and pinning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub(crate) component: String,
    pub(crate) compute: DeviceId,
    pub(crate) order: PlacementOrder,
    pub(crate) total: ByteSize,
    pub(crate) dtypes: Option<crate::inventory::DtypeLabels>,
    pub(crate) rows: Vec<DeviceRow>,
    /// Index into `rows` of the device that took the rest, if any.
    pub(crate) sink: Option<usize>,
    pub(crate) units: Vec<PlacedUnit>,
    pub(crate) warnings: Vec<Warning>,
    /// The pass predicted under this plan, when its units' compute times are known.
    pub(crate) prediction: Option<crate::cost::Prediction>,
}

impl Plan {
    /// The planned component's name.
    pub fn component(&self) -> &str {
        &self.component
    }

    /// The compute device.
    pub fn compute(&self) -> DeviceId {
        self.compute
    }

    /// The placement order used.
    pub fn order(&self) -> PlacementOrder {
        self.order
    }

    /// The predicted pass (step time, stall) under this plan: present when the inventory's
    /// units carry compute times ([`crate::Unit::compute`]).
    pub fn prediction(&self) -> Option<crate::cost::Prediction> {
        self.prediction
    }

    /// Bytes of the whole model as placed: the sum of every unit's bytes at its home (the
    /// file's size, unless a home holds weights in another dtype).
    pub fn total_bytes(&self) -> ByteSize {
        self.total
    }

    /// The dtypes the component was planned with, if its inventory was labelled.
    pub fn dtypes(&self) -> Option<&crate::inventory::DtypeLabels> {
        self.dtypes.as_ref()
    }

    /// One row per device involved, compute first when it was not named by the allocation.
    pub fn devices(&self) -> &[DeviceRow] {
        &self.rows
    }

    /// Every unit, in execution order, with its device.
    pub fn units(&self) -> &[PlacedUnit] {
        &self.units
    }

    /// Warnings, in the order they arose.
    pub fn warnings(&self) -> &[Warning] {
        &self.warnings
    }

    /// Bytes per (unit kind, device), for kinds that occur: `(kind, [bytes per row])`.
    pub fn kind_distribution(&self) -> Vec<(UnitKind, Vec<ByteSize>)> {
        let mut out: Vec<(UnitKind, Vec<ByteSize>)> = UnitKind::ALL
            .iter()
            .map(|&k| (k, vec![ByteSize::ZERO; self.rows.len()]))
            .collect();
        let mut present = [false; UnitKind::ALL.len()];
        for u in &self.units {
            let k = UnitKind::ALL.iter().position(|&k| k == u.kind).unwrap_or(0);
            let r = self.row_of(u.device);
            out[k].1[r] += u.bytes;
            present[k] = true;
        }
        out.into_iter()
            .zip(present)
            .filter_map(|(o, p)| p.then_some(o))
            .collect()
    }

    fn row_of(&self, device: DeviceId) -> usize {
        self.rows
            .iter()
            .position(|r| r.device == device)
            .unwrap_or(0)
    }

    /// The bytes-mode allocation that reproduces this plan: each device's exact bytes, the
    /// rest-taking device as `*`.
    pub fn bytes_spec(&self) -> AllocSpec {
        self.spec_with(|row| Value::Bytes(row.model_bytes), Mode::Bytes)
    }

    /// The fraction-mode allocation that reproduces this plan (the form DisTorch2 logs): each
    /// device's share of its total memory, with the fewest digits that still give back its
    /// exact bytes, the rest-taking device as `*`.
    pub fn fraction_spec(&self) -> AllocSpec {
        self.spec_with(
            |row| Value::Fraction(exact_fraction(row.model_bytes, row.total)),
            Mode::Fraction,
        )
    }

    /// [`Plan::bytes_spec`] as a string.
    pub fn bytes_string(&self) -> String {
        self.bytes_spec().to_string()
    }

    /// [`Plan::fraction_spec`] as a string.
    pub fn fraction_string(&self) -> String {
        self.fraction_spec().to_string()
    }

    fn spec_with(&self, value: impl Fn(&DeviceRow) -> Value, mode: Mode) -> AllocSpec {
        let entries: Vec<Entry> = self
            .rows
            .iter()
            .enumerate()
            .map(|(i, row)| Entry {
                device: row.device,
                value: if Some(i) == self.sink {
                    Value::Star
                } else {
                    value(row)
                },
            })
            .collect();
        let has_explicit = entries.iter().any(|e| e.value != Value::Star);
        AllocSpec::from_parts(entries, has_explicit.then_some(mode))
    }
}

/// The shortest decimal `f` (at least one digit) with `floor(f * total) == amount`.
///
/// Exists for every `amount <= total` because 20 digits resolve any `u64` total.
pub(crate) fn exact_fraction(amount: ByteSize, total: ByteSize) -> Decimal {
    let (a, t) = (u128::from(amount.0), u128::from(total.0));
    if a == 0 || t == 0 {
        return Decimal::ZERO;
    }
    if a >= t {
        return Decimal::from_int(1);
    }
    for k in 1..=20u32 {
        let unit = 10u128.pow(k);
        let floor = |m: u128| mul_div_floor(m, t, unit).unwrap_or(u128::MAX);
        let mut m = mul_div_floor(a, unit, t).unwrap_or(0);
        if floor(m) < a {
            m += 1;
        }
        if floor(m) == a {
            return Decimal::new(m, k);
        }
    }
    unreachable!("20 decimal digits resolve every u64 byte count")
}

impl fmt::Display for Plan {
    /// The human report: device table, per-kind distribution, the two strings, warnings.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::render::render(self, f)
    }
}

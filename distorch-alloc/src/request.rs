//! What a plan is asked for: the allocation (expert string or virtual VRAM), the placement
//! order and the pinning policy.

use std::fmt;
use std::str::FromStr;

use crate::bytesize::ByteSize;
use crate::device::DeviceId;
use crate::error::Error;
use crate::spec::AllocSpec;

/// Which movable units go to which device, in execution order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PlacementOrder {
    /// Spread each device's units evenly through execution order (default).
    ///
    /// Every device picks units first-fit from a low-discrepancy (bit-reversed) permutation of
    /// execution order, so any share of the model is spread over the whole pass: each
    /// offloaded unit sits between resident ones, whose compute can hide its transfer.
    #[default]
    Interleave,
    /// The original's contiguous order: each device takes the next run of units in execution
    /// order (stopping at the first unit that does not fit), in the order the allocation names
    /// the devices; the `*` device takes what is left.
    Tail,
    /// Chosen by the clock: units are ranked by how little their transfer adds to the
    /// predicted step (units' compute times, the donor's link, the streamer's staging; see
    /// [`crate::cost`]); donors take the best-ranked, the compute device keeps the rest. Without
    /// compute times every transfer looks alike and the ranking favours large units.
    Auto,
}

impl PlacementOrder {
    /// Lower-case name as accepted by `FromStr`.
    pub fn name(self) -> &'static str {
        match self {
            PlacementOrder::Interleave => "interleave",
            PlacementOrder::Tail => "tail",
            PlacementOrder::Auto => "auto",
        }
    }
}

impl fmt::Display for PlacementOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Error for an unknown [`PlacementOrder`] name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown placement order `{0}` (expected interleave, tail or auto)")]
pub struct UnknownOrder(pub String);

impl FromStr for PlacementOrder {
    type Err = UnknownOrder;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "interleave" => Ok(PlacementOrder::Interleave),
            "tail" => Ok(PlacementOrder::Tail),
            "auto" => Ok(PlacementOrder::Auto),
            _ => Err(UnknownOrder(s.to_owned())),
        }
    }
}

/// Whether embedding tables may leave the compute device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EmbeddingPolicy {
    /// Keep every embedding table on the compute device (default: a lookup touches few rows,
    /// so streaming a whole table for it wastes bandwidth).
    #[default]
    Pinned,
    /// Treat embedding tables like weights.
    Movable,
}

/// Which units are pinned to the compute device. Norms and lone biases always are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PinPolicy {
    /// Units smaller than this stay on the compute device (default 64 KiB): moving them
    /// costs more in launch overhead than it saves.
    pub tiny_threshold: ByteSize,
    /// Embedding tables.
    pub embeddings: EmbeddingPolicy,
}

impl PinPolicy {
    /// The default tiny-unit threshold.
    pub const DEFAULT_TINY: ByteSize = ByteSize::kib(64);
}

impl Default for PinPolicy {
    fn default() -> Self {
        PinPolicy {
            tiny_threshold: PinPolicy::DEFAULT_TINY,
            embeddings: EmbeddingPolicy::Pinned,
        }
    }
}

/// Virtual VRAM: move `amount` of the model off `compute` onto `donors`, in order, each
/// capped by its free memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualVram {
    compute: DeviceId,
    amount: ByteSize,
    donors: Vec<DeviceId>,
}

impl VirtualVram {
    /// Largest virtual VRAM accepted, in GiB.
    pub const MAX_GIB: f64 = 1024.0;

    /// Checks the donors (none twice, not the compute device, at least one when `amount > 0`).
    pub fn new(
        compute: DeviceId,
        amount: ByteSize,
        donors: Vec<DeviceId>,
    ) -> Result<VirtualVram, Error> {
        if amount > ByteSize::ZERO && donors.is_empty() {
            return Err(Error::NoDonors { amount });
        }
        for (i, &d) in donors.iter().enumerate() {
            if d == compute {
                return Err(Error::DonorIsCompute { device: d });
            }
            if donors[..i].contains(&d) {
                return Err(Error::DuplicateDonor { device: d });
            }
        }
        Ok(VirtualVram {
            compute,
            amount,
            donors,
        })
    }

    /// Nothing moved: the whole model on `compute`.
    pub fn none(compute: DeviceId) -> VirtualVram {
        VirtualVram {
            compute,
            amount: ByteSize::ZERO,
            donors: Vec::new(),
        }
    }

    /// Like [`VirtualVram::new`] with the amount in GiB (0–1024, finite; rounded down to a
    /// whole byte).
    pub fn from_gib(
        compute: DeviceId,
        gib: f64,
        donors: Vec<DeviceId>,
    ) -> Result<VirtualVram, Error> {
        if !gib.is_finite() || !(0.0..=Self::MAX_GIB).contains(&gib) {
            return Err(Error::VirtualVramOutOfRange { gib });
        }
        let bytes = (gib * (1u64 << 30) as f64).floor() as u64;
        VirtualVram::new(compute, ByteSize(bytes), donors)
    }

    /// The compute device.
    pub fn compute(&self) -> DeviceId {
        self.compute
    }

    /// Bytes to move off the compute device.
    pub fn amount(&self) -> ByteSize {
        self.amount
    }

    /// Donors, in the order they are filled.
    pub fn donors(&self) -> &[DeviceId] {
        &self.donors
    }
}

/// The two ways to say how a model is split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allocation {
    /// An expert allocation string; `compute` overrides the default compute device (the
    /// first device of the string).
    Expert {
        /// The allocation.
        spec: AllocSpec,
        /// The compute device, if not the string's first device.
        compute: Option<DeviceId>,
    },
    /// Virtual VRAM.
    VirtualVram(VirtualVram),
    /// Block swap: a transformer's last blocks on a swap device.
    BlockSwap(crate::block_swap::BlockSwap),
}

/// Everything the planner needs besides the inventory and the device graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanRequest {
    /// How much goes where.
    pub allocation: Allocation,
    /// Which units go where.
    pub order: PlacementOrder,
    /// What stays on the compute device.
    pub pin: PinPolicy,
    /// The streamer's prefetch limits, for predictions and [`PlacementOrder::Auto`].
    pub staging: crate::cost::Staging,
}

impl PlanRequest {
    /// An expert-string request with default order and pinning.
    pub fn expert(spec: AllocSpec) -> PlanRequest {
        PlanRequest {
            allocation: Allocation::Expert {
                spec,
                compute: None,
            },
            order: PlacementOrder::default(),
            pin: PinPolicy::default(),
            staging: crate::cost::Staging::default(),
        }
    }

    /// A virtual-VRAM request with default order and pinning.
    pub fn virtual_vram(vv: VirtualVram) -> PlanRequest {
        PlanRequest {
            allocation: Allocation::VirtualVram(vv),
            order: PlacementOrder::default(),
            pin: PinPolicy::default(),
            staging: crate::cost::Staging::default(),
        }
    }

    /// A block-swap request (see [`crate::BlockSwap`]).
    pub fn block_swap(swap: crate::block_swap::BlockSwap) -> PlanRequest {
        PlanRequest {
            allocation: Allocation::BlockSwap(swap),
            order: PlacementOrder::default(),
            pin: PinPolicy::default(),
            staging: crate::cost::Staging::default(),
        }
    }

    /// The device this request computes on (an expert string's first device unless it names
    /// another); `None` for an empty expert string.
    pub fn compute(&self) -> Option<DeviceId> {
        match &self.allocation {
            Allocation::Expert {
                compute: Some(c), ..
            } => Some(*c),
            Allocation::Expert { spec, .. } => spec.entries().first().map(|e| e.device),
            Allocation::VirtualVram(vv) => Some(vv.compute()),
            Allocation::BlockSwap(b) => Some(b.compute),
        }
    }

    /// An expert-string request whose compute device is `compute` rather than the string's
    /// first device.
    pub fn expert_with_compute(spec: AllocSpec, compute: DeviceId) -> PlanRequest {
        PlanRequest {
            allocation: Allocation::Expert {
                spec,
                compute: Some(compute),
            },
            order: PlacementOrder::default(),
            pin: PinPolicy::default(),
            staging: crate::cost::Staging::default(),
        }
    }

    /// Sets the placement order.
    pub fn with_order(mut self, order: PlacementOrder) -> PlanRequest {
        self.order = order;
        self
    }

    /// Sets the pinning policy.
    pub fn with_pin(mut self, pin: PinPolicy) -> PlanRequest {
        self.pin = pin;
        self
    }
}

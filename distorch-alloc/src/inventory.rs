//! [`Inventory`]: what a model is made of, as the planner sees it.

use std::collections::HashSet;
use std::fmt;

use crate::bytesize::ByteSize;
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
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Unit {
    /// The unit's name: the common key prefix of its tensors (`...attn1.to_q`).
    pub name: String,
    /// Bytes of all its tensors as stored.
    pub bytes: ByteSize,
    /// Position in execution order (smaller runs earlier); ties keep insertion order.
    pub order: u32,
    /// What it is.
    pub kind: UnitKind,
}

impl Unit {
    /// A unit.
    pub fn new(name: impl Into<String>, bytes: ByteSize, order: u32, kind: UnitKind) -> Unit {
        Unit {
            name: name.into(),
            bytes,
            order,
            kind,
        }
    }
}

/// The placement units of one model component, sorted by execution order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    component: String,
    units: Vec<Unit>,
    total: ByteSize,
}

impl Inventory {
    /// An inventory for `component` (e.g. `unet`). Units are sorted by `order` (stable), names
    /// must be unique and the total must fit a `u64`.
    pub fn new(component: impl Into<String>, mut units: Vec<Unit>) -> Result<Inventory, Error> {
        let component = component.into();
        let mut seen = HashSet::with_capacity(units.len());
        let mut total = ByteSize::ZERO;
        for u in &units {
            if !seen.insert(u.name.as_str()) {
                return Err(Error::DuplicateUnit {
                    component,
                    name: u.name.clone(),
                });
            }
            total = total
                .checked_add(u.bytes)
                .ok_or_else(|| Error::InventoryTooLarge {
                    component: component.clone(),
                })?;
        }
        units.sort_by_key(|u| u.order);
        Ok(Inventory {
            component,
            units,
            total,
        })
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

    /// Sum of all units' bytes.
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

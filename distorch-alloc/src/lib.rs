//! The pure heart of distorch: allocation strings, device graphs, inventories and the planner.
//! No Burn, no GPU, no I/O — everything here can be decided before a tensor is touched.
//!
//! ```
//! use distorch_alloc::{AllocSpec, ByteSize, DeviceGraph, Inventory, PlanRequest, Unit, UnitKind};
//!
//! let units = (0..8)
//!     .map(|i| Unit::new(format!("block.{i}"), ByteSize::mib(100), i, UnitKind::Weight))
//!     .collect();
//! let inventory = Inventory::new("unet", units).unwrap();
//! let graph: DeviceGraph = "cuda:0=8gib,cpu=32gib".parse().unwrap();
//! let spec: AllocSpec = "cuda:0,300mb;cpu,*".parse().unwrap();
//! let plan = distorch_alloc::plan(&PlanRequest::expert(spec), &inventory, &graph).unwrap();
//! assert_eq!(plan.devices()[0].model_bytes, ByteSize::mib(300));
//! assert_eq!(plan.bytes_string(), "cuda:0,300mib;cpu,*");
//! println!("{plan}");
//! ```
//!
//! # Allocation strings
//!
//! Parsing is two stages: text → [`syntax::AllocAst`] (spans kept) → [`AllocSpec`]. Every
//! error is a [`ParseError`] that renders the input with a caret under the fault.
//!
//! - Grammar: `ENTRY (';' ENTRY)*` with `ENTRY = DEVICE ',' VALUE`. Whitespace around tokens
//!   is allowed, one trailing `;` is allowed, and the empty string means "no expert
//!   allocation" ([`AllocSpec::is_empty`]). Any other empty entry (`;;`) is an error.
//! - Devices: `cpu`, `cuda:N`, `wgpu:N`, `vulkan:N`, `metal:N`, `rocm:N`. The kind is
//!   case-insensitive and displayed in lower case; a GPU without an index is `:0`; `cpu` has
//!   only index 0. Unknown kinds and non-numeric indices are errors.
//! - Values. The kind of a value is decided by the value alone, never by the device name:
//!   - bytes: a decimal number and a unit from `b k kb kib m mb mib g gb gib t tb tib`
//!     (case-insensitive; whitespace between number and unit allowed). Multiples are binary,
//!     as in DisTorch2: `1gb` = 2^30 bytes. Fractional bytes are rounded down. An unknown unit
//!     (`1tx`, `1e9`) is an error, never silently 1 byte.
//!   - ratio: a number and `%`.
//!   - fraction: a bare number from 0 to 1, a share of the device's *total* memory.
//!   - `*`: whatever the other entries leave.
//! - One string uses one mode (bytes, ratio or fraction) plus at most one `*`. Mixing modes,
//!   a second `*`, the same device twice (`cuda` and `cuda:0` are the same device), negative
//!   numbers, `nan`/`inf`, a fraction above 1 and numbers of more than 24 digits are errors.
//! - Ratios without `*` are normalised by their sum (`cuda:0,1%;cpu,3%` is a 1:3 split, as
//!   llama.cpp's tensor split); a sum of 0 is an error. With `*`, ratios are percentages of the
//!   model and `*` takes what is left; it is an error if they already reach 100%.
//!
//! # Virtual VRAM
//!
//! [`VirtualVram`] is its own input: a compute device, an amount (0–1024 GiB) and donors in
//! order. It moves that many bytes of the model (at most its movable part) off the compute
//! device onto the donors, filling each in order up to its free memory. If the donors cannot
//! absorb it, [`Error::DonorsTooSmall`] says how much is missing.
//!
//! # Planning rules
//!
//! See [`plan()`] for the steps. In short:
//! - The compute device is the request's, or the expert string's first device.
//! - Norms, lone biases, embedding tables (by [`PinPolicy`]) and units under the tiny
//!   threshold (default 64 KiB) are pinned to the compute device and count against its quota
//!   first. If they alone exceed it, the plan carries [`Warning::PinnedOverQuota`]: the only
//!   case in which a quota is exceeded, and only on the compute device.
//! - Quotas are exact upper bounds: a device never receives more than its quota (ratios and
//!   fractions are converted to bytes, rounding down) nor more than its free memory (a quota
//!   above it is capped, with a warning). What the quotas leave goes to the `*` device; with
//!   no `*`, to `cpu` (appended and reported) in bytes and fraction modes, or to the last
//!   entry in ratio mode. When `cpu` is named with a quota and there is no `*`, leftovers are
//!   an error ([`Error::Unplaced`]) rather than a silently exceeded quota.
//! - Units are dealt in a documented [`PlacementOrder`]: `interleave` (default) spreads each
//!   device's share evenly through execution order; `tail` deals contiguous runs as the
//!   original does.
//! - [`Plan::bytes_string`] and [`Plan::fraction_string`] reproduce the same placement exactly
//!   when fed back as expert allocations with the same graph, compute device, order and
//!   pinning (property-tested).

#![deny(missing_docs)]

mod auto;
mod block_swap;
mod bytesize;
pub mod cost;
mod device;
mod error;
mod graph;
mod inventory;
pub mod number;
mod plan;
mod planner;
mod render;
mod request;
mod spec;
pub mod syntax;

pub use block_swap::{BlockList, BlockSwap};
pub use bytesize::{ByteSize, UNITS};
pub use cost::{Prediction, Staging};
pub use device::{DeviceId, DeviceKind, parse_device_list};
pub use error::{Error, Grammar, ParseError, ParseErrorKind};
pub use graph::{DeviceGraph, DeviceInfo};
pub use inventory::{DtypeLabels, Inventory, Unit, UnitKind};
pub use plan::{DeviceRow, PlacedUnit, Plan, Quota, Role, Warning};
pub use planner::plan;
pub use request::{
    Allocation, EmbeddingPolicy, PinPolicy, PlacementOrder, PlanRequest, UnknownOrder, VirtualVram,
};
pub use spec::{AllocSpec, Entry, Mode, Value, parse_byte_size};

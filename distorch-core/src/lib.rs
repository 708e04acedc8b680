//! distorch's file-level core: safetensors indexes read from headers only, dtypes, components
//! (split by conventions the model crate gives) and the planner's inventories.
//!
//! ```no_run
//! use distorch_core::components::{self, Conventions};
//! use distorch_core::{SafetensorsIndex, units};
//!
//! let index = SafetensorsIndex::open("model.safetensors")?;
//! // distorch-core knows no model: `distorch_models::load::CONVENTIONS` knows the families.
//! for component in components::split(&index, &Conventions::NONE).components {
//!     let inventory = units::inventory(&component)?;
//!     println!("{}: {} units, {}", component.kind, inventory.len(), inventory.total_bytes());
//! }
//! # Ok::<(), distorch_core::Error>(())
//! ```
//!
//! [`runtime`] (feature `runtime`, on by default) holds the weight store, Load-Patch-Distribute
//! loading, the streamer and the model cache; [`memory`] the trait hardware probes implement.

#![deny(missing_docs)]

pub mod components;
mod dtype;
mod error;
pub mod format;
pub mod gguf;
pub mod home;
pub mod memory;
pub mod quant;
#[cfg(feature = "runtime")]
pub mod runtime;
pub mod safetensors;
pub mod units;

pub use components::{Component, ComponentKind, Split};
pub use dtype::DType;
pub use error::Error;
pub use format::Format;
pub use home::{ComputeDtype, DeviceForm, DeviceRule, Homes};
pub use memory::{DeviceMemory, MemoryProbe};
pub use safetensors::{SafetensorsIndex, TensorInfo, write_random};

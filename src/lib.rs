//! distorch runs diffusion models on machines whose GPU is too small for them: it splits a
//! model's weights across devices — the compute GPU keeps what fits, donors (CPU RAM, other
//! GPUs) hold the rest — and streams them to the compute device just in time.
//!
//! This facade re-exports the workspace's crates. What works today is everything that can be
//! decided before a tensor is touched: allocation strings, device graphs, header-only file
//! indexes and exact, explainable placement plans.
//!
//! ```no_run
//! use distorch::{ComponentKind, PlanRequest, SafetensorsIndex};
//!
//! let index = SafetensorsIndex::open("v1-5-pruned-emaonly.safetensors")?;
//! let unet = distorch::core::components::inventory_for(&index, ComponentKind::Unet)?;
//! let request = PlanRequest::expert("cuda:0,2.5gb;cpu,*".parse()?);
//! let plan = distorch::plan(&request, &unet, &"cuda:0=8gib,cpu=32gib".parse()?)?;
//! println!("{plan}");
//! # Ok::<(), distorch::Error>(())
//! ```
//!
//! Crates: [`alloc`] (grammar, device graph, planner), [`core`] (file indexes, dtypes,
//! inventories), [`backends`] (compiled Burn backends, host memory), [`lora`] and [`models`]
//! (arrive with later work; see their docs).

#![deny(missing_docs)]

pub use distorch_alloc as alloc;
pub use distorch_backends as backends;
pub use distorch_core as core;
pub use distorch_lora as lora;
pub use distorch_models as models;

pub use distorch_alloc::{
    AllocSpec, ByteSize, DeviceGraph, DeviceId, Inventory, PlacementOrder, Plan, PlanRequest,
    VirtualVram, plan,
};
pub use distorch_core::{ComponentKind, DType, SafetensorsIndex};

/// Any error from the distorch crates, so `?` works across them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// From planning, or a string that did not parse.
    #[error(transparent)]
    Alloc(#[from] distorch_alloc::Error),
    /// From reading a file or building an inventory.
    #[error(transparent)]
    Core(#[from] distorch_core::Error),
}

impl From<distorch_alloc::ParseError> for Error {
    fn from(e: distorch_alloc::ParseError) -> Self {
        Error::Alloc(e.into())
    }
}

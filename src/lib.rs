//! distorch runs diffusion models on machines whose GPU is too small for them: it splits a
//! model's weights across devices — the compute GPU keeps what fits, donors (CPU RAM, other
//! GPUs) hold the rest — and streams them to the compute device just in time.
//!
//! This facade re-exports the workspace's crates: allocation strings, device graphs and exact,
//! explainable placement plans; the weight store that loads a model where its plan says and
//! streams offloaded weights to the compute device; Stable Diffusion's models (SD 1.x/2.x,
//! SDXL, ControlNet, CLIP Vision) and a txt2img pipeline over them, Wan 2.1 text to video,
//! FLUX.1 text to image; LoRAs. See `examples/txt2img.rs` and `examples/flux.rs` for the
//! whole flow.
//!
//! An image from a checkpoint in one load and one call, the UNet under an allocation string
//! and a LoRA patched in (the README's example; `examples/txt2img.rs` runs it):
//!
//! ```no_run
//! use distorch::models::sd::pipeline::to_rgb8;
//! use distorch::models::{CheckpointOptions, LoraSpec, ModelFolders, StableDiffusion};
//! use distorch::{DeviceId, PlanRequest};
//! type B = distorch::backends::NdArray; // or Wgpu, Cuda (their features)
//!
//! let (cpu, device) = (DeviceId::CPU, Default::default());
//! let mut options = CheckpointOptions::<B>::new(distorch::backends::detect().graph, cpu, device, device)?;
//! options.unet.request = PlanRequest::expert_with_compute("cpu,*".parse()?, cpu);
//! options.loras.push(LoraSpec::parse("detail.safetensors:0.8", &ModelFolders::new())?);
//! let sd = StableDiffusion::<B>::load("v1-5-pruned-emaonly.safetensors", &options)?;
//! println!("{}", sd.loaded[0].1); // the UNet's allocation table
//! let mut request = sd.request("a red fox in the snow"); // the pipeline's own scheduler
//! (request.steps, request.width, request.height) = (20, 512, 512);
//! let image = sd.generate(&request, &mut |_| {})?.image; // its own tokenizers
//! to_rgb8(image)?.save("fox.png").map_err(|e| e.to_string())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Planning alone, from the header:
//!
//! ```no_run
//! use distorch::{ComponentKind, PlanRequest, SafetensorsIndex};
//!
//! let index = SafetensorsIndex::open("v1-5-pruned-emaonly.safetensors")?;
//! let unet = distorch::models::load::inventory_for(&index, ComponentKind::Unet)?;
//! let request = PlanRequest::expert("cuda:0,2.5gb;cpu,*".parse()?);
//! let plan = distorch::plan(&request, &unet, &"cuda:0=8gib,cpu=32gib".parse()?)?;
//! println!("{plan}");
//! # Ok::<(), distorch::Error>(())
//! ```
//!
//! A FLUX.1 image from a diffusers folder, each component placed by its own options (here
//! all on the CPU; a GPU compute device with `PlanRequest`s, block swap or virtual VRAM per
//! component is the same call):
//!
//! ```no_run
//! use distorch::models::flux::load::{FluxFiles, FluxOptions};
//! use distorch::models::flux::pipeline::{Flux, FluxTxt2Img};
//! use distorch::models::{ComponentOptions, Placement};
//! type B = distorch::backends::NdArray;
//!
//! let options = ComponentOptions::<B>::new(
//!     "cpu=32gib".parse()?,
//!     Placement::on("cpu".parse()?, Default::default()),
//! );
//! let files = FluxFiles::diffusers("FLUX.1-schnell")?;
//! let (flux, plans) = Flux::load(&files, &FluxOptions::all(options))?;
//! println!("{}", plans.transformer);
//! let mut request = FluxTxt2Img::<B>::new("a red fox in the snow");
//! (request.steps, request.max_sequence_length) = (4, 256);
//! let image = flux.txt2img(&request, &mut |_| {})?.image;
//! let _rgb = distorch::models::sd::pipeline::to_rgb8(image)?;
//! # Ok::<(), distorch::Error>(())
//! ```
//!
//! Crates: [`alloc`] (grammar, device graph, planner), [`core`] (file indexes, dtypes,
//! inventories, the weight store and streamer), [`backends`] (compiled Burn backends, memory
//! probes), [`models`] (the models, their loaders, the tokenizer, samplers and the txt2img
//! pipeline) and [`lora`] (LoRA files and patching).

#![deny(missing_docs)]

pub use distorch_alloc as alloc;
pub use distorch_backends as backends;
pub use distorch_core as core;
pub use distorch_lora as lora;
pub use distorch_models as models;

pub use distorch_alloc::{
    AllocSpec, BlockSwap, ByteSize, DeviceGraph, DeviceId, Inventory, PlacementOrder, Plan,
    PlanRequest, VirtualVram, plan,
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
    /// From loading or running a model.
    #[error(transparent)]
    Models(#[from] distorch_models::Error),
    /// From reading or mapping a LoRA.
    #[error(transparent)]
    Lora(#[from] distorch_lora::Error),
    /// From binding a device id to a compiled Burn backend.
    #[error(transparent)]
    Backends(#[from] distorch_backends::Error),
}

/// Binds `id` to the Burn device of backend `B` that it names (see [`backends::device`]), in
/// the form [`models::PlacementSpec::placement`] takes: a text encoder's placement on
/// `cuda:1` beside a UNet computing on `cuda:0` is
/// `spec.placement::<B>(compute, &device, &distorch::bind_device::<B>)`.
pub fn bind_device<B: burn::tensor::backend::Backend>(
    id: DeviceId,
) -> Result<B::Device, Box<dyn std::error::Error + Send + Sync>> {
    distorch_backends::device::<B>(id).map_err(Into::into)
}

impl From<distorch_alloc::ParseError> for Error {
    fn from(e: distorch_alloc::ParseError) -> Self {
        Error::Alloc(e.into())
    }
}

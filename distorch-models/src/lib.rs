//! Model definitions for distorch, generic over Burn backends, with weights fetched through
//! distorch-core's streamer, so every model runs whatever its placement.
//!
//! So far: the CLIP text encoder ([`clip`]) and its tokenizer ([`tokenizer`]), the CLIP
//! vision encoder ([`clip_vision`]) and its image preprocessing ([`clip_image`]), against
//! transformers; the UNet ([`unet`], SD 1.x/2.x and SDXL), the ControlNet ([`controlnet`]),
//! the VAE ([`vae`]) and the samplers ([`scheduler`]), against diffusers; all tested on tiny
//! random configurations in both key layouts. [`load_model`] loads any of them with its own
//! allocation, [`checkpoint`] a whole Stable Diffusion checkpoint. Wan 2.1 video: the UMT5
//! encoder ([`umt5`]) and its tokenizer ([`t5_tokenizer`]), the transformer ([`wan_dit`]),
//! the VAE ([`wan_vae`]), the flow-matching sampler ([`flow_match`]) and text to video
//! ([`wan_pipeline`]), against transformers / diffusers the same way.
//!
//! Compute is f32 on every backend; weights of any float dtype are widened when they reach
//! the compute device (see `distorch_core::runtime`).

#![deny(missing_docs)]

pub mod attention;
pub mod checkpoint;
pub mod clip;
pub mod clip_image;
mod clip_keys;
pub mod clip_vision;
mod config;
pub mod controlnet;
pub mod discovery;
mod error;
pub mod flow_match;
mod folder;
mod fused;
mod host;
mod host_gemm;
mod host_math;
mod keymap;
pub mod loader;
mod nn;
pub mod pipeline;
pub mod scheduler;
pub mod t5_tokenizer;
pub mod tokenizer;
pub mod umt5;
pub mod unet;
mod unet_config;
pub mod unet_ldm;
mod unet_trunk;
pub mod vae;
pub mod wan_dit;
mod wan_keys;
pub mod wan_pipeline;
mod wan_rope;
pub mod wan_vae;
mod wan_vae_blocks;

pub use checkpoint::{CheckpointOptions, LoraSpec, Placement, StableDiffusion, text_encoders};
pub use clip::{ClipTextConfig, ClipTextModel, ClipTextOutput};
pub use clip_keys::ClipLayout;
pub use clip_vision::{ClipVisionConfig, ClipVisionModel, ClipVisionOutput};
pub use controlnet::{ControlNetConfig, ControlNetInput, ControlNetModel, ControlNetOutput};
pub use discovery::{ModelFolders, ModelKind};
pub use error::Error;
pub use folder::ComponentFiles;
pub use keymap::KeyLayout;
pub use loader::{
    ComponentLoras, ComponentOptions, LoadProgress, Loaded, Model, Models, compute_dtype,
    load_cached, load_component, load_model, lora_patch,
};
pub use nn::Activation;
pub use pipeline::{Control, Generated, Progress, Txt2Img};
pub use scheduler::{SamplerKind, Scheduler, SchedulerConfig};
pub use tokenizer::ClipTokenizer;
pub use unet::{Unet2dCondition, UnetInput};
pub use unet_config::{PerBlock, UnetConfig};
pub use unet_ldm::DetectedUnet;
pub use vae::{AutoencoderKl, VaeConfig};

//! Model definitions for distorch, generic over Burn backends, with weights fetched through
//! distorch-core's streamer, so every model runs whatever its placement.
//!
//! One folder per model family, one for what they share:
//!
//! | module | what it holds |
//! |---|---|
//! | [`nn`] | an architecture described once (expected tensors, execution order, layer handles), weights fetched through the streamer, layers, [`nn::attention`], host kernels |
//! | [`load`] | the [`Model`] trait and [`LoadContext`], [`load_model`] / [`load_component`] / [`load_cached`], the file conventions ([`load::CONVENTIONS`], [`load::split`]), key maps, `config.json`, diffusers folders, [`load::discovery`] |
//! | [`text`] | CLIP text encoder and tokenizer, UMT5 and its tokenizer |
//! | [`vision`] | CLIP Vision and CLIP's image preprocessing |
//! | [`sd`] | Stable Diffusion 1.x/2.x/SDXL: UNet, ControlNet, VAE, checkpoints, txt2img |
//! | [`wan`] | Wan 2.1: transformer, VAE, text to video |
//! | [`flux`] | FLUX.1: transformer, text to image |
//! | [`sampling`] | SD schedulers, flow-matching Euler |
//!
//! Each model matches diffusers / transformers on tiny random configurations in both key
//! layouts, resident and offloaded. A model computes in f32, f16 or bf16 (its store's compute
//! dtype); weights of any float dtype are cast when they reach the compute device (see
//! `distorch_core::runtime`).

#![deny(missing_docs)]

mod error;
pub mod flux;
pub mod load;
pub mod nn;
pub mod sampling;
pub mod sd;
pub mod text;
pub mod vision;
pub mod wan;

pub use error::Error;
pub use load::discovery::{ModelFolders, ModelKind};
pub use load::folder::ComponentFiles;
pub use load::keymap::KeyLayout;
pub use load::{
    ComponentLoras, ComponentOptions, LoadContext, LoadProgress, Loaded, Model, Models,
    compute_dtype, load_cached, load_component, load_model, lora_patch,
};
pub use load::{Placement, PlacementSpec};
pub use nn::Activation;
pub use sampling::scheduler::{
    BetaSchedule, PredictionType, SamplerKind, Scheduler, SchedulerConfig, TimestepSpacing,
};
pub use sd::checkpoint::{CheckpointOptions, LoraSpec, StableDiffusion};
pub use sd::controlnet::{ControlNetConfig, ControlNetInput, ControlNetModel, ControlNetOutput};
pub use sd::pipeline::{Control, Generated, Progress, Txt2Img};
pub use sd::unet::config::{PerBlock, UnetConfig};
pub use sd::unet::ldm::DetectedUnet;
pub use sd::unet::{Unet2dCondition, UnetInput};
pub use sd::vae::{AutoencoderKl, VaeConfig};
pub use text::clip::{ClipTextConfig, ClipTextModel, ClipTextOutput};
pub use text::clip_keys::ClipLayout;
pub use text::text_encoders;
pub use text::tokenizer::ClipTokenizer;
pub use vision::clip_vision::{ClipVisionConfig, ClipVisionModel, ClipVisionOutput};

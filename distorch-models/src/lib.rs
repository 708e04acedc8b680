//! Model definitions for distorch, generic over Burn backends, with weights fetched through
//! distorch-core's streamer, so every model runs whatever its placement.
//!
//! So far: the CLIP text encoder ([`clip`], against transformers) and the VAE ([`vae`],
//! against diffusers), both tested on tiny random configurations, diffusers/transformers key
//! layouts. UNet, ControlNet, CLIP Vision, T5/UMT5 and Wan arrive with later work.
//!
//! Compute is f32 on every backend; weights of any float dtype are widened when they reach
//! the compute device (see `distorch_core::runtime`).

#![deny(missing_docs)]

pub mod clip;
mod config;
mod error;
mod nn;
pub mod vae;

pub use clip::{ClipTextConfig, ClipTextModel, ClipTextOutput};
pub use error::Error;
pub use nn::Activation;
pub use vae::{AutoencoderKl, VaeConfig};

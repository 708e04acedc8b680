//! Wan 2.1 video: the transformer, the VAE and text to video.

pub mod dit;
pub(crate) mod keys;
pub mod pipeline;
pub(crate) mod rope;
pub mod vae;

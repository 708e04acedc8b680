//! Wan 2.1 video: the transformer, the VAE, text to video, and loading the pipeline in one
//! call.

pub mod demo;
pub mod dit;
pub(crate) mod keys;
pub mod load;
pub mod pipeline;
pub(crate) mod rope;
pub mod vae;

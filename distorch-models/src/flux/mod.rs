//! FLUX.1: the transformer (diffusers' and BFL's layouts), text to image, and loading a
//! pipeline from the files users keep. Its text encoders
//! are CLIP-L ([`crate::text::clip`], the pooled output) and T5-XXL ([`crate::text::umt5`], the
//! T5 v1.1 variant); its VAE is [`crate::sd::vae`]'s `AutoencoderKL` with 16 latent channels.

pub mod demo;
pub mod dit;
pub(crate) mod keys;
pub mod load;
pub mod pipeline;

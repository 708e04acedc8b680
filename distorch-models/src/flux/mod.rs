//! FLUX.1: the transformer (diffusers' and BFL's layouts). Its text encoders are CLIP-L
//! ([`crate::text::clip`], the pooled output) and T5-XXL ([`crate::text::umt5`], the T5 v1.1
//! variant).

pub mod dit;
pub(crate) mod keys;

//! Model definitions for distorch (CLIP, T5/UMT5, UNet, DiT, VAE, ControlNet, CLIP Vision),
//! generic over Burn backends, with weights fetched through the streamer.
//!
//! **Not implemented yet.** This crate is reserved in the workspace so its place in the
//! dependency graph is fixed; it exposes nothing until the model work lands.

#![deny(missing_docs)]

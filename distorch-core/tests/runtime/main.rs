//! The runtime end to end: weight store, homes, Load-Patch-Distribute and the streamer, with
//! compute on ndarray, on wgpu (`cargo test-wgpu`) or on CUDA (`cargo test-cuda`); one test
//! binary so GPU builds link once.

#![cfg(feature = "runtime")]

mod common;
mod dtypes;
mod gguf;
mod homes;
mod repatch;
mod runtime;

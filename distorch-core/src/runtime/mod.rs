//! The runtime: weights at their planned homes ([`WeightStore`]), loaded by
//! Load-Patch-Distribute, and streamed to the compute device ([`Streamer`]).
//!
//! Generic over `B: burn::tensor::backend::Backend`; the same code runs on ndarray, wgpu and
//! cuda. Compute is f32.
//!
//! Homes (see [`WeightStore::load`]):
//!
//! | home | held as | reaches the compute device by |
//! |---|---|---|
//! | compute device | f32 tensor | nothing (resident) |
//! | GPU donor (same backend) | f32 tensor | a device-to-device copy when fetched (CUDA), or read back on the prefetch thread and uploaded (wgpu) |
//! | `cpu`, unchanged by loading | the file's bytes, borrowed from the memory map | widened to f32 on the prefetch thread, uploaded |
//! | `cpu`, patched | an owned copy in the file's dtype (fp8 → bf16, or fp8 by stochastic rounding with [`PatchPrecision::Fp8Stochastic`]; f64 → f32) | the same |
//!
//! Every float dtype a file may hold (f32, f16, bf16, f8_e4m3fn, f8_e5m2, f64) is widened to
//! f32 on the host, so backends without f16 (ndarray) need nothing more; host homes keep the
//! narrow dtype, so an f16 model offloaded to `cpu` costs its file size in RAM, not twice
//! that. Not done yet: f16/bf16 compute, and page-locked (pinned) staging buffers — Burn
//! 0.21's `Backend::staging` exists for CUDA but is unverified here without a GPU.

mod cache;
mod decode;
mod device;
mod fp8;
mod host;
mod load;
mod repatch;
mod store;
mod stream;

pub use cache::{EjectPolicy, ModelCache};
pub use device::{device_rule, supports_compute};
pub use fp8::PatchPrecision;

/// A tensor's raw little-endian bytes of a float `dtype` widened to f32 (`None` for integer
/// and boolean dtypes, or a length that is not a whole number of elements).
pub fn decode_f32(dtype: crate::DType, bytes: &[u8]) -> Option<Vec<f32>> {
    decode::to_f32(dtype, bytes).ok()
}
pub use store::{
    DeviceMap, DonorCopy, ExpectedTensor, LoadOptions, LoadReport, ShapeMismatch, StoredTensor,
    StoredUnit, WeightPatch, WeightStore,
};
pub use stream::{ExecutionOrder, Lookahead, StreamStats, Streamer, UnitWeights};

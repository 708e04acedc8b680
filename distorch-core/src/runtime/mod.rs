//! The runtime: weights at their planned homes ([`WeightStore`]), loaded by
//! Load-Patch-Distribute, and streamed to the compute device ([`Streamer`]).
//!
//! Generic over `B: burn::tensor::backend::Backend`; the same code runs on ndarray, wgpu and
//! cuda.
//!
//! **One number per unit.** A unit's bytes are the bytes it occupies at its home in the dtype
//! it has there; the plan ([`crate::units::inventory_with`] with this backend's
//! [`device_rule`]), the [`LoadReport`], [`WeightStore::bytes_per_device`] and the streamer's
//! [`StreamStats::bytes_moved`] all say that number, and loading refuses a plan that counted
//! a unit otherwise ([`crate::Error::PlanMismatch`]).
//!
//! | home | held as | reaches the compute device by |
//! |---|---|---|
//! | compute device | the file's dtype on GPU backends (f32, f16, bf16; fp8 packed four to an `i32` word; GGUF quantized blocks packed as `i32` words); f32 on ndarray | nothing (resident): cast (fp8: decoded; GGUF: dequantized with Burn integer ops) to the compute dtype when fetched, the wide copy dropped with the fetch |
//! | GPU donor (same backend) | the same | a device-to-device copy when fetched (CUDA), or read back on the prefetch thread and uploaded (wgpu) |
//! | `cpu`, unchanged by loading | the file's bytes, borrowed from the memory map | a zero-copy view (pages touched on the prefetch thread), uploaded in its dtype; widened to f32 on the host only for ndarray |
//! | `cpu`, patched | an owned copy in the file's dtype (fp8 → bf16, or fp8 by stochastic rounding with [`PatchPrecision::Fp8Stochastic`]; GGUF quantized → the compute dtype; f64 → f32) | the same |
//!
//! Weights are cast (or fp8 decoded) to the compute dtype ([`LoadOptions::compute`], f32 by
//! default) on the compute device right before use; the cast copy is dropped with the fetch.
//! f64 weights are held as f32 at device homes. Not done yet: uploads issued from the
//! prefetch thread on CUDA's own stream (they are enqueued on the compute thread on every
//! backend; see the streamer).

mod backend;
mod cache;
mod decode;
mod dequant;
mod device;
mod fp8;
mod host;
mod load;
mod order;
mod profile;
mod repatch;
mod reshape;
mod staging;
mod store;
mod stream;

pub use backend::{Capabilities, DonorCopy, UploadThread, upload_rate};
pub use cache::{EjectPolicy, ModelCache};
pub use device::{compute_burn_dtype, device_rule, move_to, supports_compute};
pub use fp8::PatchPrecision;

/// A tensor's raw little-endian bytes of a float `dtype` widened to f32 (`None` for integer
/// and boolean dtypes, or a length that is not a whole number of elements).
pub fn decode_f32(dtype: crate::DType, bytes: &[u8]) -> Option<Vec<f32>> {
    decode::to_f32(dtype, bytes).ok()
}
/// f32 values encoded little-endian in `dtype` (f16 or bf16, rounding to nearest; f32 for any
/// other dtype): the inverse of [`decode_f32`] for the types weights are written in.
pub fn encode_f32(values: &[f32], dtype: crate::DType) -> Vec<u8> {
    host::encode(values, dtype)
}

pub use store::{
    DeviceMap, ExpectedTensor, LoadOptions, LoadReport, ShapeMismatch, StoredTensor, StoredUnit,
    WeightPatch, WeightStore,
};
pub use stream::{ExecutionOrder, Lookahead, StreamStats, Streamer, UnitWeights};

//! The runtime: weights at their planned homes ([`WeightStore`]), loaded by
//! Load-Patch-Distribute, and streamed to the compute device ([`Streamer`]).
//!
//! Generic over `B: burn::tensor::backend::Backend`. Compute is f32: every stored float dtype
//! (f32, f16, bf16, f8_e4m3fn, f8_e5m2, f64) is widened to f32 on the host when loaded, which
//! also covers backends without f16 (ndarray). Homes supported so far: the compute device, and
//! host memory (`cpu`) as an owned f32 copy; GPU donors, zero-copy memory-mapped host storage,
//! pinned memory and storage dtypes other than f32 are not implemented yet.

mod cache;
mod decode;
mod store;
mod stream;

pub use cache::{EjectPolicy, ModelCache};
pub use store::{LoadReport, StoredTensor, StoredUnit, WeightPatch, WeightStore};
pub use stream::{Lookahead, StreamStats, Streamer, UnitWeights};

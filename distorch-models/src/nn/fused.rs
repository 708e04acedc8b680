//! Burn's fused (flash) attention kernel on the CubeCL backends (wgpu, CUDA): cubek's
//! attention, scores kept in registers and shared memory a tile at a time with an online
//! softmax in f32 accumulators, so no score matrix is ever written to device memory.
//!
//! Only for f16 inputs: cubek-attention 0.2's routines hold queries, keys, values and the
//! softmax probabilities in **f16 tiles** whatever the input dtype (`routines/unit.rs`: the
//! tile type is f16, only the accumulators follow `AccumulatorPrecision`), so at f32 it is
//! f16-accurate (errors of 3e-4 relative, measured: far outside f32 rounding), and at bf16 its
//! tiles would overflow where bf16 does not. f16 models lose nothing by it (their inputs are
//! f16 already; PyTorch's f16 flash attention keeps its probabilities in f16 too). f32 and
//! bf16 attention take the blocked path.
//!
//! Burn 0.21's `module::attention` picks its kernel by autotune; without Burn's `autotune`
//! feature (this workspace builds Burn without it, so that every run computes with the same
//! kernels) it falls back to the unfused path, which materializes all `[batch, heads, n, n]`
//! scores. This module calls the fused kernel directly, with one fixed strategy per runtime,
//! for the unmasked attention of the image and video models (their masks, CLIP's causal one
//! and T5's padding, are on sequences of at most a few hundred tokens and take the blocked
//! path). Where the kernel refuses a problem (a head width or a launch size the device cannot
//! take), the caller runs the blocked path.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

/// Unmasked attention of `q`, `k`, `v` ([batch, heads, seq, head_dim], the default scale
/// 1/√head_dim) with the fused kernel, or `None` where it does not apply: another dtype than
/// f16, another backend, or a problem the kernel refuses.
pub(crate) fn attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
) -> Option<Tensor<B, 4>> {
    if [q, k, v].iter().any(|t| t.dtype() != DType::F16) {
        return None;
    }
    #[cfg(feature = "wgpu")]
    if let Some(out) = cube::attention::<B, burn::backend::wgpu::WgpuRuntime>(q, k, v) {
        return Some(out);
    }
    #[cfg(feature = "cuda")]
    if let Some(out) = cube::attention::<B, burn_cubecl::cubecl::cuda::CudaRuntime>(q, k, v) {
        return Some(out);
    }
    let _ = (q, k, v);
    None
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod cube {
    use std::any::Any;

    use burn::tensor::backend::Backend;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Tensor, TensorPrimitive};
    use burn_cubecl::CubeRuntime;
    use burn_cubecl::kernel::attention::{AttentionStrategy, attention as launch};
    use burn_cubecl::tensor::CubeTensor;

    /// The fused kernel on runtime `R`, when `B`'s tensors are `R`'s.
    pub(super) fn attention<B: Backend, R: CubeRuntime>(
        q: &Tensor<B, 4>,
        k: &Tensor<B, 4>,
        v: &Tensor<B, 4>,
    ) -> Option<Tensor<B, 4>> {
        let (q, k, v) = (
            primitive::<B, R>(q)?,
            primitive::<B, R>(k)?,
            primitive::<B, R>(v)?,
        );
        match launch::<R>(
            q,
            k,
            v,
            None,
            None,
            AttentionModuleOptions::default(),
            AttentionStrategy::FlashUnit,
        ) {
            Ok(out) => tensor::<B, _>(out),
            Err(error) => {
                tracing::debug!(?error, "fused attention refused; blocked attention instead");
                None
            }
        }
    }

    /// `t`'s primitive as `R`'s tensor, when it is one.
    fn primitive<B: Backend, R: CubeRuntime>(t: &Tensor<B, 4>) -> Option<CubeTensor<R>> {
        let TensorPrimitive::Float(p) = t.clone().into_primitive() else {
            return None;
        };
        let boxed: Box<dyn Any> = Box::new(p);
        boxed.downcast::<CubeTensor<R>>().ok().map(|t| *t)
    }

    /// `primitive` as `B`'s float tensor, when it is `B`'s primitive type.
    fn tensor<B: Backend, P: 'static>(primitive: P) -> Option<Tensor<B, 4>> {
        let boxed: Box<dyn Any> = Box::new(primitive);
        let p = *boxed.downcast::<B::FloatTensorPrimitive>().ok()?;
        Some(Tensor::from_primitive(TensorPrimitive::Float(p)))
    }
}

//! Building blocks shared by the models: weights fetched through the streamer, linear layers,
//! layer norm, activations (attention is in the `attention` module).
//!
//! **Dtypes.** A model computes in its store's compute dtype (f32, f16 or bf16): its forward
//! casts the inputs to it on entry (`Weights::input`) and its outputs to f32 on exit
//! (`Weights::output`); fetched weights already arrive in it. Matrix products and
//! convolutions run in the compute dtype; what PyTorch keeps in f32 at half precision stays in
//! f32 here: norm statistics and affine (group, layer, RMS), softmax and its mask, the
//! activations (PyTorch computes elementwise kernels in f32 and stores the half result),
//! timestep and RoPE tables. At f32 every one of these is the identity.

pub mod attention;
mod fused;
pub(crate) mod host;
pub(crate) mod rope;
pub(crate) mod spec;

use burn::tensor::activation::{gelu, sigmoid};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use distorch_core::runtime::{Streamer, UnitWeights, compute_burn_dtype};

use crate::error::Error;

/// A model's view of its weights: the units its [`spec::Spec`] declared, fetched just in
/// time through the streamer.
pub(crate) struct Weights<'a, B: Backend> {
    streamer: &'a Streamer<B>,
}

/// One unit's tensors, with typed errors for what is missing.
pub(crate) struct Unit<B: Backend> {
    key: spec::UnitKey,
    weights: UnitWeights<B>,
}

impl<B: Backend> Unit<B> {
    pub(crate) fn get<const D: usize>(&self, param: &str) -> Result<Tensor<B, D>, Error> {
        self.weights
            .get::<D>(param)
            .ok_or_else(|| Error::MissingWeight {
                key: format!("{}.{param}", self.key.as_str()),
                rank: D,
            })
    }

    pub(crate) fn maybe<const D: usize>(&self, param: &str) -> Option<Tensor<B, D>> {
        self.weights.get::<D>(param)
    }
}

impl<'a, B: Backend> Weights<'a, B> {
    pub(crate) fn new(streamer: &'a Streamer<B>) -> Weights<'a, B> {
        Weights { streamer }
    }
}

impl<B: Backend> Weights<'_, B> {
    /// The dtype the model computes in (the store's compute dtype).
    pub(crate) fn dtype(&self) -> DType {
        compute_burn_dtype(self.streamer.store().compute_dtype())
    }

    /// An input of the forward pass in the compute dtype.
    pub(crate) fn input<const D: usize>(&self, t: Tensor<B, D>) -> Tensor<B, D> {
        to_dtype(t, self.dtype())
    }

    /// An output of the forward pass in f32, whatever the compute dtype.
    pub(crate) fn output<const D: usize>(&self, t: Tensor<B, D>) -> Tensor<B, D> {
        f32(t)
    }

    /// The unit a [`spec::Spec`] declared.
    pub(crate) fn fetch(&self, unit: &spec::UnitKey) -> Result<Unit<B>, Error> {
        let weights = self.streamer.fetch(unit.as_str())?;
        Ok(Unit {
            key: unit.clone(),
            weights,
        })
    }
}

/// `t` in `dtype` (itself when it already is).
pub(crate) fn to_dtype<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if t.dtype() == dtype { t } else { t.cast(dtype) }
}

/// `f` of `x` widened to f32, the result back in `x`'s dtype: how PyTorch computes norms,
/// softmax and elementwise activations at half precision.
pub(crate) fn in_f32<B: Backend, const D: usize, const E: usize>(
    x: Tensor<B, D>,
    f: impl FnOnce(Tensor<B, D>) -> Tensor<B, E>,
) -> Tensor<B, E> {
    let dtype = x.dtype();
    to_dtype(f(to_dtype(x, DType::F32)), dtype)
}

/// `t` in f32.
pub(crate) fn f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    to_dtype(t, DType::F32)
}

/// Zeros of `shape` on `like`'s device in its dtype.
pub(crate) fn zeros_as<B: Backend, const D: usize, const E: usize>(
    shape: [usize; E],
    like: &Tensor<B, D>,
) -> Tensor<B, E> {
    Tensor::zeros(shape, (&like.device(), like.dtype()))
}

/// `x · wᵀ + b`, `w` as [out, in] (`x` cast to the weight's dtype when it has another one).
pub(crate) fn linear<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    w: Tensor<B, 2>,
    b: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    let x = to_dtype(x, w.dtype());
    if let Some(y) = host::linear(&x, &w, b.as_ref()) {
        return y;
    }
    let dims = x.dims();
    let inner = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let out = w.dims()[0];
    let y = x.reshape([rows, inner]).matmul(w.transpose());
    let y = match b {
        Some(b) => y + b.unsqueeze::<2>(),
        None => y,
    };
    let mut shape = dims;
    shape[D - 1] = out;
    y.reshape(shape)
}

/// Layer norm over the last dimension (biased variance, as PyTorch), computed in f32.
pub(crate) fn layer_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    w: Tensor<B, 1>,
    b: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    in_f32(x, |x| {
        layer_norm_plain(x, eps) * f32(w).unsqueeze::<D>() + f32(b).unsqueeze::<D>()
    })
}

/// The activations the supported configs name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x · sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    /// Exact GELU, with erf.
    Gelu,
}

impl Activation {
    /// Parses a transformers `hidden_act` value.
    pub fn from_name(name: &str) -> Result<Activation, Error> {
        match name {
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu" => Ok(Activation::Gelu),
            other => Err(Error::Unsupported {
                field: "hidden_act",
                value: format!("{other:?}"),
                reason: "supported: quick_gelu, gelu",
            }),
        }
    }

    pub(crate) fn apply<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        in_f32(x, |x| match self {
            Activation::QuickGelu => x.clone() * sigmoid(x * 1.702),
            Activation::Gelu => gelu(x),
        })
    }
}

/// The causal mask: 0 on and below the diagonal, the most negative f32 above (as
/// transformers does, so a row never becomes all -inf).
pub(crate) fn causal_mask<B: Backend>(seq: usize, device: &B::Device) -> Tensor<B, 2> {
    let values: Vec<f32> = (0..seq * seq)
        .map(|i| if i % seq > i / seq { f32::MIN } else { 0.0 })
        .collect();
    Tensor::from_data(TensorData::new(values, [seq, seq]), device)
}

/// Group norm with `unit`'s `weight` and `bias`, then SiLU when `then_silu`.
pub(crate) fn group_norm_unit<B: Backend>(
    unit: &Unit<B>,
    x: Tensor<B, 4>,
    groups: usize,
    eps: f64,
    then_silu: bool,
) -> Result<Tensor<B, 4>, Error> {
    let (w, b) = (unit.get("weight")?, unit.get("bias")?);
    if let Some(y) = host::group_norm(&x, &w, &b, groups, eps, then_silu) {
        return Ok(y);
    }
    let y = group_norm_generic(x, w, b, groups, eps);
    Ok(if then_silu { silu(y) } else { y })
}

/// A 2-D convolution with `unit`'s `weight` ([out, in, kh, kw]) and `bias`.
pub(crate) fn conv2d_unit<B: Backend>(
    unit: &Unit<B>,
    x: Tensor<B, 4>,
    stride: usize,
    padding: usize,
) -> Result<Tensor<B, 4>, Error> {
    use burn::tensor::ops::ConvOptions;
    let w: Tensor<B, 4> = unit.get("weight")?;
    let bias = unit.maybe::<1>("bias");
    let x = to_dtype(x, w.dtype());
    if let Some(y) = host::conv2d(&x, &w, bias.as_ref(), stride, padding) {
        return Ok(y);
    }
    let opts = ConvOptions::new([stride; 2], [padding; 2], [1, 1], 1);
    Ok(conv2d_f32_sums(x, w, bias, opts))
}

/// Burn's 2-D convolution with f32 sums: at f16 and bf16 its operands are widened to f32 and
/// the result narrowed back. Burn 0.21's direct convolution kernel (one of those its autotune
/// picks) accumulates in the element type, which at f16 gave the tiny UNet 4.6× PyTorch's
/// error (PyTorch sums half convolutions in f32); matrix products already sum in f32.
pub(crate) fn conv2d_f32_sums<B: Backend>(
    x: Tensor<B, 4>,
    w: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    options: burn::tensor::ops::ConvOptions<2>,
) -> Tensor<B, 4> {
    use burn::tensor::module::conv2d;
    if x.dtype() == DType::F32 {
        return conv2d(x, w, bias, options);
    }
    in_f32(x, |x| conv2d(x, f32(w), bias.map(f32), options))
}

/// Group norm over [batch, channels, h, w] (biased variance, as PyTorch), computed in f32
/// in Burn's own ops (on ndarray [`Weights::group_norm`] runs the host kernel instead).
pub(crate) fn group_norm_generic<B: Backend>(
    x: Tensor<B, 4>,
    w: Tensor<B, 1>,
    b: Tensor<B, 1>,
    groups: usize,
    eps: f64,
) -> Tensor<B, 4> {
    in_f32(x, |x| {
        let [n, c, h, wd] = x.dims();
        let g = x.reshape([n, groups, (c / groups) * h * wd]);
        let mean = g.clone().mean_dim(2);
        let centred = g - mean;
        let var = centred.clone().powi_scalar(2).mean_dim(2);
        let normed = (centred / (var + eps).sqrt()).reshape([n, c, h, wd]);
        normed * f32(w).reshape([1, c, 1, 1]) + f32(b).reshape([1, c, 1, 1])
    })
}

/// `x · sigmoid(x)` (in f32).
pub(crate) fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if let Some(y) = host::silu(&x) {
        return y;
    }
    in_f32(x, |x| x.clone() * sigmoid(x))
}

/// GEGLU over the last dimension: its first half times the exact GELU of its second half.
pub(crate) fn geglu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if let Some(y) = host::geglu(&x) {
        return y;
    }
    let inner = x.dims()[D - 1] / 2;
    x.clone().narrow(D - 1, 0, inner) * gelu(x.narrow(D - 1, inner, inner))
}

/// Nearest-neighbour 2× upsampling of [batch, channels, h, w].
pub(crate) fn upsample_nearest2x<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c, h, 1, w, 1])
        .expand([n, c, h, 2, w, 2])
        .reshape([n, c, 2 * h, 2 * w])
}

/// Zero padding of one row at the bottom and one column at the right (diffusers'
/// `Downsample2D` with `padding = 0`).
pub(crate) fn pad_bottom_right<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    let right = zeros_as([n, c, h, 1], &x);
    let x = Tensor::cat(vec![x, right], 3);
    let bottom = zeros_as([n, c, 1, w + 1], &x);
    Tensor::cat(vec![x, bottom], 2)
}

/// Sinusoidal embedding of `t` ([n]) to [n, dim], as diffusers' `get_timestep_embedding`
/// (max period 10,000; frequencies computed in f32 as the reference does), in f32 (the
/// models cast it to their compute dtype, as diffusers does).
pub(crate) fn timestep_embedding<B: Backend>(
    t: Tensor<B, 1>,
    dim: usize,
    flip_sin_to_cos: bool,
    shift: f64,
) -> Tensor<B, 2> {
    let half = dim / 2;
    let t = f32(t);
    let device = t.device();
    let freqs: Vec<f32> = (0..half)
        .map(|i| {
            let exponent = -(10000f32.ln()) * i as f32;
            (exponent / (half as f64 - shift) as f32).exp()
        })
        .collect();
    let freqs = Tensor::<B, 1>::from_data(TensorData::new(freqs, [half]), &device);
    let args = t.unsqueeze_dim::<2>(1) * freqs.unsqueeze::<2>();
    let (sin, cos) = (args.clone().sin(), args.cos());
    let emb = if flip_sin_to_cos {
        Tensor::cat(vec![cos, sin], 1)
    } else {
        Tensor::cat(vec![sin, cos], 1)
    };
    if dim % 2 == 1 {
        let n = emb.dims()[0];
        Tensor::cat(vec![emb, Tensor::zeros([n, 1], &device)], 1)
    } else {
        emb
    }
}

/// GELU with the tanh approximation (`gelu_new`, `gelu_pytorch_tanh`, `approximate="tanh"`).
pub(crate) fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    in_f32(x, |x| {
        let c = (2.0 / std::f64::consts::PI).sqrt();
        let inner = (x.clone() + x.clone().powi_scalar(3) * 0.044715) * c;
        x * (inner.tanh() + 1.0) * 0.5
    })
}

/// RMS norm over the last dimension: `x / sqrt(mean(x²) + eps) · w` (T5's layer norm,
/// `torch.nn.RMSNorm`), computed in f32.
pub(crate) fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    w: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    in_f32(x, |x| {
        let ms = x.clone().powi_scalar(2).mean_dim(D - 1);
        x / (ms + eps).sqrt() * f32(w).unsqueeze::<D>()
    })
}

/// Layer norm over the last dimension without weight or bias, computed in f32.
pub(crate) fn layer_norm_plain<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    eps: f64,
) -> Tensor<B, D> {
    in_f32(x, |x| {
        let mean = x.clone().mean_dim(D - 1);
        let centred = x - mean;
        let var = centred.clone().powi_scalar(2).mean_dim(D - 1);
        centred / (var + eps).sqrt()
    })
}

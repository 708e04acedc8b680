//! The Wan VAE's layers over video tensors [batch, channels, frames, height, width], and the
//! causal cache that lets them run chunk by chunk over time exactly as diffusers'
//! `AutoencoderKLWan` does (each causal convolution keeps the last two frames it saw).

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::error::Error;
use crate::nn::attention::attention;
use crate::nn::host;
use crate::nn::spec::{Conv2d, Param, Spec, UnitKey};
use crate::nn::{Weights, f32, in_f32, pad_bottom_right, silu, upsample_nearest2x, zeros_as};

/// One causal convolution's memory between chunks.
#[derive(Clone)]
enum Cached<B: Backend> {
    /// The last (up to two) input frames.
    Frames(Tensor<B, 5>),
    /// A temporal upsampler that has passed its first chunk through unchanged (`"Rep"`).
    Rep,
}

/// The cache slots of one pass over a video, in call order (reset per chunk).
pub(crate) struct CausalCache<B: Backend> {
    slots: Vec<Option<Cached<B>>>,
    cursor: usize,
}

impl<B: Backend> CausalCache<B> {
    pub(crate) fn new() -> CausalCache<B> {
        CausalCache {
            slots: Vec::new(),
            cursor: 0,
        }
    }

    /// Starts a chunk: slots are used again in the same order.
    pub(crate) fn next_chunk(&mut self) {
        self.cursor = 0;
    }

    /// The current slot's value, and moves to the next slot.
    fn take(&mut self) -> (usize, Option<Cached<B>>) {
        if self.cursor == self.slots.len() {
            self.slots.push(None);
        }
        let i = self.cursor;
        self.cursor += 1;
        (i, self.slots[i].clone())
    }

    fn put(&mut self, i: usize, value: Cached<B>) {
        self.slots[i] = Some(value);
    }
}

/// The last `n` frames of `x` (all when it has fewer).
fn last_frames<B: Backend>(x: &Tensor<B, 5>, n: usize) -> Tensor<B, 5> {
    let t = x.dims()[2];
    x.clone().narrow(2, t - n.min(t), n.min(t))
}

/// `n` zero frames shaped like `x`'s.
fn zero_frames<B: Backend>(x: &Tensor<B, 5>, n: usize) -> Tensor<B, 5> {
    let [b, c, _, h, w] = x.dims();
    zeros_as([b, c, n, h, w], x)
}

/// `x` after `context` frames of causal context: the cached frames `old`, zero frames in
/// front of them for what they lack (all zeros without a cache).
fn with_context<B: Backend>(
    old: Option<Tensor<B, 5>>,
    x: Tensor<B, 5>,
    context: usize,
) -> Tensor<B, 5> {
    let have = old.as_ref().map_or(0, |o| o.dims()[2]);
    let mut parts = Vec::with_capacity(3);
    if have < context {
        parts.push(zero_frames(&x, context - have));
    }
    parts.extend(old);
    parts.push(x);
    Tensor::cat(parts, 2)
}

/// A 3-D convolution (no padding) as a sum over the kernel's time taps of 2-D convolutions
/// over frames folded into the batch (the 2-D ones use the fast path on ndarray).
pub(crate) fn conv3d<B: Backend>(
    x: Tensor<B, 5>,
    w: Tensor<B, 5>,
    bias: Option<Tensor<B, 1>>,
    stride_t: usize,
) -> Tensor<B, 5> {
    // Widened once (a no-op at f32), so every tap and their sum are in f32 at half precision
    // (see `nn::conv2d_f32_sums`).
    in_f32(x, |x| conv3d_f32(x, f32(w), bias.map(f32), stride_t))
}

fn conv3d_f32<B: Backend>(
    x: Tensor<B, 5>,
    w: Tensor<B, 5>,
    bias: Option<Tensor<B, 1>>,
    stride_t: usize,
) -> Tensor<B, 5> {
    use burn::tensor::module::conv2d;
    use burn::tensor::ops::ConvOptions;
    let [b, c, t, h, wd] = x.dims();
    let [o, _, kt, kh, kw] = w.dims();
    let t_out = (t - kt) / stride_t + 1;
    let device = x.device();
    let mut out: Option<Tensor<B, 4>> = None;
    for k in 0..kt {
        let frames: Vec<i64> = (0..t_out).map(|i| (i * stride_t + k) as i64).collect();
        let frames = Tensor::<B, 1, Int>::from_data(TensorData::new(frames, [t_out]), &device);
        let xs = x
            .clone()
            .select(2, frames)
            .swap_dims(1, 2)
            .reshape([b * t_out, c, h, wd]);
        let wk = w.clone().narrow(2, k, 1).reshape([o, c, kh, kw]);
        let y = match host::conv2d(&xs, &wk, None, 1, 0) {
            Some(y) => y,
            None => conv2d(xs, wk, None, ConvOptions::new([1, 1], [0, 0], [1, 1], 1)),
        };
        out = Some(match out {
            Some(acc) => acc + y,
            None => y,
        });
    }
    let y = out.expect("kernels have at least one time tap");
    let [_, _, ho, wo] = y.dims();
    let y = y.reshape([b, t_out, o, ho, wo]).swap_dims(1, 2);
    match bias {
        Some(bias) => y + bias.reshape([1, o, 1, 1, 1]),
        None => y,
    }
}

/// Pads height and width by `p` zeros on every side.
fn pad_hw<B: Backend>(x: Tensor<B, 5>, p: usize) -> Tensor<B, 5> {
    if p == 0 {
        return x;
    }
    let [b, c, t, h, w] = x.dims();
    let rows = zeros_as([b, c, t, p, w], &x);
    let x = Tensor::cat(vec![rows.clone(), x, rows], 3);
    let cols = zeros_as([b, c, t, h + 2 * p, p], &x);
    Tensor::cat(vec![cols.clone(), x, cols], 4)
}

/// A causal 3-D convolution: a time kernel of 3 (2 frames of context) or 1, spatial padding
/// `pad`.
pub(crate) struct CausalConv {
    unit: UnitKey,
    pad: usize,
}

impl CausalConv {
    /// Declares convolution `name` of kernel `shape` ([out, in, t, h, w]).
    pub(crate) fn new(s: &mut Spec<'_>, name: &str, shape: [usize; 5], pad: usize) -> CausalConv {
        let unit = s.unit(
            name,
            &[("bias", vec![shape[0]]), ("weight", shape.to_vec())],
        );
        CausalConv { unit, pad }
    }

    /// The convolution of `x`, through `cache` when given (the chunked pass).
    pub(crate) fn forward<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 5>,
        cache: Option<&mut CausalCache<B>>,
    ) -> Result<Tensor<B, 5>, Error> {
        let (kernel, bias) = kernel(w, &self.unit)?;
        let context = kernel.dims()[2] - 1;
        if context == 0 {
            return Ok(conv3d(pad_hw(x, self.pad), kernel, bias, 1));
        }
        let input = match cache {
            None => with_context(None, x, context),
            Some(cache) => {
                let (slot, old) = cache.take();
                let mut keep = last_frames(&x, context);
                if let (true, Some(Cached::Frames(o))) = (keep.dims()[2] < context, &old) {
                    keep = Tensor::cat(vec![last_frames(o, 1), keep], 2);
                }
                cache.put(slot, Cached::Frames(keep));
                match old {
                    Some(Cached::Frames(o)) => with_context(Some(o), x, context),
                    _ => with_context(None, x, context),
                }
            }
        };
        Ok(conv3d(pad_hw(input, self.pad), kernel, bias, 1))
    }
}

/// A 3-D kernel and its bias.
fn kernel<B: Backend>(
    w: &Weights<'_, B>,
    unit: &UnitKey,
) -> Result<(Tensor<B, 5>, Option<Tensor<B, 1>>), Error> {
    let unit = w.fetch(unit)?;
    Ok((unit.get("weight")?, unit.maybe("bias")))
}

/// `F.normalize` over channels · √C · gamma (WanRMS_norm, no bias), computed in f32.
pub(crate) struct Rms(Param);

impl Rms {
    /// Declares norm `name` with a `gamma` of `shape`.
    pub(crate) fn new(s: &mut Spec<'_>, name: &str, shape: Vec<usize>) -> Rms {
        Rms(s.param(name, "gamma", shape))
    }

    pub(crate) fn forward<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 5>,
    ) -> Result<Tensor<B, 5>, Error> {
        let c = x.dims()[1];
        let gamma: Tensor<B, 1> = self.0.get(w)?;
        Ok(in_f32(x, |x| {
            let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12);
            x / norm * (c as f64).sqrt() * f32(gamma).reshape([1, c, 1, 1, 1])
        }))
    }
}

/// A residual block: norm, SiLU, causal conv, twice, plus the (1×1×1) shortcut.
pub(crate) struct Resnet {
    norm1: Rms,
    conv1: CausalConv,
    norm2: Rms,
    conv2: CausalConv,
    shortcut: Option<CausalConv>,
}

impl Resnet {
    /// Declares block `name` from `i` to `o` channels.
    pub(crate) fn new(s: &mut Spec<'_>, name: &str, i: usize, o: usize) -> Resnet {
        Resnet {
            norm1: Rms::new(s, &format!("{name}.norm1"), vec![i, 1, 1, 1]),
            conv1: CausalConv::new(s, &format!("{name}.conv1"), [o, i, 3, 3, 3], 1),
            norm2: Rms::new(s, &format!("{name}.norm2"), vec![o, 1, 1, 1]),
            conv2: CausalConv::new(s, &format!("{name}.conv2"), [o, o, 3, 3, 3], 1),
            shortcut: (i != o)
                .then(|| CausalConv::new(s, &format!("{name}.conv_shortcut"), [o, i, 1, 1, 1], 0)),
        }
    }

    pub(crate) fn forward<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 5>,
        cache: &mut CausalCache<B>,
    ) -> Result<Tensor<B, 5>, Error> {
        let h = match &self.shortcut {
            Some(conv) => conv.forward(w, x.clone(), None)?,
            None => x.clone(),
        };
        let y = silu(self.norm1.forward(w, x)?);
        let y = self.conv1.forward(w, y, Some(cache))?;
        let y = silu(self.norm2.forward(w, y)?);
        let y = self.conv2.forward(w, y, Some(cache))?;
        Ok(y + h)
    }
}

/// Single-head self-attention within each frame.
pub(crate) struct Attention {
    norm: Rms,
    qkv: Conv2d,
    proj: Conv2d,
}

impl Attention {
    /// Declares attention `name` over `d` channels.
    pub(crate) fn new(s: &mut Spec<'_>, name: &str, d: usize) -> Attention {
        Attention {
            norm: Rms::new(s, &format!("{name}.norm"), vec![d, 1, 1]),
            qkv: s.conv2d(&format!("{name}.to_qkv"), 3 * d, d, 1, 1, 0),
            proj: s.conv2d(&format!("{name}.proj"), d, d, 1, 1, 0),
        }
    }

    pub(crate) fn forward<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 5>,
    ) -> Result<Tensor<B, 5>, Error> {
        let [b, c, t, h, wd] = x.dims();
        // Normalised over channels at each position: the same per frame.
        let y = self.norm.forward(w, x.clone())?;
        let y = y.swap_dims(1, 2).reshape([b * t, c, h, wd]);
        let qkv = self.qkv.forward(w, y)?;
        let qkv = qkv.reshape([b * t, 3 * c, h * wd]).swap_dims(1, 2);
        let q = qkv.clone().narrow(2, 0, c);
        let k = qkv.clone().narrow(2, c, c);
        let v = qkv.narrow(2, 2 * c, c);
        // One head of width c over each frame's pixels, in bounded memory.
        let a = attention(q, k, v, 1, None)
            .swap_dims(1, 2)
            .reshape([b * t, c, h, wd]);
        let out = self.proj.forward(w, a)?;
        let out = out.reshape([b, t, c, h, wd]).swap_dims(1, 2);
        Ok(out + x)
    }
}

/// A 2× resample: spatial (`resample.1`, every frame), and temporal (`time_conv`) when the
/// level resamples time too.
pub(crate) struct Resample {
    spatial: Conv2d,
    time_conv: Option<UnitKey>,
}

impl Resample {
    /// Declares downsampler `name` over `o` channels.
    pub(crate) fn down(s: &mut Spec<'_>, name: &str, o: usize, temporal: bool) -> Resample {
        let spatial = s.conv2d(&format!("{name}.resample.1"), o, o, 3, 2, 0);
        let time_conv = temporal.then(|| {
            let shape = vec![o, o, 3, 1, 1];
            s.unit(
                &format!("{name}.time_conv"),
                &[("bias", vec![o]), ("weight", shape)],
            )
        });
        Resample { spatial, time_conv }
    }

    /// Declares upsampler `name` from `o` channels (to `o / 2`).
    pub(crate) fn up(s: &mut Spec<'_>, name: &str, o: usize, temporal: bool) -> Resample {
        let time_conv = temporal.then(|| {
            let shape = vec![2 * o, o, 3, 1, 1];
            let params = [("bias", vec![2 * o]), ("weight", shape)];
            s.unit(&format!("{name}.time_conv"), &params)
        });
        let spatial = s.conv2d(&format!("{name}.resample.1"), o / 2, o, 3, 1, 1);
        Resample { spatial, time_conv }
    }

    /// The spatial 2× resample of every frame.
    fn spatial<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 5>,
        up: bool,
    ) -> Result<Tensor<B, 5>, Error> {
        let [b, c, t, h, wd] = x.dims();
        let frames = x.swap_dims(1, 2).reshape([b * t, c, h, wd]);
        let y = if up {
            self.spatial.forward(w, upsample_nearest2x(frames))?
        } else {
            self.spatial.forward(w, pad_bottom_right(frames))?
        };
        let [_, co, ho, wo] = y.dims();
        Ok(y.reshape([b, t, co, ho, wo]).swap_dims(1, 2))
    }

    /// Downsampling: spatial, then (temporal) a stride-2 time convolution over the previous
    /// chunk's last frame and this chunk; the first chunk passes through unchanged.
    pub(crate) fn downsample<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 5>,
        cache: &mut CausalCache<B>,
    ) -> Result<Tensor<B, 5>, Error> {
        let x = self.spatial(w, x, false)?;
        let Some(time_conv) = &self.time_conv else {
            return Ok(x);
        };
        let (slot, old) = cache.take();
        cache.put(slot, Cached::Frames(last_frames(&x, 1)));
        match old {
            Some(Cached::Frames(o)) => {
                let (kernel, bias) = kernel(w, time_conv)?;
                let input = Tensor::cat(vec![last_frames(&o, 1), x], 2);
                Ok(conv3d(input, kernel, bias, 2))
            }
            _ => Ok(x),
        }
    }

    /// Upsampling: (temporal) a causal time convolution to twice the channels, interleaved
    /// into twice the frames — except the first chunk, which passes through — then spatial.
    pub(crate) fn upsample<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 5>,
        cache: &mut CausalCache<B>,
    ) -> Result<Tensor<B, 5>, Error> {
        let mut x = x;
        if let Some(time_conv) = &self.time_conv {
            let (slot, old) = cache.take();
            match old {
                None => cache.put(slot, Cached::Rep),
                Some(old) => {
                    let mut keep = last_frames(&x, 2);
                    if keep.dims()[2] < 2 {
                        let before = match &old {
                            Cached::Frames(o) => last_frames(o, 1),
                            Cached::Rep => zero_frames(&keep, 1),
                        };
                        keep = Tensor::cat(vec![before, keep], 2);
                    }
                    let (kernel, bias) = kernel(w, time_conv)?;
                    let input = match old {
                        Cached::Frames(o) => with_context(Some(o), x, 2),
                        Cached::Rep => with_context(None, x, 2),
                    };
                    cache.put(slot, Cached::Frames(keep));
                    let y = conv3d(input, kernel, bias, 1);
                    let [b, c2, t, h, wd] = y.dims();
                    let c = c2 / 2;
                    // [b, 2, c, t, h, w] -> [b, c, t, 2, h, w] -> [b, c, 2t, h, w]
                    x = y.reshape([b, 2, c * t, h * wd]).swap_dims(1, 2).reshape([
                        b,
                        c,
                        t * 2,
                        h,
                        wd,
                    ]);
                }
            }
        }
        self.spatial(w, x, true)
    }
}

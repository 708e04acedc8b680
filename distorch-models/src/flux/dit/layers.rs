//! The FLUX transformer's layers, declared once from its configuration through a [`Spec`] in
//! either key layout (separate q/k/v projections in diffusers', fused ones in BFL's), and the
//! forward passes of its double-stream and single-stream blocks.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use distorch_core::runtime::ExpectedTensor;

use crate::error::Error;
use crate::flux::dit::FluxConfig;
use crate::flux::keys::FluxLayout;
use crate::nn::attention::attention;
use crate::nn::rope::rope;
use crate::nn::spec::{Linear, Param, Spec};
use crate::nn::{Weights, gelu_tanh, in_f32, layer_norm_plain, rms_norm};

/// The epsilon of every norm in the model (layer norms and q/k RMS norms).
const EPS: f64 = 1e-6;

/// The transformer's layers in its file's layout.
pub(crate) struct FluxLayers {
    pub(crate) x_embedder: Linear,
    pub(crate) time: (Linear, Linear),
    pub(crate) guidance: Option<(Linear, Linear)>,
    pub(crate) pooled: (Linear, Linear),
    pub(crate) context: Linear,
    pub(crate) double: Vec<DoubleBlock>,
    pub(crate) single: Vec<SingleBlock>,
    /// The final norm's modulation: (scale, shift) in diffusers' layout, (shift, scale) in
    /// BFL's.
    pub(crate) norm_out: Linear,
    pub(crate) proj_out: Linear,
    /// Every tensor, in the order the forward pass uses them.
    pub(crate) expected: Vec<ExpectedTensor>,
}

impl FluxLayers {
    /// The layers of a transformer of `c`, keys in `layout`.
    pub(crate) fn new(c: &FluxConfig, layout: FluxLayout) -> FluxLayers {
        let d = c.inner_dim();
        let mut s = Spec::new(|name| layout.unit(name));
        let x_embedder = s.linear("x_embedder", d, c.in_channels, true);
        let mlp = |s: &mut Spec<'_>, p: &str, inp: usize| {
            (
                s.linear(&format!("{p}.linear_1"), d, inp, true),
                s.linear(&format!("{p}.linear_2"), d, d, true),
            )
        };
        let time = mlp(&mut s, "time_text_embed.timestep_embedder", 256);
        let guidance = c
            .guidance_embeds
            .then(|| mlp(&mut s, "time_text_embed.guidance_embedder", 256));
        let pooled = mlp(
            &mut s,
            "time_text_embed.text_embedder",
            c.pooled_projection_dim,
        );
        let context = s.linear("context_embedder", d, c.joint_attention_dim, true);
        let double = (0..c.num_layers)
            .map(|i| DoubleBlock::new(&mut s, &format!("transformer_blocks.{i}"), c, layout))
            .collect();
        let single = (0..c.num_single_layers)
            .map(|i| SingleBlock::new(&mut s, &format!("single_transformer_blocks.{i}"), c, layout))
            .collect();
        let norm_out = s.linear("norm_out.linear", 2 * d, d, true);
        let proj_out = s.linear("proj_out", c.out_channels(), d, true);
        FluxLayers {
            x_embedder,
            time,
            guidance,
            pooled,
            context,
            double,
            single,
            norm_out,
            proj_out,
            expected: s.into_expected(),
        }
    }
}

/// q, k and v: three projections (diffusers) or one fused projection (BFL).
pub(crate) enum Qkv {
    Separate([Linear; 3]),
    Fused(Linear),
}

impl Qkv {
    /// Declares the projections of width `d`: `{p}.{names}` in diffusers' layout, `{p}.{fused}`
    /// in BFL's.
    fn new(
        s: &mut Spec<'_>,
        p: &str,
        d: usize,
        names: [&str; 3],
        fused: &str,
        l: FluxLayout,
    ) -> Qkv {
        match l {
            FluxLayout::Diffusers => {
                Qkv::Separate(names.map(|n| s.linear(&format!("{p}.{n}"), d, d, true)))
            }
            FluxLayout::Bfl => Qkv::Fused(s.linear(&format!("{p}.{fused}"), 3 * d, d, true)),
        }
    }

    fn forward<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 3>,
    ) -> Result<[Tensor<B, 3>; 3], Error> {
        match self {
            Qkv::Separate([q, k, v]) => Ok([
                q.forward(w, x.clone())?,
                k.forward(w, x.clone())?,
                v.forward(w, x)?,
            ]),
            Qkv::Fused(qkv) => {
                let y = qkv.forward(w, x)?;
                let d = y.dims()[2] / 3;
                Ok([0, 1, 2].map(|i| y.clone().narrow(2, i * d, d)))
            }
        }
    }
}

/// A q/k RMS norm over each head.
fn head_norm(s: &mut Spec<'_>, name: &str, c: &FluxConfig, l: FluxLayout) -> Param {
    s.param(name, l.norm_param(), vec![c.attention_head_dim])
}

/// What every block of one forward pass shares.
pub(crate) struct BlockContext<'a, B: Backend> {
    pub(crate) config: &'a FluxConfig,
    /// SiLU of the conditioning embedding, [batch, dim] (every modulation's input).
    pub(crate) temb: Tensor<B, 2>,
    /// The rotary tables of the text and image tokens, in that order.
    pub(crate) cos: Tensor<B, 2>,
    pub(crate) sin: Tensor<B, 2>,
}

impl<B: Backend> BlockContext<'_, B> {
    /// The modulation `lin` makes of the time embedding, as `n` chunks of [batch, 1, dim].
    pub(crate) fn modulation(
        &self,
        w: &Weights<'_, B>,
        lin: &Linear,
        n: usize,
    ) -> Result<Vec<Tensor<B, 3>>, Error> {
        let m = lin.forward(w, self.temb.clone())?;
        let [b, _] = m.dims();
        let d = self.config.inner_dim();
        Ok((0..n)
            .map(|i| m.clone().narrow(1, i * d, d).reshape([b, 1, d]))
            .collect())
    }

    /// q/k norm of each head of `x` ([batch, tokens, heads · head_dim]).
    fn head_norm(
        &self,
        w: &Weights<'_, B>,
        p: &Param,
        x: Tensor<B, 3>,
    ) -> Result<Tensor<B, 3>, Error> {
        let c = self.config;
        let [b, n, d] = x.dims();
        let x = x.reshape([b, n, c.num_attention_heads, c.attention_head_dim]);
        Ok(rms_norm(x, p.get(w)?, EPS).reshape([b, n, d]))
    }

    /// Attention over `q`, `k`, `v` (text tokens first), rotary positions applied in f32.
    fn attend(&self, q: Tensor<B, 3>, k: Tensor<B, 3>, v: Tensor<B, 3>) -> Tensor<B, 3> {
        let c = self.config;
        let (heads, hd) = (c.num_attention_heads, c.attention_head_dim);
        let roped = |z: Tensor<B, 3>| in_f32(z, |z| rope(z, &self.cos, &self.sin, heads, hd));
        attention(roped(q), roped(k), v, heads, None)
    }
}

/// `layer_norm(x) · (1 + scale) + shift` (diffusers' `AdaLayerNormZero` and friends).
fn modulate<B: Backend>(
    x: Tensor<B, 3>,
    shift: &Tensor<B, 3>,
    scale: &Tensor<B, 3>,
) -> Tensor<B, 3> {
    layer_norm_plain(x, EPS) * (scale.clone() + 1.0) + shift.clone()
}

/// At f16, PyTorch's FLUX clips the residual stream to f16's range after each block.
fn clip_f16<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    if x.dtype() == DType::F16 {
        x.clamp(-65504.0, 65504.0)
    } else {
        x
    }
}

/// A feed-forward layer: linear, tanh GELU, linear.
pub(crate) struct FeedForward(Linear, Linear);

impl FeedForward {
    fn new(s: &mut Spec<'_>, p: &str, c: &FluxConfig) -> FeedForward {
        let (d, m) = (c.inner_dim(), c.mlp_dim());
        FeedForward(
            s.linear(&format!("{p}.net.0.proj"), m, d, true),
            s.linear(&format!("{p}.net.2"), d, m, true),
        )
    }

    fn forward<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 3>,
    ) -> Result<Tensor<B, 3>, Error> {
        self.1.forward(w, gelu_tanh(self.0.forward(w, x)?))
    }
}

/// A double-stream block (`FluxTransformerBlock`): image and text tokens each modulated and
/// projected by their own weights, attending jointly, each with its own feed-forward.
pub(crate) struct DoubleBlock {
    norm1: Linear,
    norm1_context: Linear,
    qkv: Qkv,
    add_qkv: Qkv,
    norm_q: Param,
    norm_k: Param,
    norm_added_q: Param,
    norm_added_k: Param,
    to_out: Linear,
    to_add_out: Linear,
    ff: FeedForward,
    ff_context: FeedForward,
}

impl DoubleBlock {
    fn new(s: &mut Spec<'_>, p: &str, c: &FluxConfig, l: FluxLayout) -> DoubleBlock {
        let d = c.inner_dim();
        let a = format!("{p}.attn");
        DoubleBlock {
            norm1: s.linear(&format!("{p}.norm1.linear"), 6 * d, d, true),
            norm1_context: s.linear(&format!("{p}.norm1_context.linear"), 6 * d, d, true),
            qkv: Qkv::new(s, &a, d, ["to_q", "to_k", "to_v"], "qkv", l),
            add_qkv: Qkv::new(
                s,
                &a,
                d,
                ["add_q_proj", "add_k_proj", "add_v_proj"],
                "add_qkv",
                l,
            ),
            norm_q: head_norm(s, &format!("{a}.norm_q"), c, l),
            norm_k: head_norm(s, &format!("{a}.norm_k"), c, l),
            norm_added_q: head_norm(s, &format!("{a}.norm_added_q"), c, l),
            norm_added_k: head_norm(s, &format!("{a}.norm_added_k"), c, l),
            to_out: s.linear(&format!("{a}.to_out.0"), d, d, true),
            to_add_out: s.linear(&format!("{a}.to_add_out"), d, d, true),
            ff: FeedForward::new(s, &format!("{p}.ff"), c),
            ff_context: FeedForward::new(s, &format!("{p}.ff_context"), c),
        }
    }

    /// The block on image tokens `x` and text tokens `ctx`; returns both, updated.
    pub(crate) fn forward<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 3>,
        ctx: Tensor<B, 3>,
        cx: &BlockContext<'_, B>,
    ) -> Result<(Tensor<B, 3>, Tensor<B, 3>), Error> {
        let txt = ctx.dims()[1];
        // 1. Modulations: shift, scale, gate of attention, then of the feed-forward.
        let m = cx.modulation(w, &self.norm1, 6)?;
        let mc = cx.modulation(w, &self.norm1_context, 6)?;
        let y = modulate(x.clone(), &m[0], &m[1]);
        let yc = modulate(ctx.clone(), &mc[0], &mc[1]);
        // 2. Joint attention, text tokens first.
        let [q, k, v] = self.qkv.forward(w, y)?;
        let [cq, ck, cv] = self.add_qkv.forward(w, yc)?;
        let q = cx.head_norm(w, &self.norm_q, q)?;
        let k = cx.head_norm(w, &self.norm_k, k)?;
        let cq = cx.head_norm(w, &self.norm_added_q, cq)?;
        let ck = cx.head_norm(w, &self.norm_added_k, ck)?;
        let a = cx.attend(
            Tensor::cat(vec![cq, q], 1),
            Tensor::cat(vec![ck, k], 1),
            Tensor::cat(vec![cv, v], 1),
        );
        let n = a.dims()[1];
        let img = self.to_out.forward(w, a.clone().narrow(1, txt, n - txt))?;
        let text = self.to_add_out.forward(w, a.narrow(1, 0, txt))?;
        // 3. Gated residuals and feed-forwards, the image stream first.
        let x = x + m[2].clone() * img;
        let y = modulate(x.clone(), &m[3], &m[4]);
        let x = x + m[5].clone() * self.ff.forward(w, y)?;
        let ctx = ctx + mc[2].clone() * text;
        let yc = modulate(ctx.clone(), &mc[3], &mc[4]);
        let ctx = ctx + mc[5].clone() * self.ff_context.forward(w, yc)?;
        Ok((x, clip_f16(ctx)))
    }
}

/// The projections of a single-stream block: q, k, v and the MLP's input, separate
/// (diffusers) or fused into `linear1` (BFL).
pub(crate) enum SingleIn {
    Separate { mlp: Linear, qkv: Qkv },
    Fused(Linear),
}

/// A single-stream block (`FluxSingleTransformerBlock`): attention and an MLP side by side
/// over the joint text + image tokens, one output projection over both.
pub(crate) struct SingleBlock {
    norm: Linear,
    input: SingleIn,
    norm_q: Param,
    norm_k: Param,
    proj_out: Linear,
}

impl SingleBlock {
    fn new(s: &mut Spec<'_>, p: &str, c: &FluxConfig, l: FluxLayout) -> SingleBlock {
        let (d, m) = (c.inner_dim(), c.mlp_dim());
        let norm = s.linear(&format!("{p}.norm.linear"), 3 * d, d, true);
        let input = match l {
            FluxLayout::Diffusers => SingleIn::Separate {
                mlp: s.linear(&format!("{p}.proj_mlp"), m, d, true),
                qkv: Qkv::new(s, &format!("{p}.attn"), d, ["to_q", "to_k", "to_v"], "", l),
            },
            FluxLayout::Bfl => {
                SingleIn::Fused(s.linear(&format!("{p}.qkv_mlp"), 3 * d + m, d, true))
            }
        };
        SingleBlock {
            norm,
            input,
            norm_q: head_norm(s, &format!("{p}.attn.norm_q"), c, l),
            norm_k: head_norm(s, &format!("{p}.attn.norm_k"), c, l),
            proj_out: s.linear(&format!("{p}.proj_out"), d, d + m, true),
        }
    }

    /// The block on the joint tokens `x` (text first); returns them updated.
    pub(crate) fn forward<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 3>,
        cx: &BlockContext<'_, B>,
    ) -> Result<Tensor<B, 3>, Error> {
        let d = cx.config.inner_dim();
        let m = cx.modulation(w, &self.norm, 3)?;
        let y = modulate(x.clone(), &m[0], &m[1]);
        let ([q, k, v], mlp) = match &self.input {
            SingleIn::Separate { mlp, qkv } => {
                let mlp = mlp.forward(w, y.clone())?;
                (qkv.forward(w, y)?, mlp)
            }
            SingleIn::Fused(lin) => {
                let z = lin.forward(w, y)?;
                let width = z.dims()[2];
                let part = |i: usize| z.clone().narrow(2, i * d, d);
                (
                    [part(0), part(1), part(2)],
                    z.clone().narrow(2, 3 * d, width - 3 * d),
                )
            }
        };
        let q = cx.head_norm(w, &self.norm_q, q)?;
        let k = cx.head_norm(w, &self.norm_k, k)?;
        let a = cx.attend(q, k, v);
        let out = self
            .proj_out
            .forward(w, Tensor::cat(vec![a, gelu_tanh(mlp)], 2))?;
        Ok(clip_f16(x + m[2].clone() * out))
    }
}

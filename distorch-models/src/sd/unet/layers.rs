//! The layers of diffusers' `UNet2DConditionModel` a UNet and a ControlNet are built of —
//! `ResnetBlock2D`, `Transformer2DModel` with its `BasicTransformerBlock`s, the time
//! embedding and the down and mid blocks — each declared once through a [`Spec`], which
//! gives their expected tensors in execution order and the handles their forward passes use.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::error::Error;
use crate::nn::spec::{Conv2d, GroupNorm, LayerNorm, Linear, Projections, Spec};
use crate::nn::{Weights, geglu};
use crate::sd::unet::config::{Blocks, UnetConfig};

/// Group-norm epsilon of the spatial transformers.
const TRANSFORMER_NORM_EPS: f64 = 1e-6;

/// diffusers' `ResnetBlock2D`, with a time embedding (the UNet's) or without (the VAE's).
pub(crate) struct Resnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    time: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl Resnet {
    /// Declares a UNet block `p` from `cin` to `cout` channels.
    pub(crate) fn new(s: &mut Spec<'_>, p: &str, c: &UnetConfig, io: (usize, usize)) -> Resnet {
        let temb = 4 * c.block_out_channels[0];
        Resnet::declare(s, p, io, (c.norm_num_groups, c.norm_eps), Some(temb))
    }

    /// Declares block `p` from `cin` to `cout` channels with group norms of `groups` and
    /// `eps`, and a time projection from `temb` channels when given.
    pub(crate) fn declare(
        s: &mut Spec<'_>,
        p: &str,
        (cin, cout): (usize, usize),
        (groups, eps): (usize, f64),
        temb: Option<usize>,
    ) -> Resnet {
        Resnet {
            norm1: s.group_norm(&format!("{p}.norm1"), cin, groups, eps),
            conv1: s.conv2d(&format!("{p}.conv1"), cout, cin, 3, 1, 1),
            time: temb.map(|t| s.linear(&format!("{p}.time_emb_proj"), cout, t, true)),
            norm2: s.group_norm(&format!("{p}.norm2"), cout, groups, eps),
            conv2: s.conv2d(&format!("{p}.conv2"), cout, cout, 3, 1, 1),
            shortcut: (cin != cout)
                .then(|| s.conv2d(&format!("{p}.conv_shortcut"), cout, cin, 1, 1, 0)),
        }
    }

    /// The block on `x`, with the time embedding `temb` (already through SiLU) when it has a
    /// time projection.
    pub(crate) fn forward<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 4>,
        temb: Option<&Tensor<B, 2>>,
    ) -> Result<Tensor<B, 4>, Error> {
        let h = self.norm1.forward_silu(w, x.clone())?;
        let mut h = self.conv1.forward(w, h)?;
        if let (Some(time), Some(temb)) = (&self.time, temb) {
            let t = time.forward(w, temb.clone())?;
            h = h + t.unsqueeze_dim::<3>(2).unsqueeze_dim::<4>(3);
        }
        let h = self.norm2.forward_silu(w, h)?;
        let h = self.conv2.forward(w, h)?;
        let skip = match &self.shortcut {
            Some(conv) => conv.forward(w, x)?,
            None => x,
        };
        Ok(skip + h)
    }
}

/// A spatial transformer's projection in or out: linear (SD 2.x, SDXL) or a 1×1
/// convolution (SD 1.x).
enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

impl Projection {
    fn new(s: &mut Spec<'_>, name: &str, c: usize, linear: bool) -> Projection {
        if linear {
            Projection::Linear(s.linear(name, c, c, true))
        } else {
            Projection::Conv(s.conv2d(name, c, c, 1, 1, 0))
        }
    }
}

/// diffusers' `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward.
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Projections,
    norm2: LayerNorm,
    attn2: Projections,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

/// diffusers' `Transformer2DModel` (continuous input).
pub(crate) struct Transformer2d {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
    heads: usize,
}

impl Transformer2d {
    /// Declares transformer `p` over `ch` channels, `depth` blocks, `heads` heads.
    pub(crate) fn new(
        s: &mut Spec<'_>,
        p: &str,
        c: &UnetConfig,
        bl: &Blocks,
        (ch, depth, heads): (usize, usize, usize),
    ) -> Transformer2d {
        let (g, eps, lin) = (c.norm_num_groups, c.norm_eps, c.use_linear_projection);
        let norm = s.group_norm(&format!("{p}.norm"), ch, g, TRANSFORMER_NORM_EPS);
        let proj_in = Projection::new(s, &format!("{p}.proj_in"), ch, lin);
        let blocks = (0..depth)
            .map(|b| {
                let q = format!("{p}.transformer_blocks.{b}");
                TransformerBlock {
                    norm1: s.layer_norm(&format!("{q}.norm1"), ch, eps),
                    attn1: Projections::new(s, &format!("{q}.attn1"), (ch, ch), false),
                    norm2: s.layer_norm(&format!("{q}.norm2"), ch, eps),
                    attn2: Projections::new(s, &format!("{q}.attn2"), (ch, bl.context), false),
                    norm3: s.layer_norm(&format!("{q}.norm3"), ch, eps),
                    ff_in: s.linear(&format!("{q}.ff.net.0.proj"), 8 * ch, ch, true),
                    ff_out: s.linear(&format!("{q}.ff.net.2"), ch, 4 * ch, true),
                }
            })
            .collect();
        let proj_out = Projection::new(s, &format!("{p}.proj_out"), ch, lin);
        Transformer2d {
            norm,
            proj_in,
            blocks,
            proj_out,
            heads,
        }
    }

    /// The transformer on `x`, attending to `ctx`.
    pub(crate) fn forward<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 4>,
        ctx: &Tensor<B, 3>,
    ) -> Result<Tensor<B, 4>, Error> {
        let [n, c, h, wd] = x.dims();
        let y = self.norm.forward(w, x.clone())?;
        let tokens = |t: Tensor<B, 4>| t.reshape([n, c, h * wd]).swap_dims(1, 2);
        let mut y = match &self.proj_in {
            Projection::Linear(l) => l.forward(w, tokens(y))?,
            Projection::Conv(conv) => tokens(conv.forward(w, y)?),
        };
        for b in &self.blocks {
            let m = b.norm1.forward(w, y.clone())?;
            y = y + b.attn1.forward(w, m.clone(), m, self.heads)?;
            let m = b.norm2.forward(w, y.clone())?;
            y = y + b.attn2.forward(w, m, ctx.clone(), self.heads)?;
            let m = b.norm3.forward(w, y.clone())?;
            let proj = b.ff_in.forward(w, m)?;
            y = y + b.ff_out.forward(w, geglu(proj))?;
        }
        let spatial = |t: Tensor<B, 3>| t.swap_dims(1, 2).reshape([n, c, h, wd]);
        let out = match &self.proj_out {
            Projection::Linear(l) => spatial(l.forward(w, y)?),
            Projection::Conv(conv) => conv.forward(w, spatial(y))?,
        };
        Ok(out + x)
    }
}

/// One level of down or up blocks: its resnets, their transformers (cross-attention
/// levels), and the down- or upsampling convolution (all levels but the last).
pub(crate) struct Level {
    pub(crate) resnets: Vec<Resnet>,
    pub(crate) attentions: Vec<Transformer2d>,
    pub(crate) sampler: Option<Conv2d>,
}

/// The time embedding (and SDXL's text-time embedding), and `conv_in`.
pub(crate) struct Embedding {
    pub(crate) time_1: Linear,
    pub(crate) time_2: Linear,
    pub(crate) add: Option<(Linear, Linear)>,
    pub(crate) conv_in: Conv2d,
}

impl Embedding {
    pub(crate) fn new(s: &mut Spec<'_>, c: &UnetConfig) -> Embedding {
        let ch = c.block_out_channels[0];
        let temb = 4 * ch;
        let time_1 = s.linear("time_embedding.linear_1", temb, ch, true);
        let time_2 = s.linear("time_embedding.linear_2", temb, temb, true);
        let add = c.has_text_time().then(|| {
            let d = c.projection_class_embeddings_input_dim.unwrap_or_default();
            (
                s.linear("add_embedding.linear_1", temb, d, true),
                s.linear("add_embedding.linear_2", temb, temb, true),
            )
        });
        Embedding {
            time_1,
            time_2,
            add,
            conv_in: s.conv2d("conv_in", ch, c.in_channels, 3, 1, 1),
        }
    }
}

/// The down blocks and the mid block, and the channels of each skip connection.
pub(crate) struct DownMid {
    pub(crate) levels: Vec<Level>,
    pub(crate) mid: (Resnet, Transformer2d, Resnet),
    pub(crate) skips: Vec<usize>,
}

impl DownMid {
    pub(crate) fn new(s: &mut Spec<'_>, c: &UnetConfig, bl: &Blocks) -> DownMid {
        let ch = &c.block_out_channels;
        let n = ch.len();
        let mut skips = vec![ch[0]];
        let mut out = ch[0];
        let mut levels = Vec::with_capacity(n);
        for (i, &level_out) in ch.iter().enumerate() {
            let inp = out;
            out = level_out;
            let (mut resnets, mut attentions) = (Vec::new(), Vec::new());
            for j in 0..bl.layers[i] {
                let cin = if j == 0 { inp } else { out };
                resnets.push(Resnet::new(
                    s,
                    &format!("down_blocks.{i}.resnets.{j}"),
                    c,
                    (cin, out),
                ));
                if bl.down_attn[i] {
                    let p = format!("down_blocks.{i}.attentions.{j}");
                    let shape = (out, bl.depth[i], bl.heads[i]);
                    attentions.push(Transformer2d::new(s, &p, c, bl, shape));
                }
                skips.push(out);
            }
            let sampler = (i + 1 < n).then(|| {
                skips.push(out);
                let p = format!("down_blocks.{i}.downsamplers.0.conv");
                s.conv2d(&p, out, out, 3, 2, c.downsample_padding)
            });
            levels.push(Level {
                resnets,
                attentions,
                sampler,
            });
        }
        let top = ch[n - 1];
        let r0 = Resnet::new(s, "mid_block.resnets.0", c, (top, top));
        let shape = (top, bl.depth[n - 1], bl.heads[n - 1]);
        let attn = Transformer2d::new(s, "mid_block.attentions.0", c, bl, shape);
        let r1 = Resnet::new(s, "mid_block.resnets.1", c, (top, top));
        DownMid {
            levels,
            mid: (r0, attn, r1),
            skips,
        }
    }

    /// The down blocks from `x` (after `conv_in`): the last output and every skip
    /// connection (`x` itself first).
    pub(crate) fn down<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        mut x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        ctx: &Tensor<B, 3>,
    ) -> Result<(Tensor<B, 4>, Vec<Tensor<B, 4>>), Error> {
        let mut skips = vec![x.clone()];
        for level in &self.levels {
            for (j, resnet) in level.resnets.iter().enumerate() {
                x = resnet.forward(w, x, Some(temb))?;
                if let Some(t) = level.attentions.get(j) {
                    x = t.forward(w, x, ctx)?;
                }
                skips.push(x.clone());
            }
            if let Some(conv) = &level.sampler {
                x = conv.forward(w, x)?;
                skips.push(x.clone());
            }
        }
        Ok((x, skips))
    }

    /// The mid block.
    pub(crate) fn mid<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        ctx: &Tensor<B, 3>,
    ) -> Result<Tensor<B, 4>, Error> {
        let (r0, attn, r1) = &self.mid;
        let x = r0.forward(w, x, Some(temb))?;
        let x = attn.forward(w, x, ctx)?;
        r1.forward(w, x, Some(temb))
    }
}

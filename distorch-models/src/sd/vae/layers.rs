//! The VAE's layers, declared once from its configuration through a [`Spec`]: the encoder
//! (ResNet levels with stride-2 downsampling after bottom-right zero padding, the mid block,
//! the output convolution, `quant_conv`) and the decoder (`post_quant_conv`, the mid block,
//! ResNet levels with nearest-neighbour upsampling).

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use distorch_core::runtime::ExpectedTensor;

use crate::error::Error;
use crate::load::keymap::KeyMap;
use crate::nn::spec::{Conv2d, GroupNorm, Projections, Spec};
use crate::nn::{Weights, pad_bottom_right, upsample_nearest2x};
use crate::sd::unet::layers::Resnet;
use crate::sd::vae::VaeConfig;

/// Group-norm epsilon of every diffusers VAE block.
const EPS: f64 = 1e-6;

/// The VAE's layers in its file's layout.
pub(crate) struct VaeLayers {
    pub(crate) encoder: Encoder,
    pub(crate) decoder: Decoder,
    /// Every tensor, encoder first (the order of the file and of its use).
    pub(crate) expected: Vec<ExpectedTensor>,
}

impl VaeLayers {
    /// The layers of a VAE of `c`, keys through `map` (the single-file layout) or diffusers'.
    pub(crate) fn new(c: &VaeConfig, map: Option<&KeyMap>) -> VaeLayers {
        let mut s = Spec::mapped(map);
        let encoder = Encoder::new(&mut s, c);
        let decoder = Decoder::new(&mut s, c);
        VaeLayers {
            encoder,
            decoder,
            expected: s.into_expected(),
        }
    }
}

/// Single-head self-attention over the pixels, with a residual connection.
struct SpatialAttention {
    norm: GroupNorm,
    projections: Projections,
}

impl SpatialAttention {
    fn new(s: &mut Spec<'_>, p: &str, c: usize, groups: usize) -> SpatialAttention {
        SpatialAttention {
            norm: s.group_norm(&format!("{p}.group_norm"), c, groups, EPS),
            projections: Projections::new(s, p, (c, c), true),
        }
    }

    fn forward<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>, Error> {
        let [n, c, h, wd] = x.dims();
        let y = self.norm.forward(w, x.clone())?;
        let y = y.reshape([n, c, h * wd]).swap_dims(1, 2);
        let o = self.projections.forward(w, y.clone(), y, 1)?;
        Ok(o.swap_dims(1, 2).reshape([n, c, h, wd]) + x)
    }
}

/// ResNet, attention (unless the config leaves it out), ResNet at the top level's width.
struct Mid {
    first: Resnet,
    attention: Option<SpatialAttention>,
    second: Resnet,
}

impl Mid {
    fn new(s: &mut Spec<'_>, p: &str, c: &VaeConfig) -> Mid {
        let top = c.block_out_channels[c.block_out_channels.len() - 1];
        let g = c.norm_num_groups;
        Mid {
            first: Resnet::declare(s, &format!("{p}.resnets.0"), (top, top), (g, EPS), None),
            attention: c
                .mid_block_add_attention
                .then(|| SpatialAttention::new(s, &format!("{p}.attentions.0"), top, g)),
            second: Resnet::declare(s, &format!("{p}.resnets.1"), (top, top), (g, EPS), None),
        }
    }

    fn forward<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>, Error> {
        let mut x = self.first.forward(w, x, None)?;
        if let Some(a) = &self.attention {
            x = a.forward(w, x)?;
        }
        self.second.forward(w, x, None)
    }
}

/// A level of ResNets and its resampling convolution (all levels but the last).
struct Level {
    resnets: Vec<Resnet>,
    sampler: Option<Conv2d>,
}

/// The encoder, to the latent distribution's moments.
pub(crate) struct Encoder {
    conv_in: Conv2d,
    levels: Vec<Level>,
    mid: Mid,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    quant: Option<Conv2d>,
}

impl Encoder {
    fn new(s: &mut Spec<'_>, c: &VaeConfig) -> Encoder {
        let (ch, g, lc) = (&c.block_out_channels, c.norm_num_groups, c.latent_channels);
        let top = ch[ch.len() - 1];
        let conv_in = s.conv2d("encoder.conv_in", ch[0], c.in_channels, 3, 1, 1);
        let mut prev = ch[0];
        let mut levels = Vec::with_capacity(ch.len());
        for (i, &out) in ch.iter().enumerate() {
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    let cin = if j == 0 { prev } else { out };
                    let p = format!("encoder.down_blocks.{i}.resnets.{j}");
                    Resnet::declare(s, &p, (cin, out), (g, EPS), None)
                })
                .collect();
            let sampler = (i + 1 < ch.len()).then(|| {
                let p = format!("encoder.down_blocks.{i}.downsamplers.0.conv");
                s.conv2d(&p, out, out, 3, 2, 0)
            });
            levels.push(Level { resnets, sampler });
            prev = out;
        }
        Encoder {
            conv_in,
            levels,
            mid: Mid::new(s, "encoder.mid_block", c),
            norm_out: s.group_norm("encoder.conv_norm_out", top, g, EPS),
            conv_out: s.conv2d("encoder.conv_out", 2 * lc, top, 3, 1, 1),
            quant: c
                .use_quant_conv
                .then(|| s.conv2d("quant_conv", 2 * lc, 2 * lc, 1, 1, 0)),
        }
    }

    /// The moments (mean and log-variance, concatenated over channels) of `x`.
    pub(crate) fn forward<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>, Error> {
        let mut x = self.conv_in.forward(w, x)?;
        for level in &self.levels {
            for r in &level.resnets {
                x = r.forward(w, x, None)?;
            }
            if let Some(conv) = &level.sampler {
                x = conv.forward(w, pad_bottom_right(x))?;
            }
        }
        x = self.mid.forward(w, x)?;
        x = self.norm_out.forward_silu(w, x)?;
        x = self.conv_out.forward(w, x)?;
        match &self.quant {
            Some(conv) => conv.forward(w, x),
            None => Ok(x),
        }
    }
}

/// The decoder, from latents to images.
pub(crate) struct Decoder {
    post_quant: Option<Conv2d>,
    conv_in: Conv2d,
    mid: Mid,
    levels: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(s: &mut Spec<'_>, c: &VaeConfig) -> Decoder {
        let (ch, g, lc) = (&c.block_out_channels, c.norm_num_groups, c.latent_channels);
        let top = ch[ch.len() - 1];
        let post_quant = c
            .use_post_quant_conv
            .then(|| s.conv2d("post_quant_conv", lc, lc, 1, 1, 0));
        let conv_in = s.conv2d("decoder.conv_in", top, lc, 3, 1, 1);
        let mid = Mid::new(s, "decoder.mid_block", c);
        let mut prev = top;
        let mut levels = Vec::with_capacity(ch.len());
        for (i, &out) in ch.iter().rev().enumerate() {
            let resnets = (0..=c.layers_per_block)
                .map(|j| {
                    let cin = if j == 0 { prev } else { out };
                    let p = format!("decoder.up_blocks.{i}.resnets.{j}");
                    Resnet::declare(s, &p, (cin, out), (g, EPS), None)
                })
                .collect();
            let sampler = (i + 1 < ch.len()).then(|| {
                let p = format!("decoder.up_blocks.{i}.upsamplers.0.conv");
                s.conv2d(&p, out, out, 3, 1, 1)
            });
            levels.push(Level { resnets, sampler });
            prev = out;
        }
        Decoder {
            post_quant,
            conv_in,
            mid,
            levels,
            norm_out: s.group_norm("decoder.conv_norm_out", ch[0], g, EPS),
            conv_out: s.conv2d("decoder.conv_out", c.out_channels, ch[0], 3, 1, 1),
        }
    }

    /// The image decoded from latents `z`.
    pub(crate) fn forward<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        z: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>, Error> {
        let mut x = match &self.post_quant {
            Some(conv) => conv.forward(w, z)?,
            None => z,
        };
        x = self.conv_in.forward(w, x)?;
        x = self.mid.forward(w, x)?;
        for level in &self.levels {
            for r in &level.resnets {
                x = r.forward(w, x, None)?;
            }
            if let Some(conv) = &level.sampler {
                x = conv.forward(w, upsample_nearest2x(x))?;
            }
        }
        x = self.norm_out.forward_silu(w, x)?;
        self.conv_out.forward(w, x)
    }
}

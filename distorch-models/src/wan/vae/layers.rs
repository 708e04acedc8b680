//! The Wan VAE's layers, declared once from its configuration through a [`Spec`] in either
//! key layout: the encoder, the quantisation convolutions and the decoder.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use distorch_core::runtime::ExpectedTensor;

use crate::error::Error;
use crate::nn::spec::Spec;
use crate::nn::{Weights, silu};
use crate::wan::vae::blocks::{Attention, CausalCache, CausalConv, Resample, Resnet, Rms};
use crate::wan::vae::{WanVaeConfig, WanVaeLayout};

/// The VAE's layers in its file's layout.
pub(crate) struct WanVaeLayers {
    pub(crate) encoder: Encoder,
    pub(crate) quant: CausalConv,
    pub(crate) post_quant: CausalConv,
    pub(crate) decoder: Decoder,
    /// Every tensor, encoder then decoder, in the order the forward passes use them.
    pub(crate) expected: Vec<ExpectedTensor>,
}

impl WanVaeLayers {
    /// The layers of a VAE of `c`, keys in `layout`.
    pub(crate) fn new(c: &WanVaeConfig, layout: WanVaeLayout) -> WanVaeLayers {
        let res = c.num_res_blocks;
        let mut s = Spec::new(move |name| layout.unit(name, res));
        let z = c.z_dim;
        let encoder = Encoder::new(&mut s, c);
        let quant = CausalConv::new(&mut s, "quant_conv", [2 * z, 2 * z, 1, 1, 1], 0);
        let post_quant = CausalConv::new(&mut s, "post_quant_conv", [z, z, 1, 1, 1], 0);
        let decoder = Decoder::new(&mut s, c);
        WanVaeLayers {
            encoder,
            quant,
            post_quant,
            decoder,
            expected: s.into_expected(),
        }
    }
}

/// ResNet, attention, ResNet.
struct Mid {
    first: Resnet,
    attention: Attention,
    second: Resnet,
}

impl Mid {
    fn new(s: &mut Spec<'_>, side: &str, d: usize) -> Mid {
        let m = format!("{side}.mid_block");
        Mid {
            first: Resnet::new(s, &format!("{m}.resnets.0"), d, d),
            attention: Attention::new(s, &format!("{m}.attentions.0"), d),
            second: Resnet::new(s, &format!("{m}.resnets.1"), d, d),
        }
    }

    fn forward<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 5>,
        cache: &mut CausalCache<B>,
    ) -> Result<Tensor<B, 5>, Error> {
        let x = self.first.forward(w, x, cache)?;
        let x = self.attention.forward(w, x)?;
        self.second.forward(w, x, cache)
    }
}

/// One of the encoder's numbered blocks: a residual block or a downsampler.
enum Step {
    Resnet(Resnet),
    Down(Resample),
}

/// The encoder, run chunk by chunk over time.
pub(crate) struct Encoder {
    conv_in: CausalConv,
    steps: Vec<Step>,
    mid: Mid,
    norm_out: Rms,
    conv_out: CausalConv,
}

impl Encoder {
    fn new(s: &mut Spec<'_>, c: &WanVaeConfig) -> Encoder {
        let dims = c.encoder_dims();
        let conv_in = CausalConv::new(s, "encoder.conv_in", [dims[0], c.in_channels, 3, 3, 3], 1);
        let levels = c.dim_mult.len();
        let mut steps = Vec::new();
        for level in 0..levels {
            let (mut i, o) = (dims[level], dims[level + 1]);
            for _ in 0..c.num_res_blocks {
                let name = format!("encoder.down_blocks.{}", steps.len());
                steps.push(Step::Resnet(Resnet::new(s, &name, i, o)));
                i = o;
            }
            if level + 1 < levels {
                let name = format!("encoder.down_blocks.{}", steps.len());
                let temporal = c.temperal_downsample[level];
                steps.push(Step::Down(Resample::down(s, &name, o, temporal)));
            }
        }
        let d = dims[levels];
        Encoder {
            conv_in,
            steps,
            mid: Mid::new(s, "encoder", d),
            norm_out: Rms::new(s, "encoder.norm_out", vec![d, 1, 1, 1]),
            conv_out: CausalConv::new(s, "encoder.conv_out", [2 * c.z_dim, d, 3, 3, 3], 1),
        }
    }

    /// One chunk of frames through the encoder.
    pub(crate) fn forward<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 5>,
        cache: &mut CausalCache<B>,
    ) -> Result<Tensor<B, 5>, Error> {
        let mut x = self.conv_in.forward(w, x, Some(cache))?;
        for step in &self.steps {
            x = match step {
                Step::Resnet(r) => r.forward(w, x, cache)?,
                Step::Down(d) => d.downsample(w, x, cache)?,
            };
        }
        let x = self.mid.forward(w, x, cache)?;
        let x = silu(self.norm_out.forward(w, x)?);
        self.conv_out.forward(w, x, Some(cache))
    }
}

/// One level of the decoder: its residual blocks' widths and its upsampling.
struct UpLevel {
    input: usize,
    output: usize,
    upsample: Option<bool>,
}

fn up_levels(c: &WanVaeConfig) -> Vec<UpLevel> {
    let last = *c.dim_mult.last().unwrap_or(&1);
    let dims: Vec<usize> = std::iter::once(last)
        .chain(c.dim_mult.iter().rev().copied())
        .map(|m| c.base_dim * m)
        .collect();
    let levels = c.dim_mult.len();
    let up: Vec<bool> = c.temperal_downsample[..levels - 1]
        .iter()
        .rev()
        .copied()
        .collect();
    (0..levels)
        .map(|i| UpLevel {
            input: if i > 0 { dims[i] / 2 } else { dims[i] },
            output: dims[i + 1],
            upsample: (i + 1 < levels).then(|| up[i]),
        })
        .collect()
}

/// The decoder, run one latent frame at a time.
pub(crate) struct Decoder {
    conv_in: CausalConv,
    mid: Mid,
    levels: Vec<(Vec<Resnet>, Option<Resample>)>,
    norm_out: Rms,
    conv_out: CausalConv,
}

impl Decoder {
    fn new(s: &mut Spec<'_>, c: &WanVaeConfig) -> Decoder {
        let up = up_levels(c);
        let (first, z) = (up[0].input, c.z_dim);
        let conv_in = CausalConv::new(s, "decoder.conv_in", [first, z, 3, 3, 3], 1);
        let mid = Mid::new(s, "decoder", first);
        let mut levels = Vec::with_capacity(up.len());
        for (i, l) in up.iter().enumerate() {
            let mut input = l.input;
            let mut resnets = Vec::new();
            for r in 0..=c.num_res_blocks {
                let name = format!("decoder.up_blocks.{i}.resnets.{r}");
                resnets.push(Resnet::new(s, &name, input, l.output));
                input = l.output;
            }
            let upsample = l.upsample.map(|temporal| {
                let name = format!("decoder.up_blocks.{i}.upsamplers.0");
                Resample::up(s, &name, l.output, temporal)
            });
            levels.push((resnets, upsample));
        }
        let last = up.last().map_or(0, |l| l.output);
        Decoder {
            conv_in,
            mid,
            levels,
            norm_out: Rms::new(s, "decoder.norm_out", vec![last, 1, 1, 1]),
            conv_out: CausalConv::new(s, "decoder.conv_out", [c.out_channels, last, 3, 3, 3], 1),
        }
    }

    /// One latent frame through the decoder.
    pub(crate) fn forward<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        x: Tensor<B, 5>,
        cache: &mut CausalCache<B>,
    ) -> Result<Tensor<B, 5>, Error> {
        let x = self.conv_in.forward(w, x, Some(cache))?;
        let mut x = self.mid.forward(w, x, cache)?;
        for (resnets, upsample) in &self.levels {
            for r in resnets {
                x = r.forward(w, x, cache)?;
            }
            if let Some(u) = upsample {
                x = u.upsample(w, x, cache)?;
            }
        }
        let x = silu(self.norm_out.forward(w, x)?);
        self.conv_out.forward(w, x, Some(cache))
    }
}

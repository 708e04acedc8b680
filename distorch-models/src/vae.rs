//! The VAE, as diffusers' `AutoencoderKL`: an encoder to the latent distribution's mean and
//! log-variance (clamped to [-30, 20] as the reference does), and a decoder; ResNet blocks
//! with group norm, a mid block with single-head self-attention, stride-2 downsampling with
//! bottom-right zero padding, nearest-neighbour upsampling. Diffusers' key layout.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use distorch_alloc::Plan;
use distorch_core::runtime::{
    DeviceMap, ExpectedTensor, LoadOptions, LoadReport, Lookahead, Streamer, WeightStore,
};
use distorch_core::{Component, SafetensorsIndex};
use serde::Deserialize;

use crate::attention::attention;
use crate::error::Error;
use crate::keymap::{KeyLayout, KeyMap};
use crate::nn::{Weights, pad_bottom_right, upsample_nearest2x};

/// Group-norm epsilon of every diffusers VAE block.
const EPS: f64 = 1e-6;

/// The fields of a diffusers `AutoencoderKL` config the VAE uses (defaults as diffusers').
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    /// Image channels in.
    pub in_channels: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// Encoder block types (`DownEncoderBlock2D` only).
    pub down_block_types: Vec<String>,
    /// Decoder block types (`UpDecoderBlock2D` only).
    pub up_block_types: Vec<String>,
    /// Channels per level.
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per encoder level (the decoder has one more).
    pub layers_per_block: usize,
    /// `silu` only.
    pub act_fn: String,
    /// Latent channels.
    pub latent_channels: usize,
    /// Groups of every group norm.
    pub norm_num_groups: usize,
    /// Multiplies latents before the UNet (a sampler concern, kept for callers).
    pub scaling_factor: f64,
    /// Subtracted from latents before scaling (SD3/Flux VAEs), if any.
    pub shift_factor: Option<f64>,
    /// Whether `quant_conv` exists.
    pub use_quant_conv: bool,
    /// Whether `post_quant_conv` exists.
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have attention.
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfig {
    fn default() -> Self {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl VaeConfig {
    /// Reads a diffusers `config.json` and checks it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<VaeConfig, Error> {
        let config: VaeConfig = crate::config::read(path.as_ref())?;
        config.check()?;
        Ok(config)
    }

    /// Checks the values the maths depends on.
    pub fn check(&self) -> Result<(), Error> {
        let unsupported = |field, value: String, reason| {
            Err(Error::Unsupported {
                field,
                value,
                reason,
            })
        };
        if self.act_fn != "silu" {
            return unsupported("act_fn", format!("{:?}", self.act_fn), "supported: silu");
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return unsupported(
                "down_block_types",
                format!("{t:?}"),
                "supported: DownEncoderBlock2D",
            );
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            return unsupported(
                "up_block_types",
                format!("{t:?}"),
                "supported: UpDecoderBlock2D",
            );
        }
        let levels = self.block_out_channels.len();
        if levels == 0
            || self.down_block_types.len() != levels
            || self.up_block_types.len() != levels
        {
            return unsupported(
                "block_out_channels",
                format!("{:?}", self.block_out_channels),
                "needs one entry per down and up block",
            );
        }
        if self.norm_num_groups == 0
            || self
                .block_out_channels
                .iter()
                .any(|c| !c.is_multiple_of(self.norm_num_groups))
        {
            return unsupported(
                "norm_num_groups",
                self.norm_num_groups.to_string(),
                "must divide every block's channels",
            );
        }
        Ok(())
    }

    /// The configuration of a single-file (LDM layout) VAE from its tensors' shapes (`shape`
    /// of a key); group norms of 32 and the scaling factor (which shapes cannot show) are
    /// given.
    pub fn detect_ldm(
        shape: impl Fn(&str) -> Option<Vec<usize>>,
        scaling_factor: f64,
    ) -> Result<VaeConfig, Error> {
        let need = |key: &str, i: usize| {
            shape(key)
                .and_then(|s| s.get(i).copied())
                .ok_or_else(|| Error::Input {
                    input: "checkpoint",
                    reason: format!("not a single-file VAE: no `{key}` of rank > {i}"),
                })
        };
        let in_channels = need("encoder.conv_in.weight", 1)?;
        let latent = need("decoder.conv_in.weight", 1)?;
        let out = need("decoder.conv_out.weight", 0)?;
        let channels: Vec<usize> = (0..)
            .map_while(|i| shape(&format!("encoder.down.{i}.block.0.conv1.weight")))
            .map(|s| s.first().copied().unwrap_or(0))
            .collect();
        let layers = (0..)
            .take_while(|j| shape(&format!("encoder.down.0.block.{j}.conv1.weight")).is_some())
            .count();
        let n = channels.len();
        let config = VaeConfig {
            in_channels,
            out_channels: out,
            down_block_types: vec!["DownEncoderBlock2D".into(); n],
            up_block_types: vec!["UpDecoderBlock2D".into(); n],
            block_out_channels: channels,
            layers_per_block: layers,
            latent_channels: latent,
            scaling_factor,
            use_quant_conv: shape("quant_conv.weight").is_some(),
            use_post_quant_conv: shape("post_quant_conv.weight").is_some(),
            mid_block_add_attention: shape("encoder.mid.attn_1.q.weight").is_some(),
            ..VaeConfig::default()
        };
        config.check()?;
        Ok(config)
    }

    /// Every tensor the VAE reads, with keys in `layout`.
    pub fn expected_tensors_in(&self, layout: KeyLayout) -> Vec<ExpectedTensor> {
        match layout {
            KeyLayout::Diffusers => self.expected_tensors(),
            KeyLayout::Ldm => ldm_map(self).expected(self.expected_tensors()),
        }
    }

    /// Every tensor the VAE reads, diffusers keys.
    pub fn expected_tensors(&self) -> Vec<ExpectedTensor> {
        let mut out = Vec::new();
        let mut conv = |name: String, o: usize, i: usize, k: usize| {
            out.push(ExpectedTensor {
                name: format!("{name}.weight"),
                shape: vec![o, i, k, k],
            });
            out.push(ExpectedTensor {
                name: format!("{name}.bias"),
                shape: vec![o],
            });
        };
        let ch = &self.block_out_channels;
        let top = ch[ch.len() - 1];
        let lc = self.latent_channels;
        conv("encoder.conv_in".into(), ch[0], self.in_channels, 3);
        let mut prev = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            for j in 0..self.layers_per_block {
                let cin = if j == 0 { prev } else { c };
                resnet_convs(
                    &mut conv,
                    &format!("encoder.down_blocks.{i}.resnets.{j}"),
                    cin,
                    c,
                );
            }
            if i + 1 < ch.len() {
                conv(
                    format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                    c,
                    c,
                    3,
                );
            }
            prev = c;
        }
        mid_convs(&mut conv, "encoder.mid_block", top);
        conv("encoder.conv_out".into(), 2 * lc, top, 3);
        if self.use_quant_conv {
            conv("quant_conv".into(), 2 * lc, 2 * lc, 1);
        }
        if self.use_post_quant_conv {
            conv("post_quant_conv".into(), lc, lc, 1);
        }
        conv("decoder.conv_in".into(), top, lc, 3);
        mid_convs(&mut conv, "decoder.mid_block", top);
        let mut prev = top;
        for (i, &c) in ch.iter().rev().enumerate() {
            for j in 0..=self.layers_per_block {
                let cin = if j == 0 { prev } else { c };
                resnet_convs(
                    &mut conv,
                    &format!("decoder.up_blocks.{i}.resnets.{j}"),
                    cin,
                    c,
                );
            }
            if i + 1 < ch.len() {
                conv(format!("decoder.up_blocks.{i}.upsamplers.0.conv"), c, c, 3);
            }
            prev = c;
        }
        conv("decoder.conv_out".into(), self.out_channels, ch[0], 3);
        let mut matrices = Vec::new();
        let mut vectors = |name: String, n: usize| {
            for p in ["weight", "bias"] {
                out.push(ExpectedTensor {
                    name: format!("{name}.{p}"),
                    shape: vec![n],
                });
            }
        };
        // Norms and attention projections (vectors and matrices).
        let mut prev = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            for j in 0..self.layers_per_block {
                let cin = if j == 0 { prev } else { c };
                let p = format!("encoder.down_blocks.{i}.resnets.{j}");
                vectors(format!("{p}.norm1"), cin);
                vectors(format!("{p}.norm2"), c);
            }
            prev = c;
        }
        let mut prev = top;
        for (i, &c) in ch.iter().rev().enumerate() {
            for j in 0..=self.layers_per_block {
                let cin = if j == 0 { prev } else { c };
                let p = format!("decoder.up_blocks.{i}.resnets.{j}");
                vectors(format!("{p}.norm1"), cin);
                vectors(format!("{p}.norm2"), c);
            }
            prev = c;
        }
        for side in ["encoder", "decoder"] {
            for r in 0..2 {
                vectors(format!("{side}.mid_block.resnets.{r}.norm1"), top);
                vectors(format!("{side}.mid_block.resnets.{r}.norm2"), top);
            }
            if self.mid_block_add_attention {
                let a = format!("{side}.mid_block.attentions.0");
                vectors(format!("{a}.group_norm"), top);
                for proj in ["to_q", "to_k", "to_v", "to_out.0"] {
                    // [top, top] weight; the bias is a vector like a norm's.
                    vectors(format!("{a}.{proj}"), top);
                    matrices.push(format!("{a}.{proj}.weight"));
                }
            }
        }
        vectors("encoder.conv_norm_out".into(), top);
        vectors("decoder.conv_norm_out".into(), ch[0]);
        // `vectors` listed a [top] "weight" for each projection; they are [top, top].
        for e in &mut out {
            if matrices.contains(&e.name) {
                e.shape = vec![top, top];
            }
        }
        out
    }
}

fn resnet_convs(conv: &mut impl FnMut(String, usize, usize, usize), p: &str, cin: usize, c: usize) {
    conv(format!("{p}.conv1"), c, cin, 3);
    conv(format!("{p}.conv2"), c, c, 3);
    if cin != c {
        conv(format!("{p}.conv_shortcut"), c, cin, 1);
    }
}

fn mid_convs(conv: &mut impl FnMut(String, usize, usize, usize), p: &str, c: usize) {
    for r in 0..2 {
        resnet_convs(conv, &format!("{p}.resnets.{r}"), c, c);
    }
}

/// A VAE whose weights live where its plan put them.
pub struct AutoencoderKl<B: Backend> {
    config: VaeConfig,
    streamer: Arc<Streamer<B>>,
    /// diffusers names to the file's, for the single-file layout.
    map: Option<KeyMap>,
}

impl<B: Backend> AutoencoderKl<B> {
    /// Loads the VAE from `component` of `index` at the homes `plan` gives (see
    /// [`WeightStore::load`]), in diffusers' key layout or the original single-file one
    /// (recognised from the names). The streamer records the execution order on the first
    /// pass, so a decode-only pipeline prefetches decoder units only.
    pub fn load(
        index: &SafetensorsIndex,
        component: &Component<'_>,
        plan: &Plan,
        devices: &DeviceMap<B>,
        config: VaeConfig,
        options: &LoadOptions<'_, B>,
        lookahead: Lookahead,
    ) -> Result<(AutoencoderKl<B>, LoadReport), Error> {
        config.check()?;
        let ldm = KeyLayout::of_vae(component) == KeyLayout::Ldm;
        let map = ldm.then(|| ldm_map(&config));
        let expected = config.expected_tensors();
        let expected = match &map {
            Some(m) => m.expected(expected),
            None => expected,
        };
        let options = options.expecting(&expected);
        let (store, report) = WeightStore::load(index, component, plan, devices, &options)?;
        let streamer = Arc::new(Streamer::new(Arc::new(store), lookahead));
        Ok((
            AutoencoderKl {
                config,
                streamer,
                map,
            },
            report,
        ))
    }

    /// The configuration.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The streamer (its statistics, its execution order).
    pub fn streamer(&self) -> &Streamer<B> {
        &self.streamer
    }

    fn weights(&self) -> Weights<'_, B> {
        Weights::new(&self.streamer, "").with_map(self.map.as_ref())
    }

    /// Encodes images [batch, in_channels, h, w] (h and w divisible by 2^(levels-1)) to the
    /// latent distribution's `(mean, logvar)`, each [batch, latent_channels, h/f, w/f].
    pub fn encode(&self, image: Tensor<B, 4>) -> Result<(Tensor<B, 4>, Tensor<B, 4>), Error> {
        let c = &self.config;
        let [_, channels, h, wd] = image.dims();
        let factor = 1 << (c.block_out_channels.len() - 1);
        if channels != c.in_channels || h % factor != 0 || wd % factor != 0 || h == 0 || wd == 0 {
            return Err(Error::Input {
                input: "image",
                reason: format!(
                    "shape [_, {channels}, {h}, {wd}]: expected {} channels and a size \
                     divisible by {factor}",
                    c.in_channels
                ),
            });
        }
        let w = self.weights();
        let g = c.norm_num_groups;
        let ch = &c.block_out_channels;
        let mut x = w.conv2d("encoder.conv_in", w.input(image), 1, 1)?;
        let mut prev = ch[0];
        for (i, &out) in ch.iter().enumerate() {
            for j in 0..c.layers_per_block {
                let cin = if j == 0 { prev } else { out };
                x = resnet(
                    &w,
                    &format!("encoder.down_blocks.{i}.resnets.{j}"),
                    x,
                    cin,
                    out,
                    g,
                )?;
            }
            if i + 1 < ch.len() {
                let conv = format!("encoder.down_blocks.{i}.downsamplers.0.conv");
                x = w.conv2d(&conv, pad_bottom_right(x), 2, 0)?;
            }
            prev = out;
        }
        x = self.mid(&w, "encoder.mid_block", x)?;
        x = w.group_norm_silu("encoder.conv_norm_out", x, g, EPS)?;
        x = w.conv2d("encoder.conv_out", x, 1, 1)?;
        if c.use_quant_conv {
            x = w.conv2d("quant_conv", x, 1, 0)?;
        }
        let lc = c.latent_channels;
        let x = w.output(x);
        let mean = x.clone().narrow(1, 0, lc);
        let logvar = x.narrow(1, lc, lc).clamp(-30.0, 20.0);
        Ok((mean, logvar))
    }

    /// Decodes latents [batch, latent_channels, h, w] to images [batch, out_channels,
    /// h·f, w·f].
    pub fn decode(&self, z: Tensor<B, 4>) -> Result<Tensor<B, 4>, Error> {
        let c = &self.config;
        let [_, channels, h, wd] = z.dims();
        if channels != c.latent_channels || h == 0 || wd == 0 {
            return Err(Error::Input {
                input: "z",
                reason: format!(
                    "shape [_, {channels}, {h}, {wd}]: expected {} latent channels",
                    c.latent_channels
                ),
            });
        }
        let w = self.weights();
        let g = c.norm_num_groups;
        let ch = &c.block_out_channels;
        let mut x = w.input(z);
        if c.use_post_quant_conv {
            x = w.conv2d("post_quant_conv", x, 1, 0)?;
        }
        x = w.conv2d("decoder.conv_in", x, 1, 1)?;
        x = self.mid(&w, "decoder.mid_block", x)?;
        let mut prev = ch[ch.len() - 1];
        for (i, &out) in ch.iter().rev().enumerate() {
            for j in 0..=c.layers_per_block {
                let cin = if j == 0 { prev } else { out };
                x = resnet(
                    &w,
                    &format!("decoder.up_blocks.{i}.resnets.{j}"),
                    x,
                    cin,
                    out,
                    g,
                )?;
            }
            if i + 1 < ch.len() {
                let conv = format!("decoder.up_blocks.{i}.upsamplers.0.conv");
                x = w.conv2d(&conv, upsample_nearest2x(x), 1, 1)?;
            }
            prev = out;
        }
        x = w.group_norm_silu("decoder.conv_norm_out", x, g, EPS)?;
        Ok(w.output(w.conv2d("decoder.conv_out", x, 1, 1)?))
    }

    /// ResNet, attention, ResNet at the top level's width.
    fn mid(&self, w: &Weights<'_, B>, p: &str, x: Tensor<B, 4>) -> Result<Tensor<B, 4>, Error> {
        let c = &self.config;
        let top = c.block_out_channels[c.block_out_channels.len() - 1];
        let g = c.norm_num_groups;
        let mut x = resnet(w, &format!("{p}.resnets.0"), x, top, top, g)?;
        if c.mid_block_add_attention {
            x = spatial_attention(w, &format!("{p}.attentions.0"), x, g)?;
        }
        resnet(w, &format!("{p}.resnets.1"), x, top, top, g)
    }
}

/// diffusers' `ResnetBlock2D` without a time embedding.
fn resnet<B: Backend>(
    w: &Weights<'_, B>,
    p: &str,
    x: Tensor<B, 4>,
    cin: usize,
    cout: usize,
    groups: usize,
) -> Result<Tensor<B, 4>, Error> {
    let h = w.group_norm_silu(&format!("{p}.norm1"), x.clone(), groups, EPS)?;
    let h = w.conv2d(&format!("{p}.conv1"), h, 1, 1)?;
    let h = w.group_norm_silu(&format!("{p}.norm2"), h, groups, EPS)?;
    let h = w.conv2d(&format!("{p}.conv2"), h, 1, 1)?;
    let skip = if cin != cout {
        w.conv2d(&format!("{p}.conv_shortcut"), x, 1, 0)?
    } else {
        x
    };
    Ok(skip + h)
}

/// Single-head self-attention over the pixels, with a residual connection.
fn spatial_attention<B: Backend>(
    w: &Weights<'_, B>,
    p: &str,
    x: Tensor<B, 4>,
    groups: usize,
) -> Result<Tensor<B, 4>, Error> {
    let [n, c, h, wd] = x.dims();
    let y = w.group_norm(&format!("{p}.group_norm"), x.clone(), groups, EPS)?;
    let y = y.reshape([n, c, h * wd]).swap_dims(1, 2);
    let q = w.linear(&format!("{p}.to_q"), y.clone())?;
    let k = w.linear(&format!("{p}.to_k"), y.clone())?;
    let v = w.linear(&format!("{p}.to_v"), y)?;
    let a = attention(q, k, v, 1, None);
    let o = w.linear(&format!("{p}.to_out.0"), a)?;
    Ok(o.swap_dims(1, 2).reshape([n, c, h, wd]) + x)
}

/// The original (LDM) single-file VAE layout (`encoder.down.N.block.M`, `mid.attn_1.q` as 1×1
/// convolutions, decoder levels numbered from the bottom), as diffusers' converter reads it.
pub(crate) fn ldm_map(config: &VaeConfig) -> KeyMap {
    const RESNET: &[(&str, &str)] = &[("conv_shortcut", "nin_shortcut")];
    const ATTN: &[(&str, &str)] = &[
        ("group_norm", "norm"),
        ("to_q", "q"),
        ("to_k", "k"),
        ("to_v", "v"),
        ("to_out.0", "proj_out"),
    ];
    let n = config.block_out_channels.len();
    let mut m = KeyMap::default();
    for side in ["encoder", "decoder"] {
        m.prefix(format!("{side}.conv_norm_out"), format!("{side}.norm_out"));
        for r in 0..2 {
            m.rename(
                format!("{side}.mid_block.resnets.{r}"),
                format!("{side}.mid.block_{}", r + 1),
                RESNET,
            );
        }
        m.rename(
            format!("{side}.mid_block.attentions.0"),
            format!("{side}.mid.attn_1"),
            ATTN,
        );
        for p in ["q", "k", "v", "proj_out"] {
            m.conv1x1(format!("{side}.mid.attn_1.{p}"));
        }
    }
    for i in 0..n {
        let level = n - 1 - i;
        m.prefix(
            format!("encoder.down_blocks.{i}.downsamplers.0"),
            format!("encoder.down.{i}.downsample"),
        );
        m.prefix(
            format!("decoder.up_blocks.{i}.upsamplers.0"),
            format!("decoder.up.{level}.upsample"),
        );
        for j in 0..=config.layers_per_block {
            m.rename(
                format!("encoder.down_blocks.{i}.resnets.{j}"),
                format!("encoder.down.{i}.block.{j}"),
                RESNET,
            );
            m.rename(
                format!("decoder.up_blocks.{i}.resnets.{j}"),
                format!("decoder.up.{level}.block.{j}"),
                RESNET,
            );
        }
    }
    m
}

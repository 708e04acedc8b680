//! The VAE, as diffusers' `AutoencoderKL`: an encoder to the latent distribution's mean and
//! log-variance (clamped to [-30, 20] as the reference does), and a decoder; ResNet blocks
//! with group norm, a mid block with single-head self-attention, stride-2 downsampling with
//! bottom-right zero padding, nearest-neighbour upsampling. Diffusers' key layout.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use distorch_core::Component;
use distorch_core::runtime::{ExpectedTensor, LoadReport, Streamer};
use serde::Deserialize;

use crate::error::{Error, unsupported};
use crate::load::keymap::KeyLayout;
use crate::load::{LoadContext, Model, needs_config, shape_map, to_usize};
use crate::nn::Weights;
use distorch_core::ComponentKind;

mod layers;
mod ldm;

use layers::VaeLayers;
pub(crate) use ldm::ldm_map;

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
        crate::load::config::read_checked(path.as_ref(), VaeConfig::check)
    }

    /// Checks the values the maths depends on.
    pub fn check(&self) -> Result<(), Error> {
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
                .ok_or_else(|| Error::NotTheModel {
                    model: "single-file VAE",
                    reason: format!("no `{key}` of rank > {i}"),
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
        let map = (layout == KeyLayout::Ldm).then(|| ldm_map(self));
        VaeLayers::new(self, map.as_ref()).expected
    }

    /// Every tensor the VAE reads, diffusers keys.
    pub fn expected_tensors(&self) -> Vec<ExpectedTensor> {
        VaeLayers::new(self, None).expected
    }
}

/// A VAE whose weights live where its plan put them.
pub struct AutoencoderKl<B: Backend> {
    config: VaeConfig,
    streamer: Arc<Streamer<B>>,
    layers: VaeLayers,
}

impl<B: Backend> AutoencoderKl<B> {
    /// The configuration.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The streamer (its statistics, its execution order).
    pub fn streamer(&self) -> &Streamer<B> {
        &self.streamer
    }

    fn weights(&self) -> Weights<'_, B> {
        Weights::new(&self.streamer)
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
        let x = self.layers.encoder.forward(&w, w.input(image))?;
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
        let x = self.layers.decoder.forward(&w, w.input(z))?;
        Ok(w.output(x))
    }
}

impl<B: Backend> Model<B> for AutoencoderKl<B> {
    type Config = VaeConfig;
    const KIND: ComponentKind = ComponentKind::Vae;
    fn config_from_file(path: &Path) -> Result<VaeConfig, Error> {
        VaeConfig::from_file(path)
    }
    /// SD 1.x's scaling factor (0.18215) unless a configuration is given: the VAE's
    /// shapes do not tell it (SDXL's is 0.13025; the checkpoint loader sets it).
    fn detect_config(c: &Component<'_>) -> Result<VaeConfig, Error> {
        if KeyLayout::of_vae(c) == KeyLayout::Diffusers {
            return Err(needs_config("VAE"));
        }
        VaeConfig::detect(c, 0.18215)
    }
    fn execution_order(_: &VaeConfig, _: &Component<'_>) -> Result<Vec<String>, Error> {
        // File order: the encoder, then the decoder, is how the VAE is used.
        Ok(Vec::new())
    }
    fn streamer(&self) -> &Streamer<B> {
        self.streamer()
    }
    /// Loads the VAE from `component` of `index` at the homes `plan` gives (see
    /// [`WeightStore::load`]), in diffusers' key layout or the original single-file one
    /// (recognised from the names). The streamer records the execution order on the first
    /// pass, so a decode-only pipeline prefetches decoder units only.
    fn load(ctx: &LoadContext<'_, B>, config: Self::Config) -> Result<(Self, LoadReport), Error> {
        config.check()?;
        let ldm = KeyLayout::of_vae(ctx.component) == KeyLayout::Ldm;
        let map = ldm.then(|| ldm_map(&config));
        let layers = VaeLayers::new(&config, map.as_ref());
        let (streamer, report) = ctx.stream_recorded(&layers.expected)?;
        Ok((
            AutoencoderKl {
                config,
                streamer,
                layers,
            },
            report,
        ))
    }
}

impl VaeConfig {
    /// The configuration of a single-file (LDM layout) VAE component from its shapes; a
    /// diffusers-layout VAE needs its `config.json`.
    pub fn detect(c: &Component<'_>, scaling_factor: f64) -> Result<VaeConfig, Error> {
        let shapes = shape_map(c);
        VaeConfig::detect_ldm(|k| shapes.get(k).map(|s| to_usize(s)), scaling_factor)
    }
}

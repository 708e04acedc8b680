//! [`VaeConfig`]: the fields of a diffusers `AutoencoderKL` config, checked, or read from a
//! single-file VAE's shapes.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, unsupported};

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
}

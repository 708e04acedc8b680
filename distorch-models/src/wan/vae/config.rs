//! [`WanVaeConfig`]: the fields of a diffusers `AutoencoderKLWan` config, checked, or read
//! from a file's shapes; [`WanVaeLayout`]: the two key layouts.

use std::path::Path;

use distorch_core::Component;
use serde::Deserialize;

use crate::error::{Error, unsupported};
use crate::load::{shape_map, to_usize};

/// The fields of a diffusers `AutoencoderKLWan` config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct WanVaeConfig {
    /// Channels of the first level.
    pub base_dim: usize,
    /// The decoder's, when it differs.
    pub decoder_base_dim: Option<usize>,
    /// Latent channels.
    pub z_dim: usize,
    /// Channel multiplier per level.
    pub dim_mult: Vec<usize>,
    /// Residual blocks per level (the decoder has one more).
    pub num_res_blocks: usize,
    /// Must be empty (no attention in the down/up blocks).
    pub attn_scales: Vec<f64>,
    /// Which levels also halve the frames.
    pub temperal_downsample: Vec<bool>,
    /// Per-channel latent mean (for the pipeline's normalisation).
    pub latents_mean: Vec<f64>,
    /// Per-channel latent standard deviation.
    pub latents_std: Vec<f64>,
    /// Wan 2.2's residual VAE: not supported.
    pub is_residual: bool,
    /// Video channels in.
    pub in_channels: usize,
    /// Video channels out.
    pub out_channels: usize,
    /// Wan 2.2's patchified VAE: not supported.
    pub patch_size: Option<usize>,
}

impl Default for WanVaeConfig {
    /// Wan 2.1's VAE.
    fn default() -> Self {
        WanVaeConfig {
            base_dim: 96,
            decoder_base_dim: None,
            z_dim: 16,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            attn_scales: Vec::new(),
            temperal_downsample: vec![false, true, true],
            latents_mean: vec![
                -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134,
                -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
            ],
            latents_std: vec![
                2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526,
                2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
            ],
            is_residual: false,
            in_channels: 3,
            out_channels: 3,
            patch_size: None,
        }
    }
}

impl WanVaeConfig {
    /// Reads a diffusers `config.json` and checks it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<WanVaeConfig, Error> {
        crate::load::config::read_checked(path.as_ref(), WanVaeConfig::check)
    }

    /// Refuses what is not implemented.
    pub fn check(&self) -> Result<(), Error> {
        if self.is_residual || self.patch_size.is_some() {
            return unsupported(
                "is_residual",
                self.is_residual.to_string(),
                "Wan 2.2's residual, patchified VAE is not implemented (Wan 2.1's VAE only)",
            );
        }
        if !self.attn_scales.is_empty() {
            return unsupported(
                "attn_scales",
                format!("{:?}", self.attn_scales),
                "attention outside the middle blocks is not implemented",
            );
        }
        let levels = self.dim_mult.len().saturating_sub(1);
        let temporal = self
            .temperal_downsample
            .iter()
            .take(levels)
            .filter(|t| **t)
            .count();
        if temporal > 2 {
            // Encoding runs chunks of four frames (as the reference): at most two halvings.
            return unsupported(
                "temperal_downsample",
                format!("{:?}", self.temperal_downsample),
                "at most two temporal downsampling levels (chunks of four frames)",
            );
        }
        if self.dim_mult.is_empty()
            || self.temperal_downsample.len() + 1 < self.dim_mult.len()
            || self.decoder_base_dim.is_some_and(|d| d != self.base_dim)
        {
            return unsupported(
                "dim_mult",
                format!("{:?}", self.dim_mult),
                "needs a temporal flag per downsampling level and one base width",
            );
        }
        Ok(())
    }

    /// Frames of video per latent frame after the first.
    pub fn temporal_factor(&self) -> usize {
        let levels = self.dim_mult.len() - 1;
        1 << self.temperal_downsample[..levels]
            .iter()
            .filter(|t| **t)
            .count()
    }

    /// Pixels per latent pixel along each side.
    pub fn spatial_factor(&self) -> usize {
        1 << (self.dim_mult.len() - 1)
    }

    /// Encoder widths, first level to last.
    pub(crate) fn encoder_dims(&self) -> Vec<usize> {
        std::iter::once(1)
            .chain(self.dim_mult.iter().copied())
            .map(|m| self.base_dim * m)
            .collect()
    }

    /// The configuration from a component's shapes (either layout); latent statistics are
    /// Wan 2.1's.
    pub fn detect(c: &Component<'_>) -> Result<WanVaeConfig, Error> {
        let layout = WanVaeLayout::of(c);
        let shapes = shape_map(c);
        let n_guess = 2;
        let get = |unit: &str, param: &str| {
            shapes
                .get(&format!("{}.{param}", layout.unit(unit, n_guess)))
                .map(|s| to_usize(s))
        };
        let not = |what: &str| Error::NotTheModel {
            model: "Wan VAE",
            reason: what.to_owned(),
        };
        let conv_in = get("encoder.conv_in", "weight").ok_or_else(|| not("no encoder"))?;
        let post = get("post_quant_conv", "weight").ok_or_else(|| not("no post_quant_conv"))?;
        let (&[base, in_channels, ..], &[z_dim, ..]) = (&conv_in[..], &post[..]) else {
            return Err(not("unexpected ranks"));
        };
        // Walk the encoder's flat list: residual blocks, and resamples between levels.
        let (mut dim_mult, mut temporal, mut res) = (Vec::new(), Vec::new(), 0usize);
        let mut per_level = Vec::new();
        let mut width = base;
        for j in 0.. {
            let block = format!("encoder.down_blocks.{j}");
            if let Some(w) = get(&format!("{block}.conv1"), "weight") {
                width = w[0];
                res += 1;
            } else if get(&format!("{block}.resample.1"), "weight").is_some() {
                dim_mult.push(width / base.max(1));
                temporal.push(get(&format!("{block}.time_conv"), "weight").is_some());
                per_level.push(std::mem::take(&mut res));
            } else {
                break;
            }
        }
        dim_mult.push(width / base.max(1));
        per_level.push(res);
        let num_res_blocks = per_level[0];
        if num_res_blocks != n_guess && layout == WanVaeLayout::Original {
            return Err(not(
                "the original layout is read with two residual blocks per level",
            ));
        }
        while temporal.len() < dim_mult.len() - 1 {
            temporal.push(false);
        }
        let out = get("decoder.conv_out", "weight").ok_or_else(|| not("no decoder"))?;
        let config = WanVaeConfig {
            base_dim: base,
            z_dim,
            dim_mult,
            num_res_blocks,
            temperal_downsample: temporal,
            in_channels,
            out_channels: out[0],
            ..WanVaeConfig::default()
        };
        config.check()?;
        Ok(config)
    }
}

/// The two key layouts of a Wan VAE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WanVaeLayout {
    /// diffusers' `AutoencoderKLWan` names.
    Diffusers,
    /// The original Wan (and ComfyUI) names: `encoder.downsamples.*`, `decoder.upsamples.*`,
    /// `middle.*`, `head.*`, `conv1`/`conv2` for the quantisation convolutions.
    Original,
}

impl WanVaeLayout {
    /// The layout of a component: the original one has `encoder.downsamples.*`.
    pub fn of(c: &Component<'_>) -> WanVaeLayout {
        if c.local_names()
            .any(|n| n.starts_with("encoder.downsamples."))
        {
            WanVaeLayout::Original
        } else {
            WanVaeLayout::Diffusers
        }
    }

    /// A unit's name (diffusers naming) in this layout, for `res` residual blocks per
    /// encoder level (diffusers' converter's mapping, inverted).
    pub fn unit(self, ours: &str, res: usize) -> String {
        if self == WanVaeLayout::Diffusers {
            return ours.to_owned();
        }
        let resnet = |p: &str| -> String {
            const R: &[(&str, &str)] = &[
                ("norm1", "residual.0"),
                ("conv1", "residual.2"),
                ("norm2", "residual.3"),
                ("conv2", "residual.6"),
                ("conv_shortcut", "shortcut"),
            ];
            R.iter()
                .find(|(d, _)| *d == p)
                .map_or(p.to_owned(), |(_, o)| (*o).to_owned())
        };
        match ours {
            "quant_conv" => return "conv1".into(),
            "post_quant_conv" => return "conv2".into(),
            _ => {}
        }
        let (side, rest) = ours.split_once('.').unwrap_or((ours, ""));
        let parts: Vec<&str> = rest.split('.').collect();
        let tail = |from: usize| parts[from..].join(".");
        let mapped = match parts.as_slice() {
            ["conv_in"] => "conv1".to_owned(),
            ["norm_out"] => "head.0".to_owned(),
            ["conv_out"] => "head.2".to_owned(),
            ["mid_block", "attentions", "0", ..] => format!("middle.1.{}", tail(3)),
            ["mid_block", "resnets", r, p] => {
                let m = if *r == "0" { 0 } else { 2 };
                format!("middle.{m}.{}", resnet(p))
            }
            ["down_blocks", j, p] => format!("downsamples.{j}.{}", resnet(p)),
            ["down_blocks", j, ..] => format!("downsamples.{j}.{}", tail(2)),
            ["up_blocks", i, "resnets", j, p] => {
                let (i, j) = (i.parse().unwrap_or(0), j.parse().unwrap_or(0));
                format!("upsamples.{}.{}", (res + 2) * i + j, resnet(p))
            }
            ["up_blocks", i, "upsamplers", "0", ..] => {
                let i: usize = i.parse().unwrap_or(0);
                format!("upsamples.{}.{}", (res + 2) * i + res + 1, tail(4))
            }
            _ => rest.to_owned(),
        };
        format!("{side}.{mapped}")
    }
}

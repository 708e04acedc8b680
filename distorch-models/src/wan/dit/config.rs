//! [`WanDitConfig`]: the fields of a diffusers `WanTransformer3DModel` config, checked, or
//! read from a file's shapes; [`WanSize`]: the released model a size matches.

use std::path::Path;

use distorch_core::Component;
use serde::Deserialize;

use crate::error::{Error, unsupported};
use crate::load::{shape_map, to_usize};
use crate::wan::keys::WanLayout;

/// The fields of a diffusers `WanTransformer3DModel` config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct WanDitConfig {
    /// Patch size over (frames, height, width).
    pub patch_size: [usize; 3],
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Width of one head.
    pub attention_head_dim: usize,
    /// Latent channels in.
    pub in_channels: usize,
    /// Latent channels out.
    pub out_channels: usize,
    /// Width of the text encoder's states.
    pub text_dim: usize,
    /// Width of the sinusoidal time embedding.
    pub freq_dim: usize,
    /// Width of the feed-forward layer.
    pub ffn_dim: usize,
    /// Transformer blocks.
    pub num_layers: usize,
    /// Whether the cross-attention input is layer-normed (with weight and bias).
    pub cross_attn_norm: bool,
    /// Only `rms_norm_across_heads` is supported.
    pub qk_norm: Option<String>,
    /// Norm epsilon.
    pub eps: f64,
    /// Image conditioning (I2V): not supported, must be absent.
    pub image_dim: Option<usize>,
    /// Added k/v projections (I2V): not supported, must be absent.
    pub added_kv_proj_dim: Option<usize>,
    /// Positions the rotary embedding covers per axis.
    pub rope_max_seq_len: usize,
}

impl Default for WanDitConfig {
    /// Wan 2.1 T2V 14B.
    fn default() -> Self {
        WanDitConfig {
            patch_size: [1, 2, 2],
            num_attention_heads: 40,
            attention_head_dim: 128,
            in_channels: 16,
            out_channels: 16,
            text_dim: 4096,
            freq_dim: 256,
            ffn_dim: 13824,
            num_layers: 40,
            cross_attn_norm: true,
            qk_norm: Some("rms_norm_across_heads".into()),
            eps: 1e-6,
            image_dim: None,
            added_kv_proj_dim: None,
            rope_max_seq_len: 1024,
        }
    }
}

/// A configuration read from shapes, with the model's size class.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectedWan {
    /// The configuration.
    pub config: WanDitConfig,
    /// The released model its size matches.
    pub family: WanSize,
}

/// The released Wan transformer a configuration's size matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WanSize {
    /// Wan 2.1 1.3B: 1,536 wide, 30 blocks.
    Wan1_3B,
    /// Wan 2.1 14B: 5,120 wide, 40 blocks.
    Wan14B,
    /// Wan 2.2 5B: 3,072 wide, 30 blocks.
    Wan22_5B,
    /// Any other size.
    Other,
}

impl std::fmt::Display for WanSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WanSize::Wan1_3B => "Wan 1.3B",
            WanSize::Wan14B => "Wan 14B",
            WanSize::Wan22_5B => "Wan 2.2 5B",
            WanSize::Other => "Wan (other size)",
        })
    }
}

impl WanDitConfig {
    /// Reads a diffusers `config.json` and checks it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<WanDitConfig, Error> {
        crate::load::config::read_checked(path.as_ref(), WanDitConfig::check)
    }

    /// Width of the hidden states.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Checks what the maths depends on and refuses what is not implemented.
    pub fn check(&self) -> Result<(), Error> {
        if self.image_dim.is_some() || self.added_kv_proj_dim.is_some() {
            return unsupported(
                "image_dim",
                format!("{:?}", self.image_dim),
                "image conditioning (I2V) is not implemented; text-to-video models only",
            );
        }
        if self.qk_norm.as_deref() != Some("rms_norm_across_heads") {
            return unsupported(
                "qk_norm",
                format!("{:?}", self.qk_norm),
                "supported: rms_norm_across_heads",
            );
        }
        if self.attention_head_dim < 6 || self.attention_head_dim % 2 == 1 {
            return unsupported(
                "attention_head_dim",
                self.attention_head_dim.to_string(),
                "must be even and at least 6 (three rotary sections)",
            );
        }
        if self.patch_size.contains(&0) || self.num_attention_heads == 0 {
            return unsupported(
                "patch_size",
                format!("{:?}", self.patch_size),
                "patch sizes and heads must be positive",
            );
        }
        Ok(())
    }

    /// The configuration from a component's shapes (either layout). Heads are 128 wide, as
    /// in every released Wan model; tiny or unusual models need their `config.json`.
    pub fn detect(c: &Component<'_>) -> Result<DetectedWan, Error> {
        let layout = WanLayout::of(c);
        let shapes = shape_map(c);
        let get = |unit: &str, param: &str| {
            shapes
                .get(&format!("{}.{param}", layout.unit(unit)))
                .map(|s| to_usize(s))
        };
        let not = |what: &str| Error::NotTheModel {
            model: "Wan transformer",
            reason: what.to_owned(),
        };
        if shapes
            .keys()
            .any(|k| k.starts_with("img_emb.") || k.contains("image_embedder"))
        {
            return Err(Error::Unsupported {
                field: "image_dim",
                value: "an image embedder".into(),
                reason: "image conditioning (I2V) is not implemented; text-to-video models only",
            });
        }
        let patch = get("patch_embedding", "weight").ok_or_else(|| not("no patch_embedding"))?;
        let text = get("condition_embedder.text_embedder.linear_1", "weight")
            .ok_or_else(|| not("no text embedder"))?;
        let time = get("condition_embedder.time_embedder.linear_1", "weight")
            .ok_or_else(|| not("no time embedder"))?;
        let ffn = get("blocks.0.ffn.net.0.proj", "weight").ok_or_else(|| not("no blocks"))?;
        let head = get("proj_out", "weight").ok_or_else(|| not("no output head"))?;
        let (&[inner, in_channels, pt, ph, pw], &[_, text_dim], &[_, freq_dim], &[ffn_dim, _]) =
            (&patch[..], &text[..], &time[..], &ffn[..])
        else {
            return Err(not("unexpected ranks"));
        };
        if inner % 128 != 0 {
            return Err(not(&format!(
                "width {inner} is not a multiple of 128-wide heads; give its config.json"
            )));
        }
        let num_layers = (0..)
            .take_while(|l| get(&format!("blocks.{l}.attn1.to_q"), "weight").is_some())
            .count();
        let config = WanDitConfig {
            patch_size: [pt, ph, pw],
            num_attention_heads: inner / 128,
            attention_head_dim: 128,
            in_channels,
            out_channels: head[0] / (pt * ph * pw).max(1),
            text_dim,
            freq_dim,
            ffn_dim,
            num_layers,
            cross_attn_norm: get("blocks.0.norm2", "weight").is_some(),
            ..WanDitConfig::default()
        };
        config.check()?;
        let family = match (inner, num_layers) {
            (1536, 30) => WanSize::Wan1_3B,
            (5120, 40) => WanSize::Wan14B,
            (3072, 30) => WanSize::Wan22_5B,
            _ => WanSize::Other,
        };
        Ok(DetectedWan { config, family })
    }

    /// Units per transformer block (for a look-ahead of whole blocks).
    pub fn units_per_block(&self) -> usize {
        // modulation, 2 × (q, k, v, norm_q, norm_k, out), ffn × 2, and the cross norm.
        1 + 12 + 2 + usize::from(self.cross_attn_norm)
    }
}

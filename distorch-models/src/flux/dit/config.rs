//! [`FluxConfig`]: the fields of a diffusers `FluxTransformer2DModel` config, checked, or read
//! from a file's shapes; [`FluxVariant`]: the released model a configuration matches.

use std::path::Path;

use distorch_core::Component;
use serde::Deserialize;

use crate::error::{Error, unsupported};
use crate::flux::keys::FluxLayout;
use crate::load::{shape_map, to_usize};

/// The fields of a diffusers `FluxTransformer2DModel` config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct FluxConfig {
    /// Patch size: only 1 (the pipeline packs 2×2 latent patches into tokens itself).
    pub patch_size: usize,
    /// Channels of a packed latent token (4 × the VAE's latent channels).
    pub in_channels: usize,
    /// Channels out (`None`: `in_channels`).
    pub out_channels: Option<usize>,
    /// Double-stream blocks.
    pub num_layers: usize,
    /// Single-stream blocks.
    pub num_single_layers: usize,
    /// Width of one head.
    pub attention_head_dim: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Width of the text encoder's states (T5-XXL: 4,096).
    pub joint_attention_dim: usize,
    /// Width of the pooled text embedding (CLIP-L: 768).
    pub pooled_projection_dim: usize,
    /// Whether the model embeds a guidance value (FLUX.1-dev; schnell does not).
    pub guidance_embeds: bool,
    /// The head's rotary sections per position axis; they add up to the head width.
    pub axes_dims_rope: [usize; 3],
}

impl Default for FluxConfig {
    /// FLUX.1-dev.
    fn default() -> Self {
        FluxConfig {
            patch_size: 1,
            in_channels: 64,
            out_channels: None,
            num_layers: 19,
            num_single_layers: 38,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            pooled_projection_dim: 768,
            guidance_embeds: true,
            axes_dims_rope: [16, 56, 56],
        }
    }
}

/// The released FLUX transformer a configuration matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FluxVariant {
    /// FLUX.1-dev: 19 double and 38 single blocks, 3,072 wide, guidance embedded.
    Dev,
    /// FLUX.1-schnell: FLUX.1-dev's size without the guidance embedder.
    Schnell,
    /// Any other size.
    Other,
}

impl std::fmt::Display for FluxVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FluxVariant::Dev => "FLUX.1-dev",
            FluxVariant::Schnell => "FLUX.1-schnell",
            FluxVariant::Other => "FLUX (other size)",
        })
    }
}

/// A configuration read from shapes, with the released model it matches.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectedFlux {
    /// The configuration.
    pub config: FluxConfig,
    /// The released model its size matches.
    pub variant: FluxVariant,
}

impl FluxConfig {
    /// FLUX.1-schnell (FLUX.1-dev without guidance).
    pub fn schnell() -> FluxConfig {
        FluxConfig {
            guidance_embeds: false,
            ..FluxConfig::default()
        }
    }

    /// Reads a diffusers `config.json` and checks it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<FluxConfig, Error> {
        crate::load::config::read_checked(path.as_ref(), FluxConfig::check)
    }

    /// Width of the hidden states.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Width of the feed-forward layers (diffusers fixes the ratio at 4).
    pub fn mlp_dim(&self) -> usize {
        4 * self.inner_dim()
    }

    /// Channels out.
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// The released model this configuration matches.
    pub fn variant(&self) -> FluxVariant {
        let flux1 = FluxConfig {
            guidance_embeds: self.guidance_embeds,
            ..FluxConfig::default()
        };
        match (*self == flux1, self.guidance_embeds) {
            (true, true) => FluxVariant::Dev,
            (true, false) => FluxVariant::Schnell,
            _ => FluxVariant::Other,
        }
    }

    /// Checks what the maths depends on and refuses what is not implemented.
    pub fn check(&self) -> Result<(), Error> {
        if self.patch_size != 1 {
            return unsupported(
                "patch_size",
                self.patch_size.to_string(),
                "FLUX transformers take packed tokens: patch size 1",
            );
        }
        if self.num_attention_heads == 0 || self.attention_head_dim == 0 {
            return unsupported(
                "num_attention_heads",
                self.num_attention_heads.to_string(),
                "heads and their width must be positive",
            );
        }
        if self.axes_dims_rope.iter().sum::<usize>() != self.attention_head_dim
            || self.axes_dims_rope.iter().any(|d| d % 2 == 1)
        {
            return unsupported(
                "axes_dims_rope",
                format!("{:?}", self.axes_dims_rope),
                "the rotary sections must be even and add up to attention_head_dim",
            );
        }
        Ok(())
    }

    /// The configuration from a component's shapes (either layout). The rotary sections
    /// cannot be read from shapes: heads 128 wide get FLUX.1's (16, 56, 56); other head
    /// widths need the model's `config.json`.
    pub fn detect(c: &Component<'_>) -> Result<DetectedFlux, Error> {
        let layout = FluxLayout::of(c);
        let shapes = shape_map(c);
        let get = |unit: &str, param: &str| {
            shapes
                .get(&format!("{}.{param}", layout.unit(unit)))
                .map(|s| to_usize(s))
        };
        let not = |what: &str| Error::NotTheModel {
            model: "FLUX transformer",
            reason: what.to_owned(),
        };
        let x = get("x_embedder", "weight").ok_or_else(|| not("no image input (`img_in`)"))?;
        let ctx = get("context_embedder", "weight").ok_or_else(|| not("no `txt_in`"))?;
        let pooled = get("time_text_embed.text_embedder.linear_1", "weight")
            .ok_or_else(|| not("no pooled-text embedder (`vector_in`)"))?;
        let out = get("proj_out", "weight").ok_or_else(|| not("no output projection"))?;
        let norm = get("transformer_blocks.0.attn.norm_q", layout.norm_param())
            .or_else(|| {
                get(
                    "single_transformer_blocks.0.attn.norm_q",
                    layout.norm_param(),
                )
            })
            .ok_or_else(|| not("no q norm in the first block"))?;
        let (&[inner, in_channels], &[_, joint], &[_, pooled_dim], &[out_channels, _], &[hd]) =
            (&x[..], &ctx[..], &pooled[..], &out[..], &norm[..])
        else {
            return Err(not("unexpected ranks"));
        };
        if hd == 0 || inner % hd != 0 {
            return Err(not(&format!(
                "width {inner} is not a multiple of heads {hd} wide"
            )));
        }
        let count = |prefix: &str| {
            (0..)
                .take_while(|i| {
                    let p = format!("{prefix}{i}.");
                    shapes.keys().any(|k| k.starts_with(&p))
                })
                .count()
        };
        if hd != 128 {
            return Err(Error::Undetectable {
                model: "FLUX transformer",
                what: format!(
                    "the rotary sections (`axes_dims_rope`) of heads {hd} wide (FLUX.1's are \
                     128 wide)"
                ),
            });
        }
        let config = FluxConfig {
            in_channels,
            out_channels: (out_channels != in_channels).then_some(out_channels),
            num_layers: count(layout.double_blocks()),
            num_single_layers: count(layout.single_blocks()),
            attention_head_dim: hd,
            num_attention_heads: inner / hd,
            joint_attention_dim: joint,
            pooled_projection_dim: pooled_dim,
            guidance_embeds: get("time_text_embed.guidance_embedder.linear_1", "weight").is_some(),
            ..FluxConfig::default()
        };
        config.check()?;
        Ok(DetectedFlux {
            variant: config.variant(),
            config,
        })
    }
}

//! [`UnetConfig`]: the fields of a diffusers `UNet2DConditionModel` config, checked.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, unsupported};

/// A value given once for every block, or per block.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// The same for every block.
    One(T),
    /// One per down block.
    Many(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value for each of `n` blocks; `None` when a list has another length.
    pub fn expand(&self, n: usize) -> Option<Vec<T>> {
        match self {
            PerBlock::One(v) => Some(vec![v.clone(); n]),
            PerBlock::Many(v) if v.len() == n => Some(v.clone()),
            PerBlock::Many(_) => None,
        }
    }
}

/// The fields of a diffusers `UNet2DConditionModel` config the UNet uses (defaults as
/// diffusers'). Values that would change the maths in ways this UNet does not implement are
/// rejected by [`UnetConfig::check`], not ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
#[allow(missing_docs)] // Field names and meanings are diffusers'.
pub struct UnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock<usize>,
    pub transformer_layers_per_block: PerBlock<usize>,
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    pub encoder_hid_dim: Option<usize>,
    pub attention_head_dim: PerBlock<usize>,
    pub num_attention_heads: Option<PerBlock<usize>>,
    pub dual_cross_attention: bool,
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<usize>,
    pub num_class_embeds: Option<usize>,
    pub resnet_time_scale_shift: String,
    pub resnet_skip_time_act: bool,
    pub resnet_out_scale_factor: f64,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub time_cond_proj_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub projection_class_embeddings_input_dim: Option<usize>,
    pub attention_type: String,
    pub class_embeddings_concat: bool,
    pub mid_block_only_cross_attention: Option<bool>,
    pub cross_attention_norm: Option<String>,
}

impl Default for UnetConfig {
    fn default() -> Self {
        UnetConfig {
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: [
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            only_cross_attention: PerBlock::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::One(1280),
            transformer_layers_per_block: PerBlock::One(1),
            reverse_transformer_layers_per_block: None,
            encoder_hid_dim: None,
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            resnet_time_scale_shift: "default".into(),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            attention_type: "default".into(),
            class_embeddings_concat: false,
            mid_block_only_cross_attention: None,
            cross_attention_norm: None,
        }
    }
}

/// Per-block values, expanded and checked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Blocks {
    pub(crate) layers: Vec<usize>,
    pub(crate) heads: Vec<usize>,
    pub(crate) depth: Vec<usize>,
    pub(crate) context: usize,
    /// Whether each down block (in order) has attention.
    pub(crate) down_attn: Vec<bool>,
    /// Whether each up block (in order) has attention.
    pub(crate) up_attn: Vec<bool>,
}

impl UnetConfig {
    /// Reads a diffusers `config.json` and checks it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<UnetConfig, Error> {
        crate::load::config::read_checked(path.as_ref(), UnetConfig::check)
    }

    /// Whether SDXL's text-time addition embedding is used (`text_embeds`, `time_ids`).
    pub fn has_text_time(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    /// Checks every value that changes the maths.
    pub fn check(&self) -> Result<(), Error> {
        self.blocks().map(|_| ())
    }

    /// Norm groups and attention heads must divide every level's channels.
    fn check_divisible(&self, heads: &[usize]) -> Result<(), Error> {
        let g = self.norm_num_groups;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if g == 0 || !c.is_multiple_of(g) {
                return unsupported(
                    "norm_num_groups",
                    g.to_string(),
                    "must divide every block's channels",
                );
            }
            if heads[i] == 0 || !c.is_multiple_of(heads[i]) {
                return unsupported(
                    "attention_head_dim",
                    format!("{heads:?}"),
                    "the heads of each block must divide its channels",
                );
            }
        }
        Ok(())
    }

    /// Which down and up blocks have cross-attention.
    fn block_kinds(&self) -> Result<(Vec<bool>, Vec<bool>), Error> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return unsupported(
                "block_out_channels",
                format!("{:?}", self.block_out_channels),
                "needs one entry per down and up block",
            );
        }
        let mut down_attn = Vec::new();
        for t in &self.down_block_types {
            match t.as_str() {
                "CrossAttnDownBlock2D" => down_attn.push(true),
                "DownBlock2D" => down_attn.push(false),
                _ => {
                    return unsupported(
                        "down_block_types",
                        format!("{t:?}"),
                        "supported: CrossAttnDownBlock2D, DownBlock2D",
                    );
                }
            }
        }
        let mut up_attn = Vec::new();
        for t in &self.up_block_types {
            match t.as_str() {
                "CrossAttnUpBlock2D" => up_attn.push(true),
                "UpBlock2D" => up_attn.push(false),
                _ => {
                    return unsupported(
                        "up_block_types",
                        format!("{t:?}"),
                        "supported: CrossAttnUpBlock2D, UpBlock2D",
                    );
                }
            }
        }
        Ok((down_attn, up_attn))
    }

    /// The fields that must keep their default: (name, whether it does, its value, what is
    /// supported).
    fn fixed_fields(&self, n: usize) -> [(&'static str, bool, String, &'static str); 17] {
        [
            (
                "act_fn",
                self.act_fn == "silu",
                format!("{:?}", self.act_fn),
                "supported: silu",
            ),
            (
                "center_input_sample",
                !self.center_input_sample,
                "true".into(),
                "supported: false",
            ),
            (
                "dual_cross_attention",
                !self.dual_cross_attention,
                "true".into(),
                "supported: false",
            ),
            (
                "class_embed_type",
                self.class_embed_type.is_none(),
                format!("{:?}", self.class_embed_type),
                "supported: null",
            ),
            (
                "num_class_embeds",
                self.num_class_embeds.is_none(),
                format!("{:?}", self.num_class_embeds),
                "supported: null",
            ),
            (
                "addition_embed_type",
                self.addition_embed_type.is_none() || self.has_text_time(),
                format!("{:?}", self.addition_embed_type),
                "supported: null, \"text_time\"",
            ),
            (
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift == "default",
                format!("{:?}", self.resnet_time_scale_shift),
                "supported: \"default\"",
            ),
            (
                "resnet_skip_time_act",
                !self.resnet_skip_time_act,
                "true".into(),
                "supported: false",
            ),
            (
                "resnet_out_scale_factor",
                self.resnet_out_scale_factor == 1.0,
                self.resnet_out_scale_factor.to_string(),
                "supported: 1.0",
            ),
            (
                "mid_block_scale_factor",
                self.mid_block_scale_factor == 1.0,
                self.mid_block_scale_factor.to_string(),
                "supported: 1.0",
            ),
            (
                "time_embedding_type",
                self.time_embedding_type == "positional",
                format!("{:?}", self.time_embedding_type),
                "supported: \"positional\"",
            ),
            (
                "time_embedding_dim",
                self.time_embedding_dim.is_none(),
                format!("{:?}", self.time_embedding_dim),
                "supported: null (4 × block_out_channels[0])",
            ),
            (
                "time_embedding_act_fn / timestep_post_act",
                self.time_embedding_act_fn.is_none() && self.timestep_post_act.is_none(),
                format!(
                    "{:?} / {:?}",
                    self.time_embedding_act_fn, self.timestep_post_act
                ),
                "supported: null",
            ),
            (
                "time_cond_proj_dim / encoder_hid_dim",
                self.time_cond_proj_dim.is_none() && self.encoder_hid_dim.is_none(),
                format!("{:?} / {:?}", self.time_cond_proj_dim, self.encoder_hid_dim),
                "supported: null",
            ),
            (
                "conv_in_kernel / conv_out_kernel",
                self.conv_in_kernel == 3 && self.conv_out_kernel == 3,
                format!("{} / {}", self.conv_in_kernel, self.conv_out_kernel),
                "supported: 3",
            ),
            (
                "attention_type",
                self.attention_type == "default",
                format!("{:?}", self.attention_type),
                "supported: \"default\"",
            ),
            (
                "only_cross_attention",
                self.only_cross_attention
                    .expand(n)
                    .is_some_and(|v| v.iter().all(|x| !x))
                    && self.mid_block_only_cross_attention != Some(true)
                    && self.cross_attention_norm.is_none()
                    && !self.class_embeddings_concat
                    && self.reverse_transformer_layers_per_block.is_none(),
                format!("{:?}", self.only_cross_attention),
                "supported: false (and no mid-block-only, cross-attention norm, class concat or reversed depths)",
            ),
        ]
    }

    pub(crate) fn blocks(&self) -> Result<Blocks, Error> {
        let (down_attn, up_attn) = self.block_kinds()?;
        let n = self.block_out_channels.len();
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            return unsupported(
                "mid_block_type",
                format!("{:?}", self.mid_block_type),
                "supported: UNetMidBlock2DCrossAttn",
            );
        }
        if let Some((field, _, value, reason)) = self.fixed_fields(n).into_iter().find(|c| !c.1) {
            return unsupported(field, value, reason);
        }
        if self.has_text_time()
            && (self.addition_time_embed_dim.is_none()
                || self.projection_class_embeddings_input_dim.is_none())
        {
            return unsupported(
                "addition_time_embed_dim",
                format!("{:?}", self.addition_time_embed_dim),
                "text_time needs addition_time_embed_dim and projection_class_embeddings_input_dim",
            );
        }
        let expand = |field: &'static str, v: &PerBlock<usize>| {
            v.expand(n).ok_or_else(|| Error::Unsupported {
                field,
                value: format!("{v:?}"),
                reason: "a list needs one entry per down block",
            })
        };
        let layers = expand("layers_per_block", &self.layers_per_block)?;
        let heads = expand(
            "num_attention_heads",
            self.num_attention_heads
                .as_ref()
                .unwrap_or(&self.attention_head_dim),
        )?;
        let depth = expand(
            "transformer_layers_per_block",
            &self.transformer_layers_per_block,
        )?;
        let context = match &self.cross_attention_dim {
            PerBlock::One(c) => *c,
            PerBlock::Many(v) if v.windows(2).all(|w| w[0] == w[1]) && !v.is_empty() => v[0],
            other => {
                return unsupported(
                    "cross_attention_dim",
                    format!("{other:?}"),
                    "supported: one width for every block",
                );
            }
        };
        self.check_divisible(&heads)?;
        Ok(Blocks {
            layers,
            heads,
            depth,
            context,
            down_attn,
            up_attn,
        })
    }
}

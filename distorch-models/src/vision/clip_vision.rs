//! CLIP vision encoder, as transformers' `CLIPVisionModelWithProjection`: patch and class
//! embeddings, positions, the pre-layernorm (`pre_layrnorm`, transformers' spelling), pre-norm
//! transformer layers, post-layernorm on the class token, visual projection; every layer's
//! hidden state (image-prompt adapters use the penultimate). transformers' key layout, with
//! or without the `vision_model.` level's outer prefix.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use distorch_core::runtime::{ExpectedTensor, LoadReport, Streamer};
use distorch_core::{Component, ComponentKind};
use serde::Deserialize;

use crate::error::Error;
use crate::load::LoadContext;
use crate::nn::attention::attention;
use crate::nn::spec::{Conv2d, LayerNorm, Linear, Param, Spec};
use crate::nn::{Activation, Weights};

/// The fields of a transformers `CLIPVisionConfig` the encoder uses (defaults as
/// transformers').
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
#[allow(missing_docs)] // Field names and meanings are transformers'.
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        ClipVisionConfig {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipVisionConfig {
    /// Reads a transformers `config.json` (a `CLIPVisionConfig`, or a `CLIPConfig` whose
    /// `vision_config` is used) and checks it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<ClipVisionConfig, Error> {
        let path = path.as_ref();
        let value: serde_json::Value = crate::load::config::read(path)?;
        let value = match value.get("vision_config") {
            Some(v) => v.clone(),
            None => value,
        };
        let config: ClipVisionConfig = crate::load::config::from_value(path, value)?;
        config.check()?;
        Ok(config)
    }

    /// Rejects what the encoder cannot run.
    pub fn check(&self) -> Result<(), Error> {
        Activation::from_name(&self.hidden_act)?;
        let bad = crate::error::unsupported;
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return bad(
                "num_attention_heads",
                self.num_attention_heads.to_string(),
                "must divide hidden_size",
            );
        }
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return bad(
                "patch_size",
                self.patch_size.to_string(),
                "must divide image_size",
            );
        }
        Ok(())
    }

    /// Patches per image.
    pub fn patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// The configuration from a component's shapes (key prefix stripped): widths, layers,
    /// patch and image size from the tensors; heads and activation by the released models'
    /// conventions (64-wide heads up to 768 wide, else 16 heads; quick_gelu for OpenAI's
    /// ViT-B/L, gelu for OpenCLIP's wider ViT-H/bigG).
    pub fn detect(c: &Component<'_>) -> Result<ClipVisionConfig, Error> {
        let keys = VisionKeys::detect(c)?;
        let shape = |k: &str| {
            c.tensors
                .iter()
                .find(|t| c.local(t) == k)
                .map(|t| t.shape.iter().map(|&d| d as usize).collect::<Vec<_>>())
        };
        let need = |k: String, rank: usize| {
            shape(&k)
                .filter(|s| s.len() == rank)
                .ok_or_else(|| Error::NotTheModel {
                    model: "CLIP vision encoder",
                    reason: format!("no tensor `{k}` of rank {rank}"),
                })
        };
        let patch = need(
            format!("{}embeddings.patch_embedding.weight", keys.inner),
            4,
        )?;
        let positions = need(
            format!("{}embeddings.position_embedding.weight", keys.inner),
            2,
        )?;
        let fc1 = need(format!("{}encoder.layers.0.mlp.fc1.weight", keys.inner), 2)?;
        let projection = need(keys.projection(), 2)?;
        let hidden = patch[0];
        let side = ((positions[0].saturating_sub(1)) as f64).sqrt().round() as usize;
        let layers = (0..)
            .take_while(|l| {
                shape(&format!("{}encoder.layers.{l}.mlp.fc1.weight", keys.inner)).is_some()
            })
            .count();
        let config = ClipVisionConfig {
            hidden_size: hidden,
            intermediate_size: fc1[0],
            projection_dim: projection[0],
            num_hidden_layers: layers,
            num_attention_heads: if hidden <= 768 {
                (hidden / 64).max(1)
            } else {
                16
            },
            num_channels: patch[1],
            image_size: side * patch[2],
            patch_size: patch[2],
            hidden_act: if hidden <= 1024 { "quick_gelu" } else { "gelu" }.into(),
            layer_norm_eps: 1e-5,
        };
        config.check()?;
        Ok(config)
    }
}

/// Where the encoder's keys are: `{outer}vision_model.` holds the encoder, `{outer}` the
/// projection.
#[derive(Debug, Clone)]
struct VisionKeys {
    inner: String,
    outer: String,
}

impl VisionKeys {
    fn detect(c: &Component<'_>) -> Result<VisionKeys, Error> {
        const CLASS: &str = "embeddings.class_embedding";
        let inner = c
            .local_names()
            .find_map(|n| n.strip_suffix(CLASS))
            .ok_or_else(|| Error::NotTheModel {
                model: "CLIP vision encoder in transformers' layout",
                reason: format!("no `{CLASS}`"),
            })?
            .to_owned();
        let outer = inner
            .strip_suffix("vision_model.")
            .unwrap_or(&inner)
            .to_owned();
        Ok(VisionKeys { inner, outer })
    }

    fn projection(&self) -> String {
        format!("{}visual_projection.weight", self.outer)
    }
}

/// The encoder's layers, described once from the configuration (see [`Spec`]).
struct Layers {
    class: Param,
    patches: Conv2d,
    positions: Param,
    pre_norm: LayerNorm,
    blocks: Vec<Block>,
    post_norm: LayerNorm,
    projection: Linear,
    expected: Vec<ExpectedTensor>,
}

/// One encoder layer.
struct Block {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl Layers {
    fn new(keys: &VisionKeys, c: &ClipVisionConfig) -> Layers {
        let (h, i, p, eps) = (
            c.hidden_size,
            c.intermediate_size,
            c.patch_size,
            c.layer_norm_eps,
        );
        let mut s = Spec::prefixed(&keys.inner);
        let class = s.tensor("embeddings.class_embedding", vec![h]);
        let patches =
            s.conv2d_without_bias("embeddings.patch_embedding", (h, c.num_channels, p), p, 0);
        let positions = s.param(
            "embeddings.position_embedding",
            "weight",
            vec![c.patches() + 1, h],
        );
        let pre_norm = s.layer_norm("pre_layrnorm", h, eps);
        let blocks = (0..c.num_hidden_layers)
            .map(|l| {
                let u = |part: &str| format!("encoder.layers.{l}.{part}");
                Block {
                    norm1: s.layer_norm(&u("layer_norm1"), h, eps),
                    q: s.linear(&u("self_attn.q_proj"), h, h, true),
                    k: s.linear(&u("self_attn.k_proj"), h, h, true),
                    v: s.linear(&u("self_attn.v_proj"), h, h, true),
                    out: s.linear(&u("self_attn.out_proj"), h, h, true),
                    norm2: s.layer_norm(&u("layer_norm2"), h, eps),
                    fc1: s.linear(&u("mlp.fc1"), i, h, true),
                    fc2: s.linear(&u("mlp.fc2"), h, i, true),
                }
            })
            .collect();
        let post_norm = s.layer_norm("post_layernorm", h, eps);
        let mut expected = s.into_expected();
        let mut outer = Spec::prefixed(&keys.outer);
        let projection = outer.linear("visual_projection", c.projection_dim, h, false);
        expected.extend(outer.into_expected());
        Layers {
            class,
            patches,
            positions,
            pre_norm,
            blocks,
            post_norm,
            projection,
            expected,
        }
    }
}

/// What the vision encoder returns.
#[derive(Debug, Clone)]
pub struct ClipVisionOutput<B: Backend> {
    /// The projected, post-layernormed class token, [batch, projection_dim].
    pub image_embeds: Tensor<B, 2>,
    /// The last layer's output (not post-layernormed), [batch, patches + 1, hidden].
    pub last_hidden_state: Tensor<B, 3>,
    /// The pre-layernormed embeddings, then every layer's output.
    pub hidden_states: Vec<Tensor<B, 3>>,
}

/// A CLIP vision encoder whose weights live where its plan put them.
pub struct ClipVisionModel<B: Backend> {
    config: ClipVisionConfig,
    activation: Activation,
    streamer: Arc<Streamer<B>>,
    layers: Layers,
}

impl<B: Backend> ClipVisionModel<B> {
    /// The configuration.
    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// The streamer (its statistics, its execution order).
    pub fn streamer(&self) -> &Streamer<B> {
        &self.streamer
    }

    /// Encodes preprocessed images, [batch, channels, image_size, image_size] (see
    /// [`crate::vision::clip_image::preprocess`]).
    pub fn forward(&self, pixel_values: Tensor<B, 4>) -> Result<ClipVisionOutput<B>, Error> {
        let c = &self.config;
        let [batch, ch, hh, ww] = pixel_values.dims();
        if ch != c.num_channels || hh != c.image_size || ww != c.image_size || batch == 0 {
            return Err(Error::Input {
                input: "pixel_values",
                reason: format!(
                    "shape {:?}: expected [B, {}, {}, {}]",
                    pixel_values.dims(),
                    c.num_channels,
                    c.image_size,
                    c.image_size
                ),
            });
        }
        let w = Weights::new(&self.streamer);
        let l = &self.layers;
        let h = c.hidden_size;
        let n = c.patches();
        let class: Tensor<B, 1> = l.class.get(&w)?;
        let patches = l.patches.forward(&w, pixel_values)?;
        let patches = patches.reshape([batch, h, n]).swap_dims(1, 2);
        let class = class.reshape([1, 1, h]).expand([batch, 1, h]);
        let positions: Tensor<B, 2> = l.positions.get(&w)?;
        let x = Tensor::cat(vec![class, patches], 1) + positions.unsqueeze::<3>();
        let mut x = l.pre_norm.forward(&w, x)?;
        let mut hidden_states = vec![x.clone()];
        for b in &l.blocks {
            let y = b.norm1.forward(&w, x.clone())?;
            let q = b.q.forward(&w, y.clone())?;
            let k = b.k.forward(&w, y.clone())?;
            let v = b.v.forward(&w, y)?;
            let a = attention(q, k, v, c.num_attention_heads, None);
            x = x + b.out.forward(&w, a)?;
            let y = b.norm2.forward(&w, x.clone())?;
            let y = self.activation.apply(b.fc1.forward(&w, y)?);
            x = x + b.fc2.forward(&w, y)?;
            hidden_states.push(x.clone());
        }
        let pooled = x.clone().narrow(1, 0, 1).reshape([batch, h]);
        let pooled = l.post_norm.forward(&w, pooled)?;
        let image_embeds = l.projection.forward(&w, pooled)?;
        Ok(ClipVisionOutput {
            image_embeds: w.output(image_embeds),
            last_hidden_state: w.output(x),
            hidden_states: hidden_states.into_iter().map(|t| w.output(t)).collect(),
        })
    }
}

impl<B: Backend> crate::load::Model<B> for ClipVisionModel<B> {
    type Config = ClipVisionConfig;
    const KIND: ComponentKind = ComponentKind::ClipVision;
    fn config_from_file(path: &Path) -> Result<ClipVisionConfig, Error> {
        ClipVisionConfig::from_file(path)
    }
    fn detect_config(c: &Component<'_>) -> Result<ClipVisionConfig, Error> {
        ClipVisionConfig::detect(c)
    }
    fn execution_order(config: &ClipVisionConfig, c: &Component<'_>) -> Result<Vec<String>, Error> {
        let layers = Layers::new(&VisionKeys::detect(c)?, config);
        Ok(crate::load::units_in_order(&layers.expected))
    }
    fn streamer(&self) -> &Streamer<B> {
        self.streamer()
    }
    /// Loads the encoder from `component` of `index` at the homes `plan` gives; every key
    /// and shape is checked against `config` first.
    fn load(ctx: &LoadContext<'_, B>, config: Self::Config) -> Result<(Self, LoadReport), Error> {
        config.check()?;
        let layers = Layers::new(&VisionKeys::detect(ctx.component)?, &config);
        let (streamer, report) = ctx.stream_declared(&layers.expected)?;
        let activation = Activation::from_name(&config.hidden_act)?;
        Ok((
            ClipVisionModel {
                config,
                activation,
                streamer,
                layers,
            },
            report,
        ))
    }
}

//! CLIP vision encoder, as transformers' `CLIPVisionModelWithProjection`: patch and class
//! embeddings, positions, the pre-layernorm (`pre_layrnorm`, transformers' spelling), pre-norm
//! transformer layers, post-layernorm on the class token, visual projection; every layer's
//! hidden state (image-prompt adapters use the penultimate). transformers' key layout, with
//! or without the `vision_model.` level's outer prefix.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use distorch_alloc::Plan;
use distorch_core::runtime::{
    DeviceMap, ExpectedTensor, LoadOptions, LoadReport, Lookahead, Streamer, WeightStore,
};
use distorch_core::{Component, ComponentKind, SafetensorsIndex};
use serde::Deserialize;

use crate::attention::attention;
use crate::error::Error;
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
        let value: serde_json::Value = crate::config::read(path)?;
        let value = match value.get("vision_config") {
            Some(v) => v.clone(),
            None => value,
        };
        let config: ClipVisionConfig = crate::config::from_value(path, value)?;
        config.check()?;
        Ok(config)
    }

    /// Rejects what the encoder cannot run.
    pub fn check(&self) -> Result<(), Error> {
        Activation::from_name(&self.hidden_act)?;
        let bad = |field, value: String, reason| {
            Err(Error::Unsupported {
                field,
                value,
                reason,
            })
        };
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
                .ok_or_else(|| Error::Input {
                    input: "clip vision",
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
            .ok_or_else(|| Error::Input {
                input: "clip vision",
                reason: format!("no `{CLASS}`: not a CLIP vision encoder in transformers' layout"),
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

    fn layer(&self, l: usize, part: &str) -> String {
        format!("{}encoder.layers.{l}.{part}", self.inner)
    }

    fn expected(&self, c: &ClipVisionConfig) -> Vec<ExpectedTensor> {
        let (h, i, p) = (c.hidden_size, c.intermediate_size, c.patch_size);
        let mut out = Vec::new();
        let mut push = |name: String, shape: Vec<usize>| out.push(ExpectedTensor { name, shape });
        let e = format!("{}embeddings", self.inner);
        push(format!("{e}.class_embedding"), vec![h]);
        push(
            format!("{e}.patch_embedding.weight"),
            vec![h, c.num_channels, p, p],
        );
        push(
            format!("{e}.position_embedding.weight"),
            vec![c.patches() + 1, h],
        );
        for norm in ["pre_layrnorm", "post_layernorm"] {
            push(format!("{}{norm}.weight", self.inner), vec![h]);
            push(format!("{}{norm}.bias", self.inner), vec![h]);
        }
        for l in 0..c.num_hidden_layers {
            for norm in ["layer_norm1", "layer_norm2"] {
                push(format!("{}.weight", self.layer(l, norm)), vec![h]);
                push(format!("{}.bias", self.layer(l, norm)), vec![h]);
            }
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                let u = self.layer(l, &format!("self_attn.{proj}"));
                push(format!("{u}.weight"), vec![h, h]);
                push(format!("{u}.bias"), vec![h]);
            }
            push(format!("{}.weight", self.layer(l, "mlp.fc1")), vec![i, h]);
            push(format!("{}.bias", self.layer(l, "mlp.fc1")), vec![i]);
            push(format!("{}.weight", self.layer(l, "mlp.fc2")), vec![h, i]);
            push(format!("{}.bias", self.layer(l, "mlp.fc2")), vec![h]);
        }
        push(self.projection(), vec![c.projection_dim, h]);
        out
    }

    /// Units in the order a forward pass uses them.
    fn order(&self, c: &ClipVisionConfig) -> Vec<String> {
        crate::loader::units_in_order(self.expected(c))
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
    keys: VisionKeys,
}

impl<B: Backend> ClipVisionModel<B> {
    /// Loads the encoder from `component` of `index` at the homes `plan` gives; every key
    /// and shape is checked against `config` first.
    pub fn load(
        index: &SafetensorsIndex,
        component: &Component<'_>,
        plan: &Plan,
        devices: &DeviceMap<B>,
        config: ClipVisionConfig,
        options: &LoadOptions<'_, B>,
        lookahead: Lookahead,
    ) -> Result<(ClipVisionModel<B>, LoadReport), Error> {
        config.check()?;
        let keys = VisionKeys::detect(component)?;
        let expected = keys.expected(&config);
        let options = options.expecting(&expected);
        let (store, report) = WeightStore::load(index, component, plan, devices, &options)?;
        let streamer = Arc::new(Streamer::new(Arc::new(store), lookahead));
        let activation = Activation::from_name(&config.hidden_act)?;
        Ok((
            ClipVisionModel {
                config,
                activation,
                streamer,
                keys,
            },
            report,
        ))
    }

    /// The configuration.
    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// The streamer (its statistics, its execution order).
    pub fn streamer(&self) -> &Streamer<B> {
        &self.streamer
    }

    /// Encodes preprocessed images, [batch, channels, image_size, image_size] (see
    /// [`crate::clip_image::preprocess`]).
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
        let w = Weights::new(&self.streamer, "");
        let k = &self.keys;
        let h = c.hidden_size;
        let n = c.patches();
        let e = format!("{}embeddings", k.inner);
        let class: Tensor<B, 1> = w
            .unit(&format!("{e}.class_embedding"))?
            .get("class_embedding")?;
        let patches = w.conv2d(
            &format!("{e}.patch_embedding"),
            pixel_values,
            c.patch_size,
            0,
        )?;
        let patches = patches.reshape([batch, h, n]).swap_dims(1, 2);
        let class = class.reshape([1, 1, h]).expand([batch, 1, h]);
        let positions: Tensor<B, 2> = w.unit(&format!("{e}.position_embedding"))?.get("weight")?;
        let x = Tensor::cat(vec![class, patches], 1) + positions.unsqueeze::<3>();
        let eps = c.layer_norm_eps;
        let mut x = w.layer_norm(&format!("{}pre_layrnorm", k.inner), x, eps)?;
        let mut hidden_states = vec![x.clone()];
        for l in 0..c.num_hidden_layers {
            let y = w.layer_norm(&k.layer(l, "layer_norm1"), x.clone(), eps)?;
            let q = w.linear(&k.layer(l, "self_attn.q_proj"), y.clone())?;
            let kk = w.linear(&k.layer(l, "self_attn.k_proj"), y.clone())?;
            let v = w.linear(&k.layer(l, "self_attn.v_proj"), y)?;
            let a = attention(q, kk, v, c.num_attention_heads, None);
            x = x + w.linear(&k.layer(l, "self_attn.out_proj"), a)?;
            let y = w.layer_norm(&k.layer(l, "layer_norm2"), x.clone(), eps)?;
            let y = self.activation.apply(w.linear(&k.layer(l, "mlp.fc1"), y)?);
            x = x + w.linear(&k.layer(l, "mlp.fc2"), y)?;
            hidden_states.push(x.clone());
        }
        let pooled = x.clone().narrow(1, 0, 1).reshape([batch, h]);
        let pooled = w.layer_norm(&format!("{}post_layernorm", k.inner), pooled, eps)?;
        let projection = k.projection();
        let projection = projection.strip_suffix(".weight").unwrap_or(&projection);
        let image_embeds = w.linear(projection, pooled)?;
        Ok(ClipVisionOutput {
            image_embeds: w.output(image_embeds),
            last_hidden_state: w.output(x),
            hidden_states: hidden_states.into_iter().map(|t| w.output(t)).collect(),
        })
    }
}

impl<B: Backend> crate::loader::Model<B> for ClipVisionModel<B> {
    type Config = ClipVisionConfig;
    const KIND: ComponentKind = ComponentKind::ClipVision;
    fn config_from_file(path: &Path) -> Result<ClipVisionConfig, Error> {
        ClipVisionConfig::from_file(path)
    }
    fn detect_config(c: &Component<'_>) -> Result<ClipVisionConfig, Error> {
        ClipVisionConfig::detect(c)
    }
    fn execution_order(config: &ClipVisionConfig, c: &Component<'_>) -> Result<Vec<String>, Error> {
        Ok(VisionKeys::detect(c)?.order(config))
    }
    fn streamer(&self) -> &Streamer<B> {
        self.streamer()
    }
    fn load(
        index: &SafetensorsIndex,
        c: &Component<'_>,
        plan: &Plan,
        devices: &DeviceMap<B>,
        config: ClipVisionConfig,
        options: &LoadOptions<'_, B>,
        lookahead: Lookahead,
    ) -> Result<(Self, LoadReport), Error> {
        ClipVisionModel::load(index, c, plan, devices, config, options, lookahead)
    }
}

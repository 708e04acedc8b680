//! Where a CLIP text encoder's weights sit in a file: transformers' layout (under
//! `text_model.`, `transformer.text_model.` or no prefix), or OpenCLIP's (SD 2.x
//! `cond_stage_model.model.`, SDXL `conditioner.embedders.1.model.`: fused q/k/v `in_proj`,
//! a bare `positional_embedding`, a transposed `text_projection`).

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use distorch_core::runtime::ExpectedTensor;

use distorch_lora::ModelTensor;

use crate::clip::ClipTextConfig;
use crate::error::Error;
use crate::nn::{Weights, linear};

/// The two key layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipLayout {
    /// transformers' `CLIPTextModel` names.
    Transformers,
    /// OpenCLIP's names.
    OpenClip,
}

/// The key layout and prefixes of one encoder's weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClipKeys {
    pub(crate) layout: ClipLayout,
    /// Prefix of the encoder's units.
    pub(crate) prefix: String,
    /// Prefix of the projection.
    pub(crate) outer: String,
}

impl ClipKeys {
    /// Reads the layout from a component's tensor keys (its own prefix stripped).
    pub(crate) fn detect<'a>(names: impl Iterator<Item = &'a str> + Clone) -> ClipKeys {
        const TOKENS: &str = "embeddings.token_embedding.weight";
        if let Some(p) = names.clone().find_map(|n| n.strip_suffix(TOKENS)) {
            let outer = p.strip_suffix("text_model.").unwrap_or(p).to_owned();
            return ClipKeys {
                layout: ClipLayout::Transformers,
                prefix: p.to_owned(),
                outer,
            };
        }
        let p = names
            .clone()
            .find_map(|n| n.strip_suffix("positional_embedding"))
            .unwrap_or("")
            .to_owned();
        ClipKeys {
            layout: ClipLayout::OpenClip,
            outer: p.clone(),
            prefix: p,
        }
    }

    /// The projection's tensor key.
    pub(crate) fn projection_key(&self) -> String {
        match self.layout {
            ClipLayout::Transformers => format!("{}text_projection.weight", self.outer),
            ClipLayout::OpenClip => format!("{}text_projection", self.outer),
        }
    }

    fn layer(&self, l: usize, part: &str) -> String {
        let p = &self.prefix;
        match self.layout {
            ClipLayout::Transformers => format!("{p}encoder.layers.{l}.{part}"),
            ClipLayout::OpenClip => {
                let part = match part {
                    "layer_norm1" => "ln_1",
                    "layer_norm2" => "ln_2",
                    "self_attn.out_proj" => "attn.out_proj",
                    "mlp.fc1" => "mlp.c_fc",
                    "mlp.fc2" => "mlp.c_proj",
                    other => other,
                };
                format!("{p}transformer.resblocks.{l}.{part}")
            }
        }
    }

    fn final_norm(&self) -> String {
        match self.layout {
            ClipLayout::Transformers => format!("{}final_layer_norm", self.prefix),
            ClipLayout::OpenClip => format!("{}ln_final", self.prefix),
        }
    }

    fn tokens_unit(&self) -> String {
        match self.layout {
            ClipLayout::Transformers => format!("{}embeddings.token_embedding", self.prefix),
            ClipLayout::OpenClip => format!("{}token_embedding", self.prefix),
        }
    }

    fn positions_unit(&self) -> String {
        match self.layout {
            ClipLayout::Transformers => format!("{}embeddings.position_embedding", self.prefix),
            ClipLayout::OpenClip => format!("{}positional_embedding", self.prefix),
        }
    }

    /// Every tensor the encoder reads, keys and shapes in this layout.
    pub(crate) fn expected(&self, c: &ClipTextConfig, projection: bool) -> Vec<ExpectedTensor> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let mut out = Vec::new();
        let mut push = |name: String, shape: Vec<usize>| out.push(ExpectedTensor { name, shape });
        let open = self.layout == ClipLayout::OpenClip;
        push(
            format!("{}.weight", self.tokens_unit()),
            vec![c.vocab_size, h],
        );
        let pos = if open {
            self.positions_unit()
        } else {
            format!("{}.weight", self.positions_unit())
        };
        push(pos, vec![c.max_position_embeddings, h]);
        for l in 0..c.num_hidden_layers {
            for norm in ["layer_norm1", "layer_norm2"] {
                push(format!("{}.weight", self.layer(l, norm)), vec![h]);
                push(format!("{}.bias", self.layer(l, norm)), vec![h]);
            }
            if open {
                let attn = self.layer(l, "attn");
                push(format!("{attn}.in_proj_weight"), vec![3 * h, h]);
                push(format!("{attn}.in_proj_bias"), vec![3 * h]);
            } else {
                for proj in ["q_proj", "k_proj", "v_proj"] {
                    let u = self.layer(l, &format!("self_attn.{proj}"));
                    push(format!("{u}.weight"), vec![h, h]);
                    push(format!("{u}.bias"), vec![h]);
                }
            }
            for (part, o, n) in [
                ("self_attn.out_proj", h, h),
                ("mlp.fc1", i, h),
                ("mlp.fc2", h, i),
            ] {
                push(format!("{}.weight", self.layer(l, part)), vec![o, n]);
                push(format!("{}.bias", self.layer(l, part)), vec![o]);
            }
        }
        push(format!("{}.weight", self.final_norm()), vec![h]);
        push(format!("{}.bias", self.final_norm()), vec![h]);
        if projection {
            let shape = if open {
                vec![h, c.projection_dim]
            } else {
                vec![c.projection_dim, h]
            };
            push(self.projection_key(), shape);
        }
        out
    }

    /// Units in the order a forward pass uses them.
    pub(crate) fn order(&self, c: &ClipTextConfig, projection: bool) -> Vec<String> {
        let mut out = vec![self.tokens_unit(), self.positions_unit()];
        for l in 0..c.num_hidden_layers {
            out.push(self.layer(l, "layer_norm1"));
            match self.layout {
                ClipLayout::OpenClip => out.push(self.layer(l, "attn")),
                ClipLayout::Transformers => {
                    for p in ["q_proj", "k_proj", "v_proj"] {
                        out.push(self.layer(l, &format!("self_attn.{p}")));
                    }
                }
            }
            for p in ["self_attn.out_proj", "layer_norm2", "mlp.fc1", "mlp.fc2"] {
                out.push(self.layer(l, p));
            }
        }
        out.push(self.final_norm());
        if projection {
            let key = self.projection_key();
            out.push(key.strip_suffix(".weight").unwrap_or(&key).to_owned());
        }
        out
    }

    pub(crate) fn tokens<B: Backend>(&self, w: &Weights<'_, B>) -> Result<Tensor<B, 2>, Error> {
        w.unit(&self.tokens_unit())?.get("weight")
    }

    pub(crate) fn positions<B: Backend>(&self, w: &Weights<'_, B>) -> Result<Tensor<B, 2>, Error> {
        let param = match self.layout {
            ClipLayout::Transformers => "weight",
            ClipLayout::OpenClip => "positional_embedding",
        };
        w.unit(&self.positions_unit())?.get(param)
    }

    /// The name of layer `l`'s `part` (transformers names: `layer_norm1`, `mlp.fc1`, ...).
    pub(crate) fn unit(&self, l: usize, part: &str) -> String {
        self.layer(l, part)
    }

    pub(crate) fn final_unit(&self) -> String {
        self.final_norm()
    }

    /// Layer `l`'s query, key and value of `y`.
    pub(crate) fn qkv<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        l: usize,
        y: Tensor<B, 3>,
    ) -> Result<[Tensor<B, 3>; 3], Error> {
        match self.layout {
            ClipLayout::Transformers => Ok([
                w.linear(&self.layer(l, "self_attn.q_proj"), y.clone())?,
                w.linear(&self.layer(l, "self_attn.k_proj"), y.clone())?,
                w.linear(&self.layer(l, "self_attn.v_proj"), y)?,
            ]),
            ClipLayout::OpenClip => {
                let unit = w.unit(&self.layer(l, "attn"))?;
                let fused: Tensor<B, 2> = unit.get("in_proj_weight")?;
                let bias: Tensor<B, 1> = unit.get("in_proj_bias")?;
                let h = fused.dims()[1];
                let part = |k: usize| {
                    linear(
                        y.clone(),
                        fused.clone().narrow(0, k * h, h),
                        Some(bias.clone().narrow(0, k * h, h)),
                    )
                };
                Ok([part(0), part(1), part(2)])
            }
        }
    }

    /// The projection of the pooled output.
    pub(crate) fn project<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        pooled: Tensor<B, 2>,
    ) -> Result<Tensor<B, 2>, Error> {
        match self.layout {
            ClipLayout::Transformers => {
                let key = self.projection_key();
                w.linear(key.strip_suffix(".weight").unwrap_or(&key), pooled)
            }
            ClipLayout::OpenClip => {
                let key = self.projection_key();
                let p: Tensor<B, 2> = w.unit(&key)?.get("text_projection")?;
                Ok(pooled.matmul(p))
            }
        }
    }
}

impl ClipKeys {
    /// The encoder's configuration from its tensors' shapes (`shape` of a key), with the
    /// conventions shapes cannot show: 64-wide heads, quick_gelu for transformers-layout
    /// (OpenAI CLIP-L) and gelu for OpenCLIP weights, and pooling at the highest id (the
    /// end-of-text token of CLIP's vocabulary).
    pub(crate) fn detect_config(
        &self,
        shape: impl Fn(&str) -> Option<Vec<usize>>,
    ) -> Result<ClipTextConfig, Error> {
        let need = |key: String| {
            shape(&key).ok_or_else(|| Error::Input {
                input: "checkpoint",
                reason: format!("not a CLIP text encoder: no `{key}`"),
            })
        };
        let tokens = need(format!("{}.weight", self.tokens_unit()))?;
        let positions = match self.layout {
            ClipLayout::Transformers => need(format!("{}.weight", self.positions_unit()))?,
            ClipLayout::OpenClip => need(self.positions_unit())?,
        };
        let fc1 = need(format!("{}.weight", self.layer(0, "mlp.fc1")))?;
        let layers = (0..)
            .take_while(|&l| shape(&format!("{}.weight", self.layer(l, "layer_norm1"))).is_some())
            .count();
        let at = |s: &[usize], i: usize| s.get(i).copied().unwrap_or(0);
        let hidden = at(&tokens, 1);
        let projection = match (self.layout, shape(&self.projection_key())) {
            (ClipLayout::Transformers, Some(s)) => at(&s, 0),
            (ClipLayout::OpenClip, Some(s)) => at(&s, 1),
            (_, None) => hidden,
        };
        let config = ClipTextConfig {
            vocab_size: at(&tokens, 0),
            hidden_size: hidden,
            intermediate_size: at(&fc1, 0),
            projection_dim: projection,
            num_hidden_layers: layers,
            num_attention_heads: (hidden / 64).max(1),
            max_position_embeddings: at(&positions, 0),
            hidden_act: match self.layout {
                ClipLayout::Transformers => "quick_gelu",
                ClipLayout::OpenClip => "gelu",
            }
            .into(),
            layer_norm_eps: 1e-5,
            eos_token_id: 2,
        };
        if [
            config.vocab_size,
            hidden,
            config.intermediate_size,
            config.max_position_embeddings,
        ]
        .contains(&0)
            || layers == 0
        {
            return Err(Error::Input {
                input: "checkpoint",
                reason: format!(
                    "not a CLIP text encoder: shapes {tokens:?}, {positions:?}, {fc1:?}"
                ),
            });
        }
        config.check()?;
        Ok(config)
    }
}

/// An OpenCLIP-layout tensor with transformers' module names, as LoRAs name them: the
/// fused `attn.in_proj_weight`/`_bias` as three row slices (q, k, v), `attn.out_proj`,
/// `mlp.c_fc`/`c_proj` as `mlp.fc1`/`fc2`, `ln_1`/`ln_2` as the layer norms. Other
/// tensors keep their own name only.
pub(crate) fn open_clip_lora_names(keys: &ClipKeys, mut t: ModelTensor) -> Vec<ModelTensor> {
    let rest = t
        .key
        .strip_prefix(&keys.prefix)
        .and_then(|k| k.strip_prefix("transformer.resblocks."))
        .and_then(|k| k.split_once('.'));
    let Some((layer, part)) = rest else {
        return vec![t];
    };
    let ours = format!("text_model.encoder.layers.{layer}");
    if let Some(param) = part.strip_prefix("attn.in_proj_") {
        let h = t.shape.first().copied().unwrap_or(0) / 3;
        return ["q_proj", "k_proj", "v_proj"]
            .into_iter()
            .enumerate()
            .map(|(i, p)| ModelTensor {
                key: t.key.clone(),
                modules: vec![format!("{ours}.self_attn.{p}")],
                shape: t.shape.clone(),
                rows: Some(i * h..(i + 1) * h),
            })
            .filter(|_| param == "weight" || param == "bias")
            .collect();
    }
    let module = part.rsplit_once('.').map_or(part, |(m, _)| m);
    let alias = match module {
        "attn.out_proj" => "self_attn.out_proj",
        "mlp.c_fc" => "mlp.fc1",
        "mlp.c_proj" => "mlp.fc2",
        "ln_1" => "layer_norm1",
        "ln_2" => "layer_norm2",
        _ => return vec![t],
    };
    t.modules.push(format!("{ours}.{alias}"));
    vec![t]
}

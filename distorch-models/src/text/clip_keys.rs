//! Where a CLIP text encoder's weights sit in a file: transformers' layout (under
//! `text_model.`, `transformer.text_model.` or no prefix), or OpenCLIP's (SD 2.x
//! `cond_stage_model.model.`, SDXL `conditioner.embedders.1.model.`: fused q/k/v `in_proj`,
//! a bare `positional_embedding`, a transposed `text_projection`).

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use distorch_core::runtime::ExpectedTensor;

use distorch_lora::ModelTensor;

use crate::error::Error;
use crate::load::shape_map;
use crate::nn::spec::{LayerNorm, Linear, Param, Spec, UnitKey};
use crate::nn::{Weights, linear};
use crate::text::clip_config::ClipTextConfig;
use distorch_core::Component;

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

    /// The encoder's layers in this layout, described once (see [`Spec`]); `projection`:
    /// whether the file has the text projection.
    pub(crate) fn layers(&self, c: &ClipTextConfig, projection: bool) -> Layers {
        let (h, i, eps) = (c.hidden_size, c.intermediate_size, c.layer_norm_eps);
        let open = self.layout == ClipLayout::OpenClip;
        let mut s = Spec::new(str::to_owned);
        let tokens = s.param(&self.tokens_unit(), "weight", vec![c.vocab_size, h]);
        let shape = vec![c.max_position_embeddings, h];
        let positions = if open {
            s.tensor(&self.positions_unit(), shape)
        } else {
            s.param(&self.positions_unit(), "weight", shape)
        };
        let blocks = (0..c.num_hidden_layers)
            .map(|l| {
                let norm1 = s.layer_norm(&self.layer(l, "layer_norm1"), h, eps);
                let qkv =
                    if open {
                        let attn = self.layer(l, "attn");
                        Qkv::Fused(s.unit(
                            &attn,
                            &[
                                ("in_proj_weight", vec![3 * h, h]),
                                ("in_proj_bias", vec![3 * h]),
                            ],
                        ))
                    } else {
                        Qkv::Separate(["q_proj", "k_proj", "v_proj"].map(|p| {
                            s.linear(&self.layer(l, &format!("self_attn.{p}")), h, h, true)
                        }))
                    };
                Block {
                    norm1,
                    qkv,
                    out: s.linear(&self.layer(l, "self_attn.out_proj"), h, h, true),
                    norm2: s.layer_norm(&self.layer(l, "layer_norm2"), h, eps),
                    fc1: s.linear(&self.layer(l, "mlp.fc1"), i, h, true),
                    fc2: s.linear(&self.layer(l, "mlp.fc2"), h, i, true),
                }
            })
            .collect();
        let final_norm = s.layer_norm(&self.final_norm(), h, eps);
        let projection = projection.then(|| {
            let unit = format!("{}text_projection", self.outer);
            if open {
                Projection::Matrix(s.tensor(&unit, vec![h, c.projection_dim]))
            } else {
                Projection::Linear(s.linear(&unit, c.projection_dim, h, false))
            }
        });
        Layers {
            tokens,
            positions,
            blocks,
            final_norm,
            projection,
            expected: s.into_expected(),
        }
    }
}

/// A CLIP text encoder's layers in its file's layout.
pub(crate) struct Layers {
    pub(crate) tokens: Param,
    pub(crate) positions: Param,
    pub(crate) blocks: Vec<Block>,
    pub(crate) final_norm: LayerNorm,
    pub(crate) projection: Option<Projection>,
    /// Every tensor the encoder reads, in the order its forward pass uses them.
    pub(crate) expected: Vec<ExpectedTensor>,
}

/// One encoder layer.
pub(crate) struct Block {
    pub(crate) norm1: LayerNorm,
    pub(crate) qkv: Qkv,
    pub(crate) out: Linear,
    pub(crate) norm2: LayerNorm,
    pub(crate) fc1: Linear,
    pub(crate) fc2: Linear,
}

/// The attention's query, key and value projections.
pub(crate) enum Qkv {
    /// Three linear layers (transformers).
    Separate([Linear; 3]),
    /// One fused `in_proj_weight` / `in_proj_bias` (OpenCLIP).
    Fused(UnitKey),
}

impl Qkv {
    /// The query, key and value of `y`.
    pub(crate) fn forward<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        y: Tensor<B, 3>,
    ) -> Result<[Tensor<B, 3>; 3], Error> {
        match self {
            Qkv::Separate([q, k, v]) => Ok([
                q.forward(w, y.clone())?,
                k.forward(w, y.clone())?,
                v.forward(w, y)?,
            ]),
            Qkv::Fused(unit) => {
                let unit = w.fetch(unit)?;
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
}

/// The text projection of the pooled output.
pub(crate) enum Projection {
    /// A linear layer without bias, [projection, hidden] (transformers).
    Linear(Linear),
    /// A [hidden, projection] matrix (OpenCLIP).
    Matrix(Param),
}

impl Projection {
    /// The projection of `pooled`.
    pub(crate) fn forward<B: Backend>(
        &self,
        w: &Weights<'_, B>,
        pooled: Tensor<B, 2>,
    ) -> Result<Tensor<B, 2>, Error> {
        match self {
            Projection::Linear(l) => l.forward(w, pooled),
            Projection::Matrix(p) => {
                let m: Tensor<B, 2> = p.get(w)?;
                Ok(pooled.matmul(m))
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
            shape(&key).ok_or_else(|| Error::NotTheModel {
                model: "CLIP text encoder",
                reason: format!("no `{key}`"),
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
            return Err(Error::NotTheModel {
                model: "CLIP text encoder",
                reason: format!("shapes {tokens:?}, {positions:?}, {fc1:?}"),
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
                of_module: None,
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

/// The text encoders of a CLIP component, each with its key layout: SDXL numbers them
/// (`0.`, `1.` under `conditioner.embedders.`); SD 1.x/2.x and one-encoder files have one.
pub fn text_encoders<'a>(c: &Component<'a>) -> Vec<(Component<'a>, ClipLayout)> {
    encoders(c)
        .into_iter()
        .map(|e| {
            let shapes = shape_map(&e);
            let layout = ClipKeys::detect(shapes.keys().map(String::as_str)).layout;
            (e, layout)
        })
        .collect()
}

/// The text encoders of a CLIP component (see [`text_encoders`]).
pub(crate) fn encoders<'a>(c: &Component<'a>) -> Vec<Component<'a>> {
    let mut numbered: Vec<&str> = c
        .tensors
        .iter()
        .filter_map(|t| {
            let l = c.local(t);
            let (head, _) = l.split_once('.')?;
            head.parse::<u32>().ok().map(|_| head)
        })
        .collect();
    numbered.sort_by_key(|h| h.parse::<u32>().unwrap_or(u32::MAX));
    numbered.dedup();
    if numbered.is_empty() {
        return vec![c.clone()];
    }
    numbered
        .into_iter()
        .map(|head| Component {
            kind: c.kind,
            prefix: c.prefix,
            conventions: c.conventions,
            tensors: c
                .tensors
                .iter()
                .filter(|t| c.local(t).starts_with(&format!("{head}.")))
                .copied()
                .collect(),
        })
        .collect()
}

//! CLIP text encoder, as transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`:
//! token and position embeddings, pre-norm transformer layers with causal self-attention,
//! final layer norm, pooled output at the first EOS token, optional text projection. Every
//! layer's hidden state is returned (SDXL conditions on the penultimate one).

use std::path::Path;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use distorch_alloc::Plan;
use distorch_core::runtime::{
    DeviceMap, ExecutionOrder, ExpectedTensor, LoadOptions, LoadReport, Lookahead, Streamer,
    WeightStore,
};
use distorch_core::{Component, SafetensorsIndex};
use serde::Deserialize;

use crate::error::Error;
use crate::nn::{Activation, Weights, attention, causal_mask};

/// The fields of a transformers `CLIPTextConfig` the encoder uses (defaults as transformers').
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Width of the text projection.
    pub projection_dim: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Longest sequence (rows of the position embedding).
    pub max_position_embeddings: usize,
    /// `quick_gelu` (CLIP-L) or `gelu` (OpenCLIP).
    pub hidden_act: String,
    /// Layer-norm epsilon.
    pub layer_norm_eps: f64,
    /// The end-of-text token; `2` selects the legacy pooling (argmax of the ids).
    pub eos_token_id: u32,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: 2,
        }
    }
}

impl ClipTextConfig {
    /// Reads a `config.json` (a `CLIPTextConfig`, or a `CLIPConfig` whose `text_config` is
    /// used) and checks it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<ClipTextConfig, Error> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Config {
                path: path.to_path_buf(),
                reason: format!("not JSON: {e}"),
            })?;
        if let Some(inner) = value.get_mut("text_config") {
            value = inner.take();
        }
        let config: ClipTextConfig = crate::config::from_value(path, value)?;
        config.check()?;
        Ok(config)
    }

    /// Checks the values the maths depends on.
    pub fn check(&self) -> Result<(), Error> {
        Activation::from_name(&self.hidden_act)?;
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::Unsupported {
                field: "num_attention_heads",
                value: self.num_attention_heads.to_string(),
                reason: "must divide hidden_size",
            });
        }
        Ok(())
    }
}

/// What the encoder returns.
#[derive(Debug, Clone)]
pub struct ClipTextOutput<B: Backend> {
    /// The last layer's output after the final layer norm, [batch, seq, hidden].
    pub last_hidden_state: Tensor<B, 3>,
    /// `last_hidden_state` at each row's first EOS token, [batch, hidden].
    pub pooled_output: Tensor<B, 2>,
    /// The pooled output through the text projection, [batch, projection], when the model
    /// has one.
    pub text_embeds: Option<Tensor<B, 2>>,
    /// The embeddings and every layer's output (before the final norm): layers + 1 tensors.
    pub hidden_states: Vec<Tensor<B, 3>>,
}

/// A CLIP text encoder whose weights live where its plan put them.
pub struct ClipTextModel<B: Backend> {
    config: ClipTextConfig,
    activation: Activation,
    streamer: Arc<Streamer<B>>,
    /// Key prefix of the encoder's units (`text_model.`, `transformer.text_model.` or empty).
    prefix: String,
    /// Key prefix of the projection (the prefix without `text_model.`).
    outer: String,
    projection: bool,
}

impl<B: Backend> ClipTextModel<B> {
    /// The tensors the encoder reads, keys under `prefix` (`text_model.` as transformers
    /// saves them, or empty), plus `text_projection.weight` when `projection`.
    pub fn expected_tensors(
        config: &ClipTextConfig,
        prefix: &str,
        projection: bool,
    ) -> Vec<ExpectedTensor> {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let mut out = Vec::new();
        let mut push = |name: String, shape: Vec<usize>| {
            out.push(ExpectedTensor {
                name: format!("{prefix}{name}"),
                shape,
            })
        };
        push(
            "embeddings.token_embedding.weight".into(),
            vec![config.vocab_size, h],
        );
        push(
            "embeddings.position_embedding.weight".into(),
            vec![config.max_position_embeddings, h],
        );
        for l in 0..config.num_hidden_layers {
            let p = format!("encoder.layers.{l}");
            for norm in ["layer_norm1", "layer_norm2"] {
                push(format!("{p}.{norm}.weight"), vec![h]);
                push(format!("{p}.{norm}.bias"), vec![h]);
            }
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                push(format!("{p}.self_attn.{proj}.weight"), vec![h, h]);
                push(format!("{p}.self_attn.{proj}.bias"), vec![h]);
            }
            push(format!("{p}.mlp.fc1.weight"), vec![i, h]);
            push(format!("{p}.mlp.fc1.bias"), vec![i]);
            push(format!("{p}.mlp.fc2.weight"), vec![h, i]);
            push(format!("{p}.mlp.fc2.bias"), vec![h]);
        }
        push("final_layer_norm.weight".into(), vec![h]);
        push("final_layer_norm.bias".into(), vec![h]);
        if projection {
            out.push(ExpectedTensor {
                name: "text_projection.weight".into(),
                shape: vec![config.projection_dim, h],
            });
        }
        out
    }

    /// Units in the order the forward pass uses them.
    pub fn execution_order(config: &ClipTextConfig, prefix: &str, projection: bool) -> Vec<String> {
        let mut out = vec![
            format!("{prefix}embeddings.token_embedding"),
            format!("{prefix}embeddings.position_embedding"),
        ];
        for l in 0..config.num_hidden_layers {
            for m in [
                "layer_norm1",
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.out_proj",
                "layer_norm2",
                "mlp.fc1",
                "mlp.fc2",
            ] {
                out.push(format!("{prefix}encoder.layers.{l}.{m}"));
            }
        }
        out.push(format!("{prefix}final_layer_norm"));
        if projection {
            out.push("text_projection".into());
        }
        out
    }

    /// Loads the encoder from `component` of `index` at the homes `plan` gives (see
    /// [`WeightStore::load`]); the file's keys may sit under `text_model.` (transformers),
    /// `transformer.text_model.` (SD single-file checkpoints) or no prefix. Missing or mis-shaped weights are errors unless `options` allows them; keys
    /// the encoder does not use (an old `position_ids` buffer) are reported as unused.
    pub fn load(
        index: &SafetensorsIndex,
        component: &Component<'_>,
        plan: &Plan,
        devices: &DeviceMap<B>,
        config: ClipTextConfig,
        options: &LoadOptions<'_, B>,
        lookahead: Lookahead,
    ) -> Result<(ClipTextModel<B>, LoadReport), Error> {
        config.check()?;
        let local = |t: &&distorch_core::TensorInfo| {
            t.name
                .strip_prefix(component.prefix)
                .unwrap_or(&t.name)
                .to_owned()
        };
        let names: Vec<String> = component.tensors.iter().map(local).collect();
        // Keys may sit under `text_model.` (transformers), `transformer.text_model.` (SD
        // single-file checkpoints) or nothing; the projection beside `text_model`.
        const TOKENS: &str = "embeddings.token_embedding.weight";
        let prefix = names
            .iter()
            .find_map(|n| n.strip_suffix(TOKENS))
            .unwrap_or("")
            .to_owned();
        let outer = prefix
            .strip_suffix("text_model.")
            .unwrap_or(&prefix)
            .to_owned();
        let projection = names
            .iter()
            .any(|n| *n == format!("{outer}text_projection.weight"));
        let mut expected = Self::expected_tensors(&config, &prefix, projection);
        if let Some(p) = expected.last_mut().filter(|_| projection) {
            p.name = format!("{outer}text_projection.weight");
        }
        let options = LoadOptions {
            patch: options.patch,
            expected: Some(&expected),
            allow_missing: options.allow_missing,
            allow_mismatched: options.allow_mismatched,
            check_finite: options.check_finite,
        };
        let (store, report) = WeightStore::load(index, component, plan, devices, &options)?;
        let order = ExecutionOrder::Declared(
            Self::execution_order(&config, &prefix, projection)
                .into_iter()
                .map(|u| match u.as_str() {
                    "text_projection" => format!("{outer}text_projection"),
                    _ => u,
                })
                .filter(|u| store.position(u).is_some())
                .collect(),
        );
        let streamer = Streamer::with_order(Arc::new(store), lookahead, order)?;
        let activation = Activation::from_name(&config.hidden_act)?;
        Ok((
            ClipTextModel {
                config,
                activation,
                streamer: Arc::new(streamer),
                prefix,
                outer,
                projection,
            },
            report,
        ))
    }

    /// The configuration.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// The streamer (its statistics, its execution order).
    pub fn streamer(&self) -> &Streamer<B> {
        &self.streamer
    }

    /// Encodes `batch` rows of token ids (`input_ids.len() / batch` tokens each, at most
    /// `max_position_embeddings`).
    pub fn forward(&self, input_ids: &[u32], batch: usize) -> Result<ClipTextOutput<B>, Error> {
        let c = &self.config;
        let seq = check_ids(input_ids, batch, c)?;
        let device = self.streamer.store().compute().clone();
        let w = Weights::new(&self.streamer, &self.prefix);
        let ids: Vec<i64> = input_ids.iter().map(|&i| i64::from(i)).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [batch * seq]), &device);
        let tokens: Tensor<B, 2> = w.unit("embeddings.token_embedding")?.get("weight")?;
        let positions: Tensor<B, 2> = w.unit("embeddings.position_embedding")?.get("weight")?;
        let h = c.hidden_size;
        let mut x = tokens.select(0, ids).reshape([batch, seq, h])
            + positions.narrow(0, 0, seq).unsqueeze::<3>();
        let mask = causal_mask::<B>(seq, &device);
        let mut hidden_states = vec![x.clone()];
        for l in 0..c.num_hidden_layers {
            let p = format!("encoder.layers.{l}");
            let eps = c.layer_norm_eps;
            let y = w.layer_norm(&format!("{p}.layer_norm1"), x.clone(), eps)?;
            let q = w.linear(&format!("{p}.self_attn.q_proj"), y.clone())?;
            let k = w.linear(&format!("{p}.self_attn.k_proj"), y.clone())?;
            let v = w.linear(&format!("{p}.self_attn.v_proj"), y)?;
            let a = attention(q, k, v, c.num_attention_heads, Some(mask.clone()));
            x = x + w.linear(&format!("{p}.self_attn.out_proj"), a)?;
            let y = w.layer_norm(&format!("{p}.layer_norm2"), x.clone(), eps)?;
            let y = self.activation.apply(w.linear(&format!("{p}.mlp.fc1"), y)?);
            x = x + w.linear(&format!("{p}.mlp.fc2"), y)?;
            hidden_states.push(x.clone());
        }
        let last = w.layer_norm("final_layer_norm", x, c.layer_norm_eps)?;
        let rows: Vec<i64> = pooled_positions(input_ids, batch, seq, c.eos_token_id)
            .into_iter()
            .enumerate()
            .map(|(b, p)| (b * seq + p) as i64)
            .collect();
        let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [batch]), &device);
        let pooled = last.clone().reshape([batch * seq, h]).select(0, rows);
        let text_embeds = if self.projection {
            let root = Weights::new(&self.streamer, &self.outer);
            Some(root.linear("text_projection", pooled.clone())?)
        } else {
            None
        };
        Ok(ClipTextOutput {
            last_hidden_state: last,
            pooled_output: pooled,
            text_embeds,
            hidden_states,
        })
    }
}

/// Checks the ids against the config; returns the sequence length.
fn check_ids(ids: &[u32], batch: usize, c: &ClipTextConfig) -> Result<usize, Error> {
    let bad = |reason: String| Error::Input {
        input: "input_ids",
        reason,
    };
    if batch == 0 || ids.is_empty() || !ids.len().is_multiple_of(batch) {
        return Err(bad(format!(
            "{} ids do not split into {batch} non-empty rows",
            ids.len()
        )));
    }
    let seq = ids.len() / batch;
    if seq > c.max_position_embeddings {
        return Err(bad(format!(
            "{seq} tokens per row, the model takes at most {}",
            c.max_position_embeddings
        )));
    }
    if let Some((i, id)) = ids
        .iter()
        .enumerate()
        .find(|(_, id)| **id as usize >= c.vocab_size)
    {
        return Err(bad(format!(
            "id {id} at row {}, position {} is outside the vocabulary of {}",
            i / seq,
            i % seq,
            c.vocab_size
        )));
    }
    Ok(seq)
}

/// The position pooled in each row, as transformers picks it: the first EOS token (the
/// highest id when `eos_token_id` is 2, the legacy configs); position 0 when a row has none.
fn pooled_positions(ids: &[u32], batch: usize, seq: usize, eos: u32) -> Vec<usize> {
    (0..batch)
        .map(|b| {
            let row = &ids[b * seq..(b + 1) * seq];
            if eos == 2 {
                // argmax: the first position of the largest id.
                row.iter()
                    .enumerate()
                    .fold(
                        (0, 0),
                        |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
                    )
                    .0
            } else {
                row.iter().position(|&v| v == eos).unwrap_or_else(|| {
                    tracing::warn!(row = b, "no EOS token in the row; pooling position 0");
                    0
                })
            }
        })
        .collect()
}

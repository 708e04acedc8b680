//! CLIP text encoder, as transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`:
//! token and position embeddings, pre-norm transformer layers with causal self-attention,
//! final layer norm, pooled output at the first EOS token, optional text projection. Every
//! layer's hidden state is returned (SDXL conditions on the penultimate one).

use std::path::Path;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use distorch_core::Component;
use distorch_core::runtime::{ExecutionOrder, ExpectedTensor, LoadReport, Streamer};

use crate::error::Error;
use crate::load::{LoadContext, Model, shape_map, to_usize};
use crate::nn::attention::attention;
use crate::nn::{Activation, Weights, causal_mask};
pub use crate::text::clip_config::ClipTextConfig;
use crate::text::clip_keys::encoders;
use crate::text::clip_keys::{ClipKeys, ClipLayout, Layers};
use distorch_core::ComponentKind;
use distorch_lora::ModelTensor;

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
    layers: Layers,
}

impl<B: Backend> ClipTextModel<B> {
    /// The tensors the encoder reads in transformers' layout, keys under `prefix`
    /// (`text_model.` as transformers saves them, `transformer.text_model.` in SD
    /// checkpoints, or empty), plus the text projection when `projection`.
    pub fn expected_tensors(
        config: &ClipTextConfig,
        prefix: &str,
        projection: bool,
    ) -> Vec<ExpectedTensor> {
        ClipKeys {
            layout: ClipLayout::Transformers,
            prefix: prefix.to_owned(),
            outer: prefix
                .strip_suffix("text_model.")
                .unwrap_or(prefix)
                .to_owned(),
        }
        .layers(config, projection)
        .expected
    }

    /// The tensors the encoder reads in OpenCLIP's layout (fused `in_proj`, transposed
    /// projection), keys under `prefix` (empty, or `model.` as in SD checkpoints).
    pub fn expected_tensors_open_clip(
        config: &ClipTextConfig,
        prefix: &str,
        projection: bool,
    ) -> Vec<ExpectedTensor> {
        ClipKeys {
            layout: ClipLayout::OpenClip,
            prefix: prefix.to_owned(),
            outer: prefix.to_owned(),
        }
        .layers(config, projection)
        .expected
    }

    /// The final layer norm applied to `x`, hidden states of this encoder (SD 2.x
    /// conditions on the penultimate layer through it).
    pub fn final_norm(&self, x: Tensor<B, 3>) -> Result<Tensor<B, 3>, Error> {
        let w = Weights::new(&self.streamer);
        self.layers.final_norm.forward(&w, x)
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
        let w = Weights::new(&self.streamer);
        let l = &self.layers;
        let ids: Vec<i64> = input_ids.iter().map(|&i| i64::from(i)).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [batch * seq]), &device);
        let tokens: Tensor<B, 2> = l.tokens.get(&w)?;
        let positions: Tensor<B, 2> = l.positions.get(&w)?;
        let h = c.hidden_size;
        let mut x = tokens.select(0, ids).reshape([batch, seq, h])
            + positions.narrow(0, 0, seq).unsqueeze::<3>();
        let mask = causal_mask::<B>(seq, &device);
        let mut hidden_states = vec![x.clone()];
        for b in &l.blocks {
            let y = b.norm1.forward(&w, x.clone())?;
            let [q, k, v] = b.qkv.forward(&w, y)?;
            let a = attention(q, k, v, c.num_attention_heads, Some(mask.clone()));
            x = x + b.out.forward(&w, a)?;
            let y = b.norm2.forward(&w, x.clone())?;
            let y = self.activation.apply(b.fc1.forward(&w, y)?);
            x = x + b.fc2.forward(&w, y)?;
            hidden_states.push(x.clone());
        }
        let last = l.final_norm.forward(&w, x)?;
        let rows: Vec<i64> = pooled_positions(input_ids, batch, seq, c.eos_token_id)
            .into_iter()
            .enumerate()
            .map(|(b, p)| (b * seq + p) as i64)
            .collect();
        let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [batch]), &device);
        let pooled = last.clone().reshape([batch * seq, h]).select(0, rows);
        let text_embeds = match &l.projection {
            Some(p) => Some(w.output(p.forward(&w, pooled.clone())?)),
            None => None,
        };
        Ok(ClipTextOutput {
            last_hidden_state: w.output(last),
            pooled_output: w.output(pooled),
            text_embeds,
            hidden_states: hidden_states.into_iter().map(|t| w.output(t)).collect(),
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

impl<B: Backend> Model<B> for ClipTextModel<B> {
    type Config = ClipTextConfig;
    const KIND: ComponentKind = ComponentKind::Clip;
    fn config_from_file(path: &Path) -> Result<ClipTextConfig, Error> {
        ClipTextConfig::from_file(path)
    }
    fn detect_config(c: &Component<'_>) -> Result<ClipTextConfig, Error> {
        match encoders(c).as_slice() {
            [one] => ClipTextConfig::detect(one),
            many => Err(Error::SeveralTextEncoders { count: many.len() }),
        }
    }
    fn execution_order(config: &ClipTextConfig, c: &Component<'_>) -> Result<Vec<String>, Error> {
        let keys = ClipKeys::detect(c.local_names());
        let projection = c.local_names().any(|n| n == keys.projection_key());
        Ok(crate::load::units_in_order(
            &keys.layers(config, projection).expected,
        ))
    }
    /// transformers' names, from `text_model.` on, whatever prefix the file puts before it
    /// (kohya's `lora_te_text_model_*`, PEFT's `text_encoder.text_model.*`); OpenCLIP-layout
    /// weights (SD 2.x, SDXL's second encoder in single files) under the same names, q, k
    /// and v as row slices of the fused `in_proj`.
    fn lora_tensors(_: &ClipTextConfig, c: &Component<'_>) -> Result<Vec<ModelTensor>, Error> {
        let keys = ClipKeys::detect(c.local_names());
        let mut tensors = Vec::new();
        for mut t in crate::load::own_modules(c) {
            let m = t.modules[0].clone();
            if keys.layout == ClipLayout::OpenClip {
                tensors.extend(crate::text::clip_keys::open_clip_lora_names(&keys, t));
                continue;
            }
            let alias = match m.find("text_model.") {
                Some(i) => m[i..].to_owned(),
                None => format!("text_model.{m}"),
            };
            t.modules.push(alias);
            tensors.push(t);
        }
        Ok(tensors)
    }
    fn streamer(&self) -> &Streamer<B> {
        self.streamer()
    }
    /// Loads the encoder from `component` of `index` at the homes `plan` gives (see
    /// [`WeightStore::load`](distorch_core::runtime::WeightStore::load)). The key layout is read from the names: transformers' (under
    /// `text_model.`, `transformer.text_model.` as in SD checkpoints, or no prefix) or
    /// OpenCLIP's (SD 2.x and SDXL's second encoder: fused q/k/v, transposed projection). Missing or mis-shaped weights are errors unless `options` allows them; keys
    /// the encoder does not use (an old `position_ids` buffer) are reported as unused.
    fn load(ctx: &LoadContext<'_, B>, config: Self::Config) -> Result<(Self, LoadReport), Error> {
        config.check()?;
        let keys = ClipKeys::detect(ctx.component.local_names());
        let projection = ctx
            .component
            .local_names()
            .any(|n| n == keys.projection_key());
        let layers = keys.layers(&config, projection);
        let order = crate::load::units_in_order(&layers.expected);
        // Units a permissive load left out are not in the store.
        let (streamer, report) = ctx.stream(&layers.expected, |store| {
            ExecutionOrder::Declared(
                order
                    .into_iter()
                    .filter(|u| store.position(u).is_some())
                    .collect(),
            )
        })?;
        let activation = Activation::from_name(&config.hidden_act)?;
        Ok((
            ClipTextModel {
                config,
                activation,
                streamer,
                layers,
            },
            report,
        ))
    }
}

impl ClipTextConfig {
    /// The configuration of the (one) text encoder in `c`, read from its shapes (see the
    /// conventions in [`crate::text::clip`]: 64-wide heads, quick_gelu for transformers-layout
    /// weights, gelu for OpenCLIP).
    /// A width no released CLIP has is detected with assumed 64-wide heads
    /// ([`ClipTextConfig::assumed`]), logged as a warning naming how to give the
    /// configuration instead.
    pub fn detect(c: &Component<'_>) -> Result<ClipTextConfig, Error> {
        let shapes = shape_map(c);
        let config = ClipKeys::detect(shapes.keys().map(String::as_str))
            .detect_config(|k| shapes.get(k).map(|s| to_usize(s)))?;
        if let Some(assumed) = config.assumed() {
            tracing::warn!(
                assumed = assumed.as_str(),
                "a CLIP text encoder of no released width: its shapes do not say this, so it \
                 was assumed; give its configuration (config.json, or ClipTextConfig) if it is \
                 wrong"
            );
        }
        Ok(config)
    }

    /// What detection from shapes assumes for this configuration beyond the released CLIPs'
    /// conventions: the head count of a width that is none of theirs (512, 768, 1024, 1280:
    /// all 64-wide heads); `None` for those widths.
    pub fn assumed(&self) -> Option<String> {
        (![512, 768, 1024, 1280].contains(&self.hidden_size)).then(|| {
            format!(
                "attention heads 64 wide ({} heads of width {})",
                self.num_attention_heads, self.hidden_size
            )
        })
    }
}

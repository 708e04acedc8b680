//! T5-family encoders: UMT5, as transformers' `UMT5EncoderModel` (Wan's text encoder), and
//! T5 v1.1, as `T5EncoderModel` (FLUX's T5-XXL): token embedding (`shared.weight`), pre-norm
//! layers of self-attention with a relative position bias and a gated-GELU feed-forward, RMS
//! layer norms, an attention mask over padding. The two differ in one place ([`T5Variant`]):
//! UMT5 has a position bias table in every layer, T5 only in the first, shared by the others.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use distorch_core::runtime::{ExpectedTensor, LoadReport, Streamer};
use distorch_core::{Component, ComponentKind};
use serde::Deserialize;

use crate::error::Error;
use crate::load::{LoadContext, Model, shape_map, to_usize, units_in_order};
use crate::nn::spec::{Linear, Param, Spec};
use crate::nn::{Weights, f32, gelu_tanh, rms_norm, to_dtype};

/// The fields of a transformers `UMT5Config` (or `T5Config`) the encoder uses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Umt5Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub d_model: usize,
    /// Width of one attention head.
    pub d_kv: usize,
    /// Width of the feed-forward layer.
    pub d_ff: usize,
    /// Encoder layers.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Relative-position buckets.
    pub relative_attention_num_buckets: usize,
    /// Distance beyond which relative positions share a bucket.
    pub relative_attention_max_distance: usize,
    /// RMS-norm epsilon.
    pub layer_norm_epsilon: f64,
    /// The feed-forward: only `gated-gelu` (UMT5, T5 v1.1) is supported.
    pub feed_forward_proj: String,
    /// Which variant (the config's `model_type`: `umt5`, or `t5` / `mt5`).
    #[serde(rename = "model_type")]
    pub variant: T5Variant,
}

/// Where a T5-family encoder keeps its relative position bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum T5Variant {
    /// UMT5: a bias table in every layer.
    #[default]
    Umt5,
    /// T5 v1.1 (and mT5): one table in the first layer, shared by every layer.
    #[serde(alias = "mt5")]
    T5,
}

impl Default for Umt5Config {
    /// umt5-xxl, Wan's encoder.
    fn default() -> Self {
        Umt5Config {
            vocab_size: 256_384,
            d_model: 4096,
            d_kv: 64,
            d_ff: 10240,
            num_layers: 24,
            num_heads: 64,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".into(),
            variant: T5Variant::Umt5,
        }
    }
}

impl Umt5Config {
    /// T5-XXL v1.1's encoder, as FLUX uses it.
    pub fn t5_xxl() -> Umt5Config {
        Umt5Config {
            vocab_size: 32_128,
            d_ff: 10240,
            num_heads: 64,
            variant: T5Variant::T5,
            ..Umt5Config::default()
        }
    }

    /// Reads a transformers `config.json` and checks it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Umt5Config, Error> {
        crate::load::config::read_checked(path.as_ref(), Umt5Config::check)
    }

    /// Checks the values the maths depends on.
    pub fn check(&self) -> Result<(), Error> {
        if self.feed_forward_proj != "gated-gelu" {
            return Err(Error::Unsupported {
                field: "feed_forward_proj",
                value: self.feed_forward_proj.clone(),
                reason: "supported: gated-gelu (UMT5, T5 v1.1)",
            });
        }
        if self.num_heads == 0 || self.relative_attention_num_buckets < 4 {
            return Err(Error::Unsupported {
                field: "num_heads",
                value: self.num_heads.to_string(),
                reason: "needs at least one head and four relative-position buckets",
            });
        }
        Ok(())
    }

    /// The configuration of an encoder from its keys and shapes (transformers' layout): UMT5
    /// when its second layer has a position bias table of its own, else T5 v1.1; the maximum
    /// distance and epsilon are both variants' (128, 1e-6).
    pub fn detect(c: &Component<'_>) -> Result<Umt5Config, Error> {
        let shapes = shape_map(c);
        let get = |k: &str| shapes.get(k).map(|s| to_usize(s));
        let not = |what: &str| Error::NotTheModel {
            model: "T5/UMT5 encoder",
            reason: what.to_owned(),
        };
        let tokens = get("shared.weight")
            .or_else(|| get("encoder.embed_tokens.weight"))
            .ok_or_else(|| not("no `shared.weight`"))?;
        let layer = "encoder.block.0.layer.";
        let q =
            get(&format!("{layer}0.SelfAttention.q.weight")).ok_or_else(|| not("no layer 0"))?;
        let bias = get(&format!(
            "{layer}0.SelfAttention.relative_attention_bias.weight"
        ))
        .ok_or_else(|| not("no relative attention bias in layer 0"))?;
        let ff = get(&format!("{layer}1.DenseReluDense.wi_0.weight"))
            .ok_or_else(|| not("no gated feed-forward (`wi_0`)"))?;
        let (&[vocab, d_model], &[inner, _], &[buckets, heads], &[d_ff, _]) =
            (&tokens[..], &q[..], &bias[..], &ff[..])
        else {
            return Err(not("unexpected ranks"));
        };
        let num_layers = (0..)
            .take_while(|l| get(&format!("encoder.block.{l}.layer.0.layer_norm.weight")).is_some())
            .count();
        let variant = if get("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight")
            .is_some()
        {
            T5Variant::Umt5
        } else {
            T5Variant::T5
        };
        let config = Umt5Config {
            vocab_size: vocab,
            d_model,
            d_kv: inner / heads.max(1),
            d_ff,
            num_layers,
            num_heads: heads,
            relative_attention_num_buckets: buckets,
            variant,
            ..Umt5Config::default()
        };
        config.check()?;
        Ok(config)
    }
}

/// A T5-family encoder (UMT5 or T5 v1.1) whose weights live where its plan put them.
pub struct Umt5Encoder<B: Backend> {
    config: Umt5Config,
    streamer: Arc<Streamer<B>>,
    layers: Layers,
}

/// The encoder's layers, described once from the configuration (see [`Spec`]).
struct Layers {
    tokens: Param,
    blocks: Vec<Block>,
    final_norm: Param,
    expected: Vec<ExpectedTensor>,
}

/// One encoder block: self-attention with a relative position bias (its own in UMT5, the
/// first block's in T5), gated-GELU feed-forward, each after an RMS norm.
struct Block {
    norm1: Param,
    q: Linear,
    k: Linear,
    v: Linear,
    bias: Option<Param>,
    o: Linear,
    norm2: Param,
    wi_0: Linear,
    wi_1: Linear,
    wo: Linear,
}

impl Layers {
    /// `tokens` is the token embedding's unit: `shared` or `encoder.embed_tokens`.
    fn new(c: &Umt5Config, tokens: &str) -> Layers {
        let (d, inner, ff) = (c.d_model, c.num_heads * c.d_kv, c.d_ff);
        let mut s = Spec::prefixed("");
        let tokens = s.param(tokens, "weight", vec![c.vocab_size, d]);
        let blocks = (0..c.num_layers)
            .map(|l| {
                let u = |part: &str| format!("encoder.block.{l}.layer.{part}");
                Block {
                    norm1: s.param(&u("0.layer_norm"), "weight", vec![d]),
                    q: s.linear(&u("0.SelfAttention.q"), inner, d, false),
                    k: s.linear(&u("0.SelfAttention.k"), inner, d, false),
                    v: s.linear(&u("0.SelfAttention.v"), inner, d, false),
                    bias: (l == 0 || c.variant == T5Variant::Umt5).then(|| {
                        s.param(
                            &u("0.SelfAttention.relative_attention_bias"),
                            "weight",
                            vec![c.relative_attention_num_buckets, c.num_heads],
                        )
                    }),
                    o: s.linear(&u("0.SelfAttention.o"), d, inner, false),
                    norm2: s.param(&u("1.layer_norm"), "weight", vec![d]),
                    wi_0: s.linear(&u("1.DenseReluDense.wi_0"), ff, d, false),
                    wi_1: s.linear(&u("1.DenseReluDense.wi_1"), ff, d, false),
                    wo: s.linear(&u("1.DenseReluDense.wo"), d, ff, false),
                }
            })
            .collect();
        let final_norm = s.param("encoder.final_layer_norm", "weight", vec![d]);
        Layers {
            tokens,
            blocks,
            final_norm,
            expected: s.into_expected(),
        }
    }
}

impl<B: Backend> Umt5Encoder<B> {
    /// The tensors the encoder reads, in the order a forward pass uses them (`tokens` is
    /// `shared` or `encoder.embed_tokens`).
    pub fn expected_tensors(c: &Umt5Config, tokens: &str) -> Vec<ExpectedTensor> {
        Layers::new(c, tokens).expected
    }

    /// The token embedding's unit in `component`: `shared`, else the (tied)
    /// `encoder.embed_tokens`.
    fn tokens_unit(component: &Component<'_>) -> &'static str {
        if component.local_names().any(|n| n == "shared.weight") {
            "shared"
        } else {
            "encoder.embed_tokens"
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Umt5Config {
        &self.config
    }

    /// The streamer (its statistics, its execution order).
    pub fn streamer(&self) -> &Streamer<B> {
        &self.streamer
    }

    /// Encodes `batch` rows of token ids; `attention_mask` (1 = a token, 0 = padding, one per
    /// id) hides padding from attention. Returns the last hidden state, [batch, seq, d_model]
    /// (padding positions included, as transformers computes them).
    pub fn forward(
        &self,
        input_ids: &[u32],
        attention_mask: &[u32],
        batch: usize,
    ) -> Result<Tensor<B, 3>, Error> {
        let c = &self.config;
        let seq = check(input_ids, attention_mask, batch, c.vocab_size)?;
        let device = self.streamer.store().compute().clone();
        let w = Weights::new(&self.streamer);
        let ids: Vec<i64> = input_ids.iter().map(|&i| i64::from(i)).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [batch * seq]), &device);
        let layers = &self.layers;
        let table: Tensor<B, 2> = layers.tokens.get(&w)?;
        let mut x = table.select(0, ids).reshape([batch, seq, c.d_model]);
        let mask: Vec<f32> = attention_mask
            .iter()
            .map(|&m| if m == 0 { f32::MIN } else { 0.0 })
            .collect();
        let mask = Tensor::<B, 1>::from_data(TensorData::new(mask, [batch * seq]), &device)
            .reshape([batch, 1, 1, seq]);
        let buckets = relative_buckets(
            seq,
            c.relative_attention_num_buckets,
            c.relative_attention_max_distance,
        );
        let buckets =
            Tensor::<B, 1, Int>::from_data(TensorData::new(buckets, [seq * seq]), &device);
        let eps = c.layer_norm_epsilon;
        let (h, dk) = (c.num_heads, c.d_kv);
        // transformers' T5LayerNorm: statistics in f32, the result in the compute dtype.
        let dt = w.dtype();
        let norm = |p: &Param, x: Tensor<B, 3>| -> Result<Tensor<B, 3>, Error> {
            Ok(to_dtype(rms_norm(x, p.get(&w)?, eps), dt))
        };
        // The position bias of the last block that has a table (T5: the first block's).
        let mut bias: Option<Tensor<B, 4>> = None;
        for b in &layers.blocks {
            let y = norm(&b.norm1, x.clone())?;
            if let Some(p) = &b.bias {
                let table: Tensor<B, 2> = p.get(&w)?;
                // [seq·seq, heads] -> [1, heads, seq, seq]
                bias = Some(
                    table
                        .select(0, buckets.clone())
                        .reshape([seq, seq, h])
                        .permute([2, 0, 1])
                        .unsqueeze::<4>(),
                );
            }
            let bias = bias.clone().ok_or_else(|| Error::MissingWeight {
                key: "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight".into(),
                rank: 2,
            })?;
            let a = self_attention(&w, b, y, bias, &mask, [batch, seq, h, dk])?;
            x = clamp_f16(residual(x, b.o.forward(&w, a)?));
            let y = norm(&b.norm2, x.clone())?;
            let gate = gelu_tanh(b.wi_0.forward(&w, y.clone())?);
            let lin = b.wi_1.forward(&w, y)?;
            // transformers keeps `wo` at f32 in half-precision T5s (`_keep_in_fp32_modules`):
            // its output, and from the first feed-forward on the residual stream, are f32 there
            // (T5-XXL's activations overflow f16 otherwise).
            x = clamp_f16(residual(x, b.wo.forward_f32(&w, gate * lin)?));
        }
        Ok(w.output(norm(&layers.final_norm, x)?))
    }
}

/// T5's self-attention of `y` ([batch, seq, width]) with `bias` and `mask` added to the
/// unscaled scores; [batch, seq, heads · head width].
fn self_attention<B: Backend>(
    w: &Weights<'_, B>,
    b: &Block,
    y: Tensor<B, 3>,
    bias: Tensor<B, 4>,
    mask: &Tensor<B, 4>,
    [batch, seq, h, dk]: [usize; 4],
) -> Result<Tensor<B, 3>, Error> {
    let heads = |t: Tensor<B, 3>| t.reshape([batch, seq, h, dk]).swap_dims(1, 2);
    let q = heads(b.q.forward(w, y.clone())?);
    let k = heads(b.k.forward(w, y.clone())?);
    let v = heads(b.v.forward(w, y)?);
    // T5 does not scale the scores.
    // Scores, bias, mask and softmax in f32 (transformers' `softmax(scores.float())`).
    let dtype = v.dtype();
    let scores = f32(q.matmul(k.transpose())) + f32(bias) + mask.clone();
    Ok(to_dtype(softmax(scores, 3), dtype)
        .matmul(v)
        .swap_dims(1, 2)
        .reshape([batch, seq, h * dk]))
}

/// `x + y`, in f32 when either is (PyTorch's type promotion).
fn residual<B: Backend>(x: Tensor<B, 3>, y: Tensor<B, 3>) -> Tensor<B, 3> {
    if x.dtype() == DType::F32 || y.dtype() == DType::F32 {
        f32(x) + f32(y)
    } else {
        x + y
    }
}

/// At f16, transformers' T5 clamps the hidden states to f16's range, 1,000 inside it once
/// they hold an infinity.
fn clamp_f16<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    if x.dtype() != DType::F16 {
        return x;
    }
    let inf = x
        .clone()
        .is_inf()
        .any()
        .into_data()
        .iter::<bool>()
        .next()
        .unwrap_or(false);
    let max = if inf { 65504.0 - 1000.0 } else { 65504.0 };
    x.clamp(-max, max)
}

/// Checks ids and mask; returns the sequence length.
fn check(ids: &[u32], mask: &[u32], batch: usize, vocab: usize) -> Result<usize, Error> {
    let bad = |input, reason: String| Error::Input { input, reason };
    if batch == 0 || ids.is_empty() || !ids.len().is_multiple_of(batch) {
        return Err(bad(
            "input_ids",
            format!("{} ids do not split into {batch} non-empty rows", ids.len()),
        ));
    }
    if mask.len() != ids.len() {
        return Err(bad(
            "attention_mask",
            format!("{} values for {} ids", mask.len(), ids.len()),
        ));
    }
    let seq = ids.len() / batch;
    if let Some((i, id)) = ids
        .iter()
        .enumerate()
        .find(|(_, id)| **id as usize >= vocab)
    {
        return Err(bad(
            "input_ids",
            format!(
                "id {id} at row {}, position {} is outside the vocabulary of {vocab}",
                i / seq,
                i % seq
            ),
        ));
    }
    Ok(seq)
}

/// T5's bidirectional relative-position buckets for every (query, key) pair, row-major:
/// half the buckets for keys after the query; exact buckets for distances below a quarter of
/// the buckets, log-spaced ones up to `max_distance` beyond. Computed in f32 as the
/// reference does, so boundary distances land in the same bucket.
fn relative_buckets(seq: usize, buckets: usize, max_distance: usize) -> Vec<i64> {
    let half = (buckets / 2) as i64;
    let exact = half / 2;
    let log_span = ((max_distance as f64) / (exact as f64)).ln() as f32;
    let mut out = Vec::with_capacity(seq * seq);
    for q in 0..seq as i64 {
        for k in 0..seq as i64 {
            let rel = k - q;
            let mut b = if rel > 0 { half } else { 0 };
            let d = rel.abs();
            b += if d < exact {
                d
            } else {
                let ratio = (d as f32 / exact as f32).ln() / log_span * (half - exact) as f32;
                (exact + ratio as i64).min(half - 1)
            };
            out.push(b);
        }
    }
    out
}

impl<B: Backend> Model<B> for Umt5Encoder<B> {
    type Config = Umt5Config;
    const KIND: ComponentKind = ComponentKind::Model;
    fn config_from_file(path: &Path) -> Result<Umt5Config, Error> {
        Umt5Config::from_file(path)
    }
    fn detect_config(c: &Component<'_>) -> Result<Umt5Config, Error> {
        Umt5Config::detect(c)
    }
    fn execution_order(config: &Umt5Config, c: &Component<'_>) -> Result<Vec<String>, Error> {
        Ok(units_in_order(
            &Layers::new(config, Self::tokens_unit(c)).expected,
        ))
    }
    fn streamer(&self) -> &Streamer<B> {
        self.streamer()
    }
    /// Loads the encoder from `component` of `index` at the homes `plan` gives.
    fn load(ctx: &LoadContext<'_, B>, config: Self::Config) -> Result<(Self, LoadReport), Error> {
        config.check()?;
        let layers = Layers::new(&config, Self::tokens_unit(ctx.component));
        let (streamer, report) = ctx.stream_declared(&layers.expected)?;
        Ok((
            Umt5Encoder {
                config,
                streamer,
                layers,
            },
            report,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_t5() {
        // Values from transformers' `UMT5Attention._relative_position_bucket` (encoder).
        let b = relative_buckets(200, 32, 128);
        let at = |q: usize, k: usize| b[q * 200 + k];
        assert_eq!(at(10, 10), 0);
        assert_eq!(at(10, 3), 7);
        assert_eq!(at(3, 10), 16 + 7);
        assert_eq!(at(20, 4), 10, "distance 16: 8 + trunc(ln 2 / ln 16 · 8)");
        assert_eq!(at(0, 199), 31, "far beyond max_distance: the last bucket");
        assert_eq!(at(199, 0), 15);
    }
}

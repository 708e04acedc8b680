//! [`LoraPatch`]: LoRA updates mapped onto a model's tensors, applied while they load.

use std::collections::HashMap;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use distorch_core::runtime::WeightPatch;

use crate::error::Error;
use crate::file::{LoraFile, Target, Update};

/// A tensor of the model, as LoRAs may name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelTensor {
    /// Its key in the component (in the file's layout), e.g.
    /// `input_blocks.1.1.proj_in.weight`.
    pub key: String,
    /// Its module's names: the model's own naming (diffusers / transformers) and the file's
    /// layout's, dotted (`down_blocks.0.attentions.0.proj_in`).
    pub modules: Vec<String>,
    /// Its shape.
    pub shape: Vec<usize>,
}

/// What a set of LoRAs matched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoraReport {
    /// (LoRA module, model tensor key) pairs applied.
    pub matched: Vec<(String, String)>,
    /// LoRA modules for this component that match no tensor of the model.
    pub unmatched: Vec<String>,
}

/// One scaled update of a tensor.
#[derive(Debug, Clone)]
enum Delta {
    LowRank {
        up: Arc<[f32]>,
        down: Arc<[f32]>,
        rows: usize,
        rank: usize,
        cols: usize,
        scale: f32,
    },
    Full {
        values: Arc<[f32]>,
        scale: f32,
    },
}

/// LoRA updates by model tensor key: a [`WeightPatch`] for `WeightStore::load`.
#[derive(Debug, Clone, Default)]
pub struct LoraPatch {
    deltas: HashMap<String, Vec<Delta>>,
}

impl LoraPatch {
    /// Maps `loras` (each with its strength) onto the tensors of the component `target`.
    /// Every update is checked against the tensor's shape here, so loading cannot fail
    /// half-way. Modules for other targets are ignored; modules for this one that match
    /// nothing are reported; a LoRA with modules for this target none of which match is an
    /// error (a LoRA for another architecture).
    pub fn build(
        loras: &[(&LoraFile, f32)],
        target: Target,
        tensors: &[ModelTensor],
    ) -> Result<(LoraPatch, LoraReport), Error> {
        let mut by_name: HashMap<(String, &str), &ModelTensor> = HashMap::new();
        for t in tensors {
            let Some((_, param)) = t.key.rsplit_once('.') else {
                continue;
            };
            let param: &str = match param {
                "weight" => "weight",
                "bias" => "bias",
                _ => continue,
            };
            for m in &t.modules {
                by_name.insert((m.clone(), param), t);
                by_name.insert((m.replace('.', "_"), param), t);
            }
        }
        let mut patch = LoraPatch::default();
        let mut report = LoraReport::default();
        for (lora, strength) in loras {
            let mine: Vec<_> = lora
                .modules()
                .iter()
                .filter(|m| m.target == target)
                .collect();
            let before = report.matched.len();
            for m in &mine {
                let param = match &m.update {
                    Update::Diff { param, .. } => *param,
                    Update::LowRank { .. } => "weight",
                };
                let Some(t) = by_name.get(&(m.name.clone(), param)) else {
                    report.unmatched.push(m.name.clone());
                    continue;
                };
                let shape_err = |reason: String| Error::Shape {
                    path: lora.path().to_path_buf(),
                    key: m.name.clone(),
                    target: t.key.clone(),
                    reason,
                };
                let numel: usize = t.shape.iter().product();
                let delta = match &m.update {
                    Update::LowRank {
                        up,
                        up_shape,
                        down,
                        down_shape,
                        alpha,
                    } => {
                        let (rows, rank) = (up_shape[0], up_shape[1]);
                        let cols: usize = down_shape[1..].iter().product();
                        if t.shape.first() != Some(&rows) || rows * cols != numel {
                            return Err(shape_err(format!(
                                "up {up_shape:?} · down {down_shape:?} is not {:?}",
                                t.shape
                            )));
                        }
                        let scale = strength * alpha.unwrap_or(rank as f32) / rank as f32;
                        Delta::LowRank {
                            up: Arc::clone(up),
                            down: Arc::clone(down),
                            rows,
                            rank,
                            cols,
                            scale,
                        }
                    }
                    Update::Diff { values, shape, .. } => {
                        if values.len() != numel {
                            return Err(shape_err(format!(
                                "difference {shape:?} is not {:?}",
                                t.shape
                            )));
                        }
                        Delta::Full {
                            values: Arc::clone(values),
                            scale: *strength,
                        }
                    }
                };
                patch.deltas.entry(t.key.clone()).or_default().push(delta);
                report.matched.push((m.name.clone(), t.key.clone()));
            }
            if !mine.is_empty() && report.matched.len() == before {
                return Err(Error::NothingMatched {
                    path: lora.path().to_path_buf(),
                    target: target.to_string(),
                    modules: mine.len(),
                    first: mine[0].name.clone(),
                });
            }
        }
        if !report.unmatched.is_empty() {
            tracing::warn!(
                %target,
                unmatched = report.unmatched.len(),
                first = report.unmatched[0].as_str(),
                "LoRA modules that match no tensor of the model"
            );
        }
        tracing::info!(%target, tensors = patch.deltas.len(), "LoRA mapped");
        Ok((patch, report))
    }

    /// Whether no tensor is patched.
    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }

    /// The patched tensors' keys.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.deltas.keys().map(String::as_str)
    }
}

impl<B: Backend> WeightPatch<B> for LoraPatch {
    fn patch(&self, key: &str, weight: &Tensor<B, 1>, _shape: &[usize]) -> Option<Tensor<B, 1>> {
        let deltas = self.deltas.get(key)?;
        let device = weight.device();
        let mut out = weight.clone();
        for d in deltas {
            out = match d {
                Delta::LowRank {
                    up,
                    down,
                    rows,
                    rank,
                    cols,
                    scale,
                } => {
                    let up = Tensor::<B, 2>::from_data(
                        TensorData::new(up.to_vec(), [*rows, *rank]),
                        &device,
                    );
                    let down = Tensor::<B, 2>::from_data(
                        TensorData::new(down.to_vec(), [*rank, *cols]),
                        &device,
                    );
                    out + up.matmul(down).reshape([rows * cols]).mul_scalar(*scale)
                }
                Delta::Full { values, scale } => {
                    let n = values.len();
                    out + Tensor::<B, 1>::from_data(TensorData::new(values.to_vec(), [n]), &device)
                        .mul_scalar(*scale)
                }
            };
        }
        Some(out)
    }

    fn applies_to(&self, key: &str) -> bool {
        self.deltas.contains_key(key)
    }
}

//! [`LoraPatch`]: LoRA updates mapped onto a model's tensors, applied while they load.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use distorch_core::runtime::WeightPatch;

use crate::error::Error;
use crate::file::{KronFactor, LoraFile, Matrix, Target, Update};

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
    /// The rows of the tensor these modules are, when they are a slice of a fused tensor
    /// (OpenCLIP's `in_proj_weight` holds q, k and v); `None` for the whole tensor.
    pub rows: Option<Range<usize>>,
    /// The rows of these modules' output the tensor (or its `rows`) is, when the modules
    /// are fused and the model's tensors separate (a kohya FLUX LoRA's `img_attn_qkv` on
    /// diffusers' `to_q`, `to_k`, `to_v`): only those rows of a LoRA's update apply here.
    /// `None`: the whole module.
    pub of_module: Option<Range<usize>>,
}

impl ModelTensor {
    /// The whole tensor `key` of `shape`, named by `modules`.
    pub fn new(key: String, modules: Vec<String>, shape: Vec<usize>) -> ModelTensor {
        ModelTensor {
            key,
            modules,
            shape,
            rows: None,
            of_module: None,
        }
    }

    /// The slice's shape: the tensor's with its first dimension cut to `rows`.
    fn slice_shape(&self) -> Vec<usize> {
        let mut s = self.shape.clone();
        if let (Some(r), Some(first)) = (&self.rows, s.first_mut()) {
            *first = r.len();
        }
        s
    }

    /// The slice's first element in the flattened tensor.
    fn offset(&self) -> usize {
        let row: usize = self.shape.iter().skip(1).product();
        self.rows.as_ref().map_or(0, |r| r.start * row)
    }
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
        /// First element of the rows updated (a slice of a fused tensor), else 0.
        offset: usize,
    },
    Full {
        values: Arc<[f32]>,
        scale: f32,
        offset: usize,
    },
    Hadamard {
        a1: Dense,
        b1: Dense,
        a2: Dense,
        b2: Dense,
        scale: f32,
        offset: usize,
    },
    Kronecker {
        w1: Factor,
        w2: Factor,
        scale: f32,
        offset: usize,
    },
}

/// The update `update` makes to tensor `t` (its `rows`, from its module's `of_module` rows),
/// scaled by `strength`; the reason when the shapes do not fit.
fn delta(update: &Update, t: &ModelTensor, strength: f32) -> Result<Delta, String> {
    let shape = t.slice_shape();
    let numel: usize = shape.iter().product();
    let offset = t.offset();
    let split = |what: &str| {
        Err(format!(
            "a {what} update of a fused module cannot be split onto the model's separate tensors"
        ))
    };
    Ok(match update {
        Update::LowRank {
            up,
            up_shape,
            down,
            down_shape,
            alpha,
        } => low_rank((up, up_shape), (down, down_shape), *alpha, t, strength)?,
        Update::Diff {
            values,
            shape: diff_shape,
            ..
        } => {
            let values = match (&t.of_module, diff_shape.first()) {
                (Some(r), Some(&rows)) if r.end <= rows && rows > 0 => {
                    rows_of(values, values.len() / rows, r)
                }
                (Some(r), _) => {
                    return Err(format!("rows {r:?} of difference {diff_shape:?}"));
                }
                (None, _) => Arc::clone(values),
            };
            if values.len() != numel {
                return Err(format!("difference {diff_shape:?} is not {shape:?}"));
            }
            Delta::Full {
                values,
                scale: strength,
                offset,
            }
        }
        Update::Hadamard { .. } if t.of_module.is_some() => return split("LoHa"),
        Update::Kronecker { .. } if t.of_module.is_some() => return split("LoKr"),
        Update::Hadamard {
            w1_a,
            w1_b,
            w2_a,
            w2_b,
            alpha,
        } => {
            let (rows, rank, cols) = (w1_a.rows(), w1_b.rows(), w1_b.cols());
            let fits = w1_a.cols() == rank
                && w2_a.rows() == rows
                && w2_a.cols() == w2_b.rows()
                && w2_b.cols() == cols
                && shape.first() == Some(&rows)
                && rows * cols == numel;
            if !fits {
                return Err(format!(
                    "LoHa ({:?}·{:?}) ⊙ ({:?}·{:?}) is not {shape:?}",
                    w1_a.shape, w1_b.shape, w2_a.shape, w2_b.shape
                ));
            }
            Delta::Hadamard {
                a1: Dense::of(w1_a),
                b1: Dense::of(w1_b),
                a2: Dense::of(w2_a),
                b2: Dense::of(w2_b),
                scale: strength * alpha.map_or(1.0, |a| a / rank as f32),
                offset,
            }
        }
        Update::Kronecker { w1, w2, alpha } => kronecker(w1, w2, *alpha, &shape, strength, offset)?,
    })
}

/// A low-rank update `up · down` (its `of_module` rows of `up` when `t` is part of the
/// module) scaled by `strength · alpha / rank`.
fn low_rank(
    (up, up_shape): (&Arc<[f32]>, &[usize]),
    (down, down_shape): (&Arc<[f32]>, &[usize]),
    alpha: Option<f32>,
    t: &ModelTensor,
    strength: f32,
) -> Result<Delta, String> {
    let shape = t.slice_shape();
    let numel: usize = shape.iter().product();
    let rank = up_shape[1];
    let cols: usize = down_shape[1..].iter().product();
    let (up, rows) = match &t.of_module {
        Some(r) if r.end <= up_shape[0] => (rows_of(up, rank, r), r.len()),
        Some(r) => {
            return Err(format!(
                "rows {r:?} of up {up_shape:?}: the module has {} rows",
                up_shape[0]
            ));
        }
        None => (Arc::clone(up), up_shape[0]),
    };
    if shape.first() != Some(&rows) || rows * cols != numel {
        return Err(format!(
            "up {up_shape:?} · down {down_shape:?} is not {shape:?}"
        ));
    }
    Ok(Delta::LowRank {
        up,
        down: Arc::clone(down),
        rows,
        rank,
        cols,
        scale: strength * alpha.unwrap_or(rank as f32) / rank as f32,
        offset: t.offset(),
    })
}

/// A LoKr update `w1 ⊗ w2`, scaled by `strength · alpha / rank` where a factor is a product.
fn kronecker(
    w1: &KronFactor,
    w2: &KronFactor,
    alpha: Option<f32>,
    shape: &[usize],
    strength: f32,
    offset: usize,
) -> Result<Delta, String> {
    let numel: usize = shape.iter().product();
    let (f1, f2) = (Factor::of(w1), Factor::of(w2));
    let (Some((w1, [a, b], r1)), Some((w2, [c, dk], r2))) = (f1, f2) else {
        return Err("a LoKr factor's halves do not multiply".into());
    };
    if shape.first() != Some(&(a * c)) || a * c * b * dk != numel {
        return Err(format!("LoKr [{a}, {b}] ⊗ [{c}, {dk}] is not {shape:?}"));
    }
    let scale = match (alpha, r2.or(r1)) {
        (Some(alpha), Some(rank)) => strength * alpha / rank as f32,
        _ => strength,
    };
    Ok(Delta::Kronecker {
        w1,
        w2,
        scale,
        offset,
    })
}

/// Rows `r` of a row-major matrix of `cols` columns.
fn rows_of(values: &Arc<[f32]>, cols: usize, r: &Range<usize>) -> Arc<[f32]> {
    values[r.start * cols..r.end * cols].into()
}

/// A matrix ready to upload.
#[derive(Debug, Clone)]
struct Dense {
    values: Arc<[f32]>,
    rows: usize,
    cols: usize,
}

impl Dense {
    fn of(m: &Matrix) -> Dense {
        Dense {
            values: Arc::clone(&m.values),
            rows: m.rows(),
            cols: m.cols(),
        }
    }

    fn on<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2> {
        Tensor::from_data(
            TensorData::new(self.values.to_vec(), [self.rows, self.cols]),
            device,
        )
    }
}

/// A LoKr factor: whole, or a product computed on the device.
#[derive(Debug, Clone)]
enum Factor {
    Whole(Dense),
    Product(Dense, Dense),
}

impl Factor {
    /// The factor, its [rows, cols], and the product's rank (`None` when whole); `None` when
    /// a product's halves do not multiply.
    fn of(f: &KronFactor) -> Option<(Factor, [usize; 2], Option<usize>)> {
        match f {
            KronFactor::Whole(m) => Some((Factor::Whole(Dense::of(m)), [m.rows(), m.cols()], None)),
            KronFactor::Product(a, b) => (a.cols() == b.rows()).then(|| {
                (
                    Factor::Product(Dense::of(a), Dense::of(b)),
                    [a.rows(), b.cols()],
                    Some(b.rows()),
                )
            }),
        }
    }

    fn on<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2> {
        match self {
            Factor::Whole(m) => m.on(device),
            Factor::Product(a, b) => a.on(device).matmul(b.on(device)),
        }
    }
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
        let mut by_name: HashMap<(String, &str), Vec<&ModelTensor>> = HashMap::new();
        for t in tensors {
            // `weight`/`bias`, or a fused tensor's `in_proj_weight`/`in_proj_bias`.
            let last = t.key.rsplit('.').next().unwrap_or("");
            let param: &str = if last.ends_with("weight") {
                "weight"
            } else if last.ends_with("bias") {
                "bias"
            } else {
                continue;
            };
            for name in t
                .modules
                .iter()
                .flat_map(|m| [m.clone(), m.replace('.', "_")])
            {
                // A module may name several tensors (a fused module over separate ones), each
                // once, whichever layouts list it.
                let same = |o: &&ModelTensor| {
                    o.key == t.key && o.rows == t.rows && o.of_module == t.of_module
                };
                let tensors = by_name.entry((name, param)).or_default();
                if !tensors.iter().any(same) {
                    tensors.push(t);
                }
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
                    _ => "weight",
                };
                let Some(ts) = by_name.get(&(m.name.clone(), param)) else {
                    report.unmatched.push(m.name.clone());
                    continue;
                };
                for t in ts {
                    let delta = delta(&m.update, t, *strength).map_err(|reason| Error::Shape {
                        path: lora.path().to_path_buf(),
                        key: m.name.clone(),
                        target: t.key.clone(),
                        reason,
                    })?;
                    patch.deltas.entry(t.key.clone()).or_default().push(delta);
                    report.matched.push((m.name.clone(), t.key.clone()));
                }
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
        let total = weight.dims()[0];
        let mut out = weight.clone();
        for d in deltas {
            let (update, offset) = match d {
                Delta::LowRank {
                    up,
                    down,
                    rows,
                    rank,
                    cols,
                    scale,
                    offset,
                } => {
                    let up = Tensor::<B, 2>::from_data(
                        TensorData::new(up.to_vec(), [*rows, *rank]),
                        &device,
                    );
                    let down = Tensor::<B, 2>::from_data(
                        TensorData::new(down.to_vec(), [*rank, *cols]),
                        &device,
                    );
                    let update = up.matmul(down).reshape([rows * cols]).mul_scalar(*scale);
                    (update, *offset)
                }
                Delta::Hadamard {
                    a1,
                    b1,
                    a2,
                    b2,
                    scale,
                    offset,
                } => {
                    let m1 = a1.on::<B>(&device).matmul(b1.on(&device));
                    let m2 = a2.on::<B>(&device).matmul(b2.on(&device));
                    let n = a1.rows * b1.cols;
                    ((m1 * m2).reshape([n]).mul_scalar(*scale), *offset)
                }
                Delta::Kronecker {
                    w1,
                    w2,
                    scale,
                    offset,
                } => {
                    let (x, y) = (w1.on::<B>(&device), w2.on::<B>(&device));
                    let ([a, b], [c, dk]) = (x.dims(), y.dims());
                    // kron(x, y)[i·c + k, j·dk + m] = x[i, j] · y[k, m]
                    let k = x.reshape([a, 1, b, 1]) * y.reshape([1, c, 1, dk]);
                    (k.reshape([a * c * b * dk]).mul_scalar(*scale), *offset)
                }
                Delta::Full {
                    values,
                    scale,
                    offset,
                } => {
                    let n = values.len();
                    let update =
                        Tensor::<B, 1>::from_data(TensorData::new(values.to_vec(), [n]), &device)
                            .mul_scalar(*scale);
                    (update, *offset)
                }
            };
            let n = update.dims()[0];
            out = if offset == 0 && n == total {
                out + update
            } else {
                // A slice of a fused tensor: only its rows change.
                let range = offset..offset + n;
                let rows = out.clone().slice([range.clone()]) + update;
                out.slice_assign([range], rows)
            };
        }
        Some(out)
    }

    fn applies_to(&self, key: &str) -> bool {
        self.deltas.contains_key(key)
    }
}

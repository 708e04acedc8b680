//! [`LoraFile`]: a LoRA's modules, read from a safetensors file in any supported format.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use distorch_core::SafetensorsIndex;

use crate::error::Error;

/// Which component of a model a LoRA module changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// The denoiser (UNet or DiT).
    Unet,
    /// A text encoder: 0 is the first (CLIP-L; `lora_te_` / `lora_te1_`), 1 the second
    /// (SDXL's OpenCLIP-G; `lora_te2_`).
    TextEncoder(usize),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unet => f.write_str("denoiser"),
            Target::TextEncoder(i) => write!(f, "text encoder {}", i + 1),
        }
    }
}

/// One module's update.
#[derive(Debug, Clone)]
pub enum Update {
    /// `up · down`, scaled by `alpha / rank` (`alpha` defaults to the rank).
    LowRank {
        /// [out, rank] (a 1×1 convolution's [out, rank, 1, 1] too).
        up: Arc<[f32]>,
        /// The up matrix's shape in the file.
        up_shape: Vec<usize>,
        /// [rank, in] or, for LoCon, [rank, in, kh, kw].
        down: Arc<[f32]>,
        /// The down matrix's shape in the file.
        down_shape: Vec<usize>,
        /// The `.alpha` value, when the file has one.
        alpha: Option<f32>,
    },
    /// A full difference added to the weight (`.diff`) or the bias (`.diff_b`).
    Diff {
        /// The values.
        values: Arc<[f32]>,
        /// Their shape.
        shape: Vec<usize>,
        /// `weight` or `bias`.
        param: &'static str,
    },
    /// LoHa (LyCORIS): `ΔW = (w1_a · w1_b) ⊙ (w2_a · w2_b) · alpha / rank`, rank the rows of
    /// `w1_b`.
    Hadamard {
        /// `hada_w1_a`, [out, rank].
        w1_a: Matrix,
        /// `hada_w1_b`, [rank, in…].
        w1_b: Matrix,
        /// `hada_w2_a`.
        w2_a: Matrix,
        /// `hada_w2_b`.
        w2_b: Matrix,
        /// Its `alpha`, if stored.
        alpha: Option<f32>,
    },
    /// LoKr (LyCORIS): `ΔW = w1 ⊗ w2` (Kronecker product), each factor whole or a product
    /// `a · b`; scaled by `alpha / rank` when a factor is a product (rank: the rows of `w2`'s
    /// `b`, else `w1`'s), else by 1.
    Kronecker {
        /// `lokr_w1`, or `lokr_w1_a · lokr_w1_b`.
        w1: KronFactor,
        /// `lokr_w2`, or `lokr_w2_a · lokr_w2_b` (a convolution's kernel folded into columns).
        w2: KronFactor,
        /// Its `alpha`, if stored.
        alpha: Option<f32>,
    },
}

/// A stored matrix (or higher-rank tensor read as [rows, everything else]).
#[derive(Debug, Clone)]
pub struct Matrix {
    /// Its values, row-major.
    pub values: Arc<[f32]>,
    /// Its shape in the file.
    pub shape: Vec<usize>,
}

impl Matrix {
    /// Rows: the first dimension.
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Columns: the product of the other dimensions.
    pub fn cols(&self) -> usize {
        self.shape.iter().skip(1).product()
    }
}

/// One factor of a LoKr product.
#[derive(Debug, Clone)]
pub enum KronFactor {
    /// Stored whole.
    Whole(Matrix),
    /// Stored as a low-rank product `a · b`.
    Product(Matrix, Matrix),
}

/// A LoRA module: the model module it names and its update.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// The module name as the file gives it, target prefix removed (kohya's underscores, or
    /// dots).
    pub name: String,
    /// The component it changes.
    pub target: Target,
    /// The update.
    pub update: Update,
}

/// A LoRA file's modules.
#[derive(Debug, Clone)]
pub struct LoraFile {
    path: PathBuf,
    modules: Vec<LoraModule>,
    unsupported: Vec<String>,
}

/// Key prefixes naming the target, longest first where they overlap.
const PREFIXES: [(&str, Target); 11] = [
    ("lora_unet_", Target::Unet),
    ("lora_te1_", Target::TextEncoder(0)),
    ("lora_te2_", Target::TextEncoder(1)),
    ("lora_te_", Target::TextEncoder(0)),
    ("unet.", Target::Unet),
    ("transformer.", Target::Unet),
    ("text_encoder_2.", Target::TextEncoder(1)),
    ("text_encoder.", Target::TextEncoder(0)),
    ("base_model.model.", Target::Unet),
    ("model.diffusion_model.", Target::Unet),
    ("diffusion_model.", Target::Unet),
];

/// Parameter suffixes: (suffix, role).
const SUFFIXES: &[(&str, &str)] = &[
    (".lora_up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".alpha", "alpha"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
    (".lora_mid.weight", "unsupported"),
    (".hada_w1_a", "hada_w1_a"),
    (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"),
    (".hada_t1", "unsupported"),
    (".hada_t2", "unsupported"),
    (".lokr_w1_a", "lokr_w1_a"),
    (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w1", "lokr_w1"),
    (".lokr_w2_a", "lokr_w2_a"),
    (".lokr_w2_b", "lokr_w2_b"),
    (".lokr_w2", "lokr_w2"),
    (".lokr_t2", "unsupported"),
];

impl LoraFile {
    /// Reads a LoRA (any float dtype; the whole file, LoRAs being small).
    pub fn open(path: impl AsRef<Path>) -> Result<LoraFile, Error> {
        let path = path.as_ref().to_path_buf();
        let index = SafetensorsIndex::open_file(&path)?;
        if index.format() != distorch_core::Format::Safetensors {
            return Err(distorch_core::Error::WrongFormat {
                path,
                expected: "a safetensors LoRA file",
                found: index.format().name(),
            }
            .into());
        }
        let bytes = std::fs::read(&path).map_err(|source| distorch_core::Error::Io {
            path: path.clone(),
            source,
        })?;
        let bad = |key: &str, reason: String| Error::Tensor {
            path: path.clone(),
            key: key.to_owned(),
            reason,
        };
        /// A tensor's values, shape and key (or, for differences, parameter).
        type Part<T> = (Arc<[f32]>, Vec<usize>, T);
        #[derive(Default)]
        struct Parts {
            up: Option<Part<String>>,
            down: Option<Part<String>>,
            alpha: Option<f32>,
            diffs: Vec<Part<&'static str>>,
            /// LyCORIS (LoHa, LoKr) tensors by role.
            lyco: BTreeMap<&'static str, Matrix>,
            /// Keys of a kind not supported (a Tucker core): the module is skipped whole.
            refused: Vec<String>,
        }
        let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
        let mut unsupported = Vec::new();
        for t in index.tensors() {
            let Some((suffix, role)) = SUFFIXES.iter().find(|(s, _)| t.name.ends_with(s)) else {
                unsupported.push(t.name.clone());
                continue;
            };
            if *role == "unsupported" {
                let base = t.name[..t.name.len() - suffix.len()].to_owned();
                parts.entry(base).or_default().refused.push(t.name.clone());
                continue;
            }
            let base = t.name[..t.name.len() - suffix.len()].to_owned();
            // The index checked that every range lies inside the file.
            let raw = &bytes[t.file_offset as usize..(t.file_offset + t.bytes) as usize];
            let values: Arc<[f32]> = distorch_core::runtime::decode_f32(t.dtype, raw)
                .ok_or_else(|| bad(&t.name, format!("dtype {} is not a float type", t.dtype)))?
                .into();
            let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
            let p = parts.entry(base).or_default();
            match *role {
                "up" => p.up = Some((values, shape, t.name.clone())),
                "down" => p.down = Some((values, shape, t.name.clone())),
                "alpha" => {
                    p.alpha = Some(*values.first().ok_or_else(|| bad(&t.name, "empty".into()))?)
                }
                "diff" => p.diffs.push((values, shape, "weight")),
                "diff_b" => p.diffs.push((values, shape, "bias")),
                lyco => {
                    p.lyco.insert(lyco, Matrix { values, shape });
                }
            }
        }
        let mut modules = Vec::new();
        for (base, mut p) in parts {
            if !p.refused.is_empty() {
                unsupported.append(&mut p.refused);
                unsupported.extend(p.lyco.keys().map(|r| format!("{base}.{r}")));
                continue;
            }
            let (name, target) = PREFIXES
                .iter()
                .find_map(|(pre, target)| base.strip_prefix(pre).map(|n| (n.to_owned(), *target)))
                .unwrap_or((base.clone(), Target::Unet));
            match (p.up, p.down) {
                (Some((up, up_shape, up_key)), Some((down, down_shape, _))) => {
                    let up_rank = up_shape.get(1).copied();
                    let down_rank = down_shape.first().copied();
                    let ok = up_shape.len() >= 2
                        && down_shape.len() >= 2
                        && up_shape[2..].iter().all(|&d| d == 1)
                        && up_rank == down_rank;
                    if !ok {
                        return Err(bad(
                            &up_key,
                            format!(
                                "up {up_shape:?} and down {down_shape:?} do not multiply (rank \
                                 {up_rank:?} vs {down_rank:?})"
                            ),
                        ));
                    }
                    modules.push(LoraModule {
                        name: name.clone(),
                        target,
                        update: Update::LowRank {
                            up,
                            up_shape,
                            down,
                            down_shape,
                            alpha: p.alpha,
                        },
                    });
                }
                (Some((_, _, k)), None) | (None, Some((_, _, k))) => {
                    return Err(bad(&k, "has no matching up/down half".into()));
                }
                (None, None) => {}
            }
            if let Some(update) = lycoris(&mut p.lyco, p.alpha, &base, &bad)? {
                modules.push(LoraModule {
                    name: name.clone(),
                    target,
                    update,
                });
            }
            for (values, shape, param) in p.diffs {
                modules.push(LoraModule {
                    name: name.clone(),
                    target,
                    update: Update::Diff {
                        values,
                        shape,
                        param,
                    },
                });
            }
        }
        if !unsupported.is_empty() {
            tracing::warn!(
                path = %path.display(),
                keys = unsupported.len(),
                first = unsupported[0].as_str(),
                "LoRA keys of an unsupported kind (Tucker cores, unknown suffixes) are ignored"
            );
        }
        Ok(LoraFile {
            path,
            modules,
            unsupported,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its modules.
    pub fn modules(&self) -> &[LoraModule] {
        &self.modules
    }

    /// Keys of kinds this crate does not apply (LoHa `hada_*`, LoKr `lokr_*`, ...).
    pub fn unsupported(&self) -> &[String] {
        &self.unsupported
    }
}

/// A LoHa or LoKr update from its tensors by role (`None` when there are none); a module
/// missing one of its tensors is an error naming it.
fn lycoris(
    lyco: &mut BTreeMap<&'static str, Matrix>,
    alpha: Option<f32>,
    base: &str,
    bad: &dyn Fn(&str, String) -> Error,
) -> Result<Option<Update>, Error> {
    if lyco.is_empty() {
        return Ok(None);
    }
    let hada = lyco.keys().any(|k| k.starts_with("hada_"));
    let missing = |role: &str| {
        bad(
            &format!("{base}.{role}"),
            "is missing from the module".into(),
        )
    };
    if hada {
        let mut get = |role: &'static str| lyco.remove(role).ok_or_else(|| missing(role));
        return Ok(Some(Update::Hadamard {
            w1_a: get("hada_w1_a")?,
            w1_b: get("hada_w1_b")?,
            w2_a: get("hada_w2_a")?,
            w2_b: get("hada_w2_b")?,
            alpha,
        }));
    }
    let mut factor = |whole: &'static str, a: &'static str, b: &'static str| match (
        lyco.remove(whole),
        lyco.remove(a),
        lyco.remove(b),
    ) {
        (Some(w), None, None) => Ok(KronFactor::Whole(w)),
        (None, Some(a), Some(b)) => Ok(KronFactor::Product(a, b)),
        (None, Some(_), None) => Err(missing(b)),
        (None, None, Some(_)) => Err(missing(a)),
        (None, None, None) => Err(missing(whole)),
        (Some(_), _, _) => Err(bad(
            &format!("{base}.{whole}"),
            "is stored both whole and as a product".into(),
        )),
    };
    let w1 = factor("lokr_w1", "lokr_w1_a", "lokr_w1_b")?;
    let w2 = factor("lokr_w2", "lokr_w2_a", "lokr_w2_b")?;
    Ok(Some(Update::Kronecker { w1, w2, alpha }))
}

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
const SUFFIXES: [(&str, &str); 10] = [
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
];

impl LoraFile {
    /// Reads a LoRA (any float dtype; the whole file, LoRAs being small).
    pub fn open(path: impl AsRef<Path>) -> Result<LoraFile, Error> {
        let path = path.as_ref().to_path_buf();
        let index = SafetensorsIndex::open_file(&path)?;
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
        }
        let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
        let mut unsupported = Vec::new();
        for t in index.tensors() {
            let Some((suffix, role)) = SUFFIXES.iter().find(|(s, _)| t.name.ends_with(s)) else {
                unsupported.push(t.name.clone());
                continue;
            };
            if *role == "unsupported" {
                unsupported.push(t.name.clone());
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
                _ => p.diffs.push((values, shape, "bias")),
            }
        }
        let mut modules = Vec::new();
        for (base, p) in parts {
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
                "LoRA keys of an unsupported kind (LoHa, LoKr, ...) are ignored"
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

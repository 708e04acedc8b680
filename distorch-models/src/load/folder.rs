//! diffusers / transformers component folders: which file holds the weights.

use std::path::{Path, PathBuf};

use distorch_core::safetensors::SHARD_INDEX_SUFFIX;

use crate::error::Error;

/// The files of a component folder (`unet/`, `vae/`, `text_encoder/`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentFiles {
    /// `config.json` in the folder (it may not exist; loaders that need it say so).
    pub config: PathBuf,
    /// The weights: one `.safetensors` file, or a shard index
    /// (`*.safetensors.index.json`) that `SafetensorsIndex::open` reads with its shards.
    pub weights: PathBuf,
}

/// The standard weight names, preferred in this order over anything else in a folder.
const PREFERRED: [&str; 4] = [
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
];

impl ComponentFiles {
    /// Finds the weights of the component folder `dir`: the standard names of diffusers and
    /// transformers (sharded first), else the folder's only shard index, else its only
    /// `.safetensors` file (an `.fp16.` variant, say). Several candidates and none standard
    /// is an error that lists them.
    pub fn find(dir: &Path) -> Result<ComponentFiles, Error> {
        let bad = |reason: String| Error::ModelFolder {
            path: dir.to_path_buf(),
            reason,
        };
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| bad(e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        let named = |suffix: &str| -> Vec<&PathBuf> {
            entries
                .iter()
                .filter(|p| p.to_string_lossy().ends_with(suffix))
                .collect()
        };
        let weights = match PREFERRED.iter().map(|n| dir.join(n)).find(|p| p.is_file()) {
            Some(p) => p,
            None => {
                let indexes = named(SHARD_INDEX_SUFFIX);
                let files = named(".safetensors");
                match (indexes.as_slice(), files.as_slice()) {
                    ([one], _) | ([], [one]) => (*one).clone(),
                    ([], []) => return Err(bad("no .safetensors file".into())),
                    (many, []) | (_, many) => {
                        return Err(bad(format!(
                            "several weight files and none of {PREFERRED:?}: {}",
                            many.iter()
                                .map(|p| p.display().to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )));
                    }
                }
            }
        };
        Ok(ComponentFiles {
            config: dir.join("config.json"),
            weights,
        })
    }
}

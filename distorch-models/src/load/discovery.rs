//! Finding models by name the way ComfyUI does: a `models/` folder with one sub-folder per kind
//! (`checkpoints/`, `unet/` and `diffusion_models/`, `clip/` and `text_encoders/`, `vae/`,
//! `controlnet/`, `clip_vision/`, `loras/`), plus the folders an `extra_model_paths.yaml`
//! adds (ComfyUI's format: sections with a `base_path` and per-kind relative paths, one or
//! several per kind).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::Error;

/// The kinds of model files ComfyUI keeps apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ModelKind {
    /// Full checkpoints.
    Checkpoints,
    /// Denoisers alone (`diffusion_models/`, legacy `unet/`).
    DiffusionModels,
    /// Text encoders (`text_encoders/`, legacy `clip/`).
    TextEncoders,
    /// VAEs.
    Vae,
    /// ControlNets.
    ControlNet,
    /// CLIP vision encoders.
    ClipVision,
    /// LoRAs.
    Loras,
}

impl ModelKind {
    /// Every kind.
    pub const ALL: [ModelKind; 7] = [
        ModelKind::Checkpoints,
        ModelKind::DiffusionModels,
        ModelKind::TextEncoders,
        ModelKind::Vae,
        ModelKind::ControlNet,
        ModelKind::ClipVision,
        ModelKind::Loras,
    ];

    /// The sub-folder names of this kind under a `models/` folder, and the keys of
    /// `extra_model_paths.yaml` that add to it.
    pub fn folder_names(self) -> &'static [&'static str] {
        match self {
            ModelKind::Checkpoints => &["checkpoints"],
            ModelKind::DiffusionModels => &["diffusion_models", "unet"],
            ModelKind::TextEncoders => &["text_encoders", "clip"],
            ModelKind::Vae => &["vae"],
            ModelKind::ControlNet => &["controlnet", "t2i_adapter"],
            ModelKind::ClipVision => &["clip_vision"],
            ModelKind::Loras => &["loras"],
        }
    }

    fn of_key(key: &str) -> Option<ModelKind> {
        ModelKind::ALL
            .into_iter()
            .find(|k| k.folder_names().contains(&key))
    }
}

/// Where to look for models of each kind, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelFolders {
    folders: BTreeMap<ModelKind, Vec<PathBuf>>,
}

/// Model files ComfyUI (with ComfyUI-GGUF) lists that distorch loads: safetensors and GGUF.
const EXTENSIONS: [&str; 3] = ["safetensors", "sft", "gguf"];

impl ModelFolders {
    /// No folders.
    pub fn new() -> ModelFolders {
        ModelFolders::default()
    }

    /// The sub-folders of a ComfyUI `models/` folder (those that exist).
    pub fn from_models_dir(dir: &Path) -> Result<ModelFolders, Error> {
        if !dir.is_dir() {
            return Err(Error::NotAFolder {
                path: dir.to_path_buf(),
            });
        }
        let mut out = ModelFolders::new();
        for kind in ModelKind::ALL {
            for name in kind.folder_names() {
                out.add(kind, dir.join(name));
            }
        }
        Ok(out)
    }

    /// Adds a folder for `kind` (kept if it exists; duplicates ignored).
    pub fn add(&mut self, kind: ModelKind, folder: PathBuf) {
        let list = self.folders.entry(kind).or_default();
        if folder.is_dir() && !list.contains(&folder) {
            list.push(folder);
        }
    }

    /// Adds the folders of an `extra_model_paths.yaml`: each top-level section has an
    /// optional `base_path` (relative to the file's folder) and per-kind paths (relative to
    /// `base_path`), one per line in a multi-line string; keys distorch does not use
    /// (`configs`, `upscale_models`, `is_default`, ...) are skipped.
    pub fn add_extra_model_paths(&mut self, yaml: &Path) -> Result<(), Error> {
        let bad = |reason: String| Error::Config {
            path: yaml.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(yaml).map_err(|e| bad(e.to_string()))?;
        let doc: serde_yaml::Value =
            serde_yaml::from_str(&text).map_err(|e| bad(format!("not YAML: {e}")))?;
        let root = yaml.parent().unwrap_or(Path::new("."));
        let Some(sections) = doc.as_mapping() else {
            return if doc.is_null() {
                Ok(())
            } else {
                Err(bad("expected sections (a mapping) at the top level".into()))
            };
        };
        for (name, section) in sections {
            let name = name.as_str().unwrap_or("?");
            let Some(entries) = section.as_mapping() else {
                return Err(bad(format!("section `{name}` is not a mapping")));
            };
            let base = match entries.get("base_path") {
                Some(v) => {
                    let s = v
                        .as_str()
                        .ok_or_else(|| bad(format!("`{name}.base_path` is not a string")))?;
                    root.join(expand_home(s.trim()))
                }
                None => root.to_path_buf(),
            };
            for (key, value) in entries {
                let key = key.as_str().unwrap_or("");
                let Some(kind) = ModelKind::of_key(key) else {
                    continue;
                };
                let paths = value
                    .as_str()
                    .ok_or_else(|| bad(format!("`{name}.{key}` is not a string")))?;
                for line in paths.lines().map(str::trim).filter(|l| !l.is_empty()) {
                    self.add(kind, base.join(expand_home(line)));
                }
            }
        }
        Ok(())
    }

    /// The folders searched for `kind`, in order.
    pub fn folders(&self, kind: ModelKind) -> &[PathBuf] {
        self.folders.get(&kind).map_or(&[], Vec::as_slice)
    }

    /// The file (or diffusers folder) `name` of `kind`: a path that exists as given, else
    /// `name` (a relative path like ComfyUI's `sd15/model.safetensors`, with or without its
    /// extension) in the kind's folders, in order. Not found: an error listing the folders
    /// searched and the closest names there.
    pub fn resolve(&self, kind: ModelKind, name: &str) -> Result<PathBuf, Error> {
        let direct = Path::new(name);
        if direct.exists() {
            return Ok(direct.to_path_buf());
        }
        for folder in self.folders(kind) {
            let candidate = folder.join(name);
            if candidate.exists() {
                return Ok(candidate);
            }
            for ext in EXTENSIONS {
                let with = folder.join(format!("{name}.{ext}"));
                if with.is_file() {
                    return Ok(with);
                }
            }
        }
        let mut known = Vec::new();
        for folder in self.folders(kind) {
            list_models(folder, folder, &mut known);
        }
        let mut near: Vec<(usize, String)> = known
            .into_iter()
            .map(|k| (distance(&k.to_lowercase(), &name.to_lowercase()), k))
            .collect();
        near.sort();
        let near: Vec<String> = near.into_iter().take(3).map(|(_, k)| k).collect();
        Err(Error::ModelNotFound {
            name: name.to_owned(),
            kind,
            searched: self.folders(kind).to_vec(),
            near,
        })
    }
}

/// `~/` at the start of a path is the home folder, as ComfyUI expands it.
fn expand_home(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(p),
    }
}

/// Model files and diffusers folders under `dir`, as names relative to `root`.
fn list_models(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let rel = || p.strip_prefix(root).unwrap_or(&p).display().to_string();
        if p.is_dir() {
            if p.join("model_index.json").is_file() || p.join("config.json").is_file() {
                out.push(rel());
            } else if out.len() < 10_000 {
                list_models(root, &p, out);
            }
        } else if p
            .extension()
            .is_some_and(|x| EXTENSIONS.iter().any(|e| x == *e))
        {
            out.push(rel());
        }
    }
}

/// Levenshtein distance, for near-miss suggestions.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"").unwrap();
    }

    #[test]
    fn comfyui_folders_and_extra_paths_resolve_names() {
        let tmp = tempfile::tempdir().unwrap();
        let models = tmp.path().join("ComfyUI/models");
        touch(&models.join("checkpoints/sd15/v1-5.safetensors"));
        touch(&models.join("unet/flux.sft"));
        touch(&models.join("clip/clip_l.safetensors"));
        let a1111 = tmp.path().join("webui");
        touch(&a1111.join("models/Stable-diffusion/dreamshaper.safetensors"));
        touch(&a1111.join("models/Lora/style.safetensors"));
        touch(&a1111.join("models/LyCORIS/locon.safetensors"));
        let yaml = tmp.path().join("extra_model_paths.yaml");
        std::fs::write(
            &yaml,
            "a111:\n    base_path: webui/\n    checkpoints: models/Stable-diffusion\n    \
             configs: models/Stable-diffusion\n    loras: |\n         models/Lora\n         \
             models/LyCORIS\n",
        )
        .unwrap();
        let mut f = ModelFolders::from_models_dir(&models).unwrap();
        f.add_extra_model_paths(&yaml).unwrap();
        let r = |k, n| f.resolve(k, n).unwrap();
        assert_eq!(
            r(ModelKind::Checkpoints, "sd15/v1-5.safetensors"),
            models.join("checkpoints/sd15/v1-5.safetensors")
        );
        assert_eq!(
            r(ModelKind::Checkpoints, "dreamshaper")
                .file_name()
                .unwrap(),
            "dreamshaper.safetensors"
        );
        assert!(r(ModelKind::Checkpoints, "dreamshaper").is_file());
        assert!(r(ModelKind::DiffusionModels, "flux").is_file());
        assert!(r(ModelKind::TextEncoders, "clip_l.safetensors").is_file());
        assert!(r(ModelKind::Loras, "locon").is_file());
        assert_eq!(f.folders(ModelKind::Loras).len(), 2);

        let e = f.resolve(ModelKind::Checkpoints, "dreamshapr").unwrap_err();
        let e = e.to_string();
        assert!(e.contains("did you mean dreamshaper.safetensors"), "{e}");
        assert!(e.contains("Stable-diffusion"), "{e}");
    }

    #[test]
    fn bad_yaml_is_a_typed_error() {
        let tmp = tempfile::tempdir().unwrap();
        let yaml = tmp.path().join("extra_model_paths.yaml");
        std::fs::write(&yaml, "comfyui:\n  base_path: [1, 2]\n").unwrap();
        let e = ModelFolders::new()
            .add_extra_model_paths(&yaml)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("`comfyui.base_path` is not a string"),
            "{e}"
        );
        std::fs::write(&yaml, "comfyui: [\n").unwrap();
        let e = ModelFolders::new()
            .add_extra_model_paths(&yaml)
            .unwrap_err();
        assert!(e.to_string().contains("not YAML"), "{e}");
    }
}

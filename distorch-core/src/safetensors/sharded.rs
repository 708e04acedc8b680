//! Sharded models: a `*.safetensors.index.json` (`{"metadata": {...}, "weight_map":
//! {tensor: file}}`, as transformers and diffusers write it) and the files it names, seen as
//! one [`SafetensorsIndex`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path};

use serde::Deserialize;

use super::SafetensorsIndex;
use crate::error::Error;
use crate::format::Format;

#[derive(Deserialize)]
struct ShardIndex {
    #[serde(default)]
    metadata: BTreeMap<String, serde_json::Value>,
    weight_map: BTreeMap<String, String>,
}

impl SafetensorsIndex {
    /// Reads a shard index and the header of every shard it names.
    ///
    /// Shards must be plain file names next to the index. Every tensor the index names must
    /// be in the shard it names; a tensor in two shards is an error. Tensors a shard holds
    /// beyond the index's list are kept, as the reference loaders load whole shards. The
    /// index's `metadata` values are kept as strings (`total_size` is a number there).
    pub fn open_sharded(path: impl AsRef<Path>) -> Result<SafetensorsIndex, Error> {
        let path = path.as_ref().to_path_buf();
        let invalid = |reason: String| Error::InvalidHeader {
            path: path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let index: ShardIndex =
            serde_json::from_str(&text).map_err(|e| invalid(format!("not a shard index ({e})")))?;
        if index.weight_map.is_empty() {
            return Err(invalid("the weight_map is empty".into()));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut names: Vec<&str> = index.weight_map.values().map(String::as_str).collect();
        names.sort_unstable();
        names.dedup();
        let mut files = Vec::with_capacity(names.len());
        let mut tensors = Vec::new();
        let mut file_len = 0u64;
        let mut home: HashMap<String, usize> = HashMap::new();
        for (shard, name) in names.iter().enumerate() {
            let mut parts = Path::new(name).components();
            if !matches!(
                (parts.next(), parts.next()),
                (Some(Component::Normal(_)), None)
            ) {
                return Err(invalid(format!(
                    "shard {name:?} is not a file name next to the index"
                )));
            }
            let one = Self::open_file(dir.join(name))?;
            if one.format != Format::Safetensors {
                return Err(Error::WrongFormat {
                    path: one.path,
                    expected: "a safetensors shard",
                    found: one.format.name(),
                });
            }
            file_len += one.file_len;
            for mut t in one.tensors {
                if let Some(&other) = home.get(&t.name) {
                    return Err(Error::DuplicateTensor {
                        path: path.clone(),
                        name: format!("{} (in {} and {name})", t.name, names[other]),
                    });
                }
                home.insert(t.name.clone(), shard);
                t.shard = shard;
                tensors.push(t);
            }
            files.push(one.path);
        }
        for (tensor, name) in &index.weight_map {
            match home.get(tensor) {
                Some(&s) if names[s] == name.as_str() => {}
                Some(&s) => {
                    return Err(invalid(format!(
                        "{tensor} is listed in {name} but is in {}",
                        names[s]
                    )));
                }
                None => {
                    return Err(invalid(format!(
                        "{tensor} is listed in {name} but is not there"
                    )));
                }
            }
        }
        let metadata = index
            .metadata
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect();
        tracing::debug!(path = %path.display(), shards = files.len(), tensors = tensors.len(), "sharded index");
        Ok(SafetensorsIndex {
            format: Format::Safetensors,
            path,
            files,
            tensors,
            metadata,
            file_len,
        })
    }
}

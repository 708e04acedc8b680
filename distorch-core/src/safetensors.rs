//! Header-only index of a weights file: names, dtypes, shapes and byte ranges, read without
//! touching tensor data. Safetensors files (single or sharded) are read here; GGUF files are
//! read by [`crate::gguf`] and seen through the same index.
//!
//! Untrusted input is checked before anything is allocated from it: the header length is
//! capped and bounded by the file, every size is computed with checked arithmetic, and data
//! ranges must tile the data section exactly (no overlap, no gap, no trailing bytes), as the
//! reference `safetensors` implementation requires.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor as st;
use serde::Deserialize;

use crate::dtype::DType;
use crate::error::Error;
use crate::format::{self, Format};
use crate::gguf::GgufFile;

mod random;
mod sharded;

pub use random::write_random;

/// How the index of a sharded model is named (`model.safetensors.index.json`).
pub const SHARD_INDEX_SUFFIX: &str = ".safetensors.index.json";

/// Largest header accepted, as in the reference implementation (100 MB).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor of a safetensors file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Its key.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
    /// Absolute byte offset of its data in its file.
    pub file_offset: u64,
    /// Which of the index's files holds it ([`SafetensorsIndex::files`]): 0 for a single
    /// file.
    pub shard: usize,
    /// Bytes of data.
    pub bytes: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// The header of a safetensors file, or the headers of a sharded model's files
/// (`*.safetensors.index.json`) seen as one, or the header of a GGUF file (its tensors with
/// their GGML types and real shapes, its scalar metadata as text): see [`SafetensorsIndex::format`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetensorsIndex {
    format: Format,
    path: PathBuf,
    files: Vec<PathBuf>,
    tensors: Vec<TensorInfo>,
    metadata: BTreeMap<String, String>,
    file_len: u64,
}

/// The header's top-level object with its keys in file order and duplicates kept, so they
/// can be reported (a plain JSON map would silently keep the last one).
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of tensor entries")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
                    out.push(entry);
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(Visit)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

impl SafetensorsIndex {
    /// Reads and validates the header of the file at `path` (reads 8 + header bytes only),
    /// or, for a path ending in `.safetensors.index.json`, every shard's header (see
    /// [`SafetensorsIndex::open_sharded`]).
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsIndex, Error> {
        let path = path.as_ref();
        if path.to_string_lossy().ends_with(SHARD_INDEX_SUFFIX) {
            Self::open_sharded(path)
        } else {
            Self::open_file(path)
        }
    }

    /// Reads and validates the header of one weights file (never a shard index): safetensors,
    /// or GGUF (told from the file's first bytes). A file of another format (a PyTorch pickle,
    /// an HTML page) is [`Error::WrongFormat`], naming what it is.
    pub fn open_file(path: impl AsRef<Path>) -> Result<SafetensorsIndex, Error> {
        let path = path.as_ref().to_path_buf();
        if format::sniff(&path)? == Format::Gguf {
            return Ok(Self::from_gguf(GgufFile::open(&path)?));
        }
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let mut file = File::open(&path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        if file_len < 8 {
            return Err(Error::FileTooSmall {
                path,
                len: file_len,
            });
        }
        let mut prefix = [0u8; 8];
        file.read_exact(&mut prefix).map_err(io)?;
        let header_len = u64::from_le_bytes(prefix);
        if header_len > MAX_HEADER_BYTES || header_len > file_len - 8 {
            return Err(Error::HeaderTooLarge {
                path,
                size: header_len,
                max: MAX_HEADER_BYTES,
                file_len,
            });
        }
        // Bounded by MAX_HEADER_BYTES above.
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(io)?;
        Self::from_header(path, &header, file_len)
    }

    /// Validates a header (the JSON after the length prefix) for a file of `file_len` bytes.
    pub fn from_header(
        path: PathBuf,
        header: &[u8],
        file_len: u64,
    ) -> Result<SafetensorsIndex, Error> {
        let invalid = |reason: String| Error::InvalidHeader {
            path: path.clone(),
            reason,
        };
        let text = std::str::from_utf8(header)
            .map_err(|e| invalid(format!("not UTF-8 ({e})")))?
            .trim_end_matches(' ');
        let Entries(entries) =
            serde_json::from_str(text).map_err(|e| invalid(format!("not a JSON object ({e})")))?;
        let mut seen = HashSet::with_capacity(entries.len());
        if let Some((name, _)) = entries.iter().find(|(n, _)| !seen.insert(n.as_str())) {
            return Err(Error::DuplicateTensor {
                path,
                name: name.clone(),
            });
        }
        let mut metadata = BTreeMap::new();
        let mut tensors = Vec::with_capacity(entries.len());
        for (name, value) in entries {
            if name == "__metadata__" {
                let m: BTreeMap<String, String> = serde_json::from_value(value)
                    .map_err(|e| invalid(format!("__metadata__ is not a string map ({e})")))?;
                metadata = m;
                continue;
            }
            tensors.push(Self::tensor_entry(&path, name, value)?);
        }
        // The layout — offsets tiling the data, sizes from shapes and dtypes — is checked by
        // Hugging Face's `safetensors` crate; its errors get the file, tensor and offsets here.
        tensors.sort_by(|a, b| (a.file_offset, &a.name).cmp(&(b.file_offset, &b.name)));
        let cursor = Self::check_layout(&path, &tensors, &metadata)?;
        let data_start = 8 + header.len() as u64;
        let actual = file_len.saturating_sub(data_start);
        if actual != cursor {
            return Err(Error::DataLengthMismatch {
                path,
                expected: cursor,
                actual,
            });
        }
        for t in &mut tensors {
            t.file_offset += data_start;
        }
        Ok(SafetensorsIndex {
            format: Format::Safetensors,
            files: vec![path.clone()],
            path,
            tensors,
            metadata,
            file_len,
        })
    }

    /// One header entry: its fields read (typed errors naming the tensor), its size checked
    /// by the `safetensors` crate against its shape and dtype. `file_offset` is relative to
    /// the data section.
    fn tensor_entry(
        path: &Path,
        name: String,
        value: serde_json::Value,
    ) -> Result<TensorInfo, Error> {
        let bad = |reason: String| Error::InvalidTensor {
            path: path.to_path_buf(),
            name: name.clone(),
            reason,
        };
        let raw: RawInfo = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        let unknown = || Error::UnknownDtype {
            path: path.to_path_buf(),
            name: name.clone(),
            dtype: raw.dtype.clone(),
        };
        let dtype = DType::from_safetensors(&raw.dtype).ok_or_else(unknown)?;
        let [begin, end] = raw.data_offsets;
        if end < begin {
            return Err(bad(format!(
                "data_offsets [{begin}, {end}] end before they begin"
            )));
        }
        let overflow = || bad(format!("shape {:?} overflows a 64-bit size", raw.shape));
        let shape: Vec<usize> = raw
            .shape
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| overflow()))
            .collect::<Result<_, _>>()?;
        let bytes = usize::try_from(end - begin).map_err(|_| overflow())?;
        let info = st::TensorInfo {
            dtype: st_dtype(dtype).ok_or_else(unknown)?,
            shape,
            data_offsets: (0, bytes),
        };
        match st::Metadata::new(None, vec![(name.clone(), info)]) {
            Ok(_) => {}
            Err(st::SafeTensorError::TensorInvalidInfo) => {
                return Err(Error::SizeMismatch {
                    path: path.to_path_buf(),
                    expected: raw
                        .shape
                        .iter()
                        .fold(dtype.size(), |a, &d| a.saturating_mul(d)),
                    name,
                    dtype,
                    shape: raw.shape,
                    got: end - begin,
                });
            }
            Err(st::SafeTensorError::ValidationOverflow) => return Err(overflow()),
            Err(e) => return Err(bad(e.to_string())),
        }
        Ok(TensorInfo {
            name,
            dtype,
            shape: raw.shape,
            file_offset: begin,
            bytes: end - begin,
            shard: 0,
        })
    }

    /// The `safetensors` crate's check that `tensors` (sorted by offset) tile the data
    /// section from 0 without gaps or overlaps; returns the data length they cover.
    fn check_layout(
        path: &Path,
        tensors: &[TensorInfo],
        metadata: &BTreeMap<String, String>,
    ) -> Result<u64, Error> {
        let infos = tensors
            .iter()
            .map(|t| {
                let info = st::TensorInfo {
                    dtype: st_dtype(t.dtype).unwrap_or(st::Dtype::U8),
                    shape: vec![t.bytes as usize / t.dtype.size().max(1) as usize],
                    data_offsets: (t.file_offset as usize, (t.file_offset + t.bytes) as usize),
                };
                (t.name.clone(), info)
            })
            .collect();
        let meta = (!metadata.is_empty()).then(|| metadata.clone().into_iter().collect());
        match st::Metadata::new(meta, infos) {
            Ok(m) => Ok(m.data_len() as u64),
            Err(st::SafeTensorError::InvalidOffset(name)) => {
                let i = tensors.iter().position(|t| t.name == name).unwrap_or(0);
                let expected = tensors[..i].last().map_or(0, |p| p.file_offset + p.bytes);
                Err(Error::InvalidOffsets {
                    path: path.to_path_buf(),
                    begin: tensors.get(i).map_or(0, |t| t.file_offset),
                    name,
                    expected,
                })
            }
            Err(e) => Err(Error::InvalidHeader {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }),
        }
    }

    /// The index of a GGUF file: its tensors (GGML types, real shapes, data ranges) in data
    /// order and its scalar metadata as text (arrays are left out: read them from
    /// [`GgufFile`]).
    pub fn from_gguf(file: GgufFile) -> SafetensorsIndex {
        let mut tensors: Vec<TensorInfo> = file
            .tensors
            .into_iter()
            .map(|t| TensorInfo {
                name: t.name,
                dtype: t.dtype,
                shape: t.shape,
                file_offset: t.file_offset,
                shard: 0,
                bytes: t.bytes,
            })
            .collect();
        tensors.sort_by(|a, b| (a.file_offset, &a.name).cmp(&(b.file_offset, &b.name)));
        let metadata = file
            .metadata
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.scalar_text()?)))
            .collect();
        SafetensorsIndex {
            format: Format::Gguf,
            files: vec![file.path.clone()],
            path: file.path,
            tensors,
            metadata,
            file_len: file.file_len,
        }
    }

    /// The file's format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// The same index with tensors renamed by `rename` (`None` keeps a name): how a family's
    /// naming in another format (llama.cpp's T5 names in GGUF) is read as its usual one. Two
    /// tensors renamed to one name are [`Error::DuplicateTensor`].
    pub fn renamed(
        mut self,
        rename: impl Fn(&str) -> Option<String>,
    ) -> Result<SafetensorsIndex, Error> {
        let mut seen = HashSet::with_capacity(self.tensors.len());
        for t in &mut self.tensors {
            if let Some(name) = rename(&t.name) {
                t.name = name;
            }
            if !seen.insert(t.name.clone()) {
                return Err(Error::DuplicateTensor {
                    path: self.path.clone(),
                    name: t.name.clone(),
                });
            }
        }
        Ok(self)
    }

    /// The file, or the shard index (`*.safetensors.index.json`) of a sharded model.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The files holding the data, indexed by [`TensorInfo::shard`]: the file itself, or
    /// the shards of a sharded model.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Whether the data is spread over several shard files.
    pub fn is_sharded(&self) -> bool {
        self.path.to_string_lossy().ends_with(SHARD_INDEX_SUFFIX)
    }

    /// Tensors in file (data offset) order; shard by shard for a sharded model.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The `__metadata__` map.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The file's length in bytes (the shards' total for a sharded model).
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes).sum()
    }
}

/// A tensor to write with [`write_zeroed`]: name, dtype, shape.
pub type TensorSpec = (String, DType, Vec<u64>);

/// Writes a valid safetensors file whose tensor data is all zeros.
///
/// The data section is created by extending the file, so on file systems with sparse files
/// it takes no disk space: an SD-sized checkpoint for planning and inspection costs only its
/// header. Tensors are laid out in the order given.
pub fn write_zeroed(
    path: impl AsRef<Path>,
    tensors: &[TensorSpec],
    metadata: &BTreeMap<String, String>,
) -> Result<(), Error> {
    write_impl(path.as_ref(), tensors, None, metadata)
}

/// Writes a safetensors file with the given tensor data (`data[i]` holds `tensors[i]`'s
/// little-endian bytes, whose length must match its shape and dtype).
pub fn write(
    path: impl AsRef<Path>,
    tensors: &[TensorSpec],
    data: &[&[u8]],
    metadata: &BTreeMap<String, String>,
) -> Result<(), Error> {
    write_impl(path.as_ref(), tensors, Some(data), metadata)
}

fn write_impl(
    path: &Path,
    tensors: &[TensorSpec],
    data: Option<&[&[u8]]>,
    metadata: &BTreeMap<String, String>,
) -> Result<(), Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let (infos, offset) = header_infos(path, tensors, data)?;
    // The tensors' entries as the `safetensors` crate validates and serializes them (in the
    // order given: its own `serialize_to_file` would sort them by dtype and write every zero
    // byte), the metadata added in key order so the same input gives the same bytes.
    let header_error = |reason: String| Error::InvalidHeader {
        path: path.to_path_buf(),
        reason,
    };
    let entries = st::Metadata::new(None, infos).map_err(|e| header_error(e.to_string()))?;
    let mut header = serde_json::to_value(&entries).map_err(|e| header_error(e.to_string()))?;
    if let (false, Some(map)) = (metadata.is_empty(), header.as_object_mut()) {
        map.insert("__metadata__".into(), serde_json::json!(metadata));
    }
    let mut json = serde_json::to_vec(&header).map_err(|e| header_error(e.to_string()))?;
    // Pad to 8 bytes so data stays aligned, as the reference writer does.
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut file = std::io::BufWriter::new(File::create(path).map_err(io)?);
    file.write_all(&(json.len() as u64).to_le_bytes())
        .map_err(io)?;
    file.write_all(&json).map_err(io)?;
    if let Some(data) = data {
        for d in data {
            file.write_all(d).map_err(io)?;
        }
    }
    let file = file.into_inner().map_err(|e| io(e.into_error()))?;
    file.set_len(8 + json.len() as u64 + offset).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Each tensor's header entry in the `safetensors` crate's form, laid out in the order given,
/// and the data length; sizes, given data and names checked with the tensor named.
fn header_infos(
    path: &Path,
    tensors: &[TensorSpec],
    data: Option<&[&[u8]]>,
) -> Result<(Vec<(String, st::TensorInfo)>, u64), Error> {
    let mut seen = HashSet::with_capacity(tensors.len());
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for (i, (name, dtype, shape)) in tensors.iter().enumerate() {
        let bad = |reason: String| Error::InvalidTensor {
            path: path.to_path_buf(),
            name: name.clone(),
            reason,
        };
        if !seen.insert(name.as_str()) {
            return Err(bad("given twice".into()));
        }
        let bytes = shape
            .iter()
            .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("shape {shape:?} overflows a 64-bit size")))?;
        if let Some(given) = data.map(|d| d.get(i).map_or(0, |b| b.len() as u64))
            && given != bytes
        {
            return Err(bad(format!(
                "{given} bytes of data given, the shape needs {bytes}"
            )));
        }
        let end = offset
            .checked_add(bytes)
            .ok_or_else(|| bad("the file would exceed 2^64 bytes".into()))?;
        let too_large = || bad("larger than this machine's address space".into());
        let info = st::TensorInfo {
            dtype: st_dtype(*dtype)
                .ok_or_else(|| bad(format!("{dtype} cannot be stored in a safetensors file")))?,
            shape: shape
                .iter()
                .map(|&d| usize::try_from(d).map_err(|_| too_large()))
                .collect::<Result<_, _>>()?,
            data_offsets: (
                usize::try_from(offset).map_err(|_| too_large())?,
                usize::try_from(end).map_err(|_| too_large())?,
            ),
        };
        infos.push((name.clone(), info));
        offset = end;
    }
    Ok((infos, offset))
}

/// The `safetensors` crate's dtype for ours (`None` for GGML block types, which safetensors
/// files cannot hold).
fn st_dtype(d: DType) -> Option<st::Dtype> {
    serde_json::from_value(serde_json::Value::String(d.safetensors_name().to_owned())).ok()
}

//! Header-only GGUF reader (versions 2 and 3): metadata, tensor infos and data offsets, read
//! without touching tensor data.
//!
//! Untrusted input is checked as the safetensors reader checks it: counts and string lengths
//! are capped and bounded by the bytes left in the file before anything is allocated, sizes
//! use checked arithmetic, every tensor's data must start on the file's alignment
//! (`general.alignment`, 32 by default), end inside the file and overlap no other, and its
//! byte size must be its element count in its type's blocks.
//!
//! ComfyUI-GGUF's conventions are applied here: GGML lists dimensions innermost first, so a
//! tensor's shape is its dimensions reversed; a file written by ComfyUI-GGUF's `convert.py`
//! stores some tensors reshaped and records the real shape in
//! `comfy.gguf.orig_shape.<name>`, which then is the tensor's shape.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use crate::dtype::DType;
use crate::error::Error;

mod value;
mod write;

pub use value::{Array, StringArray, Value};
use value::{Bounded, Caps, ReadError};
pub use write::{GgufTensorData, write_gguf};

/// The file magic, `GGUF`.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Most tensors one file may declare.
pub const MAX_TENSORS: u64 = 1 << 20;
/// Most metadata key/values one file may declare.
pub const MAX_KEYS: u64 = 1 << 20;
/// Longest string accepted (tensor names, keys and values).
pub const MAX_STRING: u64 = 1 << 24;
/// Most dimensions of a tensor (GGML's `GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// Deepest nesting of arrays accepted.
pub const MAX_ARRAY_DEPTH: usize = 4;
/// The alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The key ComfyUI-GGUF records a reshaped tensor's real shape under, followed by its name.
pub const ORIG_SHAPE_PREFIX: &str = "comfy.gguf.orig_shape.";

/// One tensor of a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensor {
    /// Its name.
    pub name: String,
    /// Its type.
    pub dtype: DType,
    /// Its dimensions as the file lists them (GGML order: innermost first).
    pub dims: Vec<u64>,
    /// Its shape (outermost first): `comfy.gguf.orig_shape.<name>` when present, else `dims`
    /// reversed.
    pub shape: Vec<u64>,
    /// Absolute byte offset of its data in the file.
    pub file_offset: u64,
    /// Bytes of data.
    pub bytes: u64,
}

/// The header of a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufFile {
    /// The file.
    pub path: PathBuf,
    /// Format version (2 or 3).
    pub version: u32,
    /// Alignment of tensor data.
    pub alignment: u64,
    /// Metadata key/values in file order.
    pub metadata: Vec<(String, Value)>,
    /// Tensors in file order.
    pub tensors: Vec<GgufTensor>,
    /// Where tensor data begins.
    pub data_start: u64,
    /// The file's length.
    pub file_len: u64,
}

impl GgufFile {
    /// Reads and validates the header of the GGUF file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, Error> {
        let path = path.as_ref().to_path_buf();
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut r = Bounded::new(BufReader::with_capacity(1 << 16, file), file_len);
        Parser {
            path: &path,
            r: &mut r,
        }
        .parse()
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// `general.architecture` (`sd1`, `sdxl`, `flux`, `wan`, `t5encoder`, ...).
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }
}

struct Parser<'a, R> {
    path: &'a Path,
    r: &'a mut Bounded<R>,
}

const CAPS: Caps = Caps {
    string: MAX_STRING,
    array_depth: MAX_ARRAY_DEPTH,
};

impl<R: std::io::Read> Parser<'_, R> {
    /// Attaches the file and the field being read to a read error.
    fn at<T>(&self, what: impl Fn() -> String, r: Result<T, ReadError>) -> Result<T, Error> {
        let path = self.path.to_path_buf();
        r.map_err(|e| match e {
            ReadError::Truncated => Error::GgufTruncated {
                path,
                what: what(),
                offset: self.r.pos,
            },
            ReadError::Limit { count, max } => Error::GgufLimit {
                path,
                what: what(),
                count,
                max,
            },
            ReadError::Invalid(reason) => Error::GgufInvalid {
                path,
                what: what(),
                reason,
            },
            ReadError::Io(source) => Error::Io { path, source },
        })
    }

    fn parse(mut self) -> Result<GgufFile, Error> {
        let magic = self.r.array::<4>();
        let magic = self.at(|| "the magic".into(), magic)?;
        if magic != MAGIC {
            return Err(Error::WrongFormat {
                path: self.path.to_path_buf(),
                expected: "GGUF",
                found: crate::format::describe_file(self.path),
            });
        }
        let version = self.r.u32();
        let version = self.at(|| "the version".into(), version)?;
        if version != 2 && version != 3 {
            return Err(Error::GgufVersion {
                path: self.path.to_path_buf(),
                version,
            });
        }
        let tensors = self.count("tensor count", MAX_TENSORS)?;
        let keys = self.count("metadata count", MAX_KEYS)?;
        let metadata = self.metadata(keys)?;
        let alignment = self.alignment(&metadata)?;
        let infos = self.tensor_infos(tensors, &metadata)?;
        let end = self.r.pos;
        let data_start = end.div_ceil(alignment).saturating_mul(alignment);
        let mut file = GgufFile {
            path: self.path.to_path_buf(),
            version,
            alignment,
            metadata,
            tensors: infos,
            data_start,
            file_len: self.r.len,
        };
        check_data(&mut file)?;
        Ok(file)
    }

    fn count(&mut self, what: &'static str, max: u64) -> Result<u64, Error> {
        let n = self.r.u64();
        let n = self.at(|| what.into(), n)?;
        if n > max {
            return Err(Error::GgufLimit {
                path: self.path.to_path_buf(),
                what: what.into(),
                count: n,
                max,
            });
        }
        Ok(n)
    }

    fn metadata(&mut self, keys: u64) -> Result<Vec<(String, Value)>, Error> {
        // Each key/value takes at least 13 bytes (key length, value type, one byte).
        if keys > self.r.left() / 13 {
            return Err(Error::GgufTruncated {
                path: self.path.to_path_buf(),
                what: format!("the {keys} metadata key/values"),
                offset: self.r.len,
            });
        }
        let mut out: Vec<(String, Value)> = Vec::with_capacity(keys as usize);
        let mut seen = std::collections::HashSet::new();
        for i in 0..keys {
            let key = self.r.string(MAX_STRING);
            let key = self.at(|| format!("metadata key {i}"), key)?;
            let kind = self.r.u32();
            let kind = self.at(|| format!("the type of `{key}`"), kind)?;
            let value = self.r.value(kind, &CAPS, 0);
            let value = self.at(|| format!("the value of `{key}`"), value)?;
            if !seen.insert(key.clone()) {
                return Err(Error::GgufInvalid {
                    path: self.path.to_path_buf(),
                    what: format!("metadata key `{key}`"),
                    reason: "it appears twice".into(),
                });
            }
            out.push((key, value));
        }
        Ok(out)
    }

    fn alignment(&self, metadata: &[(String, Value)]) -> Result<u64, Error> {
        let Some((_, v)) = metadata.iter().find(|(k, _)| k == "general.alignment") else {
            return Ok(DEFAULT_ALIGNMENT);
        };
        match v {
            Value::U32(a) if a.is_power_of_two() => Ok(u64::from(*a)),
            other => Err(Error::GgufInvalid {
                path: self.path.to_path_buf(),
                what: "`general.alignment`".into(),
                reason: format!("{other:?} is not a power of two stored as UINT32"),
            }),
        }
    }

    fn tensor_infos(
        &mut self,
        count: u64,
        metadata: &[(String, Value)],
    ) -> Result<Vec<GgufTensor>, Error> {
        // Each tensor info takes at least 24 bytes (name length, dimension count, type, offset).
        if count > self.r.left() / 24 {
            return Err(Error::GgufTruncated {
                path: self.path.to_path_buf(),
                what: format!("the {count} tensor infos"),
                offset: self.r.len,
            });
        }
        let mut out = Vec::with_capacity(count as usize);
        for i in 0..count {
            let name = self.r.string(MAX_STRING);
            let name = self.at(|| format!("the name of tensor {i}"), name)?;
            let n_dims = self.r.u32();
            let n_dims = self.at(|| format!("the dimension count of `{name}`"), n_dims)?;
            let bad = |reason: String| Error::GgufTensor {
                path: self.path.to_path_buf(),
                name: name.clone(),
                reason,
            };
            if n_dims > MAX_DIMS {
                return Err(bad(format!(
                    "{n_dims} dimensions (GGML has at most {MAX_DIMS})"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let d = self.r.u64();
                dims.push(self.at(|| format!("the dimensions of `{name}`"), d)?);
            }
            let ty = self.r.u32();
            let ty = self.at(|| format!("the type of `{name}`"), ty)?;
            let offset = self.r.u64();
            let offset = self.at(|| format!("the data offset of `{name}`"), offset)?;
            let dtype = ggml_type(ty).map_err(|type_name| Error::UnsupportedGgmlType {
                path: self.path.to_path_buf(),
                name: name.clone(),
                ggml_type: ty,
                type_name,
            })?;
            let tensor = self.tensor(name, dtype, dims, offset, metadata)?;
            out.push(tensor);
        }
        Ok(out)
    }

    fn tensor(
        &self,
        name: String,
        dtype: DType,
        dims: Vec<u64>,
        offset: u64,
        metadata: &[(String, Value)],
    ) -> Result<GgufTensor, Error> {
        let bad = |reason: String| Error::GgufTensor {
            path: self.path.to_path_buf(),
            name: name.clone(),
            reason,
        };
        let numel = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("dimensions {dims:?} overflow a 64-bit count")))?;
        let row = dims.first().copied().unwrap_or(1);
        if !row.is_multiple_of(dtype.block_elems()) {
            return Err(bad(format!(
                "rows of {row} elements are not whole {dtype} blocks of {}",
                dtype.block_elems()
            )));
        }
        let bytes = dtype
            .bytes_for(numel)
            .ok_or_else(|| bad(format!("{numel} {dtype} elements overflow a 64-bit size")))?;
        let mut shape: Vec<u64> = dims.iter().rev().copied().collect();
        let key = format!("{ORIG_SHAPE_PREFIX}{name}");
        if let Some((_, v)) = metadata.iter().find(|(k, _)| *k == key) {
            let orig = match v {
                Value::Array(a) => a.to_u64s(),
                _ => None,
            }
            .ok_or_else(|| bad(format!("`{key}` is not an array of non-negative integers")))?;
            let orig_numel = orig.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            if orig_numel != Some(numel) {
                return Err(bad(format!(
                    "`{key}` is {orig:?}, which does not hold its {numel} elements ({dims:?})"
                )));
            }
            shape = orig;
        }
        Ok(GgufTensor {
            name,
            dtype,
            dims,
            shape,
            file_offset: offset, // relative until `check_data`
            bytes,
        })
    }
}

/// Makes data offsets absolute and checks each range: aligned, inside the file, no overlap,
/// no name twice.
fn check_data(file: &mut GgufFile) -> Result<(), Error> {
    let path = file.path.clone();
    let mut seen = std::collections::HashSet::with_capacity(file.tensors.len());
    if let Some(t) = file.tensors.iter().find(|t| !seen.insert(t.name.as_str())) {
        return Err(Error::DuplicateTensor {
            path,
            name: t.name.clone(),
        });
    }
    for t in &mut file.tensors {
        let bad = |reason: String| Error::GgufTensor {
            path: path.clone(),
            name: t.name.clone(),
            reason,
        };
        if !t.file_offset.is_multiple_of(file.alignment) {
            return Err(bad(format!(
                "data offset {} is not a multiple of the alignment {}",
                t.file_offset, file.alignment
            )));
        }
        let start = file.data_start.checked_add(t.file_offset);
        let end = start.and_then(|s| s.checked_add(t.bytes));
        match (start, end) {
            (Some(s), Some(e)) if e <= file.file_len => t.file_offset = s,
            _ => {
                return Err(bad(format!(
                    "its {} bytes at data offset {} end past the end of the {}-byte file \
                     (data starts at {})",
                    t.bytes, t.file_offset, file.file_len, file.data_start
                )));
            }
        }
    }
    let mut order: Vec<&GgufTensor> = file.tensors.iter().collect();
    order.sort_by_key(|t| (t.file_offset, t.bytes));
    for pair in order.windows(2) {
        if pair[0].file_offset + pair[0].bytes > pair[1].file_offset {
            return Err(Error::GgufTensor {
                path,
                name: pair[1].name.clone(),
                reason: format!("its data overlaps `{}`'s", pair[0].name),
            });
        }
    }
    Ok(())
}

/// The dtype of GGML type `id`, or the name of a type this crate does not dequantize.
pub fn ggml_type(id: u32) -> Result<DType, &'static str> {
    Ok(match id {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::Q4_0,
        3 => DType::Q4_1,
        6 => DType::Q5_0,
        7 => DType::Q5_1,
        8 => DType::Q8_0,
        10 => DType::Q2K,
        11 => DType::Q3K,
        12 => DType::Q4K,
        13 => DType::Q5K,
        14 => DType::Q6K,
        24 => DType::I8,
        25 => DType::I16,
        26 => DType::I32,
        27 => DType::I64,
        28 => DType::F64,
        30 => DType::BF16,
        other => {
            return Err(match other {
                4 => "Q4_2 (removed from GGML)",
                5 => "Q4_3 (removed from GGML)",
                9 => "Q8_1",
                15 => "Q8_K",
                16 => "IQ2_XXS",
                17 => "IQ2_XS",
                18 => "IQ3_XXS",
                19 => "IQ1_S",
                20 => "IQ4_NL",
                21 => "IQ3_S",
                22 => "IQ2_S",
                23 => "IQ4_XS",
                29 => "IQ1_M",
                34 => "TQ1_0",
                35 => "TQ2_0",
                39 => "MXFP4",
                _ => "an unknown type",
            });
        }
    })
}

/// The GGML type id of `dtype`, if GGUF can hold it.
pub fn ggml_id(dtype: DType) -> Option<u32> {
    (0..40).find(|&id| ggml_type(id) == Ok(dtype))
}

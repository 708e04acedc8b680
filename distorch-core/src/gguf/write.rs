//! [`write_gguf`]: a GGUF v3 file from tensors and metadata (the demo, fixtures and the
//! hostile-file tests write with it).

use std::fs::File;
use std::io::Write;
use std::path::Path;

use super::{Array, DEFAULT_ALIGNMENT, Value, ggml_id};
use crate::dtype::DType;
use crate::error::Error;

/// A tensor to write: its shape outermost first (written in GGML's reversed order) and its
/// bytes in its type's layout.
#[derive(Debug, Clone, Copy)]
pub struct GgufTensorData<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its type.
    pub dtype: DType,
    /// Its shape, outermost first.
    pub shape: &'a [u64],
    /// Its data.
    pub data: &'a [u8],
}

/// Writes a GGUF v3 file: `metadata` in order, then the tensors' infos and their data, each
/// aligned to `general.alignment` when `metadata` holds it (as a `U32`), else to 32 bytes.
pub fn write_gguf(
    path: impl AsRef<Path>,
    metadata: &[(String, Value)],
    tensors: &[GgufTensorData<'_>],
) -> Result<(), Error> {
    let path = path.as_ref();
    let bad = |name: &str, reason: String| Error::InvalidTensor {
        path: path.to_path_buf(),
        name: name.to_owned(),
        reason,
    };
    let alignment = metadata
        .iter()
        .find_map(|(k, v)| match v {
            Value::U32(a) if k == "general.alignment" && a.is_power_of_two() => Some(u64::from(*a)),
            _ => None,
        })
        .unwrap_or(DEFAULT_ALIGNMENT);
    let mut head = Vec::new();
    head.extend_from_slice(&super::MAGIC);
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        string(&mut head, k);
        head.extend_from_slice(&kind(v).to_le_bytes());
        value(&mut head, v);
    }
    let mut offset = 0u64;
    let mut offsets = Vec::with_capacity(tensors.len());
    for t in tensors {
        let id =
            ggml_id(t.dtype).ok_or_else(|| bad(t.name, format!("GGUF cannot hold {}", t.dtype)))?;
        let numel = t.shape.iter().product::<u64>();
        if t.dtype.bytes_for(numel) != Some(t.data.len() as u64) {
            return Err(bad(
                t.name,
                format!("{} bytes given for {} {:?}", t.data.len(), t.dtype, t.shape),
            ));
        }
        string(&mut head, t.name);
        head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            head.extend_from_slice(&d.to_le_bytes());
        }
        head.extend_from_slice(&id.to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.data.len() as u64).div_ceil(alignment) * alignment;
    }
    let pad = |n: u64| (n.div_ceil(alignment) * alignment - n) as usize;
    head.resize(head.len() + pad(head.len() as u64), 0);
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::io::BufWriter::new(File::create(path).map_err(io)?);
    file.write_all(&head).map_err(io)?;
    let mut written = 0u64;
    for (t, &at) in tensors.iter().zip(&offsets) {
        file.write_all(&vec![0u8; (at - written) as usize])
            .map_err(io)?;
        file.write_all(t.data).map_err(io)?;
        written = at + t.data.len() as u64;
    }
    file.into_inner()
        .map_err(|e| io(e.into_error()))?
        .sync_all()
        .map_err(io)
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn kind(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn array_kind(a: &Array) -> u32 {
    match a {
        Array::U8(_) => 0,
        Array::I8(_) => 1,
        Array::U16(_) => 2,
        Array::I16(_) => 3,
        Array::U32(_) => 4,
        Array::I32(_) => 5,
        Array::F32(_) => 6,
        Array::Bool(_) => 7,
        Array::Strings(_) => 8,
        Array::Arrays(_) => 9,
        Array::U64(_) => 10,
        Array::I64(_) => 11,
        Array::F64(_) => 12,
    }
}

fn value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => string(out, s),
        Value::Array(a) => array(out, a),
    }
}

fn array(out: &mut Vec<u8>, a: &Array) {
    out.extend_from_slice(&array_kind(a).to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! each {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        Array::U8(v) => each!(v),
        Array::I8(v) => each!(v),
        Array::U16(v) => each!(v),
        Array::I16(v) => each!(v),
        Array::U32(v) => each!(v),
        Array::I32(v) => each!(v),
        Array::U64(v) => each!(v),
        Array::I64(v) => each!(v),
        Array::F32(v) => each!(v),
        Array::F64(v) => each!(v),
        Array::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        Array::Strings(v) => v.iter().for_each(|s| string(out, s)),
        Array::Arrays(v) => v.iter().for_each(|a| array(out, a)),
    }
}

//! [`write_random`]: safetensors files of deterministic random weights (demo checkpoints,
//! benchmarks' models).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{SafetensorsIndex, TensorSpec, write_zeroed};
use crate::dtype::DType;
use crate::error::Error;

/// Writes a safetensors file of `tensors` with deterministic random values (the same bytes
/// on every machine for the same `seed`), as the random demo checkpoints are written: weights
/// uniform with standard deviation 1/√fan-in, vector-shaped `weight`/`gamma` tensors (norm
/// scales) 1 and other vectors (biases) 0, so activations stay bounded. Each tensor is
/// encoded in its own dtype (f16, bf16 or f32). Written tensor by tensor (little memory)
/// under `PATH.partial`, renamed at the end, so an interrupted write is never taken for a
/// complete file.
pub fn write_random(
    path: &Path,
    tensors: &[TensorSpec],
    seed: u64,
    metadata: &BTreeMap<String, String>,
) -> Result<(), Error> {
    use std::io::{Seek, SeekFrom, Write};
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io { path: p, source }
    };
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    if let Some((name, dtype, _)) = tensors
        .iter()
        .find(|(_, d, _)| !matches!(d, DType::F16 | DType::BF16 | DType::F32))
    {
        return Err(Error::UnsupportedDtype {
            path: path.to_path_buf(),
            name: name.clone(),
            dtype: *dtype,
            reason: "random weights are written as f16, bf16 or f32",
        });
    }
    write_zeroed(&partial, tensors, metadata)?;
    let index = SafetensorsIndex::open(&partial)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&partial)
        .map_err(io(&partial))?;
    let mut state = seed;
    let mut buf = Vec::new();
    for t in index.tensors() {
        let n = t.numel() as usize;
        buf.clear();
        buf.reserve(4 * n);
        let param = t.name.rsplit('.').next().unwrap_or("");
        let vector = t.shape.iter().skip(1).all(|&d| d == 1);
        let constant = match (vector, param) {
            (true, "weight" | "gamma") => Some(1.0f32),
            (true, _) => Some(0.0),
            _ => None,
        };
        let fan_in: u64 = t.shape.iter().skip(1).product::<u64>().max(1);
        let half_width = (3.0 / fan_in as f64).sqrt() as f32;
        for _ in 0..n {
            let v = constant.unwrap_or_else(|| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * half_width
            });
            match t.dtype {
                DType::F16 => buf.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                DType::BF16 => buf.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                _ => buf.extend_from_slice(&v.to_le_bytes()),
            }
        }
        file.seek(SeekFrom::Start(t.file_offset))
            .and_then(|_| file.write_all(&buf))
            .map_err(io(&partial))?;
    }
    file.sync_all().map_err(io(&partial))?;
    std::fs::rename(&partial, path).map_err(io(path))?;
    Ok(())
}

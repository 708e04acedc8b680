//! Named tensors in and out of safetensors files for `distorch run`.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use distorch::DType;
use distorch::core::SafetensorsIndex;

use crate::Failure;

/// The tensors of an inputs file, read whole (inputs are small), as f64 values and shapes.
pub struct Inputs {
    path: String,
    tensors: BTreeMap<String, (Vec<usize>, Vec<f64>)>,
}

impl Inputs {
    pub fn read(path: &Path) -> Result<Inputs, Failure> {
        let index = SafetensorsIndex::open_file(path)?;
        let bytes =
            std::fs::read(path).map_err(|e| Failure::Other(format!("{}: {e}", path.display())))?;
        let mut tensors = BTreeMap::new();
        for t in index.tensors() {
            // The index checked that every range lies inside the file.
            let raw = &bytes[t.file_offset as usize..(t.file_offset + t.bytes) as usize];
            let values: Vec<f64> = match t.dtype {
                DType::F32 => raw
                    .chunks_exact(4)
                    .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect(),
                DType::F16 => raw
                    .chunks_exact(2)
                    .map(|c| f64::from(half::f16::from_le_bytes([c[0], c[1]]).to_f32()))
                    .collect(),
                DType::BF16 => raw
                    .chunks_exact(2)
                    .map(|c| f64::from(half::bf16::from_le_bytes([c[0], c[1]]).to_f32()))
                    .collect(),
                DType::I64 => raw
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f64)
                    .collect(),
                DType::I32 => raw
                    .chunks_exact(4)
                    .map(|c| f64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect(),
                other => {
                    return Err(Failure::Other(format!(
                        "{}: input `{}` has dtype {other}; inputs must be f32, f16, bf16, i64 or i32",
                        path.display(),
                        t.name
                    )));
                }
            };
            let shape = t.shape.iter().map(|&d| d as usize).collect();
            tensors.insert(t.name.clone(), (shape, values));
        }
        Ok(Inputs {
            path: path.display().to_string(),
            tensors,
        })
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn get(&self, name: &str) -> Result<&(Vec<usize>, Vec<f64>), Failure> {
        self.tensors.get(name).ok_or_else(|| {
            Failure::Other(format!(
                "{}: no input named `{name}` (found: {})",
                self.path,
                self.tensors.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    /// A float tensor of rank `D`.
    pub fn tensor<B: Backend, const D: usize>(
        &self,
        name: &str,
        device: &B::Device,
    ) -> Result<Tensor<B, D>, Failure> {
        let (shape, values) = self.get(name)?;
        let dims: [usize; D] = shape.as_slice().try_into().map_err(|_| {
            Failure::Other(format!(
                "{}: input `{name}` has shape {shape:?}; expected rank {D}",
                self.path
            ))
        })?;
        let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
        Ok(Tensor::from_data(TensorData::new(v, dims), device))
    }

    /// Values and shape, for host-side inputs (token ids, timesteps).
    pub fn values(&self, name: &str) -> Result<(Vec<usize>, Vec<f64>), Failure> {
        self.get(name).cloned()
    }
}

/// Output tensors, written as f32.
#[derive(Default)]
pub struct Outputs {
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl Outputs {
    pub fn push<B: Backend, const D: usize>(
        &mut self,
        name: &str,
        t: Tensor<B, D>,
    ) -> Result<(), Failure> {
        let dims = t.dims().to_vec();
        let values = t
            .into_data()
            .into_vec::<f32>()
            .map_err(|e| Failure::Other(format!("reading `{name}` back: {e:?}")))?;
        self.tensors.push((name.to_owned(), dims, values));
        Ok(())
    }

    pub fn write(self, path: &Path) -> Result<(), Failure> {
        let specs: Vec<(String, DType, Vec<u64>)> = self
            .tensors
            .iter()
            .map(|(n, s, _)| (n.clone(), DType::F32, s.iter().map(|&d| d as u64).collect()))
            .collect();
        let data: Vec<Vec<u8>> = self
            .tensors
            .iter()
            .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        distorch::core::safetensors::write(path, &specs, &refs, &BTreeMap::new())?;
        Ok(())
    }
}

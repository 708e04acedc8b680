//! [`WeightStore`]: every placement unit's tensors at their home, filled by
//! Load-Patch-Distribute.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use distorch_alloc::{ByteSize, DeviceId, Plan};

use crate::components::Component;
use crate::error::Error;
use crate::runtime::decode::{DecodeError, to_f32};
use crate::safetensors::{SafetensorsIndex, TensorInfo};
use crate::units::group;

/// Where a stored tensor's data is.
#[derive(Debug, Clone)]
pub(crate) enum Stored<B: Backend> {
    /// On the compute device.
    Device(Tensor<B, 1>),
    /// In host memory, as f32.
    Host(Arc<[f32]>),
}

/// One tensor of a unit, flattened; `shape` restores it.
#[derive(Debug, Clone)]
pub struct StoredTensor<B: Backend> {
    /// The tensor's key within its component (component prefix stripped).
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    pub(crate) data: Stored<B>,
}

/// A placement unit at its home.
#[derive(Debug, Clone)]
pub struct StoredUnit<B: Backend> {
    /// The unit's name.
    pub name: String,
    /// Its home: the plan's compute device, or `cpu` (host memory).
    pub home: DeviceId,
    /// Bytes its tensors occupy at home (f32).
    pub bytes: ByteSize,
    pub(crate) tensors: Vec<StoredTensor<B>>,
}

impl<B: Backend> StoredUnit<B> {
    /// True when the unit lives on the compute device.
    pub fn is_resident(&self) -> bool {
        self.tensors
            .iter()
            .all(|t| matches!(t.data, Stored::Device(_)))
    }
}

/// A weight changed during loading, on the compute device at f32 (the LoRA crate implements
/// it; tests use simple patches).
pub trait WeightPatch<B: Backend>: Send + Sync {
    /// Returns the patched tensor for `key`, or `None` to leave it as it is. `weight` is the
    /// flattened tensor on the compute device; `shape` is its real shape.
    fn patch(&self, key: &str, weight: &Tensor<B, 1>, shape: &[usize]) -> Option<Tensor<B, 1>>;
}

/// What loading did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Tensors loaded.
    pub tensors: usize,
    /// Keys a patch changed.
    pub patched: Vec<String>,
    /// Bytes held per home, compute device first.
    pub bytes_per_device: Vec<(DeviceId, ByteSize)>,
    /// Bytes read from the file.
    pub bytes_read: ByteSize,
    /// Tensors of the component that no planned unit covers (not loaded).
    pub unused: Vec<String>,
}

/// The tensors of one component, each unit at the home its plan gives.
#[derive(Debug)]
pub struct WeightStore<B: Backend> {
    compute_id: DeviceId,
    compute: B::Device,
    units: Vec<StoredUnit<B>>,
    by_name: HashMap<String, usize>,
}

impl<B: Backend> WeightStore<B> {
    /// Load-Patch-Distribute: reads each tensor of `component` once, decodes it to f32 on the
    /// host, and sends it to its planned home. A tensor that a patch may change is uploaded to
    /// `compute` first, patched there and then sent home. The plan's compute device is bound
    /// to the Burn device `compute`; units the plan puts on `cpu` stay in host memory.
    ///
    /// Peak extra memory is one tensor (its file bytes and their f32 decoding).
    pub fn load(
        index: &SafetensorsIndex,
        component: &Component<'_>,
        plan: &Plan,
        compute: &B::Device,
        patch: Option<&dyn WeightPatch<B>>,
    ) -> Result<(WeightStore<B>, LoadReport), Error> {
        let path = index.path().to_path_buf();
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let mut groups = group(component);
        let file = File::open(&path).map_err(io)?;
        let mut loader = Loader {
            file,
            path: &path,
            prefix: component.prefix,
            compute,
            patch,
            report: LoadReport::default(),
        };
        let mut held: HashMap<DeviceId, u64> = HashMap::new();
        let mut units = Vec::with_capacity(plan.units().len());
        for placed in plan.units() {
            let home = placed.device;
            let resident = home == plan.compute();
            if !resident && home != DeviceId::CPU {
                return Err(Error::UnsupportedHome {
                    unit: placed.name.clone(),
                    device: home,
                });
            }
            let infos =
                groups
                    .remove(placed.name.as_str())
                    .ok_or_else(|| Error::UnitNotInFile {
                        path: path.clone(),
                        unit: placed.name.clone(),
                    })?;
            let tensors = infos
                .into_iter()
                .map(|info| loader.tensor(info, resident))
                .collect::<Result<Vec<_>, Error>>()?;
            let bytes: u64 = tensors
                .iter()
                .map(|t| 4 * t.shape.iter().product::<usize>() as u64)
                .sum();
            *held.entry(home).or_default() += bytes;
            units.push(StoredUnit {
                name: placed.name.clone(),
                home,
                bytes: ByteSize(bytes),
                tensors,
            });
        }
        let mut report = loader.report;
        report.unused = groups
            .into_values()
            .flatten()
            .map(|t| t.name.clone())
            .collect();
        report.unused.sort();
        let mut per_device: Vec<(DeviceId, ByteSize)> =
            held.into_iter().map(|(d, b)| (d, ByteSize(b))).collect();
        per_device.sort_by_key(|(d, _)| (*d != plan.compute(), *d));
        report.bytes_per_device = per_device;
        let by_name = units
            .iter()
            .enumerate()
            .map(|(i, u)| (u.name.clone(), i))
            .collect();
        tracing::info!(
            component = plan.component(),
            tensors = report.tensors,
            patched = report.patched.len(),
            "loaded"
        );
        Ok((
            WeightStore {
                compute_id: plan.compute(),
                compute: compute.clone(),
                units,
                by_name,
            },
            report,
        ))
    }

    /// The compute device's id in the plan.
    pub fn compute_id(&self) -> DeviceId {
        self.compute_id
    }

    /// The Burn compute device.
    pub fn compute(&self) -> &B::Device {
        &self.compute
    }

    /// Units in execution order.
    pub fn units(&self) -> &[StoredUnit<B>] {
        &self.units
    }

    /// The position of a unit in execution order.
    pub fn position(&self, unit: &str) -> Option<usize> {
        self.by_name.get(unit).copied()
    }
}

/// Reads, decodes, patches and places one tensor at a time.
struct Loader<'a, B: Backend> {
    file: File,
    path: &'a std::path::Path,
    prefix: &'a str,
    compute: &'a B::Device,
    patch: Option<&'a dyn WeightPatch<B>>,
    report: LoadReport,
}

impl<B: Backend> Loader<'_, B> {
    fn tensor(&mut self, info: &TensorInfo, resident: bool) -> Result<StoredTensor<B>, Error> {
        let io = |source| Error::Io {
            path: self.path.to_path_buf(),
            source,
        };
        let local = info.name.strip_prefix(self.prefix).unwrap_or(&info.name);
        // The index checked that this range lies inside the file.
        let mut raw = vec![0u8; info.bytes as usize];
        self.file
            .seek(SeekFrom::Start(info.file_offset))
            .map_err(io)?;
        self.file.read_exact(&mut raw).map_err(io)?;
        self.report.bytes_read += ByteSize(info.bytes);
        let values = to_f32(info.dtype, &raw).map_err(|e| Error::UnsupportedDtype {
            path: self.path.to_path_buf(),
            name: info.name.clone(),
            dtype: info.dtype,
            reason: match e {
                DecodeError::NotFloat => "not a float type",
                DecodeError::Ragged => "byte length not a multiple of the element size",
            },
        })?;
        drop(raw);
        let shape: Vec<usize> = info.shape.iter().map(|&d| d as usize).collect();
        let n = values.len();
        let data = match self.patch {
            Some(p) => {
                let on_compute =
                    Tensor::<B, 1>::from_data(TensorData::new(values, [n]), self.compute);
                let t = match p.patch(local, &on_compute, &shape) {
                    Some(t) if t.dims() != [n] => {
                        return Err(Error::PatchShape {
                            key: local.to_owned(),
                            expected: n,
                            got: t.dims()[0],
                        });
                    }
                    Some(t) => {
                        self.report.patched.push(local.to_owned());
                        t
                    }
                    None => on_compute,
                };
                if resident {
                    Stored::Device(t)
                } else {
                    Stored::Host(host_copy(t)?)
                }
            }
            None if resident => Stored::Device(Tensor::from_data(
                TensorData::new(values, [n]),
                self.compute,
            )),
            None => Stored::Host(values.into()),
        };
        self.report.tensors += 1;
        Ok(StoredTensor {
            name: local.to_owned(),
            shape,
            data,
        })
    }
}

fn host_copy<B: Backend>(t: Tensor<B, 1>) -> Result<Arc<[f32]>, Error> {
    t.into_data()
        .into_vec::<f32>()
        .map(Arc::from)
        .map_err(|e| Error::DeviceTransfer {
            reason: format!("{e:?}"),
        })
}

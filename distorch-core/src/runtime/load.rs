//! Load-Patch-Distribute: [`WeightStore::load`].

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use distorch_alloc::{ByteSize, DeviceId, Plan};
use memmap2::Mmap;

use crate::components::Component;
use crate::dtype::DType;
use crate::error::Error;
use crate::home::{ComputeDtype, DeviceRule, Homes};
use crate::runtime::backend::DonorCopy;
use crate::runtime::decode::{first_non_finite, to_f32};
use crate::runtime::device::{
    self, DecodeTables, DeviceTensor, Source, device_rule, supports_compute,
};
use crate::runtime::fp8::PatchPrecision;
use crate::runtime::host::{HostBytes, HostTensor, changed, storage_dtype};
use crate::runtime::store::{
    DeviceMap, LoadOptions, LoadReport, ShapeMismatch, Stored, StoredTensor, StoredUnit,
    WeightPatch, WeightStore,
};
use crate::safetensors::{SafetensorsIndex, TensorInfo};
use crate::units::{group, group_bytes};

/// Where a unit goes.
pub(crate) enum Home<'d, B: Backend> {
    Compute,
    Donor(&'d B::Device, DonorCopy),
    Host,
}

impl<B: Backend> Clone for Home<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for Home<'_, B> {}

impl<B: Backend> WeightStore<B> {
    /// Load-Patch-Distribute: every tensor of `component` that the plan places is read once
    /// and sent to its home.
    ///
    /// - Resident units and GPU donors (`devices` binds the plan's ids to Burn devices) hold
    ///   their tensors as the backend's [`DeviceRule`] says ([`device_rule`]): in the
    ///   file's dtype on GPU backends (fp8 packed), as f32 on ndarray.
    /// - Host (`cpu`) units borrow their bytes from the memory-mapped file, in the file's
    ///   dtype, with no copy; they cross to the compute device in that dtype (widened on the
    ///   host only for a backend that holds f32). The file must not be modified while the
    ///   store lives (the usual contract for mapped weights).
    /// - Every unit's bytes at its home must be the plan's bytes for it: plan with the
    ///   inventory of [`crate::units::inventory_with`] and this backend's rule, or loading
    ///   fails with [`Error::PlanMismatch`] before the unit is kept.
    /// - The compute dtype ([`LoadOptions::compute`]) must be one the compute device computes
    ///   in, or loading fails before anything is read.
    /// - A tensor the patch applies to is uploaded to the compute device, patched there at
    ///   f32, rounded to its storage dtype (the file's; fp8 is kept at bf16, f64 at f32) and
    ///   sent home — rounded at every home, so outputs do not depend on the placement. At a
    ///   host home it is then an owned copy.
    ///
    /// Everything that can be checked from the header is checked before any tensor is read:
    /// homes, dtypes, expected keys and shapes. Peak extra memory while loading is one
    /// tensor (its file bytes and their f32 decoding).
    pub fn load(
        index: &SafetensorsIndex,
        component: &Component<'_>,
        plan: &Plan,
        devices: &DeviceMap<B>,
        options: &LoadOptions<'_, B>,
    ) -> Result<(WeightStore<B>, LoadReport), Error> {
        let path = index.path();
        if !supports_compute::<B>(&devices.compute, options.compute) {
            return Err(Error::UnsupportedComputeDtype {
                device: plan.compute(),
                backend: B::name(&devices.compute),
                dtype: options.compute,
            });
        }
        let rule = device_rule::<B>(&devices.compute);
        let changed = |key: &str| options.patch.is_some_and(|p| p.applies_to(key));
        let homes = Homes {
            device: rule,
            compute: options.compute,
            changed: Some(&changed),
            fp8_changed: options.precision.fp8_changed(),
        };
        let mut report = LoadReport::default();
        let local = |t: &TensorInfo| -> String {
            t.name
                .strip_prefix(component.prefix)
                .unwrap_or(&t.name)
                .to_owned()
        };

        // Check everything the header can tell before reading.
        let scaled = scaled_fp8(component);
        let mut groups = group(component);
        let mut todo = Vec::with_capacity(plan.units().len());
        for placed in plan.units() {
            let home = if placed.device == plan.compute() {
                Home::Compute
            } else if placed.device == DeviceId::CPU {
                Home::Host
            } else {
                let (device, copy) =
                    devices
                        .donor(placed.device)
                        .ok_or_else(|| Error::UnsupportedHome {
                            unit: placed.name.clone(),
                            device: placed.device,
                        })?;
                Home::Donor(device, copy)
            };
            let infos =
                groups
                    .remove(placed.name.as_str())
                    .ok_or_else(|| Error::UnitNotInFile {
                        path: path.to_path_buf(),
                        unit: placed.name.clone(),
                    })?;
            // The plan must count the unit as this backend holds it at that home.
            let (host, device) = group_bytes(component, &infos, &homes);
            let by_rule = if matches!(home, Home::Host) {
                host
            } else {
                device
            };
            if by_rule != placed.bytes.0 {
                return Err(Error::PlanMismatch {
                    unit: placed.name.clone(),
                    device: placed.device,
                    planned: placed.bytes,
                    held: ByteSize(by_rule),
                });
            }
            todo.push((placed, home, infos));
        }
        report.unused = groups.into_values().flatten().map(local).collect();
        if let Some(expected) = options.expected {
            let want: HashMap<&str, &[usize]> = expected
                .iter()
                .map(|e| (e.name.as_str(), e.shape.as_slice()))
                .collect();
            let mut found = HashMap::new();
            for (_, _, infos) in &mut todo {
                infos.retain(|t| {
                    let name = local(t);
                    // A scaled-fp8 weight's scales go with it (`scale_input`, 4 bytes, is
                    // kept too, so the unit holds what the plan counted).
                    let keep = want.contains_key(name.as_str())
                        || (scaled
                            && [".scale_weight", ".scale_input"].iter().any(|s| {
                                name.strip_suffix(s).is_some_and(|m| {
                                    want.contains_key(format!("{m}.weight").as_str())
                                })
                            }));
                    if keep {
                        found.insert(name, *t);
                    } else {
                        report.unused.push(name);
                    }
                    keep
                });
            }
            for e in expected {
                let Some(t) = found.get(&e.name) else {
                    report.missing.push(e.name.clone());
                    continue;
                };
                if !t
                    .shape
                    .iter()
                    .map(|&d| d as usize)
                    .eq(e.shape.iter().copied())
                {
                    report.mismatched.push(ShapeMismatch {
                        name: e.name.clone(),
                        expected: e.shape.clone(),
                        found: t.shape.iter().map(|&d| d as usize).collect(),
                    });
                }
            }
            if !report.missing.is_empty() && !options.allow_missing {
                return Err(Error::MissingTensors {
                    path: path.to_path_buf(),
                    component: component.kind.to_string(),
                    missing: report.missing,
                });
            }
            if let Some(m) = report.mismatched.first()
                && !options.allow_mismatched
            {
                return Err(Error::ShapeMismatch {
                    path: path.to_path_buf(),
                    name: m.name.clone(),
                    expected: m.expected.clone(),
                    found: m.found.clone(),
                    count: report.mismatched.len(),
                });
            }
        }
        report.unused.sort();
        for (_, _, infos) in &todo {
            for t in infos {
                if to_f32(t.dtype, &[]).is_err() {
                    return Err(Error::UnsupportedDtype {
                        path: path.to_path_buf(),
                        name: t.name.clone(),
                        dtype: t.dtype,
                        reason: "not a float type",
                    });
                }
            }
        }

        let mut scales = Vec::with_capacity(todo.len());
        for (_, _, infos) in &todo {
            scales.push(if scaled {
                scale_pairs(infos, &local, options, path)?
            } else {
                Vec::new()
            });
        }

        let fingerprints = index
            .files()
            .iter()
            .map(|f| Fingerprint::of(f))
            .collect::<Result<Vec<_>, Error>>()?;
        let mut loader = Loader::new(index.files(), devices, options, rule, report);
        let mut units = Vec::with_capacity(todo.len());
        for ((placed, home, infos), scales) in todo.into_iter().zip(scales) {
            let tensors = infos
                .into_iter()
                .map(|info| loader.tensor(info, &local(info), home))
                .collect::<Result<Vec<_>, Error>>()?;
            let (bytes, upload) = unit_bytes(&tensors);
            loader.report.tensors += tensors.len();
            units.push(StoredUnit {
                name: placed.name.clone(),
                home: placed.device,
                bytes: ByteSize(bytes),
                upload_bytes: ByteSize(upload),
                tensors,
                scales,
            });
        }
        let mut report = loader.report;
        let by_name = units
            .iter()
            .enumerate()
            .map(|(i, u)| (u.name.clone(), i))
            .collect();
        let store = WeightStore {
            compute_id: plan.compute(),
            compute: devices.compute.clone(),
            units,
            by_name,
            files: index.files().into(),
            fingerprints,
            precision: options.precision,
            rule,
            compute_dtype: options.compute,
            decode_tables: DecodeTables::new(devices.compute.clone()),
        };
        report.bytes_per_device = store.bytes_per_device();
        tracing::info!(
            component = plan.component(),
            tensors = report.tensors,
            patched = report.patched.len(),
            mapped = %report.host_mapped,
            read = %report.bytes_read,
            "loaded"
        );
        Ok((store, report))
    }
}

/// Why a patch on a scaled-fp8 weight is refused (at load and when re-patching).
pub(crate) const SCALED_FP8_PATCH: &str = "LoRAs on scaled-fp8 weights are not supported yet \
     (the weight would be patched without its scale); use an unscaled fp8, bf16 or f16 file";

/// Whether `component` is a ComfyUI scaled-fp8 model (its `scaled_fp8` marker tensor).
fn scaled_fp8(component: &Component<'_>) -> bool {
    component.local_names().any(|n| n == "scaled_fp8")
}

/// A scaled-fp8 unit's (weight, scale) positions among its `infos`, checked: each scale is
/// one float, and no patch applies to a scaled weight (it would be patched without its
/// scale).
fn scale_pairs(
    infos: &[&TensorInfo],
    local: &dyn Fn(&TensorInfo) -> String,
    options: &LoadOptions<'_, impl Backend>,
    path: &std::path::Path,
) -> Result<Vec<(usize, usize)>, Error> {
    let names: Vec<String> = infos.iter().map(|t| local(t)).collect();
    let mut pairs = Vec::new();
    for (s, name) in names.iter().enumerate() {
        let Some(module) = name.strip_suffix(".scale_weight") else {
            continue;
        };
        let weight = format!("{module}.weight");
        let Some(w) = names.iter().position(|n| *n == weight) else {
            continue;
        };
        let bad = |reason| Error::ScaledFp8 {
            path: path.to_path_buf(),
            name: name.clone(),
            reason,
        };
        if infos[s].numel() != 1 || !infos[s].dtype.is_float() {
            return Err(bad("a scale_weight must be one float (per-tensor scaling)"));
        }
        if options.patch.is_some_and(|p| p.applies_to(&weight)) {
            return Err(bad(SCALED_FP8_PATCH));
        }
        pairs.push((w, s));
    }
    Ok(pairs)
}

/// The bytes a unit's tensors hold at home, and the bytes one fetch of it moves (the same
/// bytes, for the tensors that are not resident).
pub(crate) fn unit_bytes<B: Backend>(tensors: &[StoredTensor<B>]) -> (u64, u64) {
    let (mut bytes, mut upload) = (0u64, 0u64);
    for t in tensors {
        match &t.data {
            Stored::Host(h) => {
                let b = h.bytes.as_slice().len() as u64;
                bytes += b;
                upload += b;
            }
            Stored::Donor(d, _) => {
                bytes += d.bytes();
                upload += d.bytes();
            }
            Stored::Device(d) => bytes += d.bytes(),
        }
    }
    (bytes, upload)
}

/// Reads, checks, patches and places one tensor at a time.
pub(crate) struct Loader<'a, B: Backend> {
    /// The files holding the data (one, or a sharded model's shards).
    files: &'a [PathBuf],
    /// Each file opened and mapped when first needed.
    shards: Vec<Option<Shard>>,
    devices: &'a DeviceMap<B>,
    options: &'a LoadOptions<'a, B>,
    /// How device homes hold each dtype.
    rule: DeviceRule,
    pub(crate) report: LoadReport,
    /// The read buffer, reused from tensor to tensor (as large as the largest one read).
    buf: Vec<u8>,
}

/// An open weights file and its read-only mapping.
struct Shard {
    file: File,
    map: Arc<Mmap>,
}

impl<'a, B: Backend> Loader<'a, B> {
    pub(crate) fn new(
        files: &'a [PathBuf],
        devices: &'a DeviceMap<B>,
        options: &'a LoadOptions<'a, B>,
        rule: DeviceRule,
        report: LoadReport,
    ) -> Loader<'a, B> {
        Loader {
            files,
            shards: files.iter().map(|_| None).collect(),
            devices,
            options,
            rule,
            report,
            buf: Vec::new(),
        }
    }

    fn io(&self, shard: usize) -> impl Fn(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            path: self.files[shard].clone(),
            source,
        }
    }

    /// The file of `shard`, opened and mapped on first use.
    fn shard(&mut self, shard: usize) -> Result<&mut Shard, Error> {
        if self.shards[shard].is_none() {
            let file = File::open(&self.files[shard]).map_err(self.io(shard))?;
            // SAFETY: the map is read-only; the documented contract is that the file is not
            // modified while the store lives (as for every loader of mapped weights). Ranges
            // come from the validated index and lie inside the file.
            let map = unsafe { Mmap::map(&file) }.map_err(self.io(shard))?;
            self.shards[shard] = Some(Shard {
                file,
                map: Arc::new(map),
            });
        }
        Ok(self.shards[shard].as_mut().expect("opened above"))
    }

    pub(crate) fn tensor(
        &mut self,
        info: &TensorInfo,
        local: &str,
        home: Home<'_, B>,
    ) -> Result<StoredTensor<B>, Error> {
        let shape: Vec<usize> = info.shape.iter().map(|&d| d as usize).collect();
        let patched = match self.options.patch.filter(|p| p.applies_to(local)) {
            Some(p) => self.patched(info, local, p, &shape)?,
            None => None,
        };
        let data = match (home, patched) {
            (Home::Host, None) => {
                // Borrowed from the mapping: no copy.
                let start = info.file_offset as usize;
                let range = start..start + info.bytes as usize;
                let map = Arc::clone(&self.shard(info.shard)?.map);
                if self.options.check_finite {
                    self.check_finite(info, &map[range.clone()])?;
                }
                self.report.host_mapped += ByteSize(info.bytes);
                Stored::Host(HostTensor {
                    bytes: HostBytes::Mapped { map, range },
                    dtype: info.dtype,
                })
            }
            (Home::Compute, None) => {
                Stored::Device(self.device_tensor(info, &self.devices.compute)?)
            }
            (Home::Donor(d, copy), None) => Stored::Donor(self.device_tensor(info, d)?, copy),
            (home, Some(t)) => self.store_patched(info, local, home, t)?,
        };
        if let Some(progress) = self.options.progress {
            progress(info.bytes);
        }
        Ok(StoredTensor {
            name: local.to_owned(),
            shape,
            data,
            origin: info.clone(),
        })
    }

    /// The tensor `local` read at f32 onto the compute device and patched there (as it is
    /// when the patch returns `None`: a tensor the patch applies to is stored in its changed
    /// dtype either way, as the plan counted it).
    fn patched(
        &mut self,
        info: &TensorInfo,
        local: &str,
        p: &dyn WeightPatch<B>,
        shape: &[usize],
    ) -> Result<Option<Tensor<B, 1>>, Error> {
        let n = info.numel() as usize;
        let on_compute = Tensor::<B, 1>::from_data(self.read_f32(info)?, &self.devices.compute);
        match p.patch(local, &on_compute, shape) {
            Some(t) if t.dims() != [n] => Err(Error::PatchShape {
                key: local.to_owned(),
                expected: n,
                got: t.dims()[0],
            }),
            Some(t) => {
                self.report.patched.push(local.to_owned());
                Ok(Some(t))
            }
            None => Ok(Some(on_compute)),
        }
    }

    /// A patched tensor at its home, rounded to its storage dtype whatever the home, so the
    /// patched model computes the same wherever its weights live.
    fn store_patched(
        &self,
        info: &TensorInfo,
        local: &str,
        home: Home<'_, B>,
        t: Tensor<B, 1>,
    ) -> Result<Stored<B>, Error> {
        let n = info.numel() as usize;
        let precision = (self.options.precision, self.options.compute);
        let rounded = if storage_dtype(info.dtype, precision.0, precision.1) == DType::F32 {
            None
        } else {
            Some(owned(t.clone(), info, precision, local)?)
        };
        let rule = self.rule;
        let device = |t: Tensor<B, 1>, rounded: Option<HostTensor>, d: &B::Device| match rounded {
            Some(h) => device::place(&rule, Source::Home(&h.bytes), h.dtype, n, d),
            None => DeviceTensor::Float(t.to_device(d)),
        };
        Ok(match home {
            Home::Compute => Stored::Device(device(t, rounded, &self.devices.compute)),
            Home::Donor(d, copy) => Stored::Donor(device(t, rounded, d), copy),
            Home::Host => Stored::Host(match rounded {
                Some(h) => h,
                None => owned(t, info, precision, local)?,
            }),
        })
    }

    /// Copies a tensor's bytes out of the file into the reused read buffer (not through the
    /// mapping, so its pages do not stay in this process's resident set), checked.
    fn read(&mut self, info: &TensorInfo) -> Result<Vec<u8>, Error> {
        let mut raw = std::mem::take(&mut self.buf);
        raw.resize(info.bytes as usize, 0);
        let file = &mut self.shard(info.shard)?.file;
        let done = file
            .seek(SeekFrom::Start(info.file_offset))
            .and_then(|_| file.read_exact(&mut raw));
        done.map_err(self.io(info.shard))?;
        self.report.bytes_read += ByteSize(info.bytes);
        if self.options.check_finite {
            self.check_finite(info, &raw)?;
        }
        Ok(raw)
    }

    /// A tensor read and widened to f32 (for patching at f32).
    fn read_f32(&mut self, info: &TensorInfo) -> Result<TensorData, Error> {
        let raw = self.read(info)?;
        // Loading checked that every planned dtype is a float type.
        let values = to_f32(info.dtype, &raw).unwrap_or_default();
        self.buf = raw;
        let n = values.len();
        Ok(TensorData::new(values, [n]))
    }

    /// A tensor read and placed on `device` as the rule holds it.
    fn device_tensor(
        &mut self,
        info: &TensorInfo,
        device: &B::Device,
    ) -> Result<DeviceTensor<B>, Error> {
        let raw = self.read(info)?;
        let n = info.numel() as usize;
        let t = device::place(&self.rule, Source::Transient(&raw), info.dtype, n, device);
        self.buf = raw;
        Ok(t)
    }

    fn check_finite(&self, info: &TensorInfo, bytes: &[u8]) -> Result<(), Error> {
        match first_non_finite(info.dtype, bytes) {
            Ok(None) | Err(_) => Ok(()),
            Ok(Some(index)) => Err(Error::NonFinite {
                path: self.files[info.shard].clone(),
                name: info.name.clone(),
                index,
            }),
        }
    }
}

/// A patched tensor brought back to the host, in its storage dtype.
fn owned<B: Backend>(
    t: Tensor<B, 1>,
    info: &TensorInfo,
    (precision, compute): (PatchPrecision, ComputeDtype),
    key: &str,
) -> Result<HostTensor, Error> {
    let values = t
        .into_data()
        .into_vec::<f32>()
        .map_err(|e| Error::DeviceTransfer {
            reason: format!("{e:?}"),
        })?;
    Ok(changed(&values, info.dtype, precision, compute, key))
}

/// A weights file's length and modification time when it was loaded: re-reading pristine
/// weights from it later ([`WeightStore::repatch`]) refuses a file that changed since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl Fingerprint {
    pub(crate) fn of(path: &std::path::Path) -> Result<Fingerprint, Error> {
        let meta = std::fs::metadata(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Fingerprint {
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }
}

//! Weights on a device in the dtype they are held in there ([`DeviceTensor`]), made from host
//! bytes and turned into the compute dtype when fetched.
//!
//! The rule for each dtype is [`DeviceRule`]: kept (f32, f16, bf16), widened to f32 on the
//! host (backends without half types), or fp8 bytes packed four to an `i32` word and decoded on
//! the device through a 256-entry table.

use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{
    AllocationProperty, Bytes, DType as BurnDType, ElementConversion, Int, Tensor, TensorData,
};

use crate::dtype::DType;
use crate::home::{ComputeDtype, DeviceForm, DeviceRule};
use crate::runtime::decode::{fp8_table, to_f32};
use crate::runtime::host::HostBytes;

/// A weight on a device (the compute device or a GPU donor), flattened.
#[derive(Debug, Clone)]
pub(crate) enum DeviceTensor<B: Backend> {
    /// A float tensor in the dtype it is held in (f32, f16 or bf16).
    Float(Tensor<B, 1>),
    /// fp8 bytes packed four to an `i32` word (little-endian: element `4i + k` is byte `k`
    /// of word `i`), `numel` elements of `dtype`.
    Packed {
        words: Tensor<B, 1, Int>,
        dtype: DType,
        numel: usize,
    },
}

impl<B: Backend> DeviceTensor<B> {
    /// Bytes it occupies on its device.
    pub(crate) fn bytes(&self) -> u64 {
        match self {
            DeviceTensor::Float(t) => t.shape().num_elements() as u64 * t.dtype().size() as u64,
            DeviceTensor::Packed { words, .. } => 4 * words.shape().num_elements() as u64,
        }
    }

    /// Its Burn device.
    pub(crate) fn device(&self) -> B::Device {
        match self {
            DeviceTensor::Float(t) => t.device(),
            DeviceTensor::Packed { words, .. } => words.device(),
        }
    }

    /// The same data on `device` (Burn's device-to-device copy).
    pub(crate) fn to_device(&self, device: &B::Device) -> DeviceTensor<B> {
        match self {
            DeviceTensor::Float(t) => DeviceTensor::Float(t.clone().to_device(device)),
            DeviceTensor::Packed {
                words,
                dtype,
                numel,
            } => DeviceTensor::Packed {
                words: words.clone().to_device(device),
                dtype: *dtype,
                numel: *numel,
            },
        }
    }

    /// Its data read back to the host, in the form it is held in.
    pub(crate) fn into_data(self) -> Staged {
        match self {
            DeviceTensor::Float(t) => Staged::Float(t.into_data()),
            DeviceTensor::Packed {
                words,
                dtype,
                numel,
            } => Staged::Packed {
                words: words.into_data(),
                dtype,
                numel,
            },
        }
    }

    /// The weight in the compute dtype, on its device: a cast (or fp8 decoding) when its
    /// dtype differs, the tensor itself when not.
    pub(crate) fn materialize(&self, compute: ComputeDtype) -> Tensor<B, 1> {
        let target = burn_dtype(compute.dtype());
        let t = match self {
            DeviceTensor::Float(t) => t.clone(),
            DeviceTensor::Packed {
                words,
                dtype,
                numel,
            } => decode_packed(words, *dtype, *numel),
        };
        if t.dtype() == target {
            t
        } else {
            t.cast(target)
        }
    }
}

/// Host data ready to upload, in the form the device will hold it in.
#[derive(Debug)]
pub(crate) enum Staged {
    /// A float tensor's data (f32, f16 or bf16).
    Float(TensorData),
    /// Packed fp8 words.
    Packed {
        words: TensorData,
        dtype: DType,
        numel: usize,
    },
}

impl Staged {
    /// Host memory this staging allocated (views of mapped or owned host bytes allocate
    /// nothing).
    pub(crate) fn allocated(&self, from: &HostBytes) -> u64 {
        let data = match self {
            Staged::Float(d) | Staged::Packed { words: d, .. } => d,
        };
        let shared = data.as_bytes().as_ptr() == from.as_slice().as_ptr();
        if shared { 0 } else { data.bytes.len() as u64 }
    }

    /// Uploads to `device` (enqueued on the calling thread).
    pub(crate) fn upload<B: Backend>(self, device: &B::Device) -> DeviceTensor<B> {
        match self {
            Staged::Float(data) => {
                let dtype = data.dtype;
                DeviceTensor::Float(Tensor::from_data(data, (device, dtype)))
            }
            Staged::Packed {
                words,
                dtype,
                numel,
            } => DeviceTensor::Packed {
                words: Tensor::from_data(words, (device, BurnDType::I32)),
                dtype,
                numel,
            },
        }
    }
}

/// Stages `numel` elements of `dtype` held in `host` for a device whose rule is `rule`: a view
/// of the host bytes when the device holds them as they are and they are aligned for it, a
/// widened or padded copy otherwise.
pub(crate) fn stage_host(
    rule: &DeviceRule,
    host: &HostBytes,
    dtype: DType,
    numel: usize,
) -> Staged {
    let bytes = host.as_slice();
    match rule.form(dtype) {
        DeviceForm::Native => {
            let dt = burn_dtype(dtype);
            Staged::Float(TensorData::from_bytes(
                view(host, dtype.size() as usize),
                [numel],
                dt,
            ))
        }
        DeviceForm::F32 => {
            // Loading checked that the dtype decodes and the length is whole elements.
            let values = to_f32(dtype, bytes).unwrap_or_default();
            Staged::Float(TensorData::new(values, [numel]))
        }
        DeviceForm::PackedBytes => {
            let words = numel.div_ceil(4);
            let data = if numel.is_multiple_of(4) {
                view(host, 4)
            } else {
                let mut padded = bytes.to_vec();
                padded.resize(4 * words, 0);
                Bytes::from_bytes_vec(padded)
            };
            Staged::Packed {
                words: TensorData::from_bytes(data, [words], BurnDType::I32),
                dtype,
                numel,
            }
        }
    }
}

/// The host bytes as Burn bytes without a copy when their address is aligned to `align`
/// (mapped files are read on demand: the pages are touched here, on the staging thread, so the
/// upload does not fault them in), else a copy.
fn view(host: &HostBytes, align: usize) -> Bytes {
    let slice = host.as_slice();
    if !(slice.as_ptr() as usize).is_multiple_of(align) {
        return Bytes::from_bytes_vec(slice.to_vec());
    }
    touch(slice);
    let owner = HostView(host.clone());
    Bytes::from_shared(bytes::Bytes::from_owner(owner), AllocationProperty::File)
}

/// Reads one byte per page so the pages of a mapped range are resident.
fn touch(bytes: &[u8]) {
    let mut sum = 0u8;
    for b in bytes.iter().step_by(4096) {
        sum = sum.wrapping_add(*b);
    }
    std::hint::black_box(sum);
}

/// Host bytes kept alive while Burn reads them.
struct HostView(HostBytes);

impl AsRef<[u8]> for HostView {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

/// Makes a device tensor from `bytes` of `dtype` (the host dtype), as `rule` holds it.
pub(crate) fn from_bytes<B: Backend>(
    rule: &DeviceRule,
    bytes: &[u8],
    dtype: DType,
    numel: usize,
    device: &B::Device,
) -> DeviceTensor<B> {
    let host = HostBytes::Owned(Arc::from(bytes));
    stage_host(rule, &host, dtype, numel).upload(device)
}

/// Decodes packed fp8 words to f32 on their device: each byte indexes the dtype's table.
fn decode_packed<B: Backend>(
    words: &Tensor<B, 1, Int>,
    dtype: DType,
    numel: usize,
) -> Tensor<B, 1> {
    let device = words.device();
    let table = Tensor::<B, 1>::from_data(
        TensorData::new(fp8_table(dtype).to_vec(), [256]),
        (&device, BurnDType::F32),
    );
    let n = words.shape().num_elements();
    let bytes: Vec<Tensor<B, 1, Int>> = (0..4)
        .map(|k| {
            words
                .clone()
                .bitwise_right_shift_scalar((8 * k).elem())
                .bitwise_and_scalar(255.elem())
        })
        .collect();
    let index = Tensor::stack::<2>(bytes, 1)
        .reshape([4 * n])
        .slice(0..numel);
    table.select(0, index)
}

/// Burn's dtype for a float [`DType`] held on a device.
pub(crate) fn burn_dtype(dtype: DType) -> BurnDType {
    match dtype {
        DType::F16 => BurnDType::F16,
        DType::BF16 => BurnDType::BF16,
        DType::F64 => BurnDType::F64,
        _ => BurnDType::F32,
    }
}

/// How backend `B` holds weights on `device`: f16 and bf16 as they are where the device
/// computes in them (fp8 then packed), every weight as f32 otherwise (ndarray).
pub fn device_rule<B: Backend>(device: &B::Device) -> DeviceRule {
    let native = |d: BurnDType| {
        if B::supports_dtype(device, d) {
            DeviceForm::Native
        } else {
            DeviceForm::F32
        }
    };
    let (f16, bf16) = (native(BurnDType::F16), native(BurnDType::BF16));
    let gpu = f16 == DeviceForm::Native || bf16 == DeviceForm::Native;
    DeviceRule {
        f16,
        bf16,
        fp8: if gpu && B::supports_dtype(device, BurnDType::I32) {
            DeviceForm::PackedBytes
        } else {
            DeviceForm::F32
        },
    }
}

/// Whether `device` can compute in `dtype`.
pub fn supports_compute<B: Backend>(device: &B::Device, dtype: ComputeDtype) -> bool {
    B::supports_dtype(device, burn_dtype(dtype.dtype()))
}

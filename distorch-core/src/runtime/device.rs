//! Weights on a device in the dtype they are held in there ([`DeviceTensor`]), made from host
//! bytes and turned into the compute dtype when fetched.
//!
//! The rule for each dtype is [`DeviceRule`]: kept (f32, f16, bf16), widened to f32 on the
//! host (backends without half types), or bytes packed four to an `i32` word and decoded on
//! the device: fp8 through a 256-entry table, GGUF blocks by `dequant.rs`.

use std::sync::OnceLock;

use burn::tensor::backend::Backend;
use burn::tensor::{
    AllocationProperty, Bytes, DType as BurnDType, ElementConversion, Int, Tensor, TensorData,
};

use crate::dtype::DType;
use crate::home::{ComputeDtype, DeviceForm, DeviceRule};
use crate::runtime::decode::{fp8_table, to_f32};
use crate::runtime::dequant::{QuantTables, dequantize};
use crate::runtime::host::HostBytes;

/// A weight on a device (the compute device or a GPU donor), flattened.
#[derive(Debug, Clone)]
pub(crate) enum DeviceTensor<B: Backend> {
    /// A float tensor in the dtype it is held in (f32, f16 or bf16).
    Float(Tensor<B, 1>),
    /// fp8 or GGUF block bytes packed four to an `i32` word (little-endian: byte `4i + k` is
    /// byte `k` of word `i`), `numel` elements of `dtype`.
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

    /// The weight in the compute dtype, on the compute device (where `tables` live): a cast
    /// (or fp8 decoding) when its dtype differs, the tensor itself when not.
    pub(crate) fn materialize(
        &self,
        compute: ComputeDtype,
        tables: &DecodeTables<B>,
    ) -> Tensor<B, 1> {
        let target = burn_dtype(compute.dtype());
        let t = match self {
            DeviceTensor::Float(t) => t.clone(),
            DeviceTensor::Packed {
                words,
                dtype,
                numel,
            } if dtype.is_quantized() => dequantize(words, *dtype, *numel, &tables.quant)
                .unwrap_or_else(|| Tensor::zeros([*numel], &words.device())),
            DeviceTensor::Packed {
                words,
                dtype,
                numel,
            } => decode_packed(words, &tables.get(*dtype), *numel),
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

/// Where staged bytes come from: a host home (mapped or owned, shared without a copy when
/// the device holds them as they are), or a transient buffer (always copied).
#[derive(Clone, Copy)]
pub(crate) enum Source<'a> {
    /// A host home's bytes.
    Home(&'a HostBytes),
    /// Bytes that do not outlive the call (the loader's read buffer).
    Transient(&'a [u8]),
}

impl Source<'_> {
    fn slice(&self) -> &[u8] {
        match self {
            Source::Home(h) => h.as_slice(),
            Source::Transient(b) => b,
        }
    }

    /// The bytes as Burn bytes: a view of a host home when its address is aligned to
    /// `align` (mapped pages are touched here, on the staging thread, so the upload does not
    /// fault them in), else a copy; and the host bytes allocated.
    fn bytes(&self, align: usize) -> (Bytes, u64) {
        match self {
            Source::Home(h) if (h.as_slice().as_ptr() as usize).is_multiple_of(align) => {
                touch(h.as_slice());
                let owner = HostView((*h).clone());
                let view = bytes::Bytes::from_owner(owner);
                (Bytes::from_shared(view, AllocationProperty::File), 0)
            }
            _ => {
                let copy = self.slice().to_vec();
                let n = copy.len() as u64;
                (Bytes::from_bytes_vec(copy), n)
            }
        }
    }
}

/// Stages `numel` elements of `dtype` for a device whose rule is `rule`, in the form the
/// device holds them: as they are (a view when the source allows), widened to f32, or fp8
/// packed into words (padded by a copy when `numel` is not a multiple of four). Returns the
/// host bytes staging allocated.
pub(crate) fn stage(
    rule: &DeviceRule,
    source: Source<'_>,
    dtype: DType,
    numel: usize,
) -> (Staged, u64) {
    match rule.form(dtype) {
        DeviceForm::Native => {
            let (bytes, allocated) = source.bytes(dtype.size() as usize);
            let data = TensorData::from_bytes(bytes, [numel], burn_dtype(dtype));
            (Staged::Float(data), allocated)
        }
        DeviceForm::F32 => {
            // Loading checked that the dtype decodes and the length is whole elements.
            let values = to_f32(dtype, source.slice()).unwrap_or_default();
            let allocated = 4 * values.len() as u64;
            (Staged::Float(TensorData::new(values, [numel])), allocated)
        }
        DeviceForm::PackedBytes => {
            let len = source.slice().len();
            let words = len.div_ceil(4);
            let (bytes, allocated) = if len.is_multiple_of(4) {
                source.bytes(4)
            } else {
                let mut padded = source.slice().to_vec();
                padded.resize(4 * words, 0);
                (Bytes::from_bytes_vec(padded), 4 * words as u64)
            };
            let words_data = TensorData::from_bytes(bytes, [words], BurnDType::I32);
            let staged = Staged::Packed {
                words: words_data,
                dtype,
                numel,
            };
            (staged, allocated)
        }
    }
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

/// Places `numel` elements of `dtype` from `source` on `device`, as `rule` holds them.
pub(crate) fn place<B: Backend>(
    rule: &DeviceRule,
    source: Source<'_>,
    dtype: DType,
    numel: usize,
    device: &B::Device,
) -> DeviceTensor<B> {
    stage(rule, source, dtype, numel).0.upload(device)
}

/// The fp8 and GGUF decoding tables on the compute device, uploaded once per store when first
/// needed.
#[derive(Debug, Clone)]
pub(crate) struct DecodeTables<B: Backend> {
    device: B::Device,
    e4m3: OnceLock<Tensor<B, 1>>,
    e5m2: OnceLock<Tensor<B, 1>>,
    quant: QuantTables<B>,
}

impl<B: Backend> DecodeTables<B> {
    /// Tables for `device` (nothing uploaded yet).
    pub(crate) fn new(device: B::Device) -> DecodeTables<B> {
        DecodeTables {
            quant: QuantTables::new(device.clone()),
            device,
            e4m3: OnceLock::new(),
            e5m2: OnceLock::new(),
        }
    }

    /// The 256 values of `dtype` on the device.
    fn get(&self, dtype: DType) -> Tensor<B, 1> {
        let cell = if dtype == DType::F8E5M2 {
            &self.e5m2
        } else {
            &self.e4m3
        };
        cell.get_or_init(|| {
            let values = TensorData::new(fp8_table(dtype).to_vec(), [256]);
            Tensor::from_data(values, (&self.device, BurnDType::F32))
        })
        .clone()
    }
}

/// Decodes packed fp8 words to f32 on their device: each byte indexes the dtype's `table`.
fn decode_packed<B: Backend>(
    words: &Tensor<B, 1, Int>,
    table: &Tensor<B, 1>,
    numel: usize,
) -> Tensor<B, 1> {
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
    table.clone().select(0, index)
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
/// computes in them (fp8 and GGUF blocks then packed), every weight as f32 otherwise
/// (ndarray).
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
    let packed = if gpu && B::supports_dtype(device, BurnDType::I32) {
        DeviceForm::PackedBytes
    } else {
        DeviceForm::F32
    };
    DeviceRule {
        f16,
        bf16,
        fp8: packed,
        quantized: packed,
    }
}

/// Whether `device` can compute in `dtype`.
pub fn supports_compute<B: Backend>(device: &B::Device, dtype: ComputeDtype) -> bool {
    B::supports_dtype(device, compute_burn_dtype(dtype))
}

/// Burn's dtype for a compute dtype (what fetched weights have).
pub fn compute_burn_dtype(dtype: ComputeDtype) -> BurnDType {
    burn_dtype(dtype.dtype())
}

/// `t` on `device`: itself when already there, else copied through host memory. Burn 0.21
/// has no device-to-device copy on wgpu (CubeCL's `send` is unimplemented there and
/// `Tensor::to_device` between two wgpu devices panics), so activations crossing devices —
/// a text encoder's output on `cuda:1` for a UNet on `cuda:0` — take this path: a read back
/// and an upload, small next to the weights the streamer moves.
pub fn move_to<B: Backend, const D: usize>(
    t: burn::tensor::Tensor<B, D>,
    device: &B::Device,
) -> burn::tensor::Tensor<B, D> {
    if t.device() == *device {
        t
    } else {
        burn::tensor::Tensor::from_data(t.into_data(), device)
    }
}

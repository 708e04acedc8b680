//! GGUF blocks dequantized on the compute device with Burn's integer and bit tensor ops, from
//! the same layouts the host dequantizes with (`crate::quant`), so a quantized weight crosses
//! the bus and stays resident as its file bytes.
//!
//! The packed words are split into bytes (`[blocks, block bytes]`), each bit field is a
//! column gather, a shift and a mask (index tensors cached per type on the device), f16
//! scales are looked up in a 65,536-entry table, and the value formula is applied in gguf-py's
//! operation order. Transient device memory is a few integer tensors of the output's size.

use std::sync::{Arc, Mutex, OnceLock};

use burn::tensor::backend::Backend;
use burn::tensor::{DType as BurnDType, ElementConversion, Int, Tensor, TensorData};

use crate::dtype::DType;
use crate::quant::{Field, Layout, Min, Part, layout};

/// One bit field's per-item index tensors on the device.
#[derive(Debug, Clone)]
struct DevicePart<B: Backend> {
    byte: Tensor<B, 1, Int>,
    shift: Tensor<B, 2, Int>,
    mask: Tensor<B, 2, Int>,
    lshift: u8,
}

#[derive(Debug, Clone)]
struct DeviceField<B: Backend> {
    parts: Vec<DevicePart<B>>,
    signed8: bool,
    bias: i32,
}

/// A type's layout with its index tensors on the device.
#[derive(Debug, Clone)]
struct DeviceLayout<B: Backend> {
    layout: &'static Layout,
    q: DeviceField<B>,
    scales: Option<DeviceField<B>>,
    mins: Option<DeviceField<B>>,
    d: Tensor<B, 1, Int>,
    min_at: Option<Tensor<B, 1, Int>>,
}

/// The tables dequantization needs on one device, uploaded on first use.
#[derive(Debug, Clone)]
pub(crate) struct QuantTables<B: Backend> {
    device: B::Device,
    f16: OnceLock<Tensor<B, 1>>,
    layouts: Arc<Mutex<LayoutCache<B>>>,
}

/// The device layouts uploaded so far, by type.
type LayoutCache<B> = Vec<(DType, Arc<DeviceLayout<B>>)>;

fn ints<B: Backend>(values: Vec<i32>, device: &B::Device) -> Tensor<B, 1, Int> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), (device, BurnDType::I32))
}

impl<B: Backend> QuantTables<B> {
    pub(crate) fn new(device: B::Device) -> QuantTables<B> {
        QuantTables {
            device,
            f16: OnceLock::new(),
            layouts: Arc::default(),
        }
    }

    fn f16(&self) -> Tensor<B, 1> {
        self.f16
            .get_or_init(|| {
                let table: Vec<f32> = (0..=u16::MAX)
                    .map(|b| half::f16::from_bits(b).to_f32())
                    .collect();
                Tensor::from_data(
                    TensorData::new(table, [65536]),
                    (&self.device, BurnDType::F32),
                )
            })
            .clone()
    }

    fn part(&self, p: &Part) -> DevicePart<B> {
        let n = p.byte.len();
        let row = |v: &[u8]| {
            ints::<B>(v.iter().map(|&x| i32::from(x)).collect(), &self.device).reshape([1, n])
        };
        DevicePart {
            byte: ints(p.byte.iter().map(|&b| i32::from(b)).collect(), &self.device),
            shift: row(&p.shift),
            mask: row(&p.mask),
            lshift: p.lshift,
        }
    }

    fn field(&self, f: &Field) -> DeviceField<B> {
        DeviceField {
            parts: f.parts.iter().map(|p| self.part(p)).collect(),
            signed8: f.signed8,
            bias: f.bias,
        }
    }

    fn layout(&self, dtype: DType) -> Option<Arc<DeviceLayout<B>>> {
        let mut cache = self.layouts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, l)) = cache.iter().find(|(d, _)| *d == dtype) {
            return Some(Arc::clone(l));
        }
        let l = layout(dtype)?;
        let pair = |at: usize| ints::<B>(vec![at as i32, at as i32 + 1], &self.device);
        let device = Arc::new(DeviceLayout {
            layout: l,
            q: self.field(&l.q),
            scales: l.scales.as_ref().map(|f| self.field(f)),
            mins: match &l.min {
                Min::Scaled(_, f) => Some(self.field(f)),
                _ => None,
            },
            d: pair(l.d),
            min_at: match l.min {
                Min::Plain(at) | Min::Scaled(at, _) => Some(pair(at)),
                Min::None => None,
            },
        });
        cache.push((dtype, Arc::clone(&device)));
        Some(device)
    }
}

/// The f16 at the byte pair `at` of every block, as f32: `[blocks, 1]`.
fn f16_column<B: Backend>(
    bytes: &Tensor<B, 2, Int>,
    at: &Tensor<B, 1, Int>,
    table: &Tensor<B, 1>,
) -> Tensor<B, 2> {
    let pair = bytes.clone().select(1, at.clone());
    let [blocks, _] = pair.dims();
    let lo = pair.clone().slice([0..blocks, 0..1]);
    let hi = pair
        .slice([0..blocks, 1..2])
        .bitwise_left_shift_scalar(8.elem());
    let bits = (lo + hi).reshape([blocks]);
    table.clone().select(0, bits).reshape([blocks, 1])
}

/// A field's integers for every block: `[blocks, items]`, as f32.
fn field_values<B: Backend>(bytes: &Tensor<B, 2, Int>, f: &DeviceField<B>) -> Tensor<B, 2> {
    let mut acc: Option<Tensor<B, 2, Int>> = None;
    for p in &f.parts {
        let v = bytes
            .clone()
            .select(1, p.byte.clone())
            .bitwise_right_shift(p.shift.clone())
            .bitwise_and(p.mask.clone());
        let v = if p.lshift > 0 {
            v.bitwise_left_shift_scalar(i32::from(p.lshift).elem())
        } else {
            v
        };
        acc = Some(match acc {
            Some(a) => a.bitwise_or(v),
            None => v,
        });
    }
    let Some(mut v) = acc else {
        return Tensor::zeros([bytes.dims()[0], 0], &bytes.device());
    };
    if f.signed8 {
        // (v ^ 0x80) - 0x80 sign-extends a byte, staying in the words' integer dtype.
        v = v.bitwise_xor_scalar(128.elem()).sub_scalar(128);
    }
    if f.bias != 0 {
        v = v.sub_scalar(f.bias);
    }
    v.float()
}

/// Splits packed little-endian words into one integer per byte, `[blocks, block bytes]`.
fn block_bytes<B: Backend>(
    words: &Tensor<B, 1, Int>,
    blocks: usize,
    per: usize,
) -> Tensor<B, 2, Int> {
    let n = words.shape().num_elements();
    let bytes: Vec<Tensor<B, 1, Int>> = (0..4)
        .map(|k| {
            words
                .clone()
                .bitwise_right_shift_scalar((8 * k).elem())
                .bitwise_and_scalar(255.elem())
        })
        .collect();
    Tensor::stack::<2>(bytes, 1)
        .reshape([4 * n])
        .slice(0..blocks * per)
        .reshape([blocks, per])
}

/// Dequantizes `numel` elements of quantized `dtype` packed in `words` (the file's bytes,
/// four to a word) to f32 on their device. `None` for a type without a layout.
pub(crate) fn dequantize<B: Backend>(
    words: &Tensor<B, 1, Int>,
    dtype: DType,
    numel: usize,
    tables: &QuantTables<B>,
) -> Option<Tensor<B, 1>> {
    let dl = tables.layout(dtype)?;
    let l = dl.layout;
    let blocks = numel / l.elems;
    let bytes = block_bytes(words, blocks, l.bytes);
    let table = tables.f16();
    let d = f16_column(&bytes, &dl.d, &table);
    let q = field_values(&bytes, &dl.q);
    let out = match (&dl.scales, &dl.min_at) {
        (None, None) => d * q,
        (None, Some(m)) => d * q + f16_column(&bytes, m, &table),
        (Some(scales), min) => {
            let subs = l.elems / l.sub;
            let dl3 = (d * field_values(&bytes, scales)).reshape([blocks, subs, 1]);
            let v = dl3 * q.reshape([blocks, subs, l.sub]);
            match (min, &dl.mins) {
                (Some(at), Some(mins)) => {
                    let dmin = f16_column(&bytes, at, &table);
                    v - (dmin * field_values(&bytes, mins)).reshape([blocks, subs, 1])
                }
                _ => v,
            }
            .reshape([blocks, l.elems])
        }
    };
    Some(out.reshape([numel]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    /// Device dequantization equals the host's, bit for bit, for every type (random blocks
    /// with finite f16 scales; the host is checked against gguf-py in `tests/gguf.rs`).
    #[test]
    fn device_dequantization_equals_the_hosts() {
        let device = Default::default();
        let tables = QuantTables::<NdArray>::new(device);
        let mut seed = 0x9e37_79b9_u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for dtype in DType::QUANTIZED {
            let l = layout(dtype).unwrap();
            let blocks = 5;
            let mut raw: Vec<u8> = (0..blocks * l.bytes).map(|_| next() as u8).collect();
            for b in 0..blocks {
                let scale_at = |at: usize, raw: &mut Vec<u8>, v: f32| {
                    raw[b * l.bytes + at..b * l.bytes + at + 2]
                        .copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
                };
                let v = (next() % 2000) as f32 / 1000.0 - 1.0;
                scale_at(l.d, &mut raw, v);
                if let Min::Plain(at) | Min::Scaled(at, _) = l.min {
                    scale_at(at, &mut raw, -v / 3.0);
                }
            }
            let numel = blocks * l.elems;
            let mut host = vec![0f32; numel];
            crate::quant::dequantize(dtype, &raw, &mut host).unwrap();
            raw.resize(raw.len().div_ceil(4) * 4, 0);
            let words: Vec<i32> = raw
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let words = ints::<NdArray>(words, &Default::default());
            let got = dequantize(&words, dtype, numel, &tables)
                .unwrap()
                .into_data()
                .into_vec::<f32>()
                .unwrap();
            for (i, (g, h)) in got.iter().zip(&host).enumerate() {
                assert_eq!(g.to_bits(), h.to_bits(), "{dtype} element {i}: {g} vs {h}");
            }
        }
    }
}

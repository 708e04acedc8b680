//! GGML block quantization: each type's block layout described once (`Layout`) and
//! dequantized from it on the host ([`dequantize`], rayon-parallel); the runtime's device
//! dequantization reads the same layouts.
//!
//! A block holds an f16 scale `d`, maybe a minimum, maybe sub-block scales and mins, and
//! small integers `q`. Each integer (an element's `q`, a sub-block's scale or min) is a few
//! bit fields of the block's bytes (`Field`): `(byte[i] >> shift) & mask`, shifted left and
//! OR-ed together, sign-extended or offset. The value of element `e` in sub-block `s` is, in
//! gguf-py's `gguf.quants.dequantize` operation order (so that the results are bit-exact):
//!
//! | types | value |
//! |---|---|
//! | Q4_0, Q5_0, Q8_0 | `d * q` |
//! | Q4_1, Q5_1 | `d * q + m` |
//! | Q3_K, Q6_K | `(d * sc[s]) * q` |
//! | Q2_K, Q4_K, Q5_K | `(d * sc[s]) * q - (dmin * mn[s])` |

use std::sync::LazyLock;

use crate::dtype::DType;

/// One bit field of every item (element or sub-block): `((byte[i] >> shift[i]) & mask[i]) <<
/// lshift`.
#[derive(Debug)]
pub(crate) struct Part {
    /// Byte offset within the block, per item.
    pub(crate) byte: Vec<u16>,
    /// Right shift, per item.
    pub(crate) shift: Vec<u8>,
    /// Mask after the shift, per item.
    pub(crate) mask: Vec<u8>,
    /// Left shift of the masked bits.
    pub(crate) lshift: u8,
}

impl Part {
    fn new(items: usize, lshift: u8, f: impl Fn(usize) -> (usize, u8, u8)) -> Part {
        let (mut byte, mut shift, mut mask) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..items {
            let (b, s, m) = f(i);
            byte.push(b as u16);
            shift.push(s);
            mask.push(m);
        }
        Part {
            byte,
            shift,
            mask,
            lshift,
        }
    }
}

/// An integer per item: its parts OR-ed, sign-extended from 8 bits when `signed8`, minus
/// `bias`.
#[derive(Debug)]
pub(crate) struct Field {
    pub(crate) parts: Vec<Part>,
    pub(crate) signed8: bool,
    pub(crate) bias: i32,
}

impl Field {
    fn eval(&self, block: &[u8], i: usize) -> i32 {
        let mut v = 0u32;
        for p in &self.parts {
            let b = u32::from(block[usize::from(p.byte[i])]);
            v |= ((b >> p.shift[i]) & u32::from(p.mask[i])) << p.lshift;
        }
        let v = if self.signed8 {
            i32::from(v as u8 as i8)
        } else {
            v as i32
        };
        v - self.bias
    }
}

/// How a block's minimum term is formed.
#[derive(Debug)]
pub(crate) enum Min {
    /// None.
    None,
    /// An f16 minimum at this byte offset, added to `d * q`.
    Plain(usize),
    /// `dmin` (an f16 at this offset) times a per-sub-block min, subtracted.
    Scaled(usize, Field),
}

/// A GGML type's block layout.
#[derive(Debug)]
pub(crate) struct Layout {
    /// Elements per block.
    pub(crate) elems: usize,
    /// Bytes per block.
    pub(crate) bytes: usize,
    /// Byte offset of the f16 scale `d`.
    pub(crate) d: usize,
    /// Each element's integer.
    pub(crate) q: Field,
    /// Elements per sub-block (= `elems` without sub-block scales).
    pub(crate) sub: usize,
    /// Each sub-block's scale, when the type has them.
    pub(crate) scales: Option<Field>,
    /// The minimum term.
    pub(crate) min: Min,
}

fn field(parts: Vec<Part>, signed8: bool, bias: i32) -> Field {
    Field {
        parts,
        signed8,
        bias,
    }
}

/// The low then high nibbles of 16 bytes at `base`: the 32 4-bit values of a legacy block.
fn nibbles(base: usize) -> Part {
    Part::new(32, 0, |e| (base + e % 16, 4 * (e / 16) as u8, 0xF))
}

/// Bit `e` of the 32-bit word at `base`, as bit 4 of element `e`.
fn fifth_bits(base: usize) -> Part {
    Part::new(32, 4, |e| (base + e / 8, (e % 8) as u8, 1))
}

/// Q4_K and Q5_K's 6-bit sub-block scales (`mins == false`) or mins packed in 12 bytes at
/// `base` (gguf-py's `Q4_K.get_scale_min`).
fn k4_scales(base: usize, mins: bool) -> Field {
    let (lo, hi) = if mins { (base + 4, 4) } else { (base, 0) };
    let low = Part::new(8, 0, |s| {
        if s < 4 {
            (lo + s, 0, 0x3F)
        } else {
            (base + 8 + s - 4, hi, 0xF)
        }
    });
    let high = Part::new(8, 4, |s| {
        if s < 4 {
            (base, 0, 0)
        } else {
            (lo + s - 4, 6, 3)
        }
    });
    field(vec![low, high], false, 0)
}

fn build(dtype: DType) -> Option<Layout> {
    let legacy = |bytes, d, min, q| Layout {
        elems: 32,
        bytes,
        d,
        q,
        sub: 32,
        scales: None,
        min,
    };
    Some(match dtype {
        DType::Q4_0 => legacy(18, 0, Min::None, field(vec![nibbles(2)], false, 8)),
        DType::Q4_1 => legacy(20, 0, Min::Plain(2), field(vec![nibbles(4)], false, 0)),
        DType::Q5_0 => legacy(
            22,
            0,
            Min::None,
            field(vec![nibbles(6), fifth_bits(2)], false, 16),
        ),
        DType::Q5_1 => legacy(
            24,
            0,
            Min::Plain(2),
            field(vec![nibbles(8), fifth_bits(4)], false, 0),
        ),
        DType::Q8_0 => legacy(
            34,
            0,
            Min::None,
            field(vec![Part::new(32, 0, |e| (2 + e, 0, 0xFF))], true, 0),
        ),
        DType::Q2K => Layout {
            elems: 256,
            bytes: 84,
            d: 80,
            q: field(
                vec![Part::new(256, 0, |e| {
                    (16 + e / 128 * 32 + e % 32, 2 * (e / 32 % 4) as u8, 3)
                })],
                false,
                0,
            ),
            sub: 16,
            scales: Some(field(vec![Part::new(16, 0, |s| (s, 0, 0xF))], false, 0)),
            min: Min::Scaled(82, field(vec![Part::new(16, 0, |s| (s, 4, 0xF))], false, 0)),
        },
        DType::Q3K => Layout {
            elems: 256,
            bytes: 110,
            d: 108,
            q: field(
                vec![
                    Part::new(256, 0, |e| {
                        (32 + e / 128 * 32 + e % 32, 2 * (e / 32 % 4) as u8, 3)
                    }),
                    Part::new(256, 2, |e| (e % 32, (e / 32) as u8, 1)),
                ],
                false,
                4,
            ),
            sub: 16,
            scales: Some(field(
                vec![
                    Part::new(16, 0, |s| (96 + s % 8, 4 * (s / 8) as u8, 0xF)),
                    Part::new(16, 4, |s| (104 + s % 4, 2 * (s / 4) as u8, 3)),
                ],
                false,
                32,
            )),
            min: Min::None,
        },
        DType::Q4K | DType::Q5K => {
            let five = dtype == DType::Q5K;
            let qs = if five { 48 } else { 16 };
            let mut parts = vec![Part::new(256, 0, |e| {
                (qs + e / 64 * 32 + e % 32, 4 * (e / 32 % 2) as u8, 0xF)
            })];
            if five {
                parts.push(Part::new(256, 4, |e| (16 + e % 32, (e / 32) as u8, 1)));
            }
            Layout {
                elems: 256,
                bytes: if five { 176 } else { 144 },
                d: 0,
                q: field(parts, false, 0),
                sub: 32,
                scales: Some(k4_scales(4, false)),
                min: Min::Scaled(2, k4_scales(4, true)),
            }
        }
        DType::Q6K => Layout {
            elems: 256,
            bytes: 210,
            d: 208,
            q: field(
                vec![
                    Part::new(256, 0, |e| {
                        (e / 128 * 64 + e % 64, 4 * (e / 64 % 2) as u8, 0xF)
                    }),
                    Part::new(256, 4, |e| {
                        (128 + e / 128 * 32 + e % 32, 2 * (e / 32 % 4) as u8, 3)
                    }),
                ],
                false,
                32,
            ),
            sub: 16,
            scales: Some(field(
                vec![Part::new(16, 0, |s| (192 + s, 0, 0xFF))],
                true,
                0,
            )),
            min: Min::None,
        },
        _ => return None,
    })
}

static LAYOUTS: LazyLock<Vec<(DType, Layout)>> = LazyLock::new(|| {
    DType::QUANTIZED
        .into_iter()
        .filter_map(|d| Some((d, build(d)?)))
        .collect()
});

/// The block layout of a quantized `dtype`.
pub(crate) fn layout(dtype: DType) -> Option<&'static Layout> {
    LAYOUTS.iter().find(|(d, _)| *d == dtype).map(|(_, l)| l)
}

fn f16_at(block: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

impl Layout {
    /// Dequantizes one block into `out` (`elems` values); `scratch` holds two sub-block
    /// terms per sub-block.
    fn block(&self, block: &[u8], out: &mut [f32], scratch: &mut [f32]) {
        let d = f16_at(block, self.d);
        match (&self.scales, &self.min) {
            (None, Min::None) => {
                for (e, o) in out.iter_mut().enumerate() {
                    *o = d * self.q.eval(block, e) as f32;
                }
            }
            (None, Min::Plain(m)) => {
                let m = f16_at(block, *m);
                for (e, o) in out.iter_mut().enumerate() {
                    *o = d * self.q.eval(block, e) as f32 + m;
                }
            }
            (Some(scales), min) => {
                let subs = self.elems / self.sub;
                let (dl, ml) = scratch.split_at_mut(subs);
                for s in 0..subs {
                    dl[s] = d * scales.eval(block, s) as f32;
                    if let Min::Scaled(at, mins) = min {
                        ml[s] = f16_at(block, *at) * mins.eval(block, s) as f32;
                    }
                }
                let scaled = matches!(min, Min::Scaled(..));
                for (e, o) in out.iter_mut().enumerate() {
                    let s = e / self.sub;
                    let v = dl[s] * self.q.eval(block, e) as f32;
                    *o = if scaled { v - ml[s] } else { v };
                }
            }
            (None, Min::Scaled(..)) => unreachable!("scaled mins come with sub-block scales"),
        }
    }
}

/// Why quantized bytes could not be dequantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    /// The type is not block-quantized.
    #[error("the type is not block-quantized")]
    NotQuantized,
    /// The bytes are not whole blocks, or do not fill `out`.
    #[error("the bytes are not whole blocks filling the output")]
    Ragged,
}

/// Byte offsets, within one block of `dtype`, of its f16 fields: the scale `d`, then the
/// minimum (or `dmin`) where the type has one. Empty for a type that is not quantized. Writers
/// of synthetic blocks (tests, benchmarks) set these to keep the values finite.
pub fn f16_fields(dtype: DType) -> Vec<usize> {
    let Some(l) = layout(dtype) else {
        return Vec::new();
    };
    match l.min {
        Min::None => vec![l.d],
        Min::Plain(at) | Min::Scaled(at, _) => vec![l.d, at],
    }
}

/// Blocks per parallel task.
const TASK_BLOCKS: usize = 512;

/// Dequantizes whole blocks of `dtype` from `bytes` into `out` (one f32 per element),
/// bit-exactly as gguf-py does, spread over rayon's threads.
pub fn dequantize(dtype: DType, bytes: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    use rayon::prelude::*;
    let l = layout(dtype).ok_or(QuantError::NotQuantized)?;
    if !bytes.len().is_multiple_of(l.bytes) || bytes.len() / l.bytes * l.elems != out.len() {
        return Err(QuantError::Ragged);
    }
    let run = |(src, dst): (&[u8], &mut [f32])| {
        let mut scratch = [0f32; 32];
        for (b, o) in src.chunks_exact(l.bytes).zip(dst.chunks_exact_mut(l.elems)) {
            l.block(b, o, &mut scratch);
        }
    };
    let blocks = bytes.len() / l.bytes;
    if blocks <= TASK_BLOCKS {
        run((bytes, out));
    } else {
        bytes
            .par_chunks(TASK_BLOCKS * l.bytes)
            .zip(out.par_chunks_mut(TASK_BLOCKS * l.elems))
            .for_each(run);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_types_block_sizes_and_stay_inside_their_blocks() {
        for dtype in DType::QUANTIZED {
            let l = layout(dtype).unwrap();
            assert_eq!(l.elems as u64, dtype.block_elems(), "{dtype}");
            assert_eq!(l.bytes as u64, dtype.size(), "{dtype}");
            let fields = std::iter::once(&l.q).chain(&l.scales).chain(match &l.min {
                Min::Scaled(_, f) => Some(f),
                _ => None,
            });
            for f in fields {
                for p in &f.parts {
                    assert!(p.byte.iter().all(|&b| usize::from(b) < l.bytes), "{dtype}");
                }
            }
        }
    }

    #[test]
    fn q8_0_is_its_scale_times_signed_bytes() {
        let mut block = half::f16::from_f32(0.5).to_le_bytes().to_vec();
        block.extend((0..32u8).map(|i| i.wrapping_mul(9)));
        let mut out = [0f32; 32];
        dequantize(DType::Q8_0, &block, &mut out).unwrap();
        for i in 0..32 {
            assert_eq!(out[i], 0.5 * f32::from(block[2 + i] as i8));
        }
        assert_eq!(
            dequantize(DType::Q8_0, &block[..33], &mut out),
            Err(QuantError::Ragged)
        );
        assert_eq!(
            dequantize(DType::F16, &block, &mut out),
            Err(QuantError::NotQuantized)
        );
    }
}

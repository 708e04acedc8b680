//! Host-side decoding of stored element types to f32.
//!
//! Used when the compute backend lacks a file's dtype (ndarray has no f16, bf16 or fp8) and
//! for f32 compute: every float dtype safetensors can hold widens to f32 exactly (f64 is
//! rounded to nearest); GGUF's block-quantized types dequantize to f32 (`crate::quant`).

use crate::dtype::DType;
use crate::quant;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// The dtype is not a float type.
    NotFloat,
    /// The byte count is not a multiple of the element size.
    Ragged,
}

/// Decodes little-endian `bytes` of `dtype` to f32.
pub(crate) fn to_f32(dtype: DType, bytes: &[u8]) -> Result<Vec<f32>, DecodeError> {
    let size = dtype.size() as usize;
    if !bytes.len().is_multiple_of(size) {
        return Err(DecodeError::Ragged);
    }
    let mut out = vec![0f32; bytes.len() / size * dtype.block_elems() as usize];
    if dtype.is_quantized() {
        quant::dequantize(dtype, bytes, &mut out).map_err(|_| DecodeError::Ragged)?;
    } else {
        decode_into(dtype, bytes, &mut out)?;
    }
    Ok(out)
}

/// Elements per parallel task: large enough that a task's overhead is noise, small enough
/// that a tensor of a few MiB splits across the cores.
const TASK: usize = 1 << 16;

/// Decodes `bytes` into `out` (one f32 per element), split across the cores (rayon) for
/// large tensors: the decoding and the first touch of `out`'s fresh pages run in parallel.
fn decode_into(dtype: DType, bytes: &[u8], out: &mut [f32]) -> Result<(), DecodeError> {
    use rayon::prelude::*;
    if !matches!(
        dtype,
        DType::F32 | DType::F64 | DType::BF16 | DType::F16 | DType::F8E4M3 | DType::F8E5M2
    ) {
        return Err(DecodeError::NotFloat);
    }
    let size = dtype.size() as usize;
    if out.len() <= TASK {
        decode_run(dtype, bytes, out);
    } else {
        out.par_chunks_mut(TASK)
            .zip(bytes.par_chunks(TASK * size))
            .for_each(|(o, b)| decode_run(dtype, b, o));
    }
    Ok(())
}

/// Decodes one run of elements: a plain copy or `half`'s slice conversion (F16C where the CPU
/// has it) on a byte view of the input when it is aligned for the element type (`bytemuck`,
/// little-endian targets), else element by element from little-endian bytes.
fn decode_run(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    #[cfg(target_endian = "little")]
    match dtype {
        DType::F32 => {
            if let Ok(v) = bytemuck::try_cast_slice::<u8, f32>(bytes) {
                return out.copy_from_slice(v);
            }
        }
        DType::F16 => {
            if let Ok(v) = bytemuck::try_cast_slice::<u8, half::f16>(bytes) {
                return v.convert_to_f32_slice(out);
            }
        }
        DType::BF16 => {
            if let Ok(v) = bytemuck::try_cast_slice::<u8, half::bf16>(bytes) {
                return v.convert_to_f32_slice(out);
            }
        }
        _ => {}
    }
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32;
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
            }
        }
        DType::F16 => {
            const BLOCK: usize = 4096;
            let mut buf = [half::f16::ZERO; BLOCK];
            for (src, dst) in bytes.chunks(2 * BLOCK).zip(out.chunks_mut(BLOCK)) {
                let buf = &mut buf[..dst.len()];
                for (h, c) in buf.iter_mut().zip(src.chunks_exact(2)) {
                    *h = half::f16::from_le_bytes([c[0], c[1]]);
                }
                buf.convert_to_f32_slice(dst);
            }
        }
        _ => {
            let table = fp8_table(dtype);
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = table[usize::from(b)];
            }
        }
    }
}

/// The 256 values of an fp8 dtype (`F8E4M3` or `F8E5M2`), indexed by byte.
pub(crate) fn fp8_table(dtype: DType) -> &'static [f32; 256] {
    if dtype == DType::F8E5M2 { &E5M2 } else { &E4M3 }
}

static E4M3: std::sync::LazyLock<[f32; 256]> =
    std::sync::LazyLock::new(|| std::array::from_fn(|b| f8_e4m3fn(b as u8)));
static E5M2: std::sync::LazyLock<[f32; 256]> =
    std::sync::LazyLock::new(|| std::array::from_fn(|b| f8_e5m2(b as u8)));

/// The index of the first NaN or infinite element of little-endian `bytes` of `dtype`,
/// found from the exponent bits without decoding (block-quantized types are dequantized a
/// stretch at a time).
pub(crate) fn first_non_finite(dtype: DType, bytes: &[u8]) -> Result<Option<usize>, DecodeError> {
    let size = dtype.size() as usize;
    if !bytes.len().is_multiple_of(size) {
        return Err(DecodeError::Ragged);
    }
    if dtype.is_quantized() {
        let per = dtype.block_elems() as usize;
        let mut out = vec![0f32; 4096 * per];
        for (k, chunk) in bytes.chunks(4096 * size).enumerate() {
            let out = &mut out[..chunk.len() / size * per];
            quant::dequantize(dtype, chunk, out).map_err(|_| DecodeError::Ragged)?;
            if let Some(i) = out.iter().position(|v| !v.is_finite()) {
                return Ok(Some(k * 4096 * per + i));
            }
        }
        return Ok(None);
    }
    // Large tensors are scanned a stretch per core; the first bad element overall is kept.
    let elems = bytes.len() / size;
    if elems > TASK {
        use rayon::prelude::*;
        return bytes
            .par_chunks(TASK * size)
            .enumerate()
            .map(|(k, chunk)| first_non_finite(dtype, chunk).map(|f| f.map(|i| k * TASK + i)))
            .find_first(|r| !matches!(r, Ok(None)))
            .unwrap_or(Ok(None));
    }
    Ok(match dtype {
        DType::F32 => find::<4>(bytes, |c| {
            u32::from_le_bytes(c) & 0x7f80_0000 == 0x7f80_0000
        }),
        DType::F64 => find::<8>(bytes, |c| {
            u64::from_le_bytes(c) & 0x7ff0_0000_0000_0000 == 0x7ff0_0000_0000_0000
        }),
        DType::F16 => find::<2>(bytes, |c| u16::from_le_bytes(c) & 0x7c00 == 0x7c00),
        DType::BF16 => find::<2>(bytes, |c| u16::from_le_bytes(c) & 0x7f80 == 0x7f80),
        DType::F8E4M3 => find::<1>(bytes, |c| c[0] & 0x7f == 0x7f),
        DType::F8E5M2 => find::<1>(bytes, |c| c[0] & 0x7c == 0x7c),
        _ => return Err(DecodeError::NotFloat),
    })
}

/// The first element of width `W` for which `bad` holds; scans blocks without branching and
/// looks closer only in a block that has one.
fn find<const W: usize>(bytes: &[u8], bad: impl Fn([u8; W]) -> bool) -> Option<usize> {
    const BLOCK: usize = 1024;
    let elem = |c: &[u8]| <[u8; W]>::try_from(c).unwrap_or([0; W]);
    for (k, block) in bytes.chunks(W * BLOCK).enumerate() {
        if block
            .chunks_exact(W)
            .fold(false, |any, c| any | bad(elem(c)))
        {
            return block
                .chunks_exact(W)
                .position(|c| bad(elem(c)))
                .map(|i| k * BLOCK + i);
        }
    }
    None
}

/// `float8_e4m3fn`: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, S.1111.111
/// is NaN.
fn f8_e4m3fn(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((b >> 3) & 0x0f);
    let man = f32::from(b & 0x07);
    if exp == 0x0f && b & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    }
}

/// `float8_e5m2`: 1 sign, 5 exponent (bias 15), 2 mantissa bits; IEEE-style inf and NaN. It
/// is the top byte of an f16, so it widens through f16 exactly.
fn f8_e5m2(b: u8) -> f32 {
    half::f16::from_bits(u16::from(b) << 8).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Little-endian bytes of `n` values of `dtype` with a varied pattern, behind `skew`
    /// bytes (a misaligned view when `skew` is odd).
    fn pattern(dtype: DType, n: usize, skew: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; skew];
        for i in 0..n {
            let v = ((i * 37 % 1001) as f32 - 500.0) / 63.0;
            match dtype {
                DType::F16 => bytes.extend(half::f16::from_f32(v).to_le_bytes()),
                DType::BF16 => bytes.extend(half::bf16::from_f32(v).to_le_bytes()),
                _ => bytes.extend(v.to_le_bytes()),
            }
        }
        bytes
    }

    /// Each element decoded on its own, by `half`'s and the standard library's scalar
    /// conversions.
    fn one_by_one(dtype: DType, bytes: &[u8]) -> Vec<f32> {
        let w = dtype.size() as usize;
        bytes
            .chunks_exact(w)
            .map(|c| match dtype {
                DType::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
                DType::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
                _ => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            })
            .collect()
    }

    #[test]
    fn parallel_and_byte_view_decoding_equal_the_element_loop() {
        let n = 3 * TASK + 5;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for skew in [0, 1] {
                let bytes = pattern(dtype, n, skew);
                let got = to_f32(dtype, &bytes[skew..]).unwrap();
                let want = one_by_one(dtype, &bytes[skew..]);
                assert_eq!(got.len(), n);
                let first_diff = got
                    .iter()
                    .zip(&want)
                    .position(|(a, b)| a.to_bits() != b.to_bits());
                assert_eq!(first_diff, None, "{dtype} skew {skew}");
            }
        }
    }

    #[test]
    fn the_parallel_scan_reports_the_first_non_finite_element() {
        let n = 4 * TASK;
        let mut bytes = pattern(DType::F32, n, 0);
        let mut set = |i: usize, v: f32| bytes[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        set(3 * TASK + 7, f32::NAN);
        set(TASK + 3, f32::INFINITY);
        assert_eq!(first_non_finite(DType::F32, &bytes), Ok(Some(TASK + 3)));
        let clean = pattern(DType::F16, n, 0);
        assert_eq!(first_non_finite(DType::F16, &clean), Ok(None));
    }

    #[test]
    fn e4m3fn_matches_its_definition() {
        // Values from the OCP FP8 specification's E4M3 table.
        assert_eq!(f8_e4m3fn(0x00), 0.0);
        assert_eq!(f8_e4m3fn(0x38), 1.0);
        assert_eq!(f8_e4m3fn(0xb8), -1.0);
        assert_eq!(f8_e4m3fn(0x7e), 448.0); // largest normal
        assert_eq!(f8_e4m3fn(0x08), 2f32.powi(-6)); // smallest normal
        assert_eq!(f8_e4m3fn(0x01), 2f32.powi(-9)); // smallest subnormal
        assert!(f8_e4m3fn(0x7f).is_nan());
        assert_eq!(f8_e4m3fn(0x78), 256.0); // exponent 15 is finite in the fn variant
    }

    #[test]
    fn e5m2_matches_its_definition() {
        assert_eq!(f8_e5m2(0x3c), 1.0);
        assert_eq!(f8_e5m2(0x7b), 57344.0); // largest normal
        assert_eq!(f8_e5m2(0x7c), f32::INFINITY);
        assert!(f8_e5m2(0x7e).is_nan());
        assert_eq!(f8_e5m2(0x01), 2f32.powi(-16)); // smallest subnormal
    }

    #[test]
    fn block_decoding_matches_the_scalar_definitions_for_every_pattern() {
        let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        let f16: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
        let got = to_f32(DType::F16, &f16).unwrap();
        let got_bf = to_f32(DType::BF16, &f16).unwrap();
        for (i, bits) in (0..=u16::MAX).enumerate() {
            assert!(
                same(got[i], half::f16::from_bits(bits).to_f32()),
                "f16 {bits:#x}"
            );
            assert!(
                same(got_bf[i], half::bf16::from_bits(bits).to_f32()),
                "bf16 {bits:#x}"
            );
            let nf = first_non_finite(DType::F16, &bits.to_le_bytes()).unwrap();
            assert_eq!(nf.is_some(), !got[i].is_finite(), "f16 {bits:#x}");
            let nf = first_non_finite(DType::BF16, &bits.to_le_bytes()).unwrap();
            assert_eq!(nf.is_some(), !got_bf[i].is_finite(), "bf16 {bits:#x}");
        }
        let bytes: Vec<u8> = (0..=u8::MAX).collect();
        let e4 = to_f32(DType::F8E4M3, &bytes).unwrap();
        let e5 = to_f32(DType::F8E5M2, &bytes).unwrap();
        for b in 0..=u8::MAX {
            let i = usize::from(b);
            assert!(
                same(e4[i], f8_e4m3fn(b)) && same(e5[i], f8_e5m2(b)),
                "{b:#x}"
            );
            let nf = first_non_finite(DType::F8E4M3, &[b]).unwrap();
            assert_eq!(nf.is_some(), !e4[i].is_finite(), "e4m3 {b:#x}");
            let nf = first_non_finite(DType::F8E5M2, &[b]).unwrap();
            assert_eq!(nf.is_some(), !e5[i].is_finite(), "e5m2 {b:#x}");
        }
        for v in [1.0f32, f32::INFINITY, f32::NAN, f32::MAX] {
            let nf = first_non_finite(DType::F32, &v.to_le_bytes()).unwrap();
            assert_eq!(nf.is_some(), !v.is_finite());
            let nf = first_non_finite(DType::F64, &f64::from(v).to_le_bytes()).unwrap();
            assert_eq!(nf.is_some(), !v.is_finite());
        }
    }

    #[test]
    fn widths_and_errors() {
        let one_f16 = half::f16::from_f32(1.5).to_le_bytes();
        assert_eq!(to_f32(DType::F16, &one_f16), Ok(vec![1.5]));
        let bf = half::bf16::from_f32(-2.0).to_le_bytes();
        assert_eq!(to_f32(DType::BF16, &bf), Ok(vec![-2.0]));
        assert_eq!(to_f32(DType::F32, &[0, 0, 0]), Err(DecodeError::Ragged));
        assert_eq!(
            to_f32(DType::I32, &[0, 0, 0, 0]),
            Err(DecodeError::NotFloat)
        );
    }
}

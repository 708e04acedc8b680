//! Host-side decoding of stored element types to f32.
//!
//! Used when the compute backend lacks a file's dtype (ndarray has no f16, bf16 or fp8) and
//! for f32 compute: every float dtype safetensors can hold widens to f32 exactly (f64 is
//! rounded to nearest).

use crate::dtype::DType;

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
    let chunks = bytes.chunks_exact(size);
    let out = match dtype {
        DType::F32 => chunks
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F64 => chunks
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
            .collect(),
        DType::F16 => chunks
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => chunks
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::F8E4M3 => chunks.map(|c| f8_e4m3fn(c[0])).collect(),
        DType::F8E5M2 => chunks.map(|c| f8_e5m2(c[0])).collect(),
        _ => return Err(DecodeError::NotFloat),
    };
    Ok(out)
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

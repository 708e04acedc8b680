//! Host homes: a tensor's bytes in host memory, in their storage dtype — borrowed from the
//! memory-mapped file when loading changed nothing, owned otherwise.

use std::ops::Range;
use std::sync::Arc;

use memmap2::Mmap;

use crate::dtype::DType;
use crate::home::{ComputeDtype, changed_dtype};
use crate::runtime::fp8::{PatchPrecision, encode_stochastic};

/// Bytes in host memory.
#[derive(Debug, Clone)]
pub(crate) enum HostBytes {
    /// A range of the memory-mapped weights file: no copy was made.
    Mapped { map: Arc<Mmap>, range: Range<usize> },
    /// A copy owned by the store (after a patch or a dtype change).
    Owned(Arc<[u8]>),
}

impl HostBytes {
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            HostBytes::Mapped { map, range } => &map[range.clone()],
            HostBytes::Owned(b) => b,
        }
    }
}

/// A tensor at a host home, in its storage dtype.
#[derive(Debug, Clone)]
pub(crate) struct HostTensor {
    pub(crate) bytes: HostBytes,
    pub(crate) dtype: DType,
}

impl HostTensor {
    /// True when the bytes are borrowed from the mapped file.
    pub(crate) fn is_mapped(&self) -> bool {
        matches!(self.bytes, HostBytes::Mapped { .. })
    }
}

/// The dtype a tensor is stored in at its home after loading changed its values
/// ([`changed_dtype`]: fp8 at bf16 unless `precision` re-quantises, f64 at f32, GGUF blocks
/// at the compute dtype).
pub(crate) fn storage_dtype(
    file: DType,
    precision: PatchPrecision,
    compute: ComputeDtype,
) -> DType {
    changed_dtype(file, precision.fp8_changed(), compute)
}

/// Changed values of the tensor `key` of a file of dtype `file`, stored as
/// [`storage_dtype`] says (fp8 by seeded stochastic rounding).
pub(crate) fn changed(
    values: &[f32],
    file: DType,
    precision: PatchPrecision,
    compute: ComputeDtype,
    key: &str,
) -> HostTensor {
    let dtype = storage_dtype(file, precision, compute);
    let bytes = match (dtype, precision) {
        (DType::F8E4M3 | DType::F8E5M2, PatchPrecision::Fp8Stochastic { seed }) => {
            encode_stochastic(values, dtype, key, seed)
        }
        _ => encode(values, dtype),
    };
    HostTensor {
        bytes: HostBytes::Owned(bytes.into()),
        dtype,
    }
}

/// Encodes f32 values in `dtype` (f16, bf16 or f32), rounding to nearest.
pub(crate) fn encode(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        DType::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::decode::to_f32;

    #[test]
    fn encode_round_trips_representable_values() {
        let v = [0.5f32, -2.0, 1.0 / 1024.0, 0.0];
        for dt in [DType::F16, DType::BF16, DType::F32] {
            assert_eq!(to_f32(dt, &encode(&v, dt)).unwrap(), v, "{dt}");
        }
    }

    #[test]
    fn non_finite_values_are_found_past_the_first_block() {
        use crate::runtime::decode::first_non_finite;
        let mut v = vec![1.0f32; (1 << 16) + 5];
        v[(1 << 16) + 3] = f32::NAN;
        let bytes = encode(&v, DType::F16);
        assert_eq!(
            first_non_finite(DType::F16, &bytes).unwrap(),
            Some((1 << 16) + 3)
        );
        assert_eq!(
            first_non_finite(DType::F32, &encode(&[1.0], DType::F32)).unwrap(),
            None
        );
    }
}

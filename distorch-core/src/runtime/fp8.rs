//! Re-quantising patched weights to fp8 with seeded stochastic rounding
//! ([`PatchPrecision::Fp8Stochastic`]).

use std::sync::OnceLock;

use crate::dtype::DType;
use crate::runtime::decode::to_f32;

/// How a tensor of an fp8 file is stored after a patch changed it (DisTorch2's
/// `high_precision_loras`). Other dtypes are stored in their own dtype either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PatchPrecision {
    /// Kept at bf16 at its home instead of re-quantising (`high_precision_loras = true`, the
    /// default): no precision of the patch is lost, the tensor takes twice its fp8 bytes.
    #[default]
    High,
    /// Re-quantised to the file's fp8 type (`high_precision_loras = false`) with stochastic
    /// rounding: each value rounds up or down to a neighbouring fp8 value with probability
    /// given by its distance to them, so small updates survive on average instead of
    /// vanishing under round-to-nearest. The random stream is seeded from the tensor's key
    /// and `seed`: the same load gives the same bytes, on every home and every run.
    Fp8Stochastic {
        /// Mixed with each key's hash.
        seed: u64,
    },
}

impl PatchPrecision {
    /// What a patched fp8 tensor becomes, for planning ([`crate::home::Homes`]).
    pub fn fp8_changed(self) -> crate::home::Fp8Changed {
        match self {
            PatchPrecision::High => crate::home::Fp8Changed::Bf16,
            PatchPrecision::Fp8Stochastic { .. } => crate::home::Fp8Changed::Fp8,
        }
    }
}

/// Finite values of an fp8 type, ascending, with their codes (one zero).
fn table(dtype: DType) -> &'static [(f32, u8)] {
    static E4M3: OnceLock<Vec<(f32, u8)>> = OnceLock::new();
    static E5M2: OnceLock<Vec<(f32, u8)>> = OnceLock::new();
    let cell = if dtype == DType::F8E4M3 { &E4M3 } else { &E5M2 };
    cell.get_or_init(|| {
        let codes: Vec<u8> = (0..=255).collect();
        let values = to_f32(dtype, &codes).unwrap_or_default();
        let mut t: Vec<(f32, u8)> = values
            .into_iter()
            .zip(codes)
            .filter(|(v, c)| v.is_finite() && *c != 0x80)
            .collect();
        t.sort_by(|a, b| a.0.total_cmp(&b.0));
        t
    })
}

/// FNV-1a of a key: the per-tensor part of the seed.
fn key_hash(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next_unit(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Encodes `values` as `dtype` (fp8) with stochastic rounding seeded from `key` and `seed`.
/// Values beyond the type's range saturate to its largest finite value; NaN stays NaN.
pub(crate) fn encode_stochastic(values: &[f32], dtype: DType, key: &str, seed: u64) -> Vec<u8> {
    let t = table(dtype);
    let nan = 0x7f;
    let mut rng = Rng(key_hash(key) ^ seed);
    values
        .iter()
        .map(|&v| {
            if v.is_nan() {
                return nan;
            }
            let (lo_v, hi_v) = (t[0].0, t[t.len() - 1].0);
            let v = v.clamp(lo_v, hi_v);
            // First entry greater than v; the one before it is <= v.
            let i = t.partition_point(|(x, _)| *x <= v);
            let below = t[i - 1];
            if below.0 == v || i == t.len() {
                return below.1;
            }
            let above = t[i];
            let p = (v - below.0) / (above.0 - below.0);
            if rng.next_unit() < p {
                above.1
            } else {
                below.1
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn representable_values_are_kept_and_others_land_on_a_neighbour() {
        for dtype in [DType::F8E4M3, DType::F8E5M2] {
            let t = table(dtype);
            let exact: Vec<f32> = t.iter().map(|(v, _)| *v).collect();
            let bytes = encode_stochastic(&exact, dtype, "k", 1);
            assert_eq!(to_f32(dtype, &bytes).unwrap(), exact, "{dtype}");
            for w in t.windows(2) {
                let mid = w[0].0 + (w[1].0 - w[0].0) * 0.3;
                let got = to_f32(dtype, &encode_stochastic(&[mid], dtype, "k", 7)).unwrap()[0];
                assert!(got == w[0].0 || got == w[1].0, "{dtype}: {mid} -> {got}");
            }
        }
    }

    #[test]
    fn rounding_is_unbiased_and_seeded() {
        // 0.3 of the way from 1.0 to the next e4m3 value (1.125): the mean of many roundings
        // approaches the value itself, where round-to-nearest would always give 1.0.
        let v = 1.0 + 0.125 * 0.3;
        let values = vec![v; 20_000];
        let bytes = encode_stochastic(&values, DType::F8E4M3, "blocks.0.weight", 42);
        let decoded = to_f32(DType::F8E4M3, &bytes).unwrap();
        let mean = decoded.iter().map(|&x| f64::from(x)).sum::<f64>() / values.len() as f64;
        assert!((mean - f64::from(v)).abs() < 0.002, "mean {mean} vs {v}");
        let up = decoded.iter().filter(|&&x| x == 1.125).count() as f64 / values.len() as f64;
        assert!((up - 0.3).abs() < 0.02, "rounded up {up}");
        assert_eq!(
            bytes,
            encode_stochastic(&values, DType::F8E4M3, "blocks.0.weight", 42)
        );
        assert_ne!(
            bytes,
            encode_stochastic(&values, DType::F8E4M3, "blocks.1.weight", 42)
        );
        assert_ne!(
            bytes,
            encode_stochastic(&values, DType::F8E4M3, "blocks.0.weight", 43)
        );
    }

    #[test]
    fn out_of_range_saturates_and_nan_stays_nan() {
        let bytes = encode_stochastic(&[1e9, -1e9, f32::NAN], DType::F8E4M3, "k", 0);
        let d = to_f32(DType::F8E4M3, &bytes).unwrap();
        assert_eq!(&d[..2], &[448.0, -448.0]);
        assert!(d[2].is_nan());
        let d = to_f32(
            DType::F8E5M2,
            &encode_stochastic(&[1e9], DType::F8E5M2, "k", 0),
        )
        .unwrap();
        assert_eq!(d[0], 57344.0);
    }
}

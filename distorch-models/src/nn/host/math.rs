//! Elementwise math for the host kernels ([`crate::nn::host`]): an `exp` written so loops over it
//! vectorize, the softmax row and SiLU built on it, compiled twice (baseline x86-64 and AVX2,
//! picked at run time). The AVX2 copy only widens the vectors: no fused multiply-adds, no
//! reordered sums, so both give the same bits.

/// Below this `exp` is 0 (e^-87.3 is f32's smallest normal).
const EXP_LO: f32 = -87.3;
/// Above this `exp` is clamped (e^88 ≈ 1.65e38; f32 overflows at 88.72).
const EXP_HI: f32 = 88.0;
/// 1.5 · 2²³: adding and subtracting it rounds an f32 below 2²² to the nearest integer.
const ROUND: f32 = 12_582_912.0;
/// ln 2 in two parts (Cody–Waite): the high part has few bits, so `n · LN2_HI` is exact.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// `e^x` to within a few ulp over f32's normal range: `x = n·ln 2 + r` with |r| ≤ ln 2 / 2,
/// `e^r` by its Taylor series to degree 7 (the remainder is below 2⁻²⁴ there), times `2^n`
/// built from its bits. NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let c = x.clamp(EXP_LO, EXP_HI);
    // n = round(c / ln 2), both as a float and (in the low bits of `t`) as an integer: an
    // `as i32` cast would saturate and stop the loop from vectorizing.
    let t = c * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = c - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r / 5040.0))))));
    let k = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let pow2 = f32::from_bits((k.wrapping_add(127) << 23) as u32);
    if x < EXP_LO { 0.0 } else { p * pow2 }
}

/// Runs `$body` compiled for AVX2 when the CPU has it, else for the baseline.
macro_rules! dispatch {
    ($avx2:ident, $body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                #[target_feature(enable = "avx2")]
                unsafe fn $avx2<R>(f: impl FnOnce() -> R) -> R {
                    f()
                }
                // SAFETY: the CPU has AVX2 (checked just above).
                return unsafe { $avx2(|| $body) };
            }
        }
        $body
    }};
}

/// One softmax row of (scaled) scores in place, unnormalised: `exp(x + mask − max)`;
/// returns the row's sum (the divisor).
pub(crate) fn softmax_row(row: &mut [f32], mask: Option<&[f32]>) -> f32 {
    dispatch!(softmax_row_avx2, softmax_row_body(row, mask))
}

#[inline(always)]
fn softmax_row_body(row: &mut [f32], mask: Option<&[f32]>) -> f32 {
    let max = |a: f32, x: f32| if x > a { x } else { a };
    let top = match mask {
        Some(m) => {
            row.iter_mut().zip(m).for_each(|(x, &m)| *x += m);
            lanes(row, f32::NEG_INFINITY, max)
        }
        None => lanes(row, f32::NEG_INFINITY, max),
    };
    // Two loops, not one: the loop vectorizer handles the exponentials alone, not fused
    // with a lane-wise sum.
    row.iter_mut().for_each(|x| *x = exp(*x - top));
    lanes(row, 0.0, |a, x| a + x)
}

/// `x · sigmoid(x)` in place.
pub(crate) fn silu_in_place(xs: &mut [f32]) {
    dispatch!(silu_avx2, xs.iter_mut().for_each(|x| *x /= 1.0 + exp(-*x)))
}

/// A fold over `xs` in eight interleaved lanes (so it vectorizes), then across the lanes and
/// the tail, always in that order.
#[inline(always)]
fn lanes(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = f(*a, x);
        }
    }
    let folded = acc.into_iter().fold(init, &f);
    tail.iter().fold(folded, |a, &x| f(a, x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.001_37;
        }
        assert!(
            worst < 3.0 * f32::EPSILON as f64,
            "worst relative error {worst:e}"
        );
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn softmax_row_matches_its_definition() {
        let mut row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
        let mask: Vec<f32> = (0..37)
            .map(|i| if i % 5 == 0 { f32::MIN } else { 0.0 })
            .collect();
        let want: Vec<f64> = row
            .iter()
            .zip(&mask)
            .map(|(&x, &m)| x as f64 * 0.5 + m as f64)
            .collect();
        let max = want.iter().cloned().fold(f64::MIN, f64::max);
        row.iter_mut().for_each(|x| *x *= 0.5);
        let sum = softmax_row(&mut row, Some(&mask));
        let want_sum: f64 = want.iter().map(|w| (w - max).exp()).sum();
        assert!(((sum as f64 - want_sum) / want_sum).abs() < 1e-6);
        for (i, (&g, w)) in row.iter().zip(&want).enumerate() {
            let w = (w - max).exp();
            assert!(
                (g as f64 - w).abs() <= 1e-6 * w.max(1e-30),
                "[{i}] {g} vs {w}"
            );
        }
    }
}

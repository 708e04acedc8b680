//! The models' attention on the test backend (the host kernel on ndarray, the blocked path on
//! wgpu and CUDA at f32 and with a mask, the fused kernel at f16) against
//! softmax(q·kᵀ/√d)·v summed in f64.

#![allow(clippy::print_stderr)]

use burn::tensor::{DType, Tensor, TensorData};
use distorch_core::ComputeDtype;
use distorch_core::runtime::supports_compute;
use distorch_models::nn::attention::{attention, attention_in_blocks};

use crate::common::B;

/// `len` values in [-2, 2) from a fixed-seed generator (splitmix64).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// The attention of [b, s, heads × d] rows in f64, `mask` [sq, sk] added to the scores.
#[allow(clippy::too_many_arguments)]
fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&[f32]>,
    (b, sq, sk): (usize, usize, usize),
    heads: usize,
    d: usize,
) -> Vec<f64> {
    let w = heads * d;
    let mut out = vec![0.0; b * sq * w];
    let scale = 1.0 / (d as f64).sqrt();
    for (bi, h, i) in
        (0..b).flat_map(|bi| (0..heads).flat_map(move |h| (0..sq).map(move |i| (bi, h, i))))
    {
        let row = |s: usize, j: usize| (bi * s + j) * w + h * d;
        let scores: Vec<f64> = (0..sk)
            .map(|j| {
                let (qi, kj) = (row(sq, i), row(sk, j));
                let dot: f64 = (0..d)
                    .map(|c| f64::from(q[qi + c]) * f64::from(k[kj + c]))
                    .sum();
                dot * scale + mask.map_or(0.0, |m| f64::from(m[i * sk + j]))
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = e.iter().sum();
        let o = row(sq, i);
        for (j, p) in e.iter().enumerate() {
            let vj = row(sk, j);
            for c in 0..d {
                out[o + c] += p / total * f64::from(v[vj + c]);
            }
        }
    }
    out
}

fn check(b: usize, sq: usize, sk: usize, heads: usize, d: usize, masked: bool) {
    let device = Default::default();
    let w = heads * d;
    let (q, k, v) = (
        values(b * sq * w, 1),
        values(b * sk * w, 2),
        values(b * sk * w, 3),
    );
    // A causal-style mask (each query sees a prefix of the keys), as CLIP's.
    let mask: Option<Vec<f32>> = masked.then(|| {
        (0..sq * sk)
            .map(|i| {
                if (i % sk) * sq > (i / sk) * sk {
                    -1e9
                } else {
                    0.0
                }
            })
            .collect()
    });
    let t = |x: &[f32], s: usize| {
        Tensor::<B, 3>::from_data(TensorData::new(x.to_vec(), [b, s, w]), &device)
    };
    let m = mask
        .as_ref()
        .map(|m| Tensor::<B, 2>::from_data(TensorData::new(m.clone(), [sq, sk]), &device));
    let expected = reference(&q, &k, &v, mask.as_deref(), (b, sq, sk), heads, d);
    let outputs = [
        (
            "attention",
            attention(t(&q, sq), t(&k, sk), t(&v, sk), heads, m.clone()),
        ),
        (
            "one-row blocks",
            attention_in_blocks(
                t(&q, sq),
                t(&k, sk),
                t(&v, sk),
                heads,
                m,
                4 * b * heads * sk,
            ),
        ),
    ];
    for (what, out) in outputs {
        assert_eq!(out.dims(), [b, sq, w], "{what}");
        let got = out.into_data().convert::<f32>().to_vec::<f32>().unwrap();
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert!(
                (f64::from(*g) - e).abs() <= 1e-5 * (1.0 + e.abs()),
                "{what} b{b} sq{sq} sk{sk} h{heads} d{d}: [{i}] {g} vs {e}"
            );
        }
    }
}

#[test]
fn attention_matches_f64_softmax() {
    // Sequence lengths off every tile size, keys fewer and more than queries.
    check(2, 37, 23, 3, 4, false);
    check(1, 300, 77, 2, 8, false);
    check(1, 130, 257, 2, 16, false);
}

#[test]
fn masked_attention_matches_f64_softmax() {
    check(2, 37, 23, 3, 4, true);
    check(1, 77, 77, 2, 8, true);
}

/// Relative L2 distance of `got` from `want`.
fn relative_l2(got: &[f32], want: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (g, w) in got.iter().zip(want) {
        num += (f64::from(*g) - w).powi(2);
        den += w * w;
    }
    (num / den).sqrt()
}

/// At f16 (the fused kernel on wgpu and CUDA, which keeps its tiles in f16): its error
/// against the f64 result is at most 2× that of the blocked path computing at f16 from the
/// same f16 inputs (the bound the half-precision parity tests use against PyTorch's run).
#[test]
fn fused_attention_at_f16_is_as_accurate_as_blocked_f16() {
    let device = Default::default();
    if !supports_compute::<B>(&device, ComputeDtype::F16) {
        eprintln!(
            "attention at f16: this backend does not compute in f16; the fused kernel's test did not run"
        );
        return;
    }
    for (b, sq, sk, heads, d) in [(2, 37, 23, 3, 4), (1, 300, 77, 2, 8), (1, 130, 257, 2, 16)] {
        let w = heads * d;
        // Inputs rounded to f16 first, so the reference and both paths see the same values.
        let half = |x: Vec<f32>, s: usize| {
            Tensor::<B, 3>::from_data(TensorData::new(x, [b, s, w]), &device).cast(DType::F16)
        };
        let (q, k, v) = (
            half(values(b * sq * w, 1), sq),
            half(values(b * sk * w, 2), sk),
            half(values(b * sk * w, 3), sk),
        );
        let read = |t: Tensor<B, 3>| t.cast(DType::F32).into_data().to_vec::<f32>().unwrap();
        let expected = reference(
            &read(q.clone()),
            &read(k.clone()),
            &read(v.clone()),
            None,
            (b, sq, sk),
            heads,
            d,
        );
        let fused = attention(q.clone(), k.clone(), v.clone(), heads, None);
        let blocked = attention_in_blocks(q, k, v, heads, None, usize::MAX);
        assert_eq!(fused.dtype(), DType::F16);
        let (fused, blocked) = (
            relative_l2(&read(fused), &expected),
            relative_l2(&read(blocked), &expected),
        );
        eprintln!(
            "f16 attention b{b} sq{sq} sk{sk} h{heads} d{d}: fused {fused:.3e}, blocked {blocked:.3e}"
        );
        assert!(
            fused <= 2.0 * blocked,
            "b{b} sq{sq} sk{sk} h{heads} d{d}: fused {fused:.3e} vs blocked {blocked:.3e}"
        );
    }
}

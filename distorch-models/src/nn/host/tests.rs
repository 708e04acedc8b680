//! Each host kernel against the same operation in Burn's generic ops on ndarray (the path the
//! models took before, and still take on every other backend).

use burn::tensor::activation::{gelu, sigmoid};
use burn::tensor::module::conv2d as burn_conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Tensor, TensorData};

use super::*;
use crate::nn::attention::generic_in_blocks;
use crate::nn::group_norm_generic;

type B = burn::backend::NdArray;

fn random<const D: usize>(shape: [usize; D], seed: u64) -> Tensor<B, D> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let n = shape.iter().product::<usize>();
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Tensor::from_data(TensorData::new(values, shape), &Default::default())
}

/// Every element within `tol` of the reference, relative to the reference's largest magnitude.
fn assert_close<const D: usize>(got: Tensor<B, D>, want: Tensor<B, D>, tol: f32, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let got = got.into_data().to_vec::<f32>().unwrap();
    let want = want.into_data().to_vec::<f32>().unwrap();
    let scale = want.iter().fold(0f32, |a, w| a.max(w.abs())).max(1e-30);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= tol * scale,
            "{what}: [{i}] {g} vs {w} (scale {scale})"
        );
    }
}

#[test]
fn linear_matches_a_matrix_product() {
    let x = random([2, 37, 24], 1);
    let w = random([19, 24], 2);
    let b = random([19], 3);
    for bias in [Some(&b), None] {
        let got = linear(&x, &w, bias).expect("ndarray f32 runs on the host");
        let y = x.clone().reshape([74, 24]).matmul(w.clone().transpose());
        let y = match bias {
            Some(b) => y + b.clone().unsqueeze::<2>(),
            None => y,
        };
        assert_close(got, y.reshape([2, 37, 19]), 1e-6, "linear");
    }
}

#[test]
fn conv2d_matches_burns_convolution() {
    let x = random([2, 5, 9, 7], 4);
    let bias = random([6], 6);
    for (k, stride, padding) in [
        (3, 1, 1),
        (3, 2, 1),
        (3, 2, 0),
        (1, 1, 0),
        (3, 1, 0),
        (1, 2, 0),
    ] {
        let w = random([6, 5, k, k], 5);
        for b in [Some(&bias), None] {
            let opts = ConvOptions::new([stride; 2], [padding; 2], [1, 1], 1);
            let want = burn_conv2d(x.clone(), w.clone(), b.cloned(), opts);
            // The batch in one product, then each image in blocks of two output rows.
            let one_row = 4 * 5 * k * k * 7;
            for cols in [usize::MAX, 2 * one_row] {
                let got = conv2d_within(&x, &w, b, stride, padding, cols).expect("host conv");
                let what = format!("conv {k}×{k} stride {stride} padding {padding}, {cols} B");
                assert_close(got, want.clone(), 1e-6, &what);
            }
        }
    }
}

#[test]
fn group_norm_matches_the_generic_one_with_and_without_silu() {
    let x = random([2, 12, 5, 3], 7) * 3.0 + 0.5;
    let (w, b) = (random([12], 8), random([12], 9));
    let want = group_norm_generic(x.clone(), w.clone(), b.clone(), 4, 1e-5);
    let got = group_norm(&x, &w, &b, 4, 1e-5, false).expect("host group norm");
    assert_close(got, want.clone(), 1e-5, "group norm");
    let got = group_norm(&x, &w, &b, 4, 1e-5, true).expect("host group norm");
    assert_close(got, want.clone() * sigmoid(want), 1e-5, "group norm + SiLU");
}

#[test]
fn silu_and_geglu_match_burns_activations() {
    let x = random([3, 7, 10], 10) * 8.0;
    assert_close(
        silu(&x).unwrap(),
        x.clone() * sigmoid(x.clone()),
        1e-6,
        "SiLU",
    );
    let want = x.clone().narrow(2, 0, 5) * gelu(x.clone().narrow(2, 5, 5));
    assert_close(geglu(&x).unwrap(), want, 1e-6, "GEGLU");
}

#[test]
fn attention_matches_the_generic_one_with_masks_and_blocks() {
    let (b, sq, sk, heads, hd) = (2, 45, 23, 3, 8);
    let q = random([b, sq, heads * hd], 11) * 2.0;
    let k = random([b, sk, heads * hd], 12) * 2.0;
    let v = random([b, sk, heads * hd], 13);
    let values: Vec<f32> = (0..sq * sk)
        .map(|i| {
            if (i % sk) * 2 > i / sk + 3 {
                f32::MIN
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::<B, 2>::from_data(TensorData::new(values, [sq, sk]), &Default::default());
    for m in [Some(&mask), None] {
        let want = generic_in_blocks(
            q.clone(),
            k.clone(),
            v.clone(),
            heads,
            m.cloned(),
            usize::MAX,
        );
        // One block per pair, then blocks of one query row.
        for block in [usize::MAX, 4 * sk] {
            let got = attention(&q, &k, &v, heads, m, block).expect("host attention");
            assert_close(
                got,
                want.clone(),
                1e-5,
                &format!("attention, block {block}"),
            );
        }
    }
}

#[test]
fn views_that_are_not_contiguous_are_read_in_order() {
    // A transposed view: the host kernels read it through a standard-layout copy.
    let x = random([4, 6], 14).transpose();
    let w = random([3, 4], 15);
    let want = x.clone().matmul(w.clone().transpose());
    assert_close(
        linear(&x, &w, None).unwrap(),
        want,
        1e-6,
        "linear of a view",
    );
}

//! Scaled dot-product attention in bounded memory: the scores of a block of queries at a
//! time, never the whole `[batch, heads, n, n]` matrix.
//!
//! Each block is exact attention for its queries (every key is in it, so its softmax is the
//! whole row's), so results do not depend on the block size beyond the order in which the
//! backend sums a matrix product, and placements stay bit-identical. Products run in the
//! inputs' dtype; scaled scores, the mask and the softmax in f32 (as PyTorch at half
//! precision).

use burn::tensor::Tensor;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;

use crate::nn::host;
use crate::nn::{f32, to_dtype};

/// Bytes of f32 scores one query block holds at most (64 MiB). A block's scores, their
/// softmax and the softmax's temporaries live at once, so attention's scratch is a few times
/// this — about 256 MiB — plus its output, whatever the sequence length (one query row is the
/// smallest block: past ~1.4 M keys at batch 1 × 12 heads the bound is that row's).
pub const SCORE_BLOCK_BYTES: usize = 64 << 20;

/// Multi-head attention: `q` [batch, seq_q, heads × head_dim], `k` and `v` [batch, seq_k,
/// heads × head_dim]; `mask` ([seq_q, seq_k], broadcast over batch and heads) is added to the
/// scaled scores. Returns [batch, seq_q, heads × head_dim].
///
/// On ndarray the host kernel runs it; on the CubeCL backends (wgpu, CUDA) unmasked f16
/// attention runs Burn's fused kernel, which keeps no scores in device memory; everything
/// else computes scores [`SCORE_BLOCK_BYTES`] at a time ([`attention_in_blocks`]).
///
/// # Panics
/// When `heads` is zero or does not divide the width, or the shapes disagree (programmer
/// errors: the models pass their checked configurations).
pub fn attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
    mask: Option<Tensor<B, 2>>,
) -> Tensor<B, 3> {
    if mask.is_none()
        && !host::on_host(&q)
        && let Some(out) = fused_heads(&q, &k, &v, heads)
    {
        return out;
    }
    attention_in_blocks(q, k, v, heads, mask, SCORE_BLOCK_BYTES)
}

/// [`attention`] through the fused kernel ([`crate::nn::fused`]), when it applies.
fn fused_heads<B: Backend>(
    q: &Tensor<B, 3>,
    k: &Tensor<B, 3>,
    v: &Tensor<B, 3>,
    heads: usize,
) -> Option<Tensor<B, 3>> {
    // Laid out contiguously per head, as the kernel reads it.
    let split = |t: &Tensor<B, 3>| contiguous(split_heads(t.clone(), heads));
    let out = crate::nn::fused::attention(&split(q), &split(k), &split(v))?;
    Some(merge_heads(out))
}

/// [batch, seq, heads × head_dim] as a [batch, heads, seq, head_dim] view.
fn split_heads<B: Backend>(t: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [b, s, width] = t.dims();
    t.reshape([b, s, heads, width / heads]).swap_dims(1, 2)
}

/// The inverse of [`split_heads`].
fn merge_heads<B: Backend>(t: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, s, d] = t.dims();
    t.swap_dims(1, 2).reshape([b, s, h * d])
}

/// `t` laid out in its logical order (a permuted view copied once).
fn contiguous<B: Backend>(t: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, r, c] = t.dims();
    t.reshape([b * h, r, c]).reshape([b, h, r, c])
}

/// [`attention`] without the fused kernel: query blocks of at most `block_bytes` of f32
/// scores (`usize::MAX`: one block, the whole score matrix at once), or the host kernel on
/// ndarray.
pub fn attention_in_blocks<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
    mask: Option<Tensor<B, 2>>,
    block_bytes: usize,
) -> Tensor<B, 3> {
    if let Some(y) = host::attention(&q, &k, &v, heads, mask.as_ref(), block_bytes) {
        return y;
    }
    generic_in_blocks(q, k, v, heads, mask, block_bytes)
}

/// [`attention_in_blocks`] in Burn's own ops, whatever the backend.
pub(crate) fn generic_in_blocks<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
    mask: Option<Tensor<B, 2>>,
    block_bytes: usize,
) -> Tensor<B, 3> {
    let [b, sq, width] = q.dims();
    let sk = k.dims()[1];
    let hd = width / heads;
    // Keys (transposed) and values laid out once as the products read them: a permuted view
    // would be copied by every block's product.
    let (q, kt, v) = (
        split_heads(q, heads),
        contiguous(split_heads(k, heads).transpose()),
        contiguous(split_heads(v, heads)),
    );
    let scale = 1.0 / (hd as f64).sqrt();
    let block = |qb: Tensor<B, 4>, m: Option<Tensor<B, 2>>| {
        let scores = f32(qb.matmul(kt.clone())) * scale;
        let scores = match m {
            Some(m) => scores + f32(m).unsqueeze::<4>(),
            None => scores,
        };
        to_dtype(softmax(scores, 3), v.dtype()).matmul(v.clone())
    };
    let per_row = 4 * b * heads * sk;
    let rows = (block_bytes / per_row.max(1)).clamp(1, sq.max(1));
    let out = if rows >= sq {
        block(q, mask)
    } else {
        let mut parts = Vec::with_capacity(sq.div_ceil(rows));
        let mut start = 0;
        while start < sq {
            let len = rows.min(sq - start);
            let m = mask.clone().map(|m| m.narrow(0, start, len));
            parts.push(block(q.clone().narrow(2, start, len), m));
            start += len;
        }
        Tensor::cat(parts, 2)
    };
    merge_heads(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};

    type B = burn::backend::NdArray;

    #[test]
    fn blocks_give_the_whole_matrix_result() {
        let device = Default::default();
        let (b, sq, sk, heads, hd) = (2, 37, 23, 3, 4);
        let t = |s: usize| {
            Tensor::<B, 3>::random([b, s, heads * hd], Distribution::Normal(0.0, 1.0), &device)
        };
        let (q, k, v) = (t(sq), t(sk), t(sk));
        let values: Vec<f32> = (0..sq * sk)
            .map(|i| {
                if (i % sk) * 3 > (i / sk) * 2 + 5 {
                    f32::MIN
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::<B, 2>::from_data(TensorData::new(values, [sq, sk]), &device);
        let whole = generic_in_blocks(
            q.clone(),
            k.clone(),
            v.clone(),
            heads,
            Some(mask.clone()),
            usize::MAX,
        );
        let whole = whole.into_data().to_vec::<f32>().unwrap();
        // 5 query rows per block (the last one shorter), and one row per block.
        for rows in [5, 1] {
            let bytes = rows * 4 * b * heads * sk;
            let blocked = generic_in_blocks(
                q.clone(),
                k.clone(),
                v.clone(),
                heads,
                Some(mask.clone()),
                bytes,
            );
            let blocked = blocked.into_data().to_vec::<f32>().unwrap();
            assert_eq!(blocked.len(), whole.len());
            for (i, (a, w)) in blocked.iter().zip(&whole).enumerate() {
                assert!(
                    (a - w).abs() <= 1e-6 * (1.0 + w.abs()),
                    "{rows} rows: [{i}] {a} vs {w}"
                );
            }
        }
    }
}

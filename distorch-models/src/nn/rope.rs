//! Rotary position embedding applied pair by pair (diffusers' `apply_rotary_emb` with
//! `use_real_unbind_dim = -1`: Wan, FLUX): the tables are built by each family.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// Rotates `x` ([batch, tokens, heads · head_dim]) pair by pair: (x₂ᵢ, x₂ᵢ₊₁) by each
/// token's angle for pair i.
pub(crate) fn rope<B: Backend>(
    x: Tensor<B, 3>,
    cos: &Tensor<B, 2>,
    sin: &Tensor<B, 2>,
    heads: usize,
    hd: usize,
) -> Tensor<B, 3> {
    let [b, n, _] = x.dims();
    let x = x.reshape([b, n, heads, hd / 2, 2]);
    let x1 = x.clone().narrow(4, 0, 1);
    let x2 = x.narrow(4, 1, 1);
    let shape = |t: &Tensor<B, 2>| t.clone().reshape([1, n, 1, hd / 2, 1]);
    let (c, s) = (shape(cos), shape(sin));
    let even = x1.clone() * c.clone() - x2.clone() * s.clone();
    let odd = x1 * s + x2 * c;
    Tensor::cat(vec![even, odd], 4).reshape([b, n, heads * hd])
}

//! The Wan transformer's 3-D rotary position embedding (diffusers' `WanRotaryPosEmbed`).

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// The rotary tables of heads `hd` wide for a grid of `[frames, height, width]` patches: cos and sin of each
/// token's angle for each rotated pair, [tokens, head_dim / 2]. The head's pairs split
/// into frame, row and column sections (diffusers' `WanRotaryPosEmbed`; θ = 10,000,
/// frequencies in f64, then f32 as the reference).
pub(crate) fn rope_tables<B: Backend>(
    hd: usize,
    grid: [usize; 3],
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let hw = 2 * (hd / 6);
    let dims = [hd - 2 * hw, hw, hw];
    let mut freqs = Vec::with_capacity(hd / 2);
    for (axis, dim) in dims.into_iter().enumerate() {
        for i in 0..dim / 2 {
            freqs.push((axis, 1.0 / 10000f64.powf((2 * i) as f64 / dim as f64)));
        }
    }
    let [fp, hp, wp] = grid;
    let n = fp * hp * wp;
    let (mut cos, mut sin) = (
        Vec::with_capacity(n * hd / 2),
        Vec::with_capacity(n * hd / 2),
    );
    for t in 0..fp {
        for y in 0..hp {
            for x in 0..wp {
                let pos = [t, y, x];
                for &(axis, f) in &freqs {
                    let angle = pos[axis] as f64 * f;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
    }
    let half = freqs.len();
    (
        Tensor::from_data(TensorData::new(cos, [n, half]), device),
        Tensor::from_data(TensorData::new(sin, [n, half]), device),
    )
}

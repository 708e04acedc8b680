//! Random GGUF blocks for the benchmarks: xorshift bytes with every f16 scale field set to a
//! small finite value, so the weights dequantize to finite numbers of about `scale`'s size.

use distorch::core::{DType, quant};

/// `n` elements of `dtype` as random blocks whose scales are `scale`.
pub fn random_blocks(dtype: DType, n: usize, seed: u64, scale: f32) -> Vec<u8> {
    let size = dtype.size() as usize;
    let mut x = 0x2545_f491_4f6c_dd1d_u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut raw: Vec<u8> = (0..n / dtype.block_elems() as usize * size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let fields = quant::f16_fields(dtype);
    let scale = half::f16::from_f32(scale).to_le_bytes();
    for b in raw.chunks_exact_mut(size) {
        for &at in &fields {
            b[at..at + 2].copy_from_slice(&scale);
        }
    }
    raw
}

//! Random GGUF blocks for the benchmarks: xorshift bytes with every f16 scale field set to a
//! small finite value, so the weights dequantize to finite numbers of about `scale`'s size.

use distorch::core::DType;

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
    // Byte offsets of the f16 scale (and min) fields in each block.
    let fields: &[usize] = match dtype {
        DType::Q2K => &[80, 82],
        DType::Q3K => &[108],
        DType::Q6K => &[208],
        DType::Q4_1 | DType::Q5_1 | DType::Q4K | DType::Q5K => &[0, 2],
        _ => &[0],
    };
    let scale = half::f16::from_f32(scale).to_le_bytes();
    for b in raw.chunks_exact_mut(size) {
        for &at in fields {
            b[at..at + 2].copy_from_slice(&scale);
        }
    }
    raw
}

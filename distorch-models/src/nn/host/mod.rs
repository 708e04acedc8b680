//! f32 kernels on the host for Burn's ndarray backend: the operations that dominate a forward
//! pass (attention, convolution, linear layers, group norm, SiLU, GEGLU), each one fused pass
//! over tensors read in place, split across rayon's threads.
//!
//! Burn 0.21's ndarray backend runs a 2-D matrix product on one thread, allocates (and the
//! kernel zero-fills) a fresh buffer for every elementwise step, and convolves loop by loop.
//! These kernels read the backend's own arrays without a copy (weights resident or streamed
//! alike), write each result once, and multiply with `matrixmultiply`'s `sgemm` (the kernel
//! ndarray itself uses) with the output's rows (or columns) split between threads: every
//! output element is summed by one thread in one fixed order, so results do not depend on the
//! placement.
//!
//! Every kernel returns `None` where it does not apply — another backend, a dtype other than
//! f32, or a build without the `ndarray` feature — and the caller runs Burn's generic ops.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

mod conv;
mod gemm;
mod math;

pub(crate) use conv::conv2d;
#[cfg(test)]
use conv::conv2d_within;

use gemm::{Mat, gemm, gemm_rows};
use math::{silu_in_place, softmax_row};

/// Runs `f` on `t`'s elements (row-major) when `t` is an f32 tensor of the ndarray backend.
fn with_slice<B: Backend, const D: usize, R>(
    t: &Tensor<B, D>,
    f: impl FnOnce(&[f32]) -> R,
) -> Option<R> {
    if t.dtype() != DType::F32 {
        return None;
    }
    ndarray_slice(t, f)
}

#[cfg(feature = "ndarray")]
fn ndarray_slice<B: Backend, const D: usize, R>(
    t: &Tensor<B, D>,
    f: impl FnOnce(&[f32]) -> R,
) -> Option<R> {
    use burn::backend::ndarray::NdArrayTensor;
    use burn::tensor::TensorPrimitive;
    let TensorPrimitive::Float(primitive) = t.clone().into_primitive() else {
        return None;
    };
    let any: &dyn std::any::Any = &primitive;
    let Some(NdArrayTensor::F32(storage)) = any.downcast_ref::<NdArrayTensor>() else {
        return None;
    };
    let view = storage.view();
    match view.as_slice() {
        Some(s) => Some(f(s)),
        None => {
            let standard = view.as_standard_layout();
            standard.as_slice().map(f)
        }
    }
}

#[cfg(not(feature = "ndarray"))]
fn ndarray_slice<B: Backend, const D: usize, R>(
    _t: &Tensor<B, D>,
    _f: impl FnOnce(&[f32]) -> R,
) -> Option<R> {
    None
}

/// Whether `t` is an f32 tensor the host kernels can read (asked without reading it: a
/// strided view is laid out only when a kernel reads it).
pub(crate) fn on_host<B: Backend, const D: usize>(t: &Tensor<B, D>) -> bool {
    t.dtype() == DType::F32 && is_ndarray(t)
}

#[cfg(feature = "ndarray")]
fn is_ndarray<B: Backend, const D: usize>(t: &Tensor<B, D>) -> bool {
    use burn::tensor::TensorPrimitive;
    match t.clone().into_primitive() {
        TensorPrimitive::Float(p) => {
            (&p as &dyn std::any::Any).is::<burn::backend::ndarray::NdArrayTensor>()
        }
        TensorPrimitive::QFloat(_) => false,
    }
}

#[cfg(not(feature = "ndarray"))]
fn is_ndarray<B: Backend, const D: usize>(_t: &Tensor<B, D>) -> bool {
    false
}

/// A tensor of `shape` on `like`'s device from `values` (ndarray takes the vector as is).
fn tensor<B: Backend, const D: usize, const E: usize>(
    values: Vec<f32>,
    shape: [usize; E],
    like: &Tensor<B, D>,
) -> Tensor<B, E> {
    Tensor::from_data(TensorData::new(values, shape), &like.device())
}

/// An output buffer of `len` copies of `fill`.
fn buffer(len: usize, fill: f32) -> Vec<f32> {
    vec![fill; len]
}

/// `x · wᵀ + b` over the last dimension (`w` as [out, in], PyTorch's layout).
pub(crate) fn linear<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    w: &Tensor<B, 2>,
    b: Option<&Tensor<B, 1>>,
) -> Option<Tensor<B, D>> {
    let dims = x.dims();
    let [out, inner] = w.dims();
    let rows = dims[..D - 1].iter().product::<usize>();
    if dims[D - 1] != inner || !on_host(w) {
        return None;
    }
    let mut y = match b {
        Some(b) => with_slice(b, |b| b.repeat(rows))?,
        None => buffer(rows * out, 0.0),
    };
    let beta = if b.is_some() { 1.0 } else { 0.0 };
    with_slice(x, |x| {
        with_slice(w, |w| {
            let a = Mat::row_major(x, rows, inner);
            // wᵀ read in place: element (i, j) is w[j, i].
            let bt = Mat::strided(w, inner, out, 1, inner as isize);
            gemm_rows(a, bt, beta, &mut y, out, out);
        })
    })??;
    let mut shape = dims;
    shape[D - 1] = out;
    Some(tensor(y, shape, x))
}

/// Group norm of [batch, channels, ...] (biased variance, as PyTorch), statistics summed in
/// f64, then `silu` applied when asked: one read for the statistics, one pass to write.
pub(crate) fn group_norm<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    w: &Tensor<B, 1>,
    b: &Tensor<B, 1>,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Option<Tensor<B, D>> {
    let dims = x.dims();
    let (n, c) = (dims[0], dims[1]);
    let plane = dims[2..].iter().product::<usize>();
    if groups == 0 || c % groups != 0 || !on_host(w) || !on_host(b) {
        return None;
    }
    let per = c / groups;
    let mut y = buffer(n * c * plane, 0.0);
    with_slice(x, |x| {
        with_slice(w, |w| {
            with_slice(b, |b| {
                y.par_chunks_mut(per * plane)
                    .zip(x.par_chunks(per * plane))
                    .enumerate()
                    .for_each(|(i, (out, src))| {
                        let g = i % groups;
                        let (mean, rstd) = moments(src, eps);
                        for (j, (o, s)) in out.chunks_mut(plane).zip(src.chunks(plane)).enumerate()
                        {
                            let ch = g * per + j;
                            let scale = rstd * w[ch];
                            let shift = b[ch] - mean * scale;
                            for (o, &s) in o.iter_mut().zip(s) {
                                *o = s * scale + shift;
                            }
                            if silu {
                                silu_in_place(o);
                            }
                        }
                    });
            })
        })
    })???;
    Some(tensor(y, dims, x))
}

/// Mean and 1/sqrt(variance + eps) of `x`, summed in f64.
fn moments(x: &[f32], eps: f64) -> (f32, f32) {
    let len = x.len().max(1) as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / len;
    let var = x
        .iter()
        .map(|&v| {
            let d = v as f64 - mean;
            d * d
        })
        .sum::<f64>()
        / len;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

/// `x · sigmoid(x)`.
pub(crate) fn silu<B: Backend, const D: usize>(x: &Tensor<B, D>) -> Option<Tensor<B, D>> {
    let y = with_slice(x, |x| {
        let mut y = x.to_vec();
        y.par_chunks_mut(1 << 14).for_each(silu_in_place);
        y
    })?;
    Some(tensor(y, x.dims(), x))
}

/// GEGLU: the last dimension's first half times the exact GELU of its second half.
pub(crate) fn geglu<B: Backend, const D: usize>(x: &Tensor<B, D>) -> Option<Tensor<B, D>> {
    let mut dims = x.dims();
    let inner = dims[D - 1] / 2;
    if inner == 0 || !dims[D - 1].is_multiple_of(2) {
        return None;
    }
    let rows = dims[..D - 1].iter().product::<usize>();
    let y = with_slice(x, |x| {
        let mut y = buffer(rows * inner, 0.0);
        y.par_chunks_mut(inner)
            .zip(x.par_chunks(2 * inner))
            .for_each(|(o, s)| {
                let (a, g) = s.split_at(inner);
                for ((o, &a), &g) in o.iter_mut().zip(a).zip(g) {
                    *o = a * gelu(g);
                }
            });
        y
    })?;
    dims[D - 1] = inner;
    Some(tensor(y, dims, x))
}

/// Exact GELU, `x/2 · (1 + erf(x/√2))`, with erf in f64 (as precise as PyTorch's f32 erf).
fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))) as f32
}

/// Multi-head attention on the host: `q` [batch, seq_q, heads·hd], `k`, `v` [batch, seq_k,
/// heads·hd], `mask` [seq_q, seq_k] added to the scaled scores. Each (batch, head) pair is a
/// task that scores a block of queries at a time into its own buffer, exponentiates in place
/// and multiplies by the values, reading q, k and v where they lie; the buffers of all tasks
/// together stay within `block_bytes`.
pub(crate) fn attention<B: Backend>(
    q: &Tensor<B, 3>,
    k: &Tensor<B, 3>,
    v: &Tensor<B, 3>,
    heads: usize,
    mask: Option<&Tensor<B, 2>>,
    block_bytes: usize,
) -> Option<Tensor<B, 3>> {
    let [b, sq, width] = q.dims();
    let sk = k.dims()[1];
    if heads == 0 || width % heads != 0 || !on_host(k) || !on_host(v) {
        return None;
    }
    if mask.is_some_and(|m| !on_host(m)) {
        return None;
    }
    let shape = Heads {
        sq,
        sk,
        width,
        hd: width / heads,
        heads,
    };
    let threads = rayon::current_num_threads().max(1);
    let bound = block_bytes / threads;
    let per_row = (4 * sk).max(1);
    let rows = (SCORE_TILE_BYTES / per_row)
        .max(MIN_ROWS)
        .min(bound / per_row)
        .clamp(1, sq.max(1));
    let mut out = buffer(b * sq * width, 0.0);
    let go = |q: &[f32], k: &[f32], v: &[f32], m: Option<&[f32]>, out: &mut [f32]| {
        let dst = SharedOut(out.as_mut_ptr());
        (0..b * heads).into_par_iter().for_each_init(
            || Scratch {
                scores: buffer(rows * sk, 0.0),
                kt: buffer(shape.hd * sk, 0.0),
                v: buffer(shape.hd * sk, 0.0),
            },
            |scratch, pair| {
                // SAFETY: each pair writes only its own head's columns of its own batch rows,
                // so no two tasks touch one element; `out` outlives the parallel loop.
                unsafe { shape.pair(pair, q, k, v, m, scratch, rows, &dst) }
            },
        );
    };
    with_slice(q, |qs| {
        with_slice(k, |ks| {
            with_slice(v, |vs| match mask {
                Some(m) => with_slice(m, |ms| go(qs, ks, vs, Some(ms), &mut out)),
                None => {
                    go(qs, ks, vs, None, &mut out);
                    Some(())
                }
            })
        })
    })????;
    Some(tensor(out, [b, sq, width], q))
}

/// Bytes of scores one task holds at a time (256 KiB): a block's scores stay in a core's L2
/// cache between the product that writes them, the softmax and the product that reads them.
/// (On the 2-core development VM 256 KiB to 8 MiB time alike; 32 MiB is slower.)
const SCORE_TILE_BYTES: usize = 256 << 10;

/// Query rows one block holds at least (unless the memory bound forbids): every block packs
/// its head's keys and values again for the products, so blocks of a few rows at long
/// sequences spend their time packing (16k tokens × 128 wide: 4-row blocks took 138 s).
const MIN_ROWS: usize = 64;

/// The output of [`attention`], written by many tasks at disjoint places.
struct SharedOut(*mut f32);
// SAFETY: the tasks write disjoint elements (see `attention`).
unsafe impl Sync for SharedOut {}

/// One task's buffers: a block of scores, and its head's keys (transposed) and values laid
/// out contiguously, so the products pack them as fast as they can (packing them from the
/// interleaved heads for every block took more time than the products).
struct Scratch {
    scores: Vec<f32>,
    kt: Vec<f32>,
    v: Vec<f32>,
}

/// The shapes of one attention call.
#[derive(Clone, Copy)]
struct Heads {
    sq: usize,
    sk: usize,
    width: usize,
    hd: usize,
    heads: usize,
}

impl Heads {
    /// Attention for one (batch, head) pair, `rows` queries at a time.
    ///
    /// # Safety
    /// `out` points at the [b, sq, width] output and no other task writes this pair's
    /// elements.
    #[allow(clippy::too_many_arguments)]
    unsafe fn pair(
        &self,
        pair: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[f32]>,
        scratch: &mut Scratch,
        rows: usize,
        out: &SharedOut,
    ) {
        let (bi, h) = (pair / self.heads, pair % self.heads);
        let (w, hd, sk) = (self.width, self.hd, self.sk);
        let kv = bi * sk * w + h * hd;
        let Scratch { scores, kt, v: vs } = scratch;
        for (j, (key, value)) in k[kv..]
            .chunks(w)
            .zip(v[kv..].chunks(w))
            .take(sk)
            .enumerate()
        {
            for d in 0..hd {
                kt[d * sk + j] = key[d];
            }
            vs[j * hd..][..hd].copy_from_slice(&value[..hd]);
        }
        let kt = Mat::row_major(kt, hd, sk);
        let vm = Mat::row_major(vs, sk, hd);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut start = 0;
        while start < self.sq {
            let len = rows.min(self.sq - start);
            let at = (bi * self.sq + start) * w + h * hd;
            let qm = Mat::strided(&q[at..], len, hd, w as isize, 1);
            let s = &mut scores[..len * sk];
            // Scaled scores (the scale applied to each finished sum, as `matmul · scale`).
            // SAFETY: `s` is this task's own `len × sk` buffer.
            unsafe { gemm(qm, kt, scale, 0.0, s.as_mut_ptr(), sk as isize, 1) };
            let mut sums = Vec::with_capacity(len);
            for (r, row) in s.chunks_exact_mut(sk).enumerate() {
                let m = mask.map(|m| &m[(start + r) * sk..][..sk]);
                sums.push(softmax_row(row, m));
            }
            // SAFETY: rows `start..start + len` of batch `bi`, columns of head `h`: this
            // pair's own elements, inside the output (the caller's promise).
            let dst = unsafe { out.0.add(at) };
            // SAFETY: as above.
            unsafe { gemm(Mat::row_major(s, len, sk), vm, 1.0, 0.0, dst, w as isize, 1) };
            for (r, sum) in sums.into_iter().enumerate() {
                // SAFETY: as above.
                let row = unsafe { std::slice::from_raw_parts_mut(dst.add(r * w), hd) };
                row.iter_mut().for_each(|x| *x /= sum);
            }
            start += len;
        }
    }
}

#[cfg(test)]
mod tests;

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

mod gemm;
mod math;

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

/// A 2-D convolution ([batch, in, h, w] by [out, in, kh, kw], square stride and zero padding)
/// as one matrix product per image: the weight [out, in·kh·kw] times the image's columns
/// (im2col), written straight into the [batch, out, ho, wo] output with its bias.
pub(crate) fn conv2d<B: Backend>(
    x: &Tensor<B, 4>,
    w: &Tensor<B, 4>,
    bias: Option<&Tensor<B, 1>>,
    stride: usize,
    padding: usize,
) -> Option<Tensor<B, 4>> {
    conv2d_within(x, w, bias, stride, padding, COLS_BYTES)
}

/// [`conv2d`] holding at most `cols_bytes` of columns at a time (at least one output row's).
pub(crate) fn conv2d_within<B: Backend>(
    x: &Tensor<B, 4>,
    w: &Tensor<B, 4>,
    bias: Option<&Tensor<B, 1>>,
    stride: usize,
    padding: usize,
    cols_bytes: usize,
) -> Option<Tensor<B, 4>> {
    let [n, c, h, wd] = x.dims();
    let [o, ci, kh, kw] = w.dims();
    if ci != c || stride == 0 || h + 2 * padding < kh || wd + 2 * padding < kw || !on_host(w) {
        return None;
    }
    let geo = Im2col {
        h,
        w: wd,
        kh,
        kw,
        stride,
        padding,
    };
    let (ho, wo) = geo.out_dims();
    let plane = ho * wo;
    let k = c * kh * kw;
    let mut y = match bias {
        Some(b) => with_slice(b, |b| {
            let mut y = Vec::with_capacity(n * o * plane);
            for _ in 0..n {
                for &v in b {
                    y.extend(std::iter::repeat_n(v, plane));
                }
            }
            y
        })?,
        None => buffer(n * o * plane, 0.0),
    };
    let beta = if bias.is_some() { 1.0 } else { 0.0 };
    with_slice(x, |x| {
        with_slice(w, |w| {
            let conv = Conv {
                geo: &geo,
                w: Mat::row_major(w, o, k),
                beta,
                cols_bytes,
            };
            let images = x.chunks_exact(c * h * wd);
            if kh == 1 && kw == 1 && stride == 1 && padding == 0 {
                for (img, out) in images.zip(y.chunks_exact_mut(o * plane)) {
                    gemm_rows(
                        conv.w,
                        Mat::row_major(img, k, plane),
                        beta,
                        out,
                        plane,
                        plane,
                    );
                }
            } else if n > 1 && 4 * k * n * plane <= cols_bytes {
                conv.folded(
                    x,
                    bias.and_then(|b| with_slice(b, |b| b.to_vec())),
                    &mut y,
                    n,
                );
            } else {
                for (img, out) in images.zip(y.chunks_exact_mut(o * plane)) {
                    conv.blocked(img, out);
                }
            }
        })
    })??;
    Some(tensor(y, [n, o, ho, wo], x))
}

/// Bytes of im2col columns a convolution holds at a time (32 MiB): a 512×512 image's 3×3
/// convolution over 128 channels would need 1.2 GB of columns at once.
const COLS_BYTES: usize = 32 << 20;

/// One convolution's weight, geometry and whether its output holds the bias already.
struct Conv<'a> {
    geo: &'a Im2col,
    w: Mat<'a>,
    beta: f32,
    cols_bytes: usize,
}

impl Conv<'_> {
    /// One image, a block of output rows at a time (columns within `cols_bytes`), each
    /// block's product written into its rows of `out` ([o, ho·wo]).
    fn blocked(&self, img: &[f32], out: &mut [f32]) {
        let (ho, wo) = self.geo.out_dims();
        let k = self.w.cols();
        let block = (self.cols_bytes / (4 * k * wo).max(1)).clamp(1, ho);
        let mut cols = buffer(k * block * wo, 0.0);
        let mut oy = 0;
        while oy < ho {
            let len = block.min(ho - oy);
            let n = len * wo;
            self.geo.fill(img, &mut cols[..k * n], n, oy, len);
            let b = Mat::row_major(&cols[..k * n], k, n);
            gemm_rows(self.w, b, self.beta, &mut out[oy * wo..], n, ho * wo);
            oy += len;
        }
    }

    /// Every image's columns side by side ([k, n·plane]), one product for the batch (small
    /// images: the weight is packed once, not once per image), then scattered into `y`
    /// ([n, o, plane]) with the bias.
    fn folded(&self, x: &[f32], bias: Option<Vec<f32>>, y: &mut [f32], n: usize) {
        let (ho, wo) = self.geo.out_dims();
        let (o, k) = (self.w.rows_len(), self.w.cols());
        let plane = ho * wo;
        let ld = n * plane;
        let mut cols = buffer(k * ld, 0.0);
        let size = x.len() / n;
        for (i, img) in x.chunks_exact(size).enumerate() {
            self.geo.fill(img, &mut cols[i * plane..], ld, 0, ho);
        }
        let mut all = buffer(o * ld, 0.0);
        gemm_rows(self.w, Mat::row_major(&cols, k, ld), 0.0, &mut all, ld, ld);
        for (i, out) in y.chunks_exact_mut(o * plane).enumerate() {
            for (r, row) in out.chunks_exact_mut(plane).enumerate() {
                let src = &all[r * ld + i * plane..][..plane];
                let add = bias.as_ref().map_or(0.0, |b| b[r]);
                row.iter_mut().zip(src).for_each(|(d, &s)| *d = s + add);
            }
        }
    }
}

/// The geometry of one image's im2col.
struct Im2col {
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
}

impl Im2col {
    fn out_dims(&self) -> (usize, usize) {
        let ho = (self.h + 2 * self.padding - self.kh) / self.stride + 1;
        let wo = (self.w + 2 * self.padding - self.kw) / self.stride + 1;
        (ho, wo)
    }

    /// Writes output rows `oy..oy + len` of `img`'s ([c, h, w]) columns into `cols`: row t
    /// of the [c·kh·kw, len·wo] columns at `t·ld`, zeros where a tap falls in the padding;
    /// one channel per task.
    fn fill(&self, img: &[f32], cols: &mut [f32], ld: usize, oy: usize, len: usize) {
        let wo = self.out_dims().1;
        let taps = self.kh * self.kw;
        cols.par_chunks_mut(taps * ld)
            .zip(img.par_chunks(self.h * self.w))
            .for_each(|(rows, chan)| {
                for (t, row) in rows.chunks_mut(ld).take(taps).enumerate() {
                    let row = &mut row[..len * wo];
                    self.fill_tap(chan, t / self.kw, t % self.kw, row, wo, oy);
                }
            });
    }

    #[allow(clippy::too_many_arguments)]
    fn fill_tap(&self, chan: &[f32], ky: usize, kx: usize, row: &mut [f32], wo: usize, oy0: usize) {
        let (s, p) = (self.stride, self.padding);
        for (r, out) in row.chunks_exact_mut(wo).enumerate() {
            let oy = oy0 + r;
            let iy = (oy * s + ky) as isize - p as isize;
            if iy < 0 || iy >= self.h as isize {
                out.fill(0.0);
                continue;
            }
            let src = &chan[iy as usize * self.w..][..self.w];
            // Output columns whose tap lands inside the row: ix = ox·s + kx − p in [0, w).
            let first = p.saturating_sub(kx).div_ceil(s).min(wo);
            let last = ((self.w + p).saturating_sub(kx)).div_ceil(s).min(wo);
            out[..first].fill(0.0);
            out[last.max(first)..].fill(0.0);
            if s == 1 {
                let start = first + kx - p;
                out[first..last].copy_from_slice(&src[start..start + last - first]);
            } else {
                for (ox, v) in out[first..last].iter_mut().enumerate() {
                    *v = src[(first + ox) * s + kx - p];
                }
            }
        }
    }
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

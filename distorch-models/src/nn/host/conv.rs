//! The host convolution: im2col columns a bounded number of rows at a time, one matrix
//! product per image, written straight into the output with its bias.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use rayon::prelude::*;

use super::gemm::{Mat, gemm_rows};
use super::{buffer, on_host, tensor, with_slice};

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

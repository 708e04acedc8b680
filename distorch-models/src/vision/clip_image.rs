//! CLIP's image preprocessing, as transformers' CLIP image processor (PIL backend): RGB,
//! resize so the shorter side is `size` with PIL's bicubic filter (antialiased when
//! shrinking, 8-bit fixed-point as Pillow computes it), centre crop, scale to [0, 1],
//! normalise with CLIP's mean and standard deviation.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::error::Error;

/// CLIP's per-channel mean (OpenAI's).
pub const CLIP_MEAN: [f64; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's per-channel standard deviation (OpenAI's).
pub const CLIP_STD: [f64; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// Pillow's fixed-point precision for 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Decodes an image file's bytes (PNG, JPEG, WebP).
pub fn decode(bytes: &[u8]) -> Result<image::RgbImage, Error> {
    image::load_from_memory(bytes)
        .map(|i| i.to_rgb8())
        .map_err(|e| Error::Input {
            input: "image",
            reason: format!("cannot be decoded: {e}"),
        })
}

/// `image` as the encoder's input, [1, 3, size, size]: the shorter side resized to `size`
/// (the longer one to `size · long / short`, truncated, as transformers does), centre
/// cropped to `size` × `size`, normalised.
pub fn preprocess<B: Backend>(
    image: &image::RgbImage,
    size: usize,
    device: &B::Device,
) -> Result<Tensor<B, 4>, Error> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    if w == 0 || h == 0 || size == 0 {
        return Err(Error::Input {
            input: "image",
            reason: format!("a {w}×{h} image cannot be resized to {size}"),
        });
    }
    let (nw, nh) = if w <= h {
        (size, size * h / w)
    } else {
        (size * w / h, size)
    };
    let resized = resize_bicubic(image.as_raw(), w, h, nw, nh);
    // Centre crop, as transformers' `center_crop` (floor of half the excess).
    let (top, left) = ((nh - size) / 2, (nw - size) / 2);
    let mut values = vec![0f32; 3 * size * size];
    for c in 0..3 {
        for y in 0..size {
            for x in 0..size {
                let v = f64::from(resized[((top + y) * nw + left + x) * 3 + c]) / 255.0;
                values[(c * size + y) * size + x] = ((v - CLIP_MEAN[c]) / CLIP_STD[c]) as f32;
            }
        }
    }
    Ok(Tensor::from_data(
        TensorData::new(values, [1, 3, size, size]),
        device,
    ))
}

/// Pillow's bicubic kernel (a = −0.5).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// For each output position: the first input index and the fixed-point weights, as
/// Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc`.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let ws: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic((x as f64 - center + 0.5) / filterscale))
                .collect();
            let total: f64 = ws.iter().sum();
            let fixed = ws
                .iter()
                .map(|&w| {
                    let k = if total != 0.0 { w / total } else { w };
                    let f = k * f64::from(1u32 << PRECISION_BITS);
                    if k < 0.0 {
                        (f - 0.5) as i32
                    } else {
                        (f + 0.5) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `Image.resize(..., BICUBIC)` of interleaved RGB bytes: horizontal pass, then
/// vertical, each rounding to 8 bits.
fn resize_bicubic(src: &[u8], w: usize, h: usize, nw: usize, nh: usize) -> Vec<u8> {
    let round = 1i64 << (PRECISION_BITS - 1);
    let horizontal = if nw != w {
        let cs = coefficients(w, nw);
        let mut out = vec![0u8; nw * h * 3];
        for y in 0..h {
            for (x, (xmin, k)) in cs.iter().enumerate() {
                for c in 0..3 {
                    let mut ss = round;
                    for (i, &kv) in k.iter().enumerate() {
                        ss += i64::from(src[(y * w + xmin + i) * 3 + c]) * i64::from(kv);
                    }
                    out[(y * nw + x) * 3 + c] = clip8(ss);
                }
            }
        }
        out
    } else {
        src.to_vec()
    };
    if nh == h {
        return horizontal;
    }
    let cs = coefficients(h, nh);
    let mut out = vec![0u8; nw * nh * 3];
    for (y, (ymin, k)) in cs.iter().enumerate() {
        for x in 0..nw {
            for c in 0..3 {
                let mut ss = round;
                for (i, &kv) in k.iter().enumerate() {
                    ss += i64::from(horizontal[((ymin + i) * nw + x) * 3 + c]) * i64::from(kv);
                }
                out[(y * nw + x) * 3 + c] = clip8(ss);
            }
        }
    }
    out
}

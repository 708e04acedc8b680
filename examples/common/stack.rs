//! The offload benchmark's stack: 24 diffusion-shaped layers (per block a 3×3 convolution
//! at SD's first level's width, an up and a down projection at attention width), written as
//! a checkpoint and run through a [`Streamer`]. Shared by `offload_bench` and `auto_bench`.

#![allow(dead_code)]

use std::collections::BTreeMap;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use distorch::DType;
use distorch::core::gguf::{Array, GgufTensorData, ORIG_SHAPE_PREFIX, Value, write_gguf};
use distorch::core::runtime::{Streamer, encode_f32};
use distorch::core::safetensors::write;

use super::blocks;
use super::random::values;

pub const BLOCKS: usize = 8;
pub const CONV: usize = 320; // channels of SD's first level
pub const LATENT: usize = 64; // 512 / 8
pub const DIM: usize = 1280; // projection width
pub const TOKENS: usize = 1024; // 32×32 tokens
pub const HIDDEN: usize = 2560;

/// The 24 layers' tensors: per block a conv, an up and a down projection, with their fan-in.
pub fn layers() -> Vec<(String, Vec<u64>, usize)> {
    let c = CONV as u64;
    (0..BLOCKS)
        .flat_map(|b| {
            [
                (
                    format!("blocks.{b}.conv.weight"),
                    vec![c, c, 3, 3],
                    CONV * 9,
                ),
                (
                    format!("blocks.{b}.up.weight"),
                    vec![HIDDEN as u64, DIM as u64],
                    DIM,
                ),
                (
                    format!("blocks.{b}.down.weight"),
                    vec![DIM as u64, HIDDEN as u64],
                    HIDDEN,
                ),
            ]
        })
        .collect()
}

/// Writes the 24-layer checkpoint: a GGUF for a quantized `dtype`, else safetensors.
pub fn write_model(path: &std::path::Path, dtype: DType) -> Result<(), distorch::Error> {
    if dtype.is_quantized() {
        return write_gguf_model(path, dtype);
    }
    let mut specs = Vec::new();
    let mut data: Vec<Vec<u8>> = Vec::new();
    for (name, shape, fan_in) in layers() {
        let n: u64 = shape.iter().product();
        let scale = 2.0 / (fan_in as f32).sqrt();
        let v = values(specs.len() as u64 + 1, n as usize, scale);
        data.push(encode_f32(&v, dtype));
        specs.push((name, dtype, shape));
    }
    let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    write(path, &specs, &refs, &BTreeMap::new())?;
    Ok(())
}

/// Writes the 24-layer checkpoint as a GGUF of random `dtype` blocks (scales sized by fan-in),
/// the convolutions stored reshaped to rows of whole blocks with their shape in
/// `comfy.gguf.orig_shape`, as ComfyUI-GGUF's converter does.
fn write_gguf_model(path: &std::path::Path, dtype: DType) -> Result<(), distorch::Error> {
    let layers = layers();
    let mut metadata = Vec::new();
    let mut stored = Vec::new();
    for (i, (name, shape, fan_in)) in layers.iter().enumerate() {
        let n: u64 = shape.iter().product();
        let scale = 2.0 / (*fan_in as f32).sqrt() / 64.0;
        let data = blocks::random_blocks(dtype, n as usize, i as u64 + 1, scale);
        // Rows of whole blocks: [out, in·k·k] when that is whole (as ComfyUI-GGUF stores a
        // convolution), else rows of one block (320·2880 is 3600 K-quant blocks of 256).
        let block = dtype.block_elems();
        let rows = if (n / shape[0]).is_multiple_of(block) {
            vec![shape[0], n / shape[0]]
        } else {
            vec![n / block, block]
        };
        if rows != *shape {
            metadata.push((
                format!("{ORIG_SHAPE_PREFIX}{name}"),
                Value::Array(Array::U64(shape.clone())),
            ));
        }
        stored.push((rows, data));
    }
    let tensors: Vec<GgufTensorData<'_>> = layers
        .iter()
        .zip(&stored)
        .map(|((name, _, _), (shape, data))| GgufTensorData {
            name,
            dtype,
            shape,
            data,
        })
        .collect();
    write_gguf(path, &metadata, &tensors)?;
    Ok(())
}

/// One pass: each block's convolution on `x`, its projections on `y`.
pub fn forward<B: Backend>(
    s: &Streamer<B>,
    x: Tensor<B, 4>,
    y: Tensor<B, 2>,
) -> (Tensor<B, 4>, Tensor<B, 2>) {
    let (mut x, mut y) = (x, y);
    let opts = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
    for b in 0..BLOCKS {
        let w: Tensor<B, 4> = s
            .fetch(&format!("blocks.{b}.conv"))
            .unwrap()
            .get("weight")
            .unwrap();
        x = conv2d(x, w, None, opts.clone()).tanh();
        let up: Tensor<B, 2> = s
            .fetch(&format!("blocks.{b}.up"))
            .unwrap()
            .get("weight")
            .unwrap();
        let h = y.clone().matmul(up.transpose()).tanh();
        let down: Tensor<B, 2> = s
            .fetch(&format!("blocks.{b}.down"))
            .unwrap()
            .get("weight")
            .unwrap();
        y = y + h.matmul(down.transpose());
    }
    (x, y)
}

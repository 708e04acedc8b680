//! One multi-head attention of `--tokens` queries and keys (Wan 2.1 1.3B's widths by default:
//! 12 heads of 128), timed, with the process's peak resident memory. One line per run; run
//! one configuration per process so the peak is that configuration's:
//!
//!     cargo run --release --example attention_bench -- --tokens 16384 [--heads 12]
//!         [--head-dim 128] [--block-mib 64 | --block-mib 0] [--backend ndarray|wgpu|cuda]
//!         [--dtype f32|f16]
//!
//! By default it runs the library's attention (`distorch::models::nn::attention::attention`: the
//! host kernel on ndarray; on wgpu and CUDA the fused kernel at `--dtype f16`, blocks of
//! scores at f32). `--block-mib M` runs the
//! blocked path without the fused kernel, M MiB of scores per block; `--block-mib 0`
//! computes the whole score matrix at once (how attention ran before it was blocked).

#![allow(clippy::print_stdout)]

use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor};
use distorch::models::nn::attention::{attention, attention_in_blocks};

/// The process's peak resident set (VmHWM), in MiB; 0 where /proc is not there.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

struct Options {
    tokens: usize,
    heads: usize,
    head_dim: usize,
    /// `None`: the library's attention; else the blocked path at this many bytes per block.
    block_bytes: Option<usize>,
    /// The inputs' dtype.
    dtype: DType,
}

fn main() {
    let arg = |name: &str| std::env::args().skip_while(|a| a != name).nth(1);
    let num = |name: &str, default: usize| match arg(name) {
        None => default,
        Some(v) => v.parse().unwrap_or_else(|_| {
            println!("{name} {v}: expected a whole number");
            std::process::exit(2);
        }),
    };
    let block_mib = arg("--block-mib").map(|_| num("--block-mib", 0));
    let options = Options {
        tokens: num("--tokens", 16384).max(1),
        heads: num("--heads", 12).max(1),
        head_dim: num("--head-dim", 128).max(1),
        block_bytes: block_mib.map(|m| if m == 0 { usize::MAX } else { m << 20 }),
        dtype: match arg("--dtype").as_deref() {
            None | Some("f32") => DType::F32,
            Some("f16") => DType::F16,
            Some(other) => {
                println!("--dtype {other}: expected f32 or f16");
                std::process::exit(2);
            }
        },
    };
    let backend = arg("--backend").unwrap_or_else(|| "ndarray".into());
    match backend.as_str() {
        #[cfg(feature = "ndarray")]
        "ndarray" => bench::<distorch::backends::NdArray>(&backend, &options),
        #[cfg(feature = "wgpu")]
        "wgpu" => bench::<distorch::backends::Wgpu>(&backend, &options),
        #[cfg(feature = "cuda")]
        "cuda" => bench::<distorch::backends::Cuda>(&backend, &options),
        other => {
            println!("backend `{other}` is not compiled in (try --features {other})");
            std::process::exit(2);
        }
    }
}

fn bench<B: Backend>(backend: &str, o: &Options) {
    let device = Default::default();
    if !B::supports_dtype(&device, o.dtype) {
        println!(
            "backend `{backend}` does not compute in {:?} on this device",
            o.dtype
        );
        std::process::exit(2);
    }
    let width = o.heads * o.head_dim;
    // Drawn 4,096 tokens at a time, so no f32 buffer larger than one f16 input is needed
    // (lavapipe refuses buffers much over 128 MiB).
    let t = || {
        let chunks = (0..o.tokens)
            .step_by(4096)
            .map(|start| {
                let n = (o.tokens - start).min(4096);
                Tensor::<B, 3>::random([1, n, width], Distribution::Normal(0.0, 1.0), &device)
                    .cast(o.dtype)
            })
            .collect();
        Tensor::cat(chunks, 1)
    };
    let (q, k, v) = (t(), t(), t());
    let _ = (q.clone() + k.clone() + v.clone()).sum().into_data();
    let before = peak_rss_mib();
    let run = || {
        let start = Instant::now();
        let (q, k, v) = (q.clone(), k.clone(), v.clone());
        let out = match o.block_bytes {
            None => attention(q, k, v, o.heads, None),
            Some(bytes) => attention_in_blocks(q, k, v, o.heads, None, bytes),
        };
        // A read back, so the clock sees the work.
        let _ = out.sum().into_data();
        start.elapsed().as_secs_f64()
    };
    // The first call includes compiling the backend's kernels for these shapes (seconds on
    // wgpu); the second is the steady state a model's later steps see.
    let first = run();
    let secs = run();
    let block = match o.block_bytes {
        None => "library".to_owned(),
        Some(usize::MAX) => "whole".to_owned(),
        Some(bytes) => format!("{}MiB", bytes >> 20),
    };
    println!(
        "tokens={} heads={} head_dim={} dtype={:?} block={block} backend={backend} first_secs={first:.2} secs={secs:.2} \
         peak_rss_mib={:.0} inputs_rss_mib={before:.0}",
        o.tokens,
        o.heads,
        o.head_dim,
        o.dtype,
        peak_rss_mib()
    );
}

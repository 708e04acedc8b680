//! One multi-head attention of `--tokens` queries and keys (Wan 2.1 1.3B's widths by default:
//! 12 heads of 128), timed, with the process's peak resident memory. One line per run; run
//! one configuration per process so the peak is that configuration's:
//!
//!     cargo run --release --example attention_bench -- --tokens 16384 [--heads 12]
//!         [--head-dim 128] [--block-mib 64 | --block-mib 0] [--backend ndarray|wgpu|cuda]
//!
//! `--block-mib 0` computes the whole score matrix at once (how attention ran before it was
//! blocked); the default is the library's bound (`distorch::models::attention`).

#![allow(clippy::print_stdout)]

use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use distorch::models::attention::{SCORE_BLOCK_BYTES, attention_in_blocks};

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
    block_bytes: usize,
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
    let block_mib = num("--block-mib", SCORE_BLOCK_BYTES >> 20);
    let options = Options {
        tokens: num("--tokens", 16384).max(1),
        heads: num("--heads", 12).max(1),
        head_dim: num("--head-dim", 128).max(1),
        block_bytes: if block_mib == 0 {
            usize::MAX
        } else {
            block_mib << 20
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
    let width = o.heads * o.head_dim;
    let t = || {
        Tensor::<B, 3>::random(
            [1, o.tokens, width],
            Distribution::Normal(0.0, 1.0),
            &device,
        )
    };
    let (q, k, v) = (t(), t(), t());
    let _ = (q.clone() + k.clone() + v.clone()).sum().into_data();
    let before = peak_rss_mib();
    let start = Instant::now();
    let out = attention_in_blocks(q, k, v, o.heads, None, o.block_bytes);
    // A read back, so the clock sees the work.
    let _ = out.sum().into_data();
    let secs = start.elapsed().as_secs_f64();
    let block = if o.block_bytes == usize::MAX {
        "whole".to_owned()
    } else {
        format!("{}MiB", o.block_bytes >> 20)
    };
    println!(
        "tokens={} heads={} head_dim={} block={block} backend={backend} secs={secs:.2} \
         peak_rss_mib={:.0} inputs_rss_mib={before:.0}",
        o.tokens,
        o.heads,
        o.head_dim,
        peak_rss_mib()
    );
}

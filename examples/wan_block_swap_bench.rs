//! Block-swap benchmark: a Wan transformer's forward pass (1.3B-class widths — 1536 wide, 12
//! heads, feed-forward 8960 — with `--blocks` blocks, bf16 weights in the original layout,
//! random) with 0, half and all blocks swapped to host memory, streamed by the [`Streamer`]
//! `--prefetch` blocks ahead. Latents: 16 channels, 5 frames at 32×32 (1,280 tokens), batch
//! 1; 64 text tokens. Prints one line per configuration with the ratio to resident.
//!
//! Run: `cargo run --release --example wan_block_swap_bench [-- --blocks N] [--passes N]
//! [--prefetch BLOCKS] [--backend ndarray|wgpu|cuda]` (defaults: 6 blocks, 2 timed passes
//! after one warm-up, 1 block ahead, ndarray). The compute device is labelled `cuda:0` in
//! the plan whatever the backend: on ndarray the "transfer" of a swapped block is reading
//! its bf16 bytes from the memory-mapped file and widening them to f32.

#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use distorch::core::runtime::Lookahead;
use distorch::core::write_random;
use distorch::models::wan::dit::{WanDitConfig, WanDitInput, WanTransformer};
use distorch::models::{ComponentOptions, Loaded, Placement, load_model};
use distorch::{BlockSwap, DType, DeviceGraph, DeviceId, PlanRequest};

#[path = "common/random.rs"]
mod random;
use random::values;

fn config(blocks: usize) -> WanDitConfig {
    WanDitConfig {
        num_attention_heads: 12,
        attention_head_dim: 128,
        ffn_dim: 8960,
        num_layers: blocks,
        ..WanDitConfig::default()
    }
}

/// Writes the checkpoint (original layout, bf16, `distorch::core::write_random`'s weights)
/// unless it is there.
fn write_model(path: &std::path::Path, c: &WanDitConfig) -> Result<(), distorch::Error> {
    if path.exists() {
        return Ok(());
    }
    let specs: Vec<_> = WanTransformer::<distorch::backends::NdArray>::expected_in(
        c,
        distorch::models::wan::dit::WanLayout::Original,
    )
    .into_iter()
    .map(|e| {
        (
            e.name,
            DType::BF16,
            e.shape.iter().map(|&d| d as u64).collect(),
        )
    })
    .collect();
    write_random(path, &specs, 1, &BTreeMap::new())?;
    Ok(())
}

fn main() -> Result<(), distorch::Error> {
    let arg = |name: &str| std::env::args().skip_while(|a| a != name).nth(1);
    let num = |name: &str, d: usize| arg(name).and_then(|p| p.parse().ok()).unwrap_or(d);
    let (blocks, passes, prefetch) = (num("--blocks", 6), num("--passes", 2), num("--prefetch", 1));
    let backend = arg("--backend").unwrap_or_else(|| "ndarray".into());
    match backend.as_str() {
        #[cfg(feature = "ndarray")]
        "ndarray" => bench::<distorch::backends::NdArray>(&backend, blocks, passes, prefetch),
        #[cfg(feature = "wgpu")]
        "wgpu" => bench::<distorch::backends::Wgpu>(&backend, blocks, passes, prefetch),
        #[cfg(feature = "cuda")]
        "cuda" => bench::<distorch::backends::Cuda>(&backend, blocks, passes, prefetch),
        other => {
            println!("backend `{other}` is not compiled in (try --features {other})");
            std::process::exit(2);
        }
    }
}

fn bench<B: Backend>(
    backend: &str,
    blocks: usize,
    passes: usize,
    prefetch: usize,
) -> Result<(), distorch::Error> {
    let c = config(blocks);
    let dir = std::env::temp_dir().join("distorch-wan-bench");
    std::fs::create_dir_all(&dir).map_err(|source| distorch::core::Error::Io {
        path: dir.clone(),
        source,
    })?;
    let path = dir.join(format!("wan-{blocks}.safetensors"));
    write_model(&path, &c)?;
    let device: burn::tensor::Device<B> = Default::default();
    let (f, h, w, tokens) = (5, 32, 32, 64);
    let latents = 16 * f * h * w;
    let input = || WanDitInput {
        hidden_states: Tensor::<B, 1>::from_data(
            TensorData::new(values(7, latents, 2.0), [latents]),
            &device,
        )
        .reshape([1, 16, f, h, w]),
        timestep: vec![500.0],
        encoder_hidden_states: Tensor::<B, 1>::from_data(
            TensorData::new(values(8, tokens * 4096, 2.0), [tokens * 4096]),
            &device,
        )
        .reshape([1, tokens, 4096]),
    };
    let graph: DeviceGraph = "cuda:0=64gib,cpu=64gib".parse()?;
    println!(
        "# Wan transformer, {blocks} blocks of width 1536 (bf16 on disk), {} tokens, {passes} \
         timed pass(es) after one warm-up, prefetch {prefetch} block(s), backend={backend}",
        f * (h / 2) * (w / 2)
    );
    let mut resident = None;
    for swapped in [0, blocks / 2, blocks] {
        let swap = BlockSwap::new(DeviceId::cuda(0), DeviceId::CPU, swapped);
        let mut options = ComponentOptions::new(
            graph.clone(),
            Placement {
                request: PlanRequest::block_swap(swap),
                devices: distorch::core::runtime::DeviceMap::new(device.clone()),
            },
        );
        options.lookahead = Lookahead {
            units: prefetch.max(1) * c.units_per_block(),
            bytes: distorch::ByteSize::gib(2),
        };
        let loaded: Loaded<WanTransformer<B>> = load_model(&path, Some(c.clone()), &options)?;
        let m = loaded.model;
        let run = || -> Result<(), distorch::Error> {
            let out = m.forward(input())?;
            let _ = out.sum().into_data();
            Ok(())
        };
        run()?;
        let _ = m.streamer().take_stats();
        let start = Instant::now();
        for _ in 0..passes {
            run()?;
        }
        let secs = start.elapsed().as_secs_f64() / passes as f64;
        let stats = m.streamer().take_stats();
        let base = *resident.get_or_insert(secs);
        let moved: u64 = stats.bytes_moved.values().map(|b| b.bytes()).sum();
        let on_host = loaded
            .report
            .bytes_per_device
            .iter()
            .find(|(d, _)| *d == DeviceId::CPU)
            .map_or(0, |(_, b)| b.bytes());
        println!(
            "swapped={swapped}/{blocks} host_mb={:.0} pass_s={secs:.3} ratio={:.3} stall_ms={:.1} \
             moved_mb={:.0} prefetched={} on_demand={} peak_extra_mb={:.0}",
            on_host as f64 / 1e6,
            secs / base,
            stats.stall.as_secs_f64() * 1e3 / passes as f64,
            moved as f64 / passes as f64 / 1e6,
            stats.prefetched,
            stats.on_demand,
            stats.peak_extra_bytes.bytes() as f64 / 1e6,
        );
    }
    Ok(())
}

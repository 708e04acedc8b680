//! Block-swap benchmark: a FLUX transformer's forward pass at FLUX.1's widths (3,072 wide, 24
//! heads of 128, MLP 12,288, T5 width 4,096, CLIP width 768, 64 packed channels) cut to
//! `--double` double-stream and `--single` single-stream blocks, bf16 weights in the BFL
//! layout, random) with none, half and all of both block lists swapped to host memory,
//! streamed by the [`Streamer`] one block ahead. Tokens: an image of `--side` × `--side` packed
//! latent tokens (16: 256×256 pixels; 64: 1024×1024) and 64 text tokens, batch 1. Prints one
//! line per configuration with the ratio to resident.
//!
//! Run: `cargo run --release --example flux_block_swap_bench [-- --double N] [--single N]
//! [--side N] [--passes N] [--backend ndarray|wgpu|cuda]` (defaults: 1 double and 2 single
//! blocks, side 16, 2 timed passes after one warm-up, ndarray). The compute device is labelled `cuda:0` in the
//! plan whatever the backend: on ndarray the "transfer" of a swapped block is reading its
//! bf16 bytes from the memory-mapped file and widening them to f32.

#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use distorch::core::runtime::Lookahead;
use distorch::core::write_random;
use distorch::models::flux::dit::{FluxConfig, FluxInput, FluxLayout, FluxTransformer, image_ids};
use distorch::models::{ComponentOptions, Loaded, Placement, load_model};
use distorch::{DType, DeviceGraph, DeviceId, PlanRequest};

#[path = "common/random.rs"]
mod random;
use random::values;

#[path = "common/malloc.rs"]
mod malloc;

/// Writes the checkpoint (BFL layout, bf16, `distorch::core::write_random`'s weights) unless
/// it is there.
fn write_model(path: &std::path::Path, c: &FluxConfig) -> Result<(), distorch::Error> {
    if path.exists() {
        return Ok(());
    }
    let specs: Vec<_> =
        FluxTransformer::<distorch::backends::NdArray>::expected_in(c, FluxLayout::Bfl)
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

/// Command-line settings.
struct Args {
    side: usize,
    double: usize,
    single: usize,
    passes: usize,
    backend: String,
}

fn main() -> Result<(), distorch::Error> {
    malloc::keep_freed_memory();
    let arg = |name: &str| std::env::args().skip_while(|a| a != name).nth(1);
    let num = |name: &str, d: usize| arg(name).and_then(|p| p.parse().ok()).unwrap_or(d);
    let args = Args {
        side: num("--side", 16),
        double: num("--double", 1),
        single: num("--single", 2),
        passes: num("--passes", 2),
        backend: arg("--backend").unwrap_or_else(|| "ndarray".into()),
    };
    match args.backend.as_str() {
        #[cfg(feature = "ndarray")]
        "ndarray" => bench::<distorch::backends::NdArray>(&args),
        #[cfg(feature = "wgpu")]
        "wgpu" => bench::<distorch::backends::Wgpu>(&args),
        #[cfg(feature = "cuda")]
        "cuda" => bench::<distorch::backends::Cuda>(&args),
        other => {
            println!("backend `{other}` is not compiled in (try --features {other})");
            std::process::exit(2);
        }
    }
}

fn bench<B: Backend>(args: &Args) -> Result<(), distorch::Error> {
    let c = FluxConfig {
        num_layers: args.double,
        num_single_layers: args.single,
        ..FluxConfig::default()
    };
    let dir = std::env::temp_dir().join("distorch-flux-bench");
    std::fs::create_dir_all(&dir).map_err(|source| distorch::core::Error::Io {
        path: dir.clone(),
        source,
    })?;
    let path = dir.join(format!("flux-{}-{}.safetensors", args.double, args.single));
    write_model(&path, &c)?;
    let device: burn::tensor::Device<B> = Default::default();
    let (side, text) = (args.side, 64);
    let tokens = side * side;
    let tensor = |seed, shape: [usize; 3]| {
        let n = shape.iter().product();
        Tensor::<B, 1>::from_data(TensorData::new(values(seed, n, 2.0), [n]), &device)
            .reshape(shape)
    };
    let input = || FluxInput {
        hidden_states: tensor(7, [1, tokens, 64]),
        encoder_hidden_states: tensor(8, [1, text, 4096]),
        pooled_projections: tensor(9, [1, 1, 768]).reshape([1, 768]),
        timestep: vec![0.5],
        img_ids: image_ids(side, side),
        txt_ids: vec![[0.0; 3]; text],
        guidance: Some(vec![3.5]),
    };
    let graph: DeviceGraph = "cuda:0=64gib,cpu=64gib".parse()?;
    println!(
        "# FLUX transformer, {} double + {} single blocks of width 3072 (bf16 on disk), {} image \
         + {text} text tokens, {} timed pass(es) after one warm-up, prefetch 1 block, backend={}",
        args.double, args.single, tokens, args.passes, args.backend
    );
    let mut resident = None;
    let (d, s) = (args.double, args.single);
    for (dd, ss) in [(0, 0), (d / 2, s / 2), (d, s)] {
        let swap = FluxLayout::Bfl.block_swap(DeviceId::cuda(0), DeviceId::CPU, dd, ss);
        let mut options = ComponentOptions::new(
            graph.clone(),
            Placement {
                request: PlanRequest::block_swap(swap),
                devices: distorch::core::runtime::DeviceMap::new(device.clone()),
            },
        );
        // A double-stream block has 16 units (a single-stream one 5): one block ahead.
        options.lookahead = Lookahead {
            units: 16,
            bytes: distorch::ByteSize::gib(2),
        };
        let loaded: Loaded<FluxTransformer<B>> = load_model(&path, Some(c.clone()), &options)?;
        let m = loaded.model;
        let run = || -> Result<(), distorch::Error> {
            let out = m.forward(input())?;
            let _ = out.sum().into_data();
            Ok(())
        };
        run()?;
        let _ = m.streamer().take_stats();
        let start = Instant::now();
        for _ in 0..args.passes {
            run()?;
        }
        let secs = start.elapsed().as_secs_f64() / args.passes as f64;
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
            "swapped={dd}/{d}+{ss}/{s} host_mb={:.0} pass_s={secs:.3} ratio={:.3} \
             stall_ms={:.1} moved_mb={:.0} prefetched={} on_demand={} peak_extra_mb={:.0}",
            on_host as f64 / 1e6,
            secs / base,
            stats.stall.as_secs_f64() * 1e3 / args.passes as f64,
            moved as f64 / args.passes as f64 / 1e6,
            stats.prefetched,
            stats.on_demand,
            stats.peak_extra_bytes.bytes() as f64 / 1e6,
        );
    }
    Ok(())
}

//! Offload benchmark: the forward pass of 24 diffusion-shaped layers (3×3 convolutions at a
//! 512×512 image's latent, attention-width projections; batch 2 for guidance; 240 MB of
//! weights in f32, 120 MB in f16/bf16) with 0 %, 50 % and 100 % of the weights in host
//! memory, streamed by the [`Streamer`]. Prints one line per configuration: `storage_mb` is
//! the offloaded units' bytes at their home (the plan's number), `moved_mb` what a pass
//! uploaded (equal: weights cross in their storage dtype), `staging_mb` the most host memory
//! staging allocated at once (zero-copy views of the mapping allocate nothing; ndarray widens
//! to f32 on the host, which is its upload).
//!
//! Before the passes it measures the upload bandwidth (`upload_gb_s`: a 256 MiB host buffer
//! marked file-backed, as the streamer's views of the mapping are — CubeCL's CUDA runtime
//! stages such bytes through pinned memory — uploaded and waited for, best of three), and
//! each line gives `bound_s` = max(resident pass, moved bytes / bandwidth), the fastest a
//! pass can be when every transfer hides behind compute, and `vs_bound` = pass / bound.
//!
//! Run: `cargo run --release --example offload_bench [-- --passes N] [--lookahead UNITS]
//! [--offload PCT,PCT,...] [--backend ndarray|wgpu|cuda] [--file-dtype f32|f16|bf16|q8_0|q4_k|...]
//! [--dtype f32|f16|bf16]` (defaults: 2 passes, look-ahead 2 units, offload 0,50,100,
//! ndarray, an f32 file, f32 compute). `wgpu` and `cuda` need the facade's features of the
//! same name (`--features wgpu`).

#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use distorch::alloc::{PinPolicy, PlacementOrder};
use distorch::core::runtime::{DeviceMap, LoadOptions, Lookahead, Streamer, WeightStore};
use distorch::core::runtime::{compute_burn_dtype, device_rule};
use distorch::core::{ComputeDtype, Homes, units};

#[path = "common/random.rs"]
mod random;
use distorch::{
    ByteSize, DType, DeviceGraph, DeviceId, PlanRequest, SafetensorsIndex, VirtualVram,
};
use random::values;

#[path = "common/blocks.rs"]
mod blocks;
#[path = "common/stack.rs"]
mod stack;
use stack::{BLOCKS, CONV, DIM, LATENT, TOKENS, forward, write_model};

/// Forces the backend to finish (a read back) so the clock sees the real time.
fn sync<B2: Backend, const D: usize>(t: &Tensor<B2, D>) {
    let _ = t.clone().sum().into_data();
}

struct Options {
    passes: usize,
    lookahead: Lookahead,
    offloads: Vec<u64>,
    file: DType,
    compute: ComputeDtype,
}

fn main() {
    if let Err(e) = run() {
        println!("error: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), distorch::Error> {
    let arg = |name: &str| std::env::args().skip_while(|a| a != name).nth(1);
    let options = Options {
        passes: arg("--passes").and_then(|p| p.parse().ok()).unwrap_or(2),
        lookahead: Lookahead {
            units: arg("--lookahead").and_then(|p| p.parse().ok()).unwrap_or(2),
            ..Lookahead::default()
        },
        offloads: arg("--offload")
            .map(|s| s.split(',').filter_map(|p| p.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![0, 50, 100]),
        file: match arg("--file-dtype").as_deref() {
            None | Some("f32") => DType::F32,
            Some("f16") => DType::F16,
            Some("bf16") => DType::BF16,
            Some(other) => match DType::QUANTIZED
                .into_iter()
                .find(|q| q.name().eq_ignore_ascii_case(other))
            {
                Some(q) => q,
                None => {
                    println!(
                        "--file-dtype {other}: expected f32, f16, bf16 or a GGUF type (q4_0, q8_0, q4_k, ...)"
                    );
                    std::process::exit(2);
                }
            },
        },
        compute: match arg("--dtype").map(|d| d.parse::<ComputeDtype>()) {
            None => ComputeDtype::F32,
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                println!("--dtype: {e}");
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

fn bench<B: Backend>(backend: &str, options: &Options) -> Result<(), distorch::Error> {
    let Options {
        passes,
        lookahead,
        ref offloads,
        file,
        compute,
    } = *options;
    let dir = std::env::temp_dir().join("distorch-offload-bench");
    std::fs::create_dir_all(&dir).map_err(|source| distorch::core::Error::Io {
        path: dir.clone(),
        source,
    })?;
    let ext = if file.is_quantized() {
        "gguf"
    } else {
        "safetensors"
    };
    let path = dir.join(format!("blocks-{file}.{ext}"));
    write_model(&path, file)?;
    let index = SafetensorsIndex::open(&path)?;
    let split = distorch::models::load::split(&index);
    let component = &split.components[0];
    let device: burn::tensor::Device<B> = Default::default();
    let homes = Homes {
        compute,
        ..Homes::new(device_rule::<B>(&device))
    };
    let inventory = units::inventory_with(component, &homes)?;
    let graph: DeviceGraph = "cuda:0=64gib,cpu=64gib".parse()?;
    let x = Tensor::<B, 1>::from_data(
        TensorData::new(
            values(7, 2 * CONV * LATENT * LATENT, 1.0),
            [2 * CONV * LATENT * LATENT],
        ),
        &device,
    )
    .reshape([2, CONV, LATENT, LATENT]);
    let y = Tensor::<B, 1>::from_data(
        TensorData::new(values(8, 2 * TOKENS * DIM, 1.0), [2 * TOKENS * DIM]),
        &device,
    )
    .reshape([2 * TOKENS, DIM]);
    println!(
        "# {} layers, {} of {file} weights ({} at device homes), compute {compute}, {passes} timed pass(es) after one warm-up, backend={backend}",
        3 * BLOCKS,
        inventory.total_bytes(),
        inventory.bytes_on(DeviceId::cuda(0), DeviceId::cuda(0)),
    );
    // On ndarray the host is the device: an "upload" is a view or a copy in place, and
    // moved bytes cost no transfer time.
    let bandwidth = if B::name(&device).contains("ndarray") {
        println!("# upload_gb_s=n/a (ndarray computes in host memory)");
        f64::INFINITY
    } else {
        let bandwidth = distorch::core::runtime::upload_rate::<B>(&device) as f64;
        println!("# upload_gb_s={:.2}", bandwidth / 1e9);
        bandwidth
    };
    let mut resident_time = None;
    for &pct in offloads {
        let amount = ByteSize(inventory.total_bytes().bytes() * pct / 100);
        let vv = VirtualVram::new(DeviceId::cuda(0), amount, vec![DeviceId::CPU])?;
        let pin = PinPolicy {
            tiny_threshold: ByteSize(0),
            ..PinPolicy::default()
        };
        let req = PlanRequest::virtual_vram(vv)
            .with_order(PlacementOrder::Interleave)
            .with_pin(pin);
        let plan = distorch::plan(&req, &inventory, &graph)?;
        let devices = DeviceMap::new(device.clone());
        let load = LoadOptions {
            compute,
            ..LoadOptions::default()
        };
        let (store, _) = WeightStore::<B>::load(&index, component, &plan, &devices, &load)?;
        // Inputs in the compute dtype, once loading has accepted it for this device.
        let dtype = compute_burn_dtype(compute);
        let (x, y) = (x.clone().cast(dtype), y.clone().cast(dtype));
        let storage: u64 = store
            .units()
            .iter()
            .filter(|u| !u.is_resident())
            .map(|u| u.bytes.bytes())
            .sum();
        let streamer = Streamer::new(Arc::new(store), lookahead);
        let (a, b) = forward(&streamer, x.clone(), y.clone());
        sync(&a);
        sync(&b);
        let _ = streamer.take_stats();
        let start = Instant::now();
        for _ in 0..passes {
            let (a, b) = forward(&streamer, x.clone(), y.clone());
            sync(&a);
            sync(&b);
        }
        let secs = start.elapsed().as_secs_f64() / passes as f64;
        let stats = streamer.take_stats();
        let base = *resident_time.get_or_insert(secs);
        let moved: u64 = stats.bytes_moved.values().map(|b| b.bytes()).sum();
        let bound = base.max(moved as f64 / passes as f64 / bandwidth);
        println!(
            "offload={pct}% lookahead={} backend={backend} file={file} dtype={compute} pass_s={secs:.3} ratio={:.3} bound_s={bound:.3} vs_bound={:.3} stall_ms={:.1} storage_mb={:.1} moved_mb={:.1} staging_mb={:.1} prefetched={} on_demand={} peak_extra_mb={:.0}",
            lookahead.units,
            secs / base,
            secs / bound,
            stats.stall.as_secs_f64() * 1e3 / passes as f64,
            storage as f64 / 1e6,
            moved as f64 / passes as f64 / 1e6,
            stats.peak_staging_bytes.bytes() as f64 / 1e6,
            stats.prefetched,
            stats.on_demand,
            stats.peak_extra_bytes.bytes() as f64 / 1e6,
        );
    }
    Ok(())
}

//! GGUF dequantization throughput, one line per type: a [4096, 4096] weight of random blocks,
//! resident on the compute device and fetched (dequantized to f32) as a forward pass would.
//! On ndarray the weight is dequantized on the host (rayon) when placed, so the line also
//! times the host kernel directly; on wgpu and CUDA it stays packed in device memory and each
//! fetch dequantizes it there.
//!
//!     cargo run --release --example dequant_bench -- [--backend ndarray|wgpu|cuda] [--rows 4096]
//!
//! GB/s counts the f32 output (4 bytes per element).

#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::Instant;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use distorch::alloc::{ByteSize, DeviceGraph, PinPolicy, PlanRequest};
use distorch::core::components::{self, Conventions};
use distorch::core::gguf::{GgufTensorData, write_gguf};
use distorch::core::runtime::{
    DeviceMap, LoadOptions, Lookahead, Streamer, WeightStore, device_rule,
};
use distorch::core::{DType, Homes, SafetensorsIndex, quant, units};

const COLS: usize = 4096;

#[path = "common/blocks.rs"]
mod blocks;

fn main() {
    let arg = |name: &str| std::env::args().skip_while(|a| a != name).nth(1);
    let rows: usize = arg("--rows").and_then(|v| v.parse().ok()).unwrap_or(4096);
    let backend = arg("--backend").unwrap_or_else(|| "ndarray".into());
    match backend.as_str() {
        "ndarray" => bench::<distorch::backends::NdArray>(&backend, rows),
        #[cfg(feature = "wgpu")]
        "wgpu" => bench::<distorch::backends::Wgpu>(&backend, rows),
        #[cfg(feature = "cuda")]
        "cuda" => bench::<distorch::backends::Cuda>(&backend, rows),
        other => println!("backend `{other}` is not compiled in (try --features {other})"),
    }
}

fn bench<B: Backend>(backend: &str, rows: usize) {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let device: B::Device = Default::default();
    let n = rows * COLS;
    let out_gb = 4.0 * n as f64 / 1e9;
    for dtype in DType::QUANTIZED {
        let data = blocks::random_blocks(dtype, n, 0, 1e-3);
        // The host kernel alone.
        let mut out = vec![0f32; n];
        let t = Instant::now();
        for _ in 0..3 {
            quant::dequantize(dtype, &data, &mut out).expect("whole blocks");
        }
        let host = 3.0 * out_gb / t.elapsed().as_secs_f64();

        let path = dir.path().join("w.gguf");
        let shape = [rows as u64, COLS as u64];
        let tensor = GgufTensorData {
            name: "w.weight",
            dtype,
            shape: &shape,
            data: &data,
        };
        write_gguf(&path, &[], &[tensor]).expect("written");
        let index = SafetensorsIndex::open(&path).expect("readable");
        let split = components::split(&index, &Conventions::NONE);
        let c = &split.components[0];
        let rule = device_rule::<B>(&device);
        let inventory = units::inventory_with(c, &Homes::new(rule)).expect("inventory");
        let graph: DeviceGraph = "cuda:0=64gib,cpu=64gib".parse().expect("graph");
        let pin = PinPolicy {
            tiny_threshold: ByteSize(0),
            ..PinPolicy::default()
        };
        let request = PlanRequest::expert("cuda:0,*".parse().expect("alloc")).with_pin(pin);
        let plan = distorch::alloc::plan(&request, &inventory, &graph).expect("plan");
        let devices = DeviceMap::new(device.clone());
        let (store, _) =
            WeightStore::<B>::load(&index, c, &plan, &devices, &LoadOptions::default())
                .expect("loaded");
        let held = store.bytes_per_device()[0].1;
        let streamer = Streamer::new(Arc::new(store), Lookahead::default());
        let fetch = || {
            let w: Tensor<B, 2> = streamer
                .fetch("w")
                .expect("unit")
                .get("weight")
                .expect("weight");
            let _ = w.slice([0..1, 0..1]).into_data();
        };
        fetch(); // compiles the kernels on GPU backends
        let t = Instant::now();
        for _ in 0..5 {
            fetch();
        }
        // On ndarray the resident weight is already f32: a fetch dequantizes nothing.
        let fetch_gbs = if rule.quantized == distorch::core::DeviceForm::PackedBytes {
            format!("{:.2}", 5.0 * out_gb / t.elapsed().as_secs_f64())
        } else {
            "n/a".into()
        };
        println!(
            "type={dtype} elements={n} file_bytes={} resident_bytes={} backend={backend} host_gbps={host:.2} device_fetch_gbps={fetch_gbs}",
            data.len(),
            held.0
        );
    }
}

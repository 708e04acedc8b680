//! Times the UNet's forward pass on the CPU (ndarray) for `tools/bench/unet_cpu.py`, which
//! compares it with diffusers on the same weights and inputs.
//!
//! `cargo run --release --example unet_bench -- --model DIR --inputs IN --out OUT
//! [--passes N] [--offload GIB]`: loads the diffusers UNet folder DIR (config.json and one
//! .safetensors), runs one warm-up and N timed passes on the inputs (`sample`, `timestep`,
//! `encoder_hidden_states`), writes `sample` to OUT and prints one JSON line:
//! `{"best_s", "mean_s", "load_s", "breakdown": {...}}`.

#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::{Tensor, TensorData};
use distorch::core::runtime::{DeviceMap, LoadOptions, Lookahead};
use distorch::core::{SafetensorsIndex, units};
use distorch::models::{KeyLayout, Unet2dCondition, UnetConfig, UnetInput};
use distorch::{ByteSize, DType, DeviceGraph, DeviceId, PlanRequest, VirtualVram};

type B = burn::backend::NdArray;

fn arg(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

fn fail(msg: String) -> ! {
    println!("{{\"error\": {msg:?}}}");
    std::process::exit(1)
}

/// An f32 input by name.
fn input(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let index = SafetensorsIndex::open(path).unwrap_or_else(|e| fail(e.to_string()));
    let bytes = std::fs::read(path).unwrap_or_else(|e| fail(e.to_string()));
    let t = index
        .tensors()
        .iter()
        .find(|t| t.name == name && t.dtype == DType::F32)
        .unwrap_or_else(|| fail(format!("no f32 input `{name}`")));
    let raw = &bytes[t.file_offset as usize..(t.file_offset + t.bytes) as usize];
    let v = raw
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (t.shape.iter().map(|&d| d as usize).collect(), v)
}

fn tensor<const D: usize>(path: &Path, name: &str) -> Tensor<B, D> {
    let (shape, v) = input(path, name);
    let dims: [usize; D] = shape
        .try_into()
        .unwrap_or_else(|_| fail(format!("`{name}` has the wrong rank")));
    Tensor::from_data(TensorData::new(v, dims), &Default::default())
}

fn main() {
    let model = PathBuf::from(arg("--model").unwrap_or_else(|| fail("--model DIR".into())));
    let inputs = PathBuf::from(arg("--inputs").unwrap_or_else(|| fail("--inputs FILE".into())));
    let out = PathBuf::from(arg("--out").unwrap_or_else(|| fail("--out FILE".into())));
    let passes: usize = arg("--passes").and_then(|p| p.parse().ok()).unwrap_or(3);
    let offload: f64 = arg("--offload").and_then(|p| p.parse().ok()).unwrap_or(0.0);

    let start = Instant::now();
    let config =
        UnetConfig::from_file(model.join("config.json")).unwrap_or_else(|e| fail(e.to_string()));
    let weights = std::fs::read_dir(&model)
        .unwrap_or_else(|e| fail(e.to_string()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .unwrap_or_else(|| fail("no .safetensors in --model".into()));
    let index = SafetensorsIndex::open(&weights).unwrap_or_else(|e| fail(e.to_string()));
    let split = distorch::models::load::split(&index);
    let c = &split.components[0];
    let order = Unet2dCondition::<B>::execution_order(&config, KeyLayout::Diffusers)
        .unwrap_or_else(|e| fail(e.to_string()));
    let rule = distorch::core::runtime::device_rule::<B>(&Default::default());
    let inventory = units::inventory_with(c, &distorch::core::Homes::new(rule))
        .unwrap_or_else(|e| fail(e.to_string()))
        .in_order(&order);
    let graph: DeviceGraph = "cuda:0=64gib,cpu=64gib"
        .parse()
        .unwrap_or_else(|e| fail(format!("{e}")));
    let vv = VirtualVram::from_gib(DeviceId::cuda(0), offload, vec![DeviceId::CPU])
        .unwrap_or_else(|e| fail(e.to_string()));
    let plan = distorch::plan(&PlanRequest::virtual_vram(vv), &inventory, &graph)
        .unwrap_or_else(|e| fail(e.to_string()));
    let (unet, report) = <Unet2dCondition<B> as distorch::models::Model<B>>::load(
        &distorch::models::LoadContext {
            index: &index,
            component: c,
            plan: &plan,
            devices: &DeviceMap::new(Default::default()),
            options: &LoadOptions::default(),
            lookahead: Lookahead::default(),
        },
        config,
    )
    .unwrap_or_else(|e| fail(e.to_string()));
    let load_s = start.elapsed().as_secs_f64();

    let (_, t) = input(&inputs, "timestep");
    let make = || {
        UnetInput::new(
            tensor::<4>(&inputs, "sample"),
            t.clone(),
            tensor::<3>(&inputs, "encoder_hidden_states"),
        )
    };
    let sync = |x: Tensor<B, 4>| x.into_data().to_vec::<f32>().unwrap_or_default();
    let _ = sync(unet.forward(make()).unwrap_or_else(|e| fail(e.to_string())));
    let _ = unet.streamer().take_stats();
    let mut times = Vec::new();
    let mut last = Vec::new();
    for _ in 0..passes {
        let s = Instant::now();
        last = sync(unet.forward(make()).unwrap_or_else(|e| fail(e.to_string())));
        times.push(s.elapsed().as_secs_f64());
    }
    let stats = unet.streamer().take_stats();
    let (shape, _) = input(&inputs, "sample");
    let bytes: Vec<u8> = last.iter().flat_map(|v| v.to_le_bytes()).collect();
    distorch::core::safetensors::write(
        &out,
        &[(
            "sample".to_owned(),
            DType::F32,
            shape.iter().map(|&d| d as u64).collect(),
        )],
        &[bytes.as_slice()],
        &BTreeMap::new(),
    )
    .unwrap_or_else(|e| fail(e.to_string()));
    let best = times.iter().copied().fold(f64::INFINITY, f64::min);
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let moved: u64 = stats.bytes_moved.values().map(|b| b.bytes()).sum();
    println!(
        "{{\"best_s\": {best:.3}, \"mean_s\": {mean:.3}, \"load_s\": {load_s:.3}, \"breakdown\": \
         {{\"weights_mb\": {:.0}, \"offload_gib\": {offload}, \"units_streamed_per_pass\": {}, \
         \"mb_moved_per_pass\": {:.0}, \"stall_ms_per_pass\": {:.1}}}}}",
        ByteSize(report.bytes_per_device.iter().map(|(_, b)| b.bytes()).sum()).bytes() as f64 / 1e6,
        (stats.prefetched + stats.on_demand) / passes.max(1),
        moved as f64 / passes.max(1) as f64 / 1e6,
        stats.stall.as_secs_f64() * 1e3 / passes.max(1) as f64,
    );
}

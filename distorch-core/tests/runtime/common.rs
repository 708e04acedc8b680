//! Shared by the runtime tests: a small MLP checkpoint, plans for it, loading and forward
//! passes through the streamer.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use burn::tensor::Tensor;
use burn::tensor::activation::relu;
use distorch_alloc::{
    ByteSize, DeviceGraph, DeviceId, PinPolicy, PlacementOrder, Plan, PlanRequest, VirtualVram,
};
use distorch_core::components::Conventions;
use distorch_core::runtime::{
    DeviceMap, LoadOptions, LoadReport, Lookahead, StreamStats, Streamer, WeightPatch, WeightStore,
};
use distorch_core::safetensors::write;
use distorch_core::{DType, Error, SafetensorsIndex, components};

#[cfg(not(any(feature = "test-wgpu", feature = "test-cuda")))]
pub type B = burn::backend::NdArray;
#[cfg(all(feature = "test-wgpu", not(feature = "test-cuda")))]
pub type B = burn::backend::Wgpu;
#[cfg(feature = "test-cuda")]
pub type B = burn::backend::Cuda;

/// False (and says why) when the tests are built for CUDA but `DISTORCH_TEST_CUDA=1` is not
/// set: the CUDA backend needs a GPU and its driver at run time.
#[allow(clippy::print_stderr)]
pub fn backend_available() -> bool {
    if cfg!(feature = "test-cuda")
        && std::env::var_os("DISTORCH_TEST_CUDA").is_none_or(|v| v != "1")
    {
        eprintln!(
            "skipped: built with test-cuda; set DISTORCH_TEST_CUDA=1 on a machine with a GPU"
        );
        return false;
    }
    true
}

/// A second Burn device for the donor: on wgpu a distinct device (its own memory space);
/// ndarray has one device, so there the donor copy is within host memory; on CUDA the second
/// GPU when there is one.
pub fn donor_device() -> burn::tensor::Device<B> {
    #[cfg(all(feature = "test-wgpu", not(feature = "test-cuda")))]
    {
        burn::backend::wgpu::WgpuDevice::Cpu
    }
    #[cfg(feature = "test-cuda")]
    {
        let gpus = std::env::var("DISTORCH_TEST_CUDA_GPUS").ok();
        let index = usize::from(gpus.and_then(|g| g.parse::<usize>().ok()).unwrap_or(1) > 1);
        burn::backend::cuda::CudaDevice::new(index)
    }
    #[cfg(not(any(feature = "test-wgpu", feature = "test-cuda")))]
    {
        Default::default()
    }
}

pub const WIDTH: usize = 48;
pub const LAYERS: usize = 8;

/// Deterministic pseudo-random values in [-0.5, 0.5).
pub fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// An MLP checkpoint: `layers.N.fc` with an f16 weight [WIDTH, WIDTH] and an f32 bias.
pub fn write_mlp(dir: &std::path::Path) -> std::path::PathBuf {
    write_mlp_with_nan(dir, None)
}

/// [`write_mlp`], with a NaN at `(layer, element)` of a weight if given.
pub fn write_mlp_with_nan(
    dir: &std::path::Path,
    nan: Option<(usize, usize)>,
) -> std::path::PathBuf {
    let mut specs = Vec::new();
    let mut data: Vec<Vec<u8>> = Vec::new();
    for l in 0..LAYERS {
        let mut w = values(l as u64, WIDTH * WIDTH);
        if let Some((layer, i)) = nan
            && layer == l
        {
            w[i] = f32::NAN;
        }
        let w: Vec<u8> = w
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let b: Vec<u8> = values(100 + l as u64, WIDTH)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        specs.push((
            format!("layers.{l}.fc.weight"),
            DType::F16,
            vec![WIDTH as u64; 2],
        ));
        data.push(w);
        specs.push((
            format!("layers.{l}.fc.bias"),
            DType::F32,
            vec![WIDTH as u64],
        ));
        data.push(b);
    }
    let path = dir.join("mlp.safetensors");
    let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    write(&path, &specs, &refs, &BTreeMap::new()).unwrap();
    path
}

/// The inventory of `component` as this backend holds it (f32 device copies on ndarray, the
/// file's dtypes on GPU backends).
pub fn inventory_of(component: &components::Component<'_>) -> distorch_alloc::Inventory {
    let rule = distorch_core::runtime::device_rule::<B>(&Default::default());
    distorch_core::units::inventory_with(component, &distorch_core::Homes::new(rule)).unwrap()
}

/// Bytes of one MLP layer (f16 weight, f32 bias) in the file and in host memory.
pub const FILE_UNIT: u64 = (WIDTH * WIDTH * 2 + WIDTH * 4) as u64;

/// Bytes of one MLP layer at a device home of this backend.
pub fn device_unit() -> u64 {
    let rule = distorch_core::runtime::device_rule::<B>(&Default::default());
    rule.device_bytes(DType::F16, (WIDTH * WIDTH) as u64) + (WIDTH * 4) as u64
}

pub fn plan_for(index: &SafetensorsIndex, offload_gib: f64, order: PlacementOrder) -> Plan {
    let split = components::split(index, &Conventions::NONE);
    plan_inventory(&inventory_of(&split.components[0]), offload_gib, order)
}

/// [`plan_for`] of an inventory.
pub fn plan_inventory(
    inv: &distorch_alloc::Inventory,
    offload_gib: f64,
    order: PlacementOrder,
) -> Plan {
    let graph: DeviceGraph = "cuda:0=1gib,cpu=8gib".parse().unwrap();
    let vv = VirtualVram::from_gib(DeviceId::cuda(0), offload_gib, vec![DeviceId::CPU]).unwrap();
    let pin = PinPolicy {
        tiny_threshold: ByteSize(0),
        ..PinPolicy::default()
    };
    let req = PlanRequest::virtual_vram(vv)
        .with_order(order)
        .with_pin(pin);
    distorch_alloc::plan(&req, inv, &graph).unwrap()
}

/// Loads the MLP at `path` with `offload_gib` of it in host memory (interleaved).
pub fn load(
    path: &std::path::Path,
    offload_gib: f64,
    patch: Option<&dyn WeightPatch<B>>,
) -> Result<(WeightStore<B>, LoadReport), Error> {
    let index = SafetensorsIndex::open(path).unwrap();
    let plan = plan_for(&index, offload_gib, PlacementOrder::Interleave);
    load_plan(&index, &plan, &DeviceMap::new(Default::default()), patch)
}

pub fn load_plan(
    index: &SafetensorsIndex,
    plan: &Plan,
    devices: &DeviceMap<B>,
    patch: Option<&dyn WeightPatch<B>>,
) -> Result<(WeightStore<B>, LoadReport), Error> {
    let split = components::split(index, &Conventions::NONE);
    let options = LoadOptions {
        patch,
        ..LoadOptions::default()
    };
    WeightStore::<B>::load(index, &split.components[0], plan, devices, &options)
}

/// The forward pass: every layer's weights through the streamer.
pub fn forward(s: &Streamer<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let mut x = x;
    for l in 0..LAYERS {
        let w = s.fetch(&format!("layers.{l}.fc")).unwrap();
        let weight: Tensor<B, 2> = w.get("weight").unwrap();
        let bias: Tensor<B, 1> = w.get("bias").unwrap();
        x = relu(x.matmul(weight.transpose()) + bias.unsqueeze());
    }
    x
}

pub fn run(
    path: &std::path::Path,
    offload_gib: f64,
    order: PlacementOrder,
    patch: Option<&dyn WeightPatch<B>>,
) -> (Vec<f32>, Vec<StreamStats>, usize) {
    let index = SafetensorsIndex::open(path).unwrap();
    let plan = plan_for(&index, offload_gib, order);
    run_plan(&index, &plan, &DeviceMap::new(Default::default()), patch)
}

/// Three forward passes of a loaded plan: the last output, each pass's statistics, and the
/// number of units not resident.
pub fn run_plan(
    index: &SafetensorsIndex,
    plan: &Plan,
    devices: &DeviceMap<B>,
    patch: Option<&dyn WeightPatch<B>>,
) -> (Vec<f32>, Vec<StreamStats>, usize) {
    #[allow(clippy::clone_on_copy)] // Copy on ndarray only.
    let device = devices.compute().clone();
    let (store, report) = load_plan(index, plan, devices, patch).unwrap();
    assert_eq!(report.tensors, 2 * LAYERS);
    let offloaded = store.units().iter().filter(|u| !u.is_resident()).count();
    let streamer = Streamer::new(Arc::new(store), Lookahead::default());
    let input =
        Tensor::<B, 1>::from_floats(values(7, 2 * WIDTH).as_slice(), &device).reshape([2, WIDTH]);
    let mut stats = Vec::new();
    let mut out = Vec::new();
    for _ in 0..3 {
        out = forward(&streamer, input.clone())
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        stats.push(streamer.take_stats());
    }
    (out, stats, offloaded)
}

//! The weight store and the streamer: outputs are bit-identical whatever the placement,
//! streaming statistics add up, patches apply during loading.
//!
//! Compute runs on ndarray, or on wgpu with `--features test-wgpu` (`cargo test-wgpu`), where
//! host memory and the compute device are two distinct memory spaces.

#![cfg(feature = "runtime")]

use std::collections::BTreeMap;
use std::sync::Arc;

use burn::tensor::Tensor;
use burn::tensor::activation::relu;
use distorch_alloc::{
    ByteSize, DeviceGraph, DeviceId, PinPolicy, PlacementOrder, Plan, PlanRequest, VirtualVram,
};
use distorch_core::runtime::{Lookahead, Streamer, WeightPatch, WeightStore};
use distorch_core::safetensors::write;
use distorch_core::{DType, Error, SafetensorsIndex, components};

#[cfg(not(feature = "test-wgpu"))]
type B = burn::backend::NdArray;
#[cfg(feature = "test-wgpu")]
type B = burn::backend::Wgpu;

const WIDTH: usize = 48;
const LAYERS: usize = 8;

/// Deterministic pseudo-random values in [-0.5, 0.5).
fn values(seed: u64, n: usize) -> Vec<f32> {
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
fn write_mlp(dir: &std::path::Path) -> std::path::PathBuf {
    let mut specs = Vec::new();
    let mut data: Vec<Vec<u8>> = Vec::new();
    for l in 0..LAYERS {
        let w: Vec<u8> = values(l as u64, WIDTH * WIDTH)
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

fn plan_for(index: &SafetensorsIndex, offload_gib: f64, order: PlacementOrder) -> Plan {
    let split = components::split(index);
    let inv = distorch_core::units::inventory(&split.components[0]).unwrap();
    let graph: DeviceGraph = "cuda:0=1gib,cpu=8gib".parse().unwrap();
    let vv = VirtualVram::from_gib(DeviceId::cuda(0), offload_gib, vec![DeviceId::CPU]).unwrap();
    let pin = PinPolicy {
        tiny_threshold: ByteSize(0),
        ..PinPolicy::default()
    };
    let req = PlanRequest::virtual_vram(vv)
        .with_order(order)
        .with_pin(pin);
    distorch_alloc::plan(&req, &inv, &graph).unwrap()
}

/// Loads the MLP at `path` with `offload_gib` of it in host memory (interleaved).
fn load(
    path: &std::path::Path,
    offload_gib: f64,
    patch: Option<&dyn WeightPatch<B>>,
) -> Result<(WeightStore<B>, distorch_core::runtime::LoadReport), Error> {
    let index = SafetensorsIndex::open(path).unwrap();
    let plan = plan_for(&index, offload_gib, PlacementOrder::Interleave);
    let split = components::split(&index);
    WeightStore::<B>::load(
        &index,
        &split.components[0],
        &plan,
        &Default::default(),
        patch,
    )
}

/// The forward pass: every layer's weights through the streamer.
fn forward(s: &Streamer<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let mut x = x;
    for l in 0..LAYERS {
        let w = s.fetch(&format!("layers.{l}.fc")).unwrap();
        let weight: Tensor<B, 2> = w.get("weight").unwrap();
        let bias: Tensor<B, 1> = w.get("bias").unwrap();
        x = relu(x.matmul(weight.transpose()) + bias.unsqueeze());
    }
    x
}

fn run(
    path: &std::path::Path,
    offload_gib: f64,
    order: PlacementOrder,
    patch: Option<&dyn WeightPatch<B>>,
) -> (Vec<f32>, Vec<distorch_core::runtime::StreamStats>, usize) {
    let index = SafetensorsIndex::open(path).unwrap();
    let plan = plan_for(&index, offload_gib, order);
    let split = components::split(&index);
    let device = Default::default();
    let (store, report) =
        WeightStore::<B>::load(&index, &split.components[0], &plan, &device, patch).unwrap();
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

#[test]
fn outputs_are_bit_identical_for_every_placement() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_mlp(dir.path());
    let (resident, stats, offloaded) = run(&path, 0.0, PlacementOrder::Interleave, None);
    assert_eq!(offloaded, 0);
    assert_eq!(stats[0].resident, LAYERS);
    assert!(stats[0].bytes_moved.is_empty());
    // Held as f32 at home; planned by file bytes (f16 weight, f32 bias).
    let unit_bytes = (WIDTH * WIDTH + WIDTH) as u64 * 4;
    let file_unit = (WIDTH * WIDTH * 2 + WIDTH * 4) as u64;
    let half_model = ((LAYERS as u64 / 2 * file_unit) as f64 + 0.5) / (1u64 << 30) as f64;
    for (gib, order, expect_off) in [
        (half_model, PlacementOrder::Interleave, LAYERS / 2),
        (half_model, PlacementOrder::Tail, LAYERS / 2),
        (1.0, PlacementOrder::Interleave, LAYERS),
    ] {
        let (out, stats, offloaded) = run(&path, gib, order, None);
        assert_eq!(offloaded, expect_off, "{gib} GiB {order}");
        assert_eq!(
            out, resident,
            "{gib} GiB {order}: output differs from resident"
        );
        for s in &stats {
            assert_eq!(s.fetches, LAYERS);
            assert_eq!(s.resident + s.prefetched + s.on_demand, LAYERS);
            assert_eq!(s.prefetched + s.on_demand, offloaded);
            assert_eq!(
                s.bytes_moved
                    .get(&DeviceId::CPU)
                    .copied()
                    .unwrap_or_default()
                    .bytes()
                    % unit_bytes,
                0
            );
            assert!(s.peak_extra_bytes.bytes() <= Lookahead::default().bytes.bytes() + unit_bytes);
        }
        // Over three passes every offloaded unit was uploaded at least once per pass.
        let moved: u64 = stats
            .iter()
            .map(|s| s.bytes_moved.get(&DeviceId::CPU).map_or(0, |b| b.bytes()))
            .sum();
        assert!(
            moved >= 3 * offloaded as u64 * unit_bytes - 2 * unit_bytes,
            "{moved}"
        );
    }
}

/// Adds 1 to the first layer's weight.
struct AddOne;

impl WeightPatch<B> for AddOne {
    fn patch(&self, key: &str, w: &Tensor<B, 1>, _shape: &[usize]) -> Option<Tensor<B, 1>> {
        (key == "layers.0.fc.weight").then(|| w.clone().add_scalar(1.0))
    }
}

#[test]
fn patches_apply_during_loading_whatever_the_home() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_mlp(dir.path());
    let (plain, _, _) = run(&path, 0.0, PlacementOrder::Interleave, None);
    let (resident, _, _) = run(&path, 0.0, PlacementOrder::Interleave, Some(&AddOne));
    let (offloaded, _, n) = run(&path, 1.0, PlacementOrder::Interleave, Some(&AddOne));
    assert_eq!(n, LAYERS);
    assert_ne!(resident, plain, "the patch changed the output");
    assert_eq!(
        resident, offloaded,
        "patched output is placement-independent"
    );

    let (store, report) = load(&path, 1.0, Some(&AddOne)).unwrap();
    assert_eq!(report.patched, ["layers.0.fc.weight"]);
    assert!(report.unused.is_empty(), "{:?}", report.unused);
    assert_eq!(report.bytes_per_device[0].0, DeviceId::CPU);
    assert_eq!(
        report.bytes_read.bytes(),
        (LAYERS * (WIDTH * WIDTH * 2 + WIDTH * 4)) as u64
    );
    let streamer = Streamer::new(Arc::new(store), Lookahead::default());
    let w: Tensor<B, 2> = streamer
        .fetch("layers.0.fc")
        .unwrap()
        .get("weight")
        .unwrap();
    let got = w.into_data().to_vec::<f32>().unwrap();
    let want: Vec<f32> = values(0, WIDTH * WIDTH)
        .iter()
        .map(|v| half::f16::from_f32(*v).to_f32() + 1.0)
        .collect();
    assert_eq!(got, want);
}

#[test]
fn unknown_units_and_unsupported_homes_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_mlp(dir.path());
    let (store, _) = load(&path, 0.0, None).unwrap();
    let streamer = Streamer::new(Arc::new(store), Lookahead::default());
    let e = streamer.fetch("layers.99.fc").unwrap_err();
    assert_eq!(e.to_string(), "the weight store has no unit `layers.99.fc`");

    let index = SafetensorsIndex::open(&path).unwrap();
    let split = components::split(&index);
    let inv = distorch_core::units::inventory(&split.components[0]).unwrap();
    let graph: DeviceGraph = "cuda:0=1gib,cuda:1=1gib".parse().unwrap();
    let vv = VirtualVram::from_gib(DeviceId::cuda(0), 1.0, vec![DeviceId::cuda(1)]).unwrap();
    let pin = PinPolicy {
        tiny_threshold: ByteSize(0),
        ..PinPolicy::default()
    };
    let gpu_donor =
        distorch_alloc::plan(&PlanRequest::virtual_vram(vv).with_pin(pin), &inv, &graph).unwrap();
    let e = WeightStore::<B>::load(
        &index,
        &split.components[0],
        &gpu_donor,
        &Default::default(),
        None,
    )
    .unwrap_err();
    assert!(matches!(e, Error::UnsupportedHome { .. }), "{e}");
}

/// With compute that takes real time, the background thread uploads the next units before
/// they are asked for.
#[test]
fn prefetch_hides_uploads_behind_compute() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_mlp(dir.path());
    let (store, _) = load(&path, 1.0, None).unwrap();
    let streamer = Streamer::new(Arc::new(store), Lookahead::default());
    for _ in 0..2 {
        for l in 0..LAYERS {
            streamer.fetch(&format!("layers.{l}.fc")).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20)); // "compute"
        }
    }
    let stats = streamer.take_stats();
    assert_eq!(stats.fetches, 2 * LAYERS);
    // Only the very first unit must be fetched on demand; allow a few for a loaded machine.
    assert!(stats.prefetched >= 2 * LAYERS - 4, "{stats:?}");
    assert!(stats.peak_extra_bytes.bytes() <= 3 * ((WIDTH * WIDTH + WIDTH) * 4) as u64);
}

/// Changes a weight's size: must be a typed error, not a panic later at reshape.
struct Truncate;

impl WeightPatch<B> for Truncate {
    fn patch(&self, key: &str, w: &Tensor<B, 1>, _shape: &[usize]) -> Option<Tensor<B, 1>> {
        (key == "layers.3.fc.weight").then(|| w.clone().narrow(0, 0, 10))
    }
}

#[test]
fn a_patch_that_changes_the_size_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_mlp(dir.path());
    let e = load(&path, 1.0, Some(&Truncate)).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "the patch for `layers.3.fc.weight` returned 10 elements, the weight has {}",
            WIDTH * WIDTH
        )
    );
}

//! The weight store and the streamer: outputs are bit-identical whatever the placement,
//! streaming statistics add up, patches apply during loading.
//!
//! Compute runs on ndarray, or on wgpu with `--features test-wgpu` (`cargo test-wgpu`), where
//! host memory and the compute device are two distinct memory spaces.

use std::sync::Arc;

use crate::common::*;
use burn::tensor::Tensor;
use distorch_alloc::{
    ByteSize, DeviceGraph, DeviceId, PinPolicy, PlacementOrder, PlanRequest, VirtualVram,
};
use distorch_core::components::Conventions;
use distorch_core::runtime::{DeviceMap, Lookahead, Streamer, WeightPatch};
use distorch_core::{Error, SafetensorsIndex, components};

#[test]
fn outputs_are_bit_identical_for_every_placement() {
    if !backend_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = write_mlp(dir.path());
    let (resident, stats, offloaded) = run(&path, 0.0, PlacementOrder::Interleave, None);
    assert_eq!(offloaded, 0);
    assert_eq!(stats[0].resident, LAYERS);
    assert!(stats[0].bytes_moved.is_empty());
    // Streamed from host memory in the file's dtype (f16 weight, f32 bias).
    let unit_bytes = FILE_UNIT;
    let file_unit = FILE_UNIT;
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
    if !backend_available() {
        return;
    }
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
        .map(|v| half::f16::from_f32(half::f16::from_f32(*v).to_f32() + 1.0).to_f32())
        .collect();
    // Patched at f32, stored (and so computed) in the file's dtype.
    assert_eq!(got, want);
}

#[test]
fn unknown_units_and_unsupported_homes_are_errors() {
    if !backend_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = write_mlp(dir.path());
    let (store, _) = load(&path, 0.0, None).unwrap();
    let streamer = Streamer::new(Arc::new(store), Lookahead::default());
    let e = streamer.fetch("layers.99.fc").unwrap_err();
    assert_eq!(e.to_string(), "the weight store has no unit `layers.99.fc`");

    let index = SafetensorsIndex::open(&path).unwrap();
    let split = components::split(&index, &Conventions::NONE);
    let inv = inventory_of(&split.components[0]);
    let graph: DeviceGraph = "cuda:0=1gib,cuda:1=1gib".parse().unwrap();
    let vv = VirtualVram::from_gib(DeviceId::cuda(0), 1.0, vec![DeviceId::cuda(1)]).unwrap();
    let pin = PinPolicy {
        tiny_threshold: ByteSize(0),
        ..PinPolicy::default()
    };
    let gpu_donor =
        distorch_alloc::plan(&PlanRequest::virtual_vram(vv).with_pin(pin), &inv, &graph).unwrap();
    let e = load_plan(
        &index,
        &gpu_donor,
        &DeviceMap::new(Default::default()),
        None,
    )
    .unwrap_err();
    assert!(matches!(e, Error::UnsupportedHome { .. }), "{e}");
}

/// With compute that takes real time, the background thread uploads the next units before
/// they are asked for.
#[test]
fn prefetch_hides_uploads_behind_compute() {
    if !backend_available() {
        return;
    }
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
    // What the prefetch thread staged is counted in whole units at their home, and took time.
    let ahead = stats.staged_ahead.bytes();
    assert_eq!(ahead % FILE_UNIT, 0, "{stats:?}");
    assert!(
        ahead >= (stats.prefetched as u64 - 1) * FILE_UNIT,
        "{stats:?}"
    );
    assert!(!stats.staging_busy.is_zero(), "{stats:?}");
}

/// On ndarray the prefetch thread stages in a pool of its own (the cores the kernels' pool
/// leaves, at least one), and transfers count as overlapping compute only when a core is
/// left; GPU backends stage on the global pool.
#[test]
fn staging_gets_the_cores_the_kernels_leave() {
    use burn::tensor::backend::Backend;
    let caps = distorch_core::runtime::Capabilities::of::<B>(&Default::default());
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let spare = cores.saturating_sub(rayon::current_num_threads());
    if B::name(&Default::default()).contains("ndarray") {
        assert_eq!(caps.staging_threads, Some(spare.max(1)));
        assert_eq!(caps.transfers_overlap, spare > 0);
    } else {
        assert_eq!(caps.staging_threads, None);
    }
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
    if !backend_available() {
        return;
    }
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

/// The timed upload a calibration takes for a GPU's link gives a rate.
#[test]
fn uploads_are_timed() {
    if !backend_available() {
        return;
    }
    let rate = distorch_core::runtime::upload_rate::<B>(&Default::default());
    assert!(rate > 1_000_000, "{rate} B/s");
}

/// Profiling gives each fetched unit the time until the next fetch, and each streamed unit
/// the time its staging took; off, nothing is recorded.
#[test]
fn profiles_time_compute_and_staging_per_unit() {
    if !backend_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = write_mlp(dir.path());
    let (store, _) = load(&path, 1.0, None).unwrap();
    let streamer = Streamer::new(Arc::new(store), Lookahead::default());
    let names: Vec<String> = (0..LAYERS).map(|l| format!("layers.{l}.fc")).collect();
    streamer.set_profiling(true);
    for name in &names {
        streamer.fetch(name).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5)); // "compute"
    }
    let compute = streamer.take_profile();
    let fetched: Vec<&String> = compute.iter().map(|(n, _)| n).collect();
    assert_eq!(fetched, names.iter().collect::<Vec<_>>());
    assert!(
        compute
            .iter()
            .all(|(_, t)| *t >= std::time::Duration::from_millis(5)),
        "{compute:?}"
    );
    let staging = streamer.take_staging_profile();
    let mut staged: Vec<&String> = staging.iter().map(|(n, _)| n).collect();
    staged.sort();
    let mut expected: Vec<&String> = names.iter().collect();
    expected.sort();
    assert_eq!(staged, expected, "every streamed unit's staging is timed");
    assert!(staging.iter().all(|(_, t)| !t.is_zero()), "{staging:?}");
    streamer.set_profiling(false);
    streamer.fetch(&names[0]).unwrap();
    assert!(streamer.take_profile().is_empty());
    assert!(streamer.take_staging_profile().is_empty());
}

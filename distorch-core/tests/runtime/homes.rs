//! Homes and loading checks: GPU donors, weights borrowed from the mapped file, expected
//! keys and shapes, non-finite weights, and the execution order the streamer follows.

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use burn::tensor::Tensor;
use distorch_alloc::{ByteSize, DeviceGraph, DeviceId, PinPolicy, PlacementOrder, PlanRequest};
use distorch_alloc::{Plan, VirtualVram};
use distorch_core::components::Conventions;
use distorch_core::runtime::{
    DeviceMap, ExecutionOrder, ExpectedTensor, LoadOptions, Lookahead, Streamer, WeightPatch,
    WeightStore,
};
use distorch_core::{Error, SafetensorsIndex, components};

/// Everything offloaded to virtual VRAM donors `donors` of graph `graph`.
fn offload_plan(index: &SafetensorsIndex, graph: &str, donors: Vec<DeviceId>) -> Plan {
    let split = components::split(index, &Conventions::NONE);
    let inv = inventory_of(&split.components[0]);
    let graph: DeviceGraph = graph.parse().unwrap();
    let vv = VirtualVram::from_gib(DeviceId::cuda(0), 1.0, donors).unwrap();
    let pin = PinPolicy {
        tiny_threshold: ByteSize(0),
        ..PinPolicy::default()
    };
    distorch_alloc::plan(&PlanRequest::virtual_vram(vv).with_pin(pin), &inv, &graph).unwrap()
}

#[test]
fn gpu_donors_give_bit_identical_outputs() {
    if !backend_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = write_mlp(dir.path());
    let index = SafetensorsIndex::open(&path).unwrap();
    let (resident, _, _) = run(&path, 0.0, PlacementOrder::Interleave, None);
    // cuda:1 holds two layers (at their device size); the rest go to host memory.
    let graph = format!("cuda:0=1gib,cuda:1={}b,cpu=8gib", 2 * device_unit() + 100);
    let plan = offload_plan(&index, &graph, vec![DeviceId::cuda(1), DeviceId::CPU]);
    let on_donor = plan
        .units()
        .iter()
        .filter(|u| u.device == DeviceId::cuda(1))
        .count();
    assert_eq!(on_donor, 2, "{plan:?}");
    let devices = DeviceMap::new(Default::default()).with_donor(DeviceId::cuda(1), donor_device());
    let (out, stats, offloaded) = run_plan(&index, &plan, &devices, None);
    assert_eq!(offloaded, LAYERS);
    assert_eq!(out, resident, "output differs with a GPU donor");
    // Each home's bytes cross as they are held there.
    let moved = &stats[2].bytes_moved;
    assert_eq!(moved[&DeviceId::cuda(1)].bytes(), 2 * device_unit());
    assert_eq!(
        moved[&DeviceId::CPU].bytes(),
        (LAYERS as u64 - 2) * FILE_UNIT
    );
}

/// Adds 1 to the first layer's weight, and says so up front.
struct AddOneToFirst;

impl WeightPatch<B> for AddOneToFirst {
    fn patch(&self, key: &str, w: &Tensor<B, 1>, _shape: &[usize]) -> Option<Tensor<B, 1>> {
        self.applies_to(key).then(|| w.clone().add_scalar(1.0))
    }

    fn applies_to(&self, key: &str) -> bool {
        key == "layers.0.fc.weight"
    }
}

#[test]
fn host_homes_borrow_the_mapped_file_in_its_dtype() {
    if !backend_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = write_mlp(dir.path());
    let (store, report) = load(&path, 1.0, None).unwrap();
    let all = LAYERS as u64 * FILE_UNIT;
    assert_eq!(report.host_mapped.bytes(), all);
    assert_eq!(report.bytes_read.bytes(), 0, "nothing copied");
    assert_eq!(report.bytes_per_device, [(DeviceId::CPU, ByteSize(all))]);
    for u in store.units() {
        assert_eq!(u.bytes.bytes(), FILE_UNIT, "f16 stays f16 on the host");
        assert_eq!(u.upload_bytes.bytes(), FILE_UNIT, "and crosses as f16");
        assert!(u.tensors().iter().all(|t| t.is_mapped()));
    }

    // A patched tensor is an owned copy, still f16; the others stay borrowed.
    let (store, report) = load(&path, 1.0, Some(&AddOneToFirst)).unwrap();
    let w = (WIDTH * WIDTH * 2) as u64;
    assert_eq!(report.patched, ["layers.0.fc.weight"]);
    assert_eq!(report.bytes_read.bytes(), w);
    assert_eq!(report.host_mapped.bytes(), all - w);
    assert_eq!(store.units()[0].bytes.bytes(), FILE_UNIT);
    let mapped: Vec<bool> = store.units()[0]
        .tensors()
        .iter()
        .map(|t| t.is_mapped())
        .collect();
    assert_eq!(mapped, [false, true], "weight owned, bias borrowed");
}

fn expected(path: &std::path::Path) -> Vec<ExpectedTensor> {
    let index = SafetensorsIndex::open(path).unwrap();
    index
        .tensors()
        .iter()
        .map(|t| ExpectedTensor {
            name: t.name.clone(),
            shape: t.shape.iter().map(|&d| d as usize).collect(),
        })
        .collect()
}

fn load_expecting(
    path: &std::path::Path,
    options: &LoadOptions<'_, B>,
) -> Result<distorch_core::runtime::LoadReport, Error> {
    let index = SafetensorsIndex::open(path).unwrap();
    let plan = plan_for(&index, 0.5, PlacementOrder::Interleave);
    let split = components::split(&index, &Conventions::NONE);
    let devices = DeviceMap::new(Default::default());
    WeightStore::<B>::load(&index, &split.components[0], &plan, &devices, options).map(|r| r.1)
}

#[test]
fn expected_keys_and_shapes_are_checked_before_loading() {
    if !backend_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = write_mlp(dir.path());
    let all = expected(&path);
    let report = load_expecting(
        &path,
        &LoadOptions {
            expected: Some(&all),
            ..LoadOptions::default()
        },
    )
    .unwrap();
    assert_eq!(report.tensors, 2 * LAYERS);
    assert!(report.missing.is_empty() && report.unused.is_empty() && report.mismatched.is_empty());

    // The model lacks one tensor of the file and wants one the file lacks.
    let mut other: Vec<ExpectedTensor> = all
        .iter()
        .filter(|e| e.name != "layers.7.fc.bias")
        .cloned()
        .collect();
    other.push(ExpectedTensor {
        name: "layers.8.fc.weight".into(),
        shape: vec![WIDTH, WIDTH],
    });
    let e = load_expecting(
        &path,
        &LoadOptions {
            expected: Some(&other),
            ..LoadOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(&e, Error::MissingTensors { missing, .. } if missing == &["layers.8.fc.weight"])
    );
    assert!(
        e.to_string()
            .ends_with("is missing 1 expected tensor(s): `layers.8.fc.weight`"),
        "{e}"
    );
    let report = load_expecting(
        &path,
        &LoadOptions {
            expected: Some(&other),
            allow_missing: true,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    assert_eq!(report.missing, ["layers.8.fc.weight"]);
    assert_eq!(report.unused, ["layers.7.fc.bias"], "not loaded, reported");
    assert_eq!(report.tensors, 2 * LAYERS - 1);

    // A transposed weight.
    let mut wrong = all.clone();
    wrong[0].shape = vec![WIDTH, WIDTH + 1];
    let name = wrong[0].name.clone();
    let e = load_expecting(
        &path,
        &LoadOptions {
            expected: Some(&wrong),
            ..LoadOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        e.to_string().ends_with(&format!(
            "tensor `{name}` has shape {:?}, the model expects {:?} (1 mismatched tensor(s) in all)",
            all[0].shape, wrong[0].shape
        )),
        "{e}"
    );
    let report = load_expecting(
        &path,
        &LoadOptions {
            expected: Some(&wrong),
            allow_mismatched: true,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    assert_eq!(report.mismatched.len(), 1);
    assert_eq!(report.mismatched[0].found, all[0].shape);
}

#[test]
fn non_finite_weights_are_errors_at_every_home() {
    if !backend_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = write_mlp_with_nan(dir.path(), Some((3, 17)));
    for offload in [0.0, 1.0] {
        let e = load(&path, offload, None).unwrap_err();
        assert!(
            matches!(&e, Error::NonFinite { name, index: 17, .. } if name == "layers.3.fc.weight"),
            "{offload}: {e}"
        );
        assert!(
            e.to_string()
                .contains("NaN or infinite value at element 17")
        );
    }
    let report = load_expecting(
        &path,
        &LoadOptions {
            check_finite: false,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    assert_eq!(report.tensors, 2 * LAYERS);
}

/// A forward pass that uses the layers from last to first.
fn reversed(s: &Streamer<B>, sleep: Duration) {
    for l in (0..LAYERS).rev() {
        s.fetch(&format!("layers.{l}.fc")).unwrap();
        std::thread::sleep(sleep);
    }
}

#[test]
fn the_execution_order_is_recorded_on_the_first_pass() {
    if !backend_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = write_mlp(dir.path());
    let (store, _) = load(&path, 1.0, None).unwrap();
    let plan_order: Vec<String> = store.units().iter().map(|u| u.name.clone()).collect();
    let want: Vec<String> = (0..LAYERS)
        .rev()
        .map(|l| format!("layers.{l}.fc"))
        .collect();
    assert_ne!(plan_order, want);
    let streamer = Streamer::new(Arc::new(store), Lookahead::default());
    assert_eq!(streamer.execution_order(), plan_order);
    reversed(&streamer, Duration::ZERO);
    streamer.take_stats();
    assert_eq!(streamer.execution_order(), want);
    // Following the recorded order, the look-ahead stages what comes next.
    reversed(&streamer, Duration::from_millis(20));
    reversed(&streamer, Duration::from_millis(20));
    let stats = streamer.take_stats();
    assert!(stats.prefetched >= 2 * LAYERS - 3, "{stats:?}");
}

#[test]
fn a_declared_order_is_followed_and_checked() {
    if !backend_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = write_mlp(dir.path());
    let (store, _) = load(&path, 1.0, None).unwrap();
    let store = Arc::new(store);
    let want: Vec<String> = (0..LAYERS)
        .rev()
        .map(|l| format!("layers.{l}.fc"))
        .collect();
    let declared = ExecutionOrder::Declared(want[..3].to_vec());
    let streamer =
        Streamer::with_order(Arc::clone(&store), Lookahead::default(), declared).unwrap();
    let order = streamer.execution_order();
    assert_eq!(
        order[..3],
        want[..3],
        "declared first, the rest in plan order"
    );
    assert_eq!(order.len(), LAYERS);
    drop(streamer);
    for bad in [
        vec!["layers.1.fc".to_owned(), "layers.1.fc".to_owned()],
        vec!["nope".to_owned()],
    ] {
        let e = Streamer::with_order(
            Arc::clone(&store),
            Lookahead::default(),
            ExecutionOrder::Declared(bad),
        )
        .err()
        .unwrap();
        assert!(matches!(e, Error::UnknownUnit { .. }), "{e}");
    }
}

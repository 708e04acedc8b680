//! Re-patching a loaded store from pristine weights (a LoRA strength change without a
//! reload), and fp8 re-quantisation of patched weights by stochastic rounding.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::common::*;
use burn::tensor::Tensor;
use distorch_alloc::{ByteSize, DeviceGraph, DeviceId, PinPolicy, PlacementOrder, PlanRequest};
use distorch_alloc::{Plan, VirtualVram};
use distorch_core::components::Conventions;
use distorch_core::runtime::{
    DeviceMap, LoadOptions, Lookahead, PatchPrecision, Streamer, WeightPatch, WeightStore,
    device_rule,
};
use distorch_core::safetensors::write;
use distorch_core::{DType, Error, Homes, SafetensorsIndex, components};

/// Adds `by` to the tensors `keys`.
struct Add {
    keys: Vec<&'static str>,
    by: f32,
}

impl WeightPatch<B> for Add {
    fn patch(&self, key: &str, w: &Tensor<B, 1>, _shape: &[usize]) -> Option<Tensor<B, 1>> {
        self.applies_to(key).then(|| w.clone().add_scalar(self.by))
    }

    fn applies_to(&self, key: &str) -> bool {
        self.keys.contains(&key)
    }
}

/// Every unit's tensors as fetched to the compute device, by key.
fn weights(s: &Streamer<B>) -> BTreeMap<String, Vec<f32>> {
    let mut out = BTreeMap::new();
    for l in 0..LAYERS {
        let w = s.fetch(&format!("layers.{l}.fc")).unwrap();
        for (name, _, t) in w.tensors() {
            out.insert(name.clone(), t.clone().into_data().to_vec::<f32>().unwrap());
        }
    }
    out
}

/// A plan with some layers on a GPU donor, some in host memory and some resident.
fn mixed_plan(index: &SafetensorsIndex) -> Plan {
    let split = components::split(index, &Conventions::NONE);
    let inv = inventory_of(&split.components[0]);
    let graph: DeviceGraph = "cuda:0=1gib,cuda:1=12kib,cpu=8gib".parse().unwrap();
    let half = inv.total_bytes().bytes() as f64 / 2.0 / (1u64 << 30) as f64;
    let vv = VirtualVram::from_gib(
        DeviceId::cuda(0),
        half,
        vec![DeviceId::cuda(1), DeviceId::CPU],
    )
    .unwrap();
    let pin = PinPolicy {
        tiny_threshold: ByteSize(0),
        ..PinPolicy::default()
    };
    let req = PlanRequest::virtual_vram(vv)
        .with_order(PlacementOrder::Interleave)
        .with_pin(pin);
    distorch_alloc::plan(&req, &inv, &graph).unwrap()
}

fn streamer(
    index: &SafetensorsIndex,
    plan: &Plan,
    patch: Option<&dyn WeightPatch<B>>,
    precision: PatchPrecision,
) -> Streamer<B> {
    let split = components::split(index, &Conventions::NONE);
    let devices = DeviceMap::new(Default::default()).with_donor(DeviceId::cuda(1), donor_device());
    let options = LoadOptions {
        patch,
        precision,
        ..LoadOptions::default()
    };
    let (store, _) =
        WeightStore::<B>::load(index, &split.components[0], plan, &devices, &options).unwrap();
    Streamer::new(Arc::new(store), Lookahead::default())
}

#[test]
fn repatching_restores_pristine_weights_and_applies_the_new_patch() {
    if !backend_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = write_mlp(dir.path());
    let index = SafetensorsIndex::open(&path).unwrap();
    let resident = plan_for(&index, 0.0, PlacementOrder::Interleave);
    let mixed = mixed_plan(&index);
    let homes: BTreeSet<DeviceId> = mixed.units().iter().map(|u| u.device).collect();
    assert_eq!(homes.len(), 3, "compute, donor and host homes: {mixed:?}");
    let hp = PatchPrecision::High;

    let first = Add {
        keys: vec![
            "layers.0.fc.weight",
            "layers.3.fc.weight",
            "layers.5.fc.bias",
        ],
        by: 1.0,
    };
    let second = Add {
        keys: vec!["layers.3.fc.weight", "layers.6.fc.weight"],
        by: 0.25,
    };
    let keys: Vec<String> = [
        "layers.0.fc.weight",
        "layers.3.fc.weight",
        "layers.5.fc.bias",
    ]
    .into_iter()
    .chain(["layers.6.fc.weight"])
    .map(String::from)
    .collect();
    for plan in [&resident, &mixed] {
        let pristine = weights(&streamer(&index, plan, None, hp));
        let fresh_second = weights(&streamer(&index, plan, Some(&second), hp));
        let s = streamer(&index, plan, Some(&first), hp);
        let with_first = weights(&s);
        assert_ne!(with_first, pristine);

        let report = s.repatch(Some(&second), &keys).unwrap();
        assert_eq!(report.tensors, 4);
        assert_eq!(report.patched.len(), 2);
        assert_eq!(
            weights(&s),
            fresh_second,
            "as if loaded with the second patch"
        );

        s.repatch(None, &keys).unwrap();
        assert_eq!(weights(&s), pristine, "the original weights, exactly");
        let store = s.store();
        for u in store.units().iter().filter(|u| u.home == DeviceId::CPU) {
            assert!(u.tensors().iter().all(|t| t.is_mapped()), "borrowed again");
        }

        // A bad key changes nothing.
        let err = s
            .repatch(Some(&first), &["layers.0.fc.weight".into(), "nope".into()])
            .unwrap_err();
        assert!(
            matches!(err, Error::UnknownTensor { ref key } if key == "nope"),
            "{err}"
        );
        assert_eq!(weights(&s), pristine);
    }

    // A weights file modified since loading is refused.
    let s = streamer(&index, &mixed, Some(&first), hp);
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let err = s.repatch(None, &keys).unwrap_err();
    assert!(matches!(err, Error::SourceChanged { .. }), "{err}");
}

/// The MLP in float8_e4m3fn: random codes of magnitude below 1, biases in f32.
fn write_fp8_mlp(dir: &std::path::Path) -> std::path::PathBuf {
    let mut specs = Vec::new();
    let mut data: Vec<Vec<u8>> = Vec::new();
    for l in 0..LAYERS {
        let w: Vec<u8> = values(l as u64, WIDTH * WIDTH)
            .iter()
            .map(|v| {
                let code = ((v + 0.5) * 112.0) as u8 % 56; // exponent field 0..=6
                code | if *v < 0.0 { 0x80 } else { 0 }
            })
            .collect();
        specs.push((
            format!("layers.{l}.fc.weight"),
            DType::F8E4M3,
            vec![WIDTH as u64; 2],
        ));
        data.push(w);
        let b: Vec<u8> = values(100 + l as u64, WIDTH)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        specs.push((
            format!("layers.{l}.fc.bias"),
            DType::F32,
            vec![WIDTH as u64],
        ));
        data.push(b);
    }
    let path = dir.join("mlp_fp8.safetensors");
    let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    write(&path, &specs, &refs, &BTreeMap::new()).unwrap();
    path
}

#[test]
fn fp8_patches_are_requantised_by_seeded_stochastic_rounding_when_asked() {
    if !backend_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = write_fp8_mlp(dir.path());
    let index = SafetensorsIndex::open(&path).unwrap();
    let resident = plan_for(&index, 0.0, PlacementOrder::Interleave);
    let host = plan_for(&index, 1.0, PlacementOrder::Interleave);
    let patch = Add {
        keys: vec!["layers.0.fc.weight"],
        by: 0.01,
    };
    let key = "layers.0.fc.weight";
    let n = WIDTH * WIDTH;
    let pristine = weights(&streamer(&index, &resident, None, PatchPrecision::High))[key].clone();
    let exact: Vec<f32> = pristine.iter().map(|w| w + 0.01).collect();

    let sr = PatchPrecision::Fp8Stochastic { seed: 3 };
    let on_host = streamer(&index, &host, Some(&patch), sr);
    let got = weights(&on_host)[key].clone();
    assert_eq!(
        on_host.store().units()[0].bytes.bytes(),
        (n + 4 * WIDTH) as u64,
        "still fp8"
    );
    assert_eq!(
        weights(&streamer(&index, &resident, Some(&patch), sr))[key],
        got,
        "the same bytes at every home"
    );
    assert_eq!(
        weights(&streamer(&index, &host, Some(&patch), sr))[key],
        got,
        "seeded"
    );
    assert_ne!(
        weights(&streamer(
            &index,
            &host,
            Some(&patch),
            PatchPrecision::Fp8Stochastic { seed: 4 }
        ))[key],
        got
    );
    // Each value is one of the two fp8 values around the exact one (spacing at most 1/16
    // below 1), and rounding is unbiased: the mean error is far below the spacing, where
    // round-to-nearest would lose the +0.01 on most weights.
    let err: Vec<f64> = got
        .iter()
        .zip(&exact)
        .map(|(g, e)| f64::from(g - e))
        .collect();
    assert!(err.iter().all(|e| e.abs() < 1.0 / 16.0));
    let mean = err.iter().sum::<f64>() / n as f64;
    assert!(mean.abs() < 2e-3, "mean rounding error {mean}");
    let moved = got.iter().zip(&pristine).filter(|(g, p)| g != p).count();
    assert!(moved > n / 20, "{moved} of {n} weights changed");

    // The default keeps the patched weight at bf16 at its host home, and a plan that knows
    // the patch counts it so (planned with the fp8 plan, loading refuses it).
    let changed = |k: &str| k == key;
    let homes = Homes {
        changed: Some(&changed),
        fp8_changed: PatchPrecision::High.fp8_changed(),
        ..Homes::new(device_rule::<B>(&Default::default()))
    };
    let split = components::split(&index, &Conventions::NONE);
    let inv = distorch_core::units::inventory_with(&split.components[0], &homes).unwrap();
    let host_high = plan_inventory(&inv, 1.0, PlacementOrder::Interleave);
    assert_eq!(
        host_high.units()[0].bytes.bytes(),
        (2 * n + 4 * WIDTH) as u64
    );
    let devices = DeviceMap::new(Default::default());
    let options = LoadOptions {
        patch: Some(&patch),
        ..LoadOptions::default()
    };
    let e = WeightStore::<B>::load(&index, &split.components[0], &host, &devices, &options)
        .unwrap_err();
    assert!(matches!(e, Error::PlanMismatch { .. }), "{e}");
    let high = streamer(&index, &host_high, Some(&patch), PatchPrecision::High);
    assert_eq!(
        high.store().units()[0].bytes.bytes(),
        (2 * n + 4 * WIDTH) as u64
    );
    let got = weights(&high)[key].clone();
    for (g, e) in got.iter().zip(&exact) {
        assert_eq!(*g, half::bf16::from_f32(*e).to_f32());
    }
}

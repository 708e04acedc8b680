//! One number per unit: for f32, f16, bf16 and fp8 files, at resident, GPU-donor and host
//! homes, the plan's bytes per device == the store's bytes at each home == the bytes a pass
//! moves when everything streams; and the weights a forward pass gets do not depend on the
//! home or on how the backend holds them (fp8 decoded on the device equals the host's
//! decoding).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::common::*;
use burn::tensor::Tensor;
use distorch_alloc::{ByteSize, DeviceGraph, DeviceId, PinPolicy, Plan, PlanRequest};
use distorch_core::components::Conventions;
use distorch_core::runtime::{
    DeviceMap, LoadOptions, Lookahead, Streamer, WeightStore, compute_burn_dtype, decode_f32,
    device_rule, encode_f32,
};
use distorch_core::safetensors::write;
use distorch_core::{ComputeDtype, DType, Error, SafetensorsIndex, components};

/// Raw bytes of `n` weights of `dtype`, small and finite.
fn weight_bytes(dtype: DType, seed: u64, n: usize) -> Vec<u8> {
    let v = values(seed, n);
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => encode_f32(&v, dtype),
        // fp8 codes with small exponents (no NaN, |value| < 2), random signs and mantissas.
        DType::F8E4M3 | DType::F8E5M2 => v
            .iter()
            .map(|x| ((x.to_bits() >> 9) as u8 & 0x3f) | if *x < 0.0 { 0x80 } else { 0 })
            .collect(),
        other => panic!("no weights of {other}"),
    }
}

/// An MLP like [`write_mlp`] with weights of `dtype` (f32 biases), an odd width so that fp8
/// tensors do not fill whole 32-bit words; `as_f32` writes the same values widened to f32.
fn write_mlp_of(dir: &std::path::Path, dtype: DType, as_f32: bool) -> std::path::PathBuf {
    let width = WIDTH + 1;
    let mut specs = Vec::new();
    let mut data: Vec<Vec<u8>> = Vec::new();
    for l in 0..LAYERS {
        let w = weight_bytes(dtype, l as u64, width * width);
        let (dt, w) = if as_f32 {
            let f = decode_f32(dtype, &w).unwrap();
            (DType::F32, encode_f32(&f, DType::F32))
        } else {
            (dtype, w)
        };
        specs.push((format!("layers.{l}.fc.weight"), dt, vec![width as u64; 2]));
        data.push(w);
        let b = values(100 + l as u64, width);
        specs.push((
            format!("layers.{l}.fc.bias"),
            DType::F32,
            vec![width as u64],
        ));
        data.push(encode_f32(&b, DType::F32));
    }
    let name = format!("mlp-{dtype}-{as_f32}.safetensors");
    let path = dir.join(name);
    let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    write(&path, &specs, &refs, &BTreeMap::new()).unwrap();
    path
}

/// A plan for `index` from an allocation string on a graph with a GPU donor.
pub(crate) fn plan(index: &SafetensorsIndex, alloc: &str) -> Plan {
    let split = components::split(index, &Conventions::NONE);
    let inv = inventory_of(&split.components[0]);
    let graph: DeviceGraph = "cuda:0=1gib,cuda:1=1gib,cpu=8gib".parse().unwrap();
    let pin = PinPolicy {
        tiny_threshold: ByteSize(0),
        ..PinPolicy::default()
    };
    let req = PlanRequest::expert(alloc.parse().unwrap()).with_pin(pin);
    distorch_alloc::plan(&req, &inv, &graph).unwrap()
}

/// Loads `plan`, runs three passes on inputs `width` wide; checks that the plan's, the store's
/// and the streamer's bytes agree and returns the output.
pub(crate) fn run_checked(index: &SafetensorsIndex, plan: &Plan, width: usize) -> Vec<f32> {
    let split = components::split(index, &Conventions::NONE);
    let devices = DeviceMap::new(Default::default()).with_donor(DeviceId::cuda(1), donor_device());
    let (store, report) = WeightStore::<B>::load(
        index,
        &split.components[0],
        plan,
        &devices,
        &LoadOptions::default(),
    )
    .unwrap();
    let planned: Vec<(DeviceId, ByteSize)> = plan
        .devices()
        .iter()
        .filter(|r| r.units > 0)
        .map(|r| (r.device, r.model_bytes))
        .collect();
    let mut sorted = planned.clone();
    sorted.sort_by_key(|(d, _)| (*d != plan.compute(), *d));
    assert_eq!(report.bytes_per_device, sorted, "report == plan");
    assert_eq!(store.bytes_per_device(), sorted, "store == plan");
    let streamed: BTreeMap<DeviceId, ByteSize> = planned
        .into_iter()
        .filter(|(d, _)| *d != plan.compute())
        .collect();
    let streamer = Streamer::new(Arc::new(store), Lookahead::default());
    let input = Tensor::<B, 1>::from_floats(values(7, 2 * width).as_slice(), &Default::default())
        .reshape([2, width]);
    let mut out = Vec::new();
    for pass in 0..3 {
        out = forward(&streamer, input.clone())
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let stats = streamer.take_stats();
        assert_eq!(stats.bytes_moved, streamed, "pass {pass}: moved == plan");
    }
    out
}

#[test]
fn plan_store_and_stream_agree_for_every_dtype_and_home() {
    if !backend_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for dtype in [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::F8E4M3,
        DType::F8E5M2,
    ] {
        let path = write_mlp_of(dir.path(), dtype, false);
        let index = SafetensorsIndex::open(&path).unwrap();
        let reference = {
            let path = write_mlp_of(dir.path(), dtype, true);
            let index = SafetensorsIndex::open(&path).unwrap();
            run_checked(&index, &plan(&index, "cuda:0,*"), WIDTH + 1)
        };
        let unit = plan(&index, "cuda:0,*").units()[1].bytes;
        for alloc in [
            "cuda:0,*".to_owned(),
            "cuda:0,0b;cpu,*".to_owned(),
            "cuda:0,0b;cuda:1,*".to_owned(),
            format!("cuda:0,{}b;cuda:1,{}b;cpu,*", 3 * unit.0, 2 * unit.0),
        ] {
            let p = plan(&index, &alloc);
            let out = run_checked(&index, &p, WIDTH + 1);
            assert_eq!(out, reference, "{dtype} at {alloc}: output differs");
        }
    }
}

#[test]
fn fp8_and_half_weights_are_held_as_the_backend_rule_says() {
    if !backend_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rule = device_rule::<B>(&Default::default());
    let width = (WIDTH + 1) as u64;
    for dtype in [DType::F16, DType::BF16, DType::F8E4M3] {
        let path = write_mlp_of(dir.path(), dtype, false);
        let index = SafetensorsIndex::open(&path).unwrap();
        let p = plan(&index, "cuda:0,*");
        let weight = rule.device_bytes(dtype, width * width);
        assert_eq!(p.units()[0].bytes.bytes(), weight + 4 * width, "{dtype}");
        // In host memory the file's bytes.
        let p = plan(&index, "cuda:0,0b;cpu,*");
        let file = width * width * dtype.size();
        assert_eq!(p.units()[0].bytes.bytes(), file + 4 * width, "{dtype}");
    }
}

#[test]
fn compute_dtypes_the_device_lacks_are_refused_before_loading() {
    if !backend_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = write_mlp(dir.path());
    let index = SafetensorsIndex::open(&path).unwrap();
    let split = components::split(&index, &Conventions::NONE);
    let p = plan(&index, "cuda:0,*");
    let device: burn::tensor::Device<B> = Default::default();
    for dtype in [ComputeDtype::F16, ComputeDtype::BF16] {
        let options = LoadOptions {
            compute: dtype,
            ..LoadOptions::default()
        };
        let loaded = WeightStore::<B>::load(
            &index,
            &split.components[0],
            &p,
            &DeviceMap::new(Default::default()),
            &options,
        );
        let supported = distorch_core::runtime::supports_compute::<B>(&device, dtype);
        match loaded {
            Ok((store, _)) => {
                assert!(supported, "{dtype} loaded on a device without it");
                let s = Streamer::new(Arc::new(store), Lookahead::default());
                let w: Tensor<B, 2> = s.fetch("layers.0.fc").unwrap().get("weight").unwrap();
                assert_eq!(w.dtype(), compute_burn_dtype(dtype));
            }
            Err(Error::UnsupportedComputeDtype { dtype: d, .. }) => {
                assert!(!supported);
                assert_eq!(d, dtype);
            }
            Err(e) => panic!("{dtype}: unexpected {e}"),
        }
    }
}

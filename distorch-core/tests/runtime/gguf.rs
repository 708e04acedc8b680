//! GGUF weights in the runtime: a unit's bytes are its quantized bytes at host homes and in
//! every streamed fetch (packed on GPU backends' device homes too), the weights a pass gets
//! are the host's dequantization wherever they live, and a patched quantized weight is
//! stored at the compute dtype.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::common::*;
use crate::dtypes::{plan, run_checked};
use burn::tensor::Tensor;
use distorch_alloc::PlacementOrder;
use distorch_core::components::{self, Conventions};
use distorch_core::gguf::{GgufTensorData, Value, write_gguf};
use distorch_core::quant;
use distorch_core::runtime::{
    DeviceMap, Lookahead, Streamer, WeightPatch, decode_f32, device_rule, encode_f32,
};
use distorch_core::safetensors::write;
use distorch_core::{DType, Homes, SafetensorsIndex, units};

const GW: usize = 256;

/// Random blocks of `dtype` for `n` elements with small finite f16 scales (|d| < 1/64), so
/// the MLP's activations stay in range.
fn blocks(dtype: DType, seed: u64, n: usize) -> Vec<u8> {
    let per = dtype.block_elems() as usize;
    let size = dtype.size() as usize;
    let v = values(seed, n / per * size);
    let mut raw: Vec<u8> = v.iter().map(|x| (x.to_bits() >> 7) as u8).collect();
    let scales = quant::f16_fields(dtype);
    assert!(!scales.is_empty(), "{dtype} is not quantized");
    let div = if per == 32 { 2048.0 } else { 65536.0 };
    for (b, chunk) in raw.chunks_exact_mut(size).enumerate() {
        for (k, &at) in scales.iter().enumerate() {
            let s = values(seed * 1000 + (b * 2 + k) as u64, 1)[0] / div;
            chunk[at..at + 2].copy_from_slice(&half::f16::from_f32(s).to_le_bytes());
        }
    }
    raw
}

/// An 8-layer MLP of width 256 in GGUF, weights of the quantized types in turn (f32 biases),
/// and the same values dequantized on the host in an f32 safetensors file.
fn write_gguf_mlp(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let types = [
        DType::Q4_0,
        DType::Q5_1,
        DType::Q8_0,
        DType::Q2K,
        DType::Q3K,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
    ];
    let mut names = Vec::new();
    let mut data = Vec::new();
    for (l, dtype) in types.into_iter().enumerate().take(LAYERS) {
        names.push((format!("layers.{l}.fc.weight"), dtype, vec![GW as u64; 2]));
        data.push(blocks(dtype, l as u64, GW * GW));
        names.push((format!("layers.{l}.fc.bias"), DType::F32, vec![GW as u64]));
        data.push(encode_f32(&values(100 + l as u64, GW), DType::F32));
    }
    let tensors: Vec<GgufTensorData<'_>> = names
        .iter()
        .zip(&data)
        .map(|((name, dtype, shape), d)| GgufTensorData {
            name,
            dtype: *dtype,
            shape,
            data: d,
        })
        .collect();
    let gguf = dir.join("mlp.gguf");
    let meta = vec![(
        "general.architecture".to_owned(),
        Value::String("mlp".into()),
    )];
    write_gguf(&gguf, &meta, &tensors).unwrap();
    let f32s: Vec<Vec<u8>> = names
        .iter()
        .zip(&data)
        .map(|((_, dtype, _), d)| encode_f32(&decode_f32(*dtype, d).unwrap(), DType::F32))
        .collect();
    let specs: Vec<_> = names
        .iter()
        .map(|(n, _, s)| (n.clone(), DType::F32, s.clone()))
        .collect();
    let reference = dir.join("mlp-f32.safetensors");
    let refs: Vec<&[u8]> = f32s.iter().map(Vec::as_slice).collect();
    write(&reference, &specs, &refs, &BTreeMap::new()).unwrap();
    (gguf, reference)
}

#[test]
fn gguf_units_count_quantized_bytes_and_compute_the_same_at_every_home() {
    if !backend_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (gguf, reference) = write_gguf_mlp(dir.path());
    let index = SafetensorsIndex::open(&gguf).unwrap();
    let want = {
        let index = SafetensorsIndex::open(&reference).unwrap();
        run_checked(&index, &plan(&index, "cuda:0,*"), GW)
    };
    // At host homes a unit is its file bytes.
    let host = plan(&index, "cuda:0,0b;cpu,*");
    for (u, t) in host.units().iter().zip(index.tensors().chunks(2)) {
        assert_eq!(u.bytes.bytes(), t[0].bytes + t[1].bytes, "{}", u.name);
    }
    // At device homes as the backend's rule says: packed file bytes on GPU backends.
    let rule = device_rule::<B>(&Default::default());
    let resident = plan(&index, "cuda:0,*");
    for (u, t) in resident.units().iter().zip(index.tensors().chunks(2)) {
        let w = rule.device_bytes(t[0].dtype, t[0].numel());
        assert_eq!(u.bytes.bytes(), w + t[1].bytes, "{}", u.name);
    }
    let unit = resident.units()[1].bytes;
    let mut outputs = Vec::new();
    for alloc in [
        "cuda:0,*".to_owned(),
        "cuda:0,0b;cpu,*".to_owned(),
        "cuda:0,0b;cuda:1,*".to_owned(),
        format!("cuda:0,{}b;cuda:1,{}b;cpu,*", 3 * unit.0, 2 * unit.0),
    ] {
        let out = run_checked(&index, &plan(&index, &alloc), GW);
        for (i, (g, w)) in out.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 + 1e-4 * w.abs(),
                "{alloc} [{i}]: {g} vs {w}"
            );
        }
        outputs.push((alloc, out));
    }
    for (alloc, out) in &outputs[1..] {
        assert_eq!(out, &outputs[0].1, "{alloc}: not bit-identical to resident");
    }
}

/// Adds `delta` to layer 0's weight.
struct AddTo0(f32);

impl WeightPatch<B> for AddTo0 {
    fn patch(&self, key: &str, w: &Tensor<B, 1>, _: &[usize]) -> Option<Tensor<B, 1>> {
        (key == "layers.0.fc.weight").then(|| w.clone().add_scalar(self.0))
    }

    fn applies_to(&self, key: &str) -> bool {
        key == "layers.0.fc.weight"
    }
}

#[test]
fn a_patched_quantized_weight_is_dequantized_patched_and_stored_at_the_compute_dtype() {
    if !backend_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (gguf, reference) = write_gguf_mlp(dir.path());
    let patch = AddTo0(0.01);
    let devices = DeviceMap::new(Default::default());
    let forward_of = |store| {
        let s = Streamer::new(Arc::new(store), Lookahead::default());
        let x = Tensor::<B, 1>::from_floats(values(7, 2 * GW).as_slice(), &Default::default())
            .reshape([2, GW]);
        forward(&s, x).into_data().to_vec::<f32>().unwrap()
    };
    let want = {
        let index = SafetensorsIndex::open(&reference).unwrap();
        let p = plan_for(&index, 0.0, PlacementOrder::Interleave);
        forward_of(load_plan(&index, &p, &devices, Some(&patch)).unwrap().0)
    };
    let index = SafetensorsIndex::open(&gguf).unwrap();
    let split = components::split(&index, &Conventions::NONE);
    // The plan counts the patched tensor at its new size (the compute dtype, f32).
    let changed = |k: &str| k == "layers.0.fc.weight";
    let homes = Homes {
        changed: Some(&changed),
        ..Homes::new(device_rule::<B>(&Default::default()))
    };
    let inventory = units::inventory_with(&split.components[0], &homes).unwrap();
    for offload in [0.0, 1.0] {
        let p = plan_inventory(&inventory, offload, PlacementOrder::Interleave);
        let (store, report) = load_plan(&index, &p, &devices, Some(&patch)).unwrap();
        assert_eq!(report.patched, vec!["layers.0.fc.weight".to_owned()]);
        // f32 compute: the patched weight is held at f32 wherever it lives.
        let layer0 = &store.units()[0];
        assert_eq!(
            layer0.bytes.bytes(),
            (GW * GW * 4 + GW * 4) as u64,
            "offload {offload}"
        );
        let out = forward_of(store);
        for (i, (g, w)) in out.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 + 1e-4 * w.abs(),
                "offload {offload} [{i}]: {g} vs {w}"
            );
        }
    }
}

#[test]
fn host_dequantization_is_what_decode_f32_gives() {
    let raw = blocks(DType::Q4K, 3, 512);
    let mut out = vec![0f32; 512];
    quant::dequantize(DType::Q4K, &raw, &mut out).unwrap();
    assert_eq!(decode_f32(DType::Q4K, &raw).unwrap(), out);
}

#[test]
fn fetched_quantized_weights_are_the_hosts_dequantization_bit_for_bit() {
    if !backend_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (gguf, _) = write_gguf_mlp(dir.path());
    let index = SafetensorsIndex::open(&gguf).unwrap();
    let bytes = std::fs::read(&gguf).unwrap();
    for alloc in ["cuda:0,*", "cuda:0,0b;cpu,*"] {
        let p = plan(&index, alloc);
        let (store, _) = load_plan(&index, &p, &DeviceMap::new(Default::default()), None).unwrap();
        let s = Streamer::new(Arc::new(store), Lookahead::default());
        for t in index.tensors().iter().filter(|t| t.dtype.is_quantized()) {
            let unit = t.name.trim_end_matches(".weight");
            let w: Tensor<B, 2> = s.fetch(unit).unwrap().get("weight").unwrap();
            let got = w.into_data().to_vec::<f32>().unwrap();
            let raw = &bytes[t.file_offset as usize..(t.file_offset + t.bytes) as usize];
            let want = decode_f32(t.dtype, raw).unwrap();
            let same = got
                .iter()
                .zip(&want)
                .all(|(g, w)| g.to_bits() == w.to_bits());
            assert!(same, "{} ({}) at {alloc}", t.name, t.dtype);
        }
    }
}

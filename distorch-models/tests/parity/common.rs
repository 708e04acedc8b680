//! Shared by the parity tests: fixtures, reading reference tensors, tolerances, plans.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use distorch_alloc::{
    ByteSize, DeviceGraph, DeviceId, EmbeddingPolicy, PinPolicy, Plan, PlanRequest, VirtualVram,
};
use distorch_core::safetensors::write;
use distorch_core::{DType, SafetensorsIndex, units};

#[cfg(not(any(feature = "test-wgpu", feature = "test-cuda")))]
pub type B = burn::backend::NdArray;
/// With `--features test-wgpu` (`cargo test-wgpu`): compute on wgpu (Mesa lavapipe without a
/// GPU), every offloaded weight streamed from host memory.
#[cfg(all(feature = "test-wgpu", not(feature = "test-cuda")))]
pub type B = burn::backend::Wgpu;
/// With `--features test-cuda` (`tools/gpu-check.sh`, on a machine with a GPU): compute on
/// CUDA.
#[cfg(feature = "test-cuda")]
pub type B = burn::backend::Cuda;

/// The compute device's id in plans.
#[cfg(not(feature = "test-wgpu"))]
pub const COMPUTE: &str = "cuda:0";
/// The compute device's id in plans.
#[cfg(feature = "test-wgpu")]
pub const COMPUTE: &str = "wgpu:0";

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A tensor of a safetensors file, as f32 (from f32) or i64 values, with its shape.
pub fn read(path: &Path, key: &str) -> (Vec<usize>, Vec<f64>) {
    let index = SafetensorsIndex::open(path).unwrap();
    let t = index.tensors().iter().find(|t| t.name == key).unwrap();
    let bytes = std::fs::read(path).unwrap();
    let raw = &bytes[t.file_offset as usize..(t.file_offset + t.bytes) as usize];
    let values = match t.dtype {
        DType::F32 => raw
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())))
            .collect(),
        DType::I64 => raw
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        other => panic!("{key}: {other}"),
    };
    (t.shape.iter().map(|&d| d as usize).collect(), values)
}

/// A float tensor of fixture `name`'s reference file, on the default device.
pub fn tensor<const D: usize>(name: &str, key: &str) -> Tensor<B, D> {
    let (shape, v) = read(&fixture(name).join("reference.safetensors"), key);
    let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    let shape: [usize; D] = shape.try_into().unwrap();
    Tensor::from_data(TensorData::new(v, shape), &Default::default())
}

pub fn assert_close<const D: usize>(what: &str, got: Tensor<B, D>, want: (Vec<usize>, Vec<f64>)) {
    assert_eq!(got.dims().to_vec(), want.0, "{what}: shape");
    let got = got.into_data().to_vec::<f32>().unwrap();
    let mut worst = 0.0f64;
    for (i, (g, w)) in got.iter().zip(&want.1).enumerate() {
        let err = (f64::from(*g) - w).abs();
        assert!(
            err <= 1e-4 + 1e-3 * w.abs(),
            "{what}[{i}]: got {g}, reference {w}"
        );
        worst = worst.max(err);
    }
    assert!(got.len() == want.1.len() && !got.is_empty());
}

/// The inventory of `component` as this backend holds it (see `runtime::device_rule`).
pub fn inventory_of(component: &distorch_core::Component<'_>) -> distorch_alloc::Inventory {
    let rule = distorch_core::runtime::device_rule::<B>(&Default::default());
    units::inventory_with(component, &distorch_core::Homes::new(rule)).unwrap()
}

pub fn plan(path: &Path, offload: bool) -> Plan {
    let index = SafetensorsIndex::open(path).unwrap();
    let split = distorch_models::load::split(&index);
    let inv = inventory_of(&split.components[0]);
    let graph: DeviceGraph = "cuda:0=1gib,cpu=8gib".parse().unwrap();
    let amount = if offload {
        inv.total_bytes()
    } else {
        ByteSize(0)
    };
    let vv = VirtualVram::new(DeviceId::cuda(0), amount, vec![DeviceId::CPU]).unwrap();
    let pin = PinPolicy {
        tiny_threshold: ByteSize(0),
        embeddings: EmbeddingPolicy::Movable,
    };
    distorch_alloc::plan(&PlanRequest::virtual_vram(vv).with_pin(pin), &inv, &graph).unwrap()
}

/// Loads the one component of `weights` as model `M` through the model's own `load`, at the
/// homes [`plan`] gives (everything resident, or everything offloaded).
pub fn load_as<M: distorch_models::Model<B>>(
    weights: &Path,
    config: M::Config,
    offload: bool,
) -> Result<(M, distorch_core::runtime::LoadReport), distorch_models::Error> {
    use distorch_core::runtime::{DeviceMap, LoadOptions, Lookahead};
    let index = SafetensorsIndex::open(weights)?;
    let split = distorch_models::load::split(&index);
    M::load(
        &distorch_models::LoadContext {
            index: &index,
            component: &split.components[0],
            plan: &plan(weights, offload),
            devices: &DeviceMap::new(Default::default()),
            options: &LoadOptions::default(),
            lookahead: Lookahead::default(),
        },
        config,
    )
}

/// The keys (prefix stripped) and shapes of one component of the SD 1.5-shaped demo
/// checkpoint: what a model's expected tensors must cover.
pub fn demo_shapes(
    kind: distorch_core::ComponentKind,
) -> std::collections::BTreeSet<(String, Vec<usize>)> {
    let dir = tempfile::tempdir().unwrap();
    let path = distorch_models::sd::demo::DemoModel::Sd15
        .ensure_in(dir.path())
        .unwrap();
    let index = SafetensorsIndex::open(&path).unwrap();
    let split = distorch_models::load::split(&index);
    let c = split.components.iter().find(|c| c.kind == kind).unwrap();
    c.tensors
        .iter()
        .map(|t| {
            let name = c.local(t).to_owned();
            (name, t.shape.iter().map(|&d| d as usize).collect())
        })
        .collect()
}

/// One component's options: everything on the compute device, or every unit (however
/// small; the default keeps tiny ones resident) offloaded to the CPU.
pub fn component_options(offload: bool) -> distorch_models::ComponentOptions<B> {
    use distorch_models::{ComponentOptions, Placement};
    let graph: DeviceGraph = "cuda:0=1gib,cpu=8gib".parse().unwrap();
    let device: burn::tensor::Device<B> = Default::default();
    let placement = if offload {
        let mut p =
            Placement::virtual_vram(DeviceId::cuda(0), device, 1.0, vec![DeviceId::CPU]).unwrap();
        p.request = p.request.with_pin(PinPolicy {
            tiny_threshold: ByteSize(0),
            embeddings: EmbeddingPolicy::Movable,
        });
        p
    } else {
        Placement::on(DeviceId::cuda(0), device)
    };
    ComponentOptions::new(graph, placement)
}

/// Rewrites the fixture's weights with `rename` applied to keys (dropping those it maps to
/// `None`).
pub fn rewrite(src: &Path, dst: &Path, rename: impl Fn(&str) -> Option<String>) {
    let index = SafetensorsIndex::open(src).unwrap();
    let bytes = std::fs::read(src).unwrap();
    let mut specs = Vec::new();
    let mut data = Vec::new();
    for t in index.tensors() {
        if let Some(name) = rename(&t.name) {
            specs.push((name, t.dtype, t.shape.clone()));
            data.push(&bytes[t.file_offset as usize..(t.file_offset + t.bytes) as usize]);
        }
    }
    write(dst, &specs, &data, &BTreeMap::new()).unwrap();
}

/// Writes the fixture's weights as `n` shards and a shard index in `dir` (tensors dealt out
/// in file order, as transformers' `save_pretrained` splits by size), with its
/// `config.json`.
pub fn shard(name: &str, weights: &str, dir: &Path, n: usize) -> PathBuf {
    let src = fixture(name).join(weights);
    let index = SafetensorsIndex::open(&src).unwrap();
    let bytes = std::fs::read(&src).unwrap();
    let per = index.tensors().len().div_ceil(n);
    let mut map = serde_json::Map::new();
    for (i, chunk) in index.tensors().chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        let specs: Vec<_> = chunk
            .iter()
            .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
            .collect();
        let data: Vec<&[u8]> = chunk
            .iter()
            .map(|t| &bytes[t.file_offset as usize..(t.file_offset + t.bytes) as usize])
            .collect();
        write(dir.join(&file), &specs, &data, &BTreeMap::new()).unwrap();
        for t in chunk {
            map.insert(t.name.clone(), file.clone().into());
        }
    }
    let json =
        serde_json::json!({"metadata": {"total_size": index.data_bytes()}, "weight_map": map});
    let path = dir.join(weights.replace(".safetensors", ".safetensors.index.json"));
    std::fs::write(&path, json.to_string()).unwrap();
    std::fs::copy(fixture(name).join("config.json"), dir.join("config.json")).unwrap();
    path
}

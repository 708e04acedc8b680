//! FLUX.1's files at their real sizes, without their weights: the key lists and shapes of
//! `flux1-dev.safetensors` (BFL names, also with ComfyUI's prefix, and the diffusers layout),
//! `t5xxl_fp16.safetensors`, `clip_l.safetensors` and `ae.safetensors`, written from the
//! published configs by `tools/fixtures/flux.py` and laid out here as zero-filled (sparse)
//! files, are detected as the released models and planned.

use std::path::{Path, PathBuf};

use distorch_alloc::{AllocSpec, ByteSize, DeviceGraph, DeviceId, PlanRequest};
use distorch_core::safetensors::write_zeroed;
use distorch_core::{DType, SafetensorsIndex};
use distorch_models::flux::dit::{FluxConfig, FluxLayout, FluxTransformer, FluxVariant};
use distorch_models::text::umt5::{Umt5Config, Umt5Encoder};
use distorch_models::{AutoencoderKl, ClipTextConfig, Model};

use crate::common::*;

/// Writes the key list `name` as a zero-filled safetensors file of `dtype`, each key
/// prefixed with `prefix`.
fn sparse(dir: &Path, name: &str, dtype: DType, prefix: &str) -> PathBuf {
    let list: Vec<(String, Vec<u64>)> = serde_json::from_str(
        &std::fs::read_to_string(fixture("flux_shapes").join(format!("{name}.json"))).unwrap(),
    )
    .unwrap();
    let specs: Vec<_> = list
        .into_iter()
        .map(|(k, s)| (format!("{prefix}{k}"), dtype, s))
        .collect();
    let path = dir.join(format!("{name}{}.safetensors", prefix.len()));
    write_zeroed(&path, &specs, &Default::default()).unwrap();
    path
}

#[test]
fn flux1_dev_is_detected_in_every_layout_and_planned() {
    let dir = tempfile::tempdir().unwrap();
    for (name, prefix, layout) in [
        ("flux1-dev", "", FluxLayout::Bfl),
        ("flux1-dev", "model.diffusion_model.", FluxLayout::Bfl),
        ("flux1-dev-diffusers", "", FluxLayout::Diffusers),
    ] {
        let path = sparse(dir.path(), name, DType::BF16, prefix);
        let index = SafetensorsIndex::open(&path).unwrap();
        let split = distorch_models::load::split(&index);
        let c = &split.components[0];
        assert_eq!(FluxLayout::of(c), layout, "{name} {prefix}");
        let found = FluxConfig::detect(c).unwrap();
        assert_eq!(found.variant, FluxVariant::Dev);
        assert_eq!(found.config, FluxConfig::default());
        // Every tensor is one the model reads, and the reverse.
        let expected = FluxTransformer::<B>::expected_in(&found.config, layout);
        assert_eq!(expected.len(), c.tensors.len(), "{name}");
        // 11.9 B parameters in bf16, 8 GiB of them on the GPU, the rest streamed from the host.
        let order = FluxTransformer::<B>::execution_order(&found.config, c).unwrap();
        let inventory = distorch_models::load::inventory_for(&index, c.kind)
            .unwrap()
            .in_order(&order);
        assert_eq!(inventory.total_bytes(), ByteSize(2 * 11_901_408_320));
        let graph: DeviceGraph = "cuda:0=24gib,cpu=64gib".parse().unwrap();
        let spec: AllocSpec = "cuda:0,8gb;cpu,*".parse().unwrap();
        let plan = distorch_alloc::plan(&PlanRequest::expert(spec), &inventory, &graph).unwrap();
        let on = |d: DeviceId| {
            plan.devices()
                .iter()
                .find(|r| r.device == d)
                .map_or(0, |r| r.model_bytes.0)
        };
        // "8gb" is 8 GiB, as in DisTorch2.
        assert!(
            on(DeviceId::cuda(0)) <= 8 << 30,
            "{}",
            on(DeviceId::cuda(0))
        );
        assert!(on(DeviceId::cuda(0)) > 7 << 30);
        assert_eq!(
            on(DeviceId::cuda(0)) + on(DeviceId::CPU),
            2 * 11_901_408_320
        );
    }
    // Schnell: the same without the guidance embedder.
    let path = sparse(dir.path(), "flux1-dev", DType::BF16, "");
    let index = SafetensorsIndex::open(&path).unwrap();
    let specs: Vec<_> = index
        .tensors()
        .iter()
        .filter(|t| !t.name.starts_with("guidance_in."))
        .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
        .collect();
    let schnell = dir.path().join("flux1-schnell.safetensors");
    write_zeroed(&schnell, &specs, &Default::default()).unwrap();
    let index = SafetensorsIndex::open(&schnell).unwrap();
    let found = FluxConfig::detect(&distorch_models::load::split(&index).components[0]).unwrap();
    assert_eq!(
        (found.variant, found.config),
        (FluxVariant::Schnell, FluxConfig::schnell())
    );
}

#[test]
fn flux_text_encoders_and_vae_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let open = |path: PathBuf| SafetensorsIndex::open(path).unwrap();
    let t5 = open(sparse(dir.path(), "t5xxl", DType::F16, ""));
    let c = &distorch_models::load::split(&t5).components[0];
    assert_eq!(Umt5Config::detect(c).unwrap(), Umt5Config::t5_xxl());
    let order = Umt5Encoder::<B>::execution_order(&Umt5Config::t5_xxl(), c).unwrap();
    assert_eq!(
        order.len(),
        24 * 9 + 1 + 1 + 1,
        "every layer's units, bias once"
    );

    let clip = open(sparse(dir.path(), "clip_l", DType::F16, ""));
    let c = &distorch_models::load::split(&clip).components[0];
    let config = ClipTextConfig::detect(c).unwrap();
    assert_eq!(
        (
            config.hidden_size,
            config.num_hidden_layers,
            config.num_attention_heads
        ),
        (768, 12, 12)
    );
    assert_eq!(config.assumed(), None, "CLIP-L's heads are known");

    let ae = open(sparse(dir.path(), "ae", DType::F32, ""));
    let c = &distorch_models::load::split(&ae).components[0];
    let config = AutoencoderKl::<B>::detect_config(c).unwrap();
    assert_eq!(
        (
            config.latent_channels,
            config.block_out_channels.clone(),
            config.scaling_factor,
            config.shift_factor
        ),
        (16, vec![128, 256, 512, 512], 0.3611, Some(0.1159))
    );
}

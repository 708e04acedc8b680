//! Splitting files into components and ordering their units by the model families'
//! conventions (`distorch_models::load::CONVENTIONS`), and the demo checkpoint.

use std::collections::BTreeMap;

use distorch_alloc::UnitKind;
use distorch_core::safetensors::write_zeroed;
use distorch_core::{ComponentKind, DType, SafetensorsIndex, units};
use distorch_models::sd::demo::DemoModel;

/// The demo checkpoint has SD1.5's exact parameter counts (diffusers reports UNet
/// 859,520,964, CLIP-L text model 123,060,480 and VAE 83,653,863 parameters).
#[test]
fn demo_checkpoint_matches_sd15() {
    let dir = tempfile::tempdir().unwrap();
    let path = DemoModel::Sd15.ensure_in(dir.path()).unwrap();
    let idx = SafetensorsIndex::open(&path).unwrap();
    let split = distorch_models::load::split(&idx);
    let kinds: Vec<_> = split.components.iter().map(|c| c.kind).collect();
    assert_eq!(
        kinds,
        [ComponentKind::Unet, ComponentKind::Clip, ComponentKind::Vae]
    );
    assert!(split.other.is_empty());
    let params: Vec<u64> = split
        .components
        .iter()
        .map(|c| c.tensors.iter().map(|t| t.numel()).sum())
        .collect();
    assert_eq!(params, [859_520_964, 123_060_480, 83_653_863]);

    let unet = units::inventory(&split.components[0]).unwrap();
    let first = &unet.units()[0];
    assert_eq!(first.name, "time_embed.0");
    assert_eq!(unet.units().last().unwrap().name, "out.2");
    let q = unet
        .units()
        .iter()
        .find(|u| u.name == "input_blocks.1.1.transformer_blocks.0.attn1.to_q")
        .unwrap();
    assert_eq!((q.kind, q.bytes.0), (UnitKind::Weight, 320 * 320 * 2));
    let clip = units::inventory(&split.components[1]).unwrap();
    let tok = clip
        .units()
        .iter()
        .find(|u| u.name.ends_with("token_embedding"))
        .unwrap();
    assert_eq!(tok.kind, UnitKind::Embedding);
    let norms = clip
        .units()
        .iter()
        .filter(|u| u.kind == UnitKind::Norm)
        .count();
    assert_eq!(norms, 12 * 2 + 1);
    // A second call reuses the cached file.
    assert_eq!(DemoModel::Sd15.ensure_in(dir.path()).unwrap(), path);
}

#[test]
fn single_component_files_are_recognised() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], ComponentKind)] = &[
        (
            &[
                "down_blocks.0.resnets.0.conv1.weight",
                "up_blocks.0.x.weight",
            ],
            ComponentKind::Unet,
        ),
        (
            &[
                "encoder.down.0.block.0.conv1.weight",
                "decoder.up.0.x.weight",
            ],
            ComponentKind::Vae,
        ),
        (
            &["text_model.encoder.layers.0.mlp.fc1.weight"],
            ComponentKind::Clip,
        ),
        (
            &["vision_model.embeddings.patch_embedding.weight"],
            ComponentKind::ClipVision,
        ),
        (
            &["input_hint_block.0.weight", "input_blocks.0.0.weight"],
            ComponentKind::ControlNet,
        ),
        (&["blocks.0.self_attn.q.weight"], ComponentKind::Model),
    ];
    for (i, (names, kind)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("{i}.safetensors"));
        let tensors: Vec<_> = names
            .iter()
            .map(|n| (n.to_string(), DType::F16, vec![4, 4]))
            .collect();
        write_zeroed(&path, &tensors, &BTreeMap::new()).unwrap();
        let idx = SafetensorsIndex::open(&path).unwrap();
        let split = distorch_models::load::split(&idx);
        assert_eq!(split.components.len(), 1);
        assert_eq!(split.components[0].kind, *kind, "{names:?}");
    }
}

#[test]
fn sdxl_style_prefixes_split_and_others_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("xl.safetensors");
    let names = [
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
        "model.diffusion_model.label_emb.0.0.weight",
        "first_stage_model.decoder.conv_in.weight",
        "alphas_cumprod",
    ];
    let tensors: Vec<_> = names
        .iter()
        .map(|n| (n.to_string(), DType::F16, vec![8, 8]))
        .collect();
    write_zeroed(&path, &tensors, &BTreeMap::new()).unwrap();
    let idx = SafetensorsIndex::open(&path).unwrap();
    let split = distorch_models::load::split(&idx);
    let kinds: Vec<_> = split
        .components
        .iter()
        .map(|c| (c.kind, c.tensors.len()))
        .collect();
    assert_eq!(
        kinds,
        [
            (ComponentKind::Unet, 1),
            (ComponentKind::Clip, 2),
            (ComponentKind::Vae, 1)
        ]
    );
    assert_eq!(split.other.len(), 1);
    assert_eq!(split.other[0].name, "alphas_cumprod");
}

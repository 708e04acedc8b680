//! The original single-file UNet layout: parity of the tiny fixtures in that layout (made by
//! `tools/fixtures/gen.py` and checked there with diffusers' own single-file converter), and
//! architecture detection on a checkpoint with SD 1.5's exact keys and shapes.

use std::collections::BTreeSet;

use crate::common::*;
use burn::tensor::Tensor;
use distorch_core::runtime::{DeviceMap, LoadOptions, Lookahead};
use distorch_core::{ComponentKind, SafetensorsIndex};
use distorch_models::sd::demo::DemoModel;
use distorch_models::sd::unet::ldm::detect;
use distorch_models::{KeyLayout, PerBlock, Unet2dCondition, UnetConfig, UnetInput};

#[test]
fn single_file_layout_matches_diffusers() {
    for (name, sdxl) in [("unet_sd", false), ("unet_sdxl", true)] {
        let path = fixture(name).join("ldm.safetensors");
        let config = UnetConfig::from_file(fixture(name).join("config.json")).unwrap();
        let index = SafetensorsIndex::open(&path).unwrap();
        let split = distorch_models::load::split(&index);
        let unet = split
            .components
            .iter()
            .find(|c| c.kind == ComponentKind::Unet)
            .unwrap();
        assert_eq!(unet.prefix, "model.diffusion_model.");
        for offload in [false, true] {
            let (model, report) = <Unet2dCondition<B> as distorch_models::Model<B>>::load(
                &distorch_models::LoadContext {
                    index: &index,
                    component: unet,
                    plan: &plan(&path, offload),
                    devices: &DeviceMap::new(Default::default()),
                    options: &LoadOptions::default(),
                    lookahead: Lookahead::default(),
                },
                config.clone(),
            )
            .unwrap();
            assert!(
                report.unused.is_empty() && report.missing.is_empty(),
                "{report:?}"
            );
            let t: Tensor<B, 1> = tensor(name, "timestep");
            let mut input = UnetInput::new(
                tensor(name, "sample"),
                t.into_data().to_vec::<f32>().unwrap(),
                tensor(name, "encoder_hidden_states"),
            );
            if sdxl {
                input = input.with_text_time(tensor(name, "text_embeds"), tensor(name, "time_ids"));
            }
            let out = model.forward(input).unwrap();
            assert_close(
                &format!("{name} ldm offload={offload}"),
                out,
                read(&fixture(name).join("reference.safetensors"), "out"),
            );
        }
    }
}

#[test]
fn detects_sd15_from_its_keys_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let path = DemoModel::Sd15.ensure_in(dir.path()).unwrap();
    let index = SafetensorsIndex::open(&path).unwrap();
    let split = distorch_models::load::split(&index);
    let unet = split
        .components
        .iter()
        .find(|c| c.kind == ComponentKind::Unet)
        .unwrap();
    let local = |t: &&distorch_core::TensorInfo| {
        t.name
            .strip_prefix(unet.prefix)
            .unwrap_or(&t.name)
            .to_owned()
    };
    let tensors: Vec<(String, Vec<u64>)> = unet
        .tensors
        .iter()
        .map(|t| (local(t), t.shape.clone()))
        .collect();
    let found = detect(tensors.iter().map(|(n, s)| (n.as_str(), s.as_slice()))).unwrap();
    assert_eq!(found.family, distorch_models::sd::SdFamily::Sd1);
    assert!(found.assumed().is_empty(), "SD 1.5's conventions are known");
    let c = &found.config;
    assert_eq!(c.block_out_channels, [320, 640, 1280, 1280]);
    assert_eq!(c.layers_per_block, PerBlock::Many(vec![2; 4]));
    assert_eq!(c.cross_attention_dim, PerBlock::One(768));
    assert_eq!(c.attention_head_dim, PerBlock::Many(vec![8; 4]));
    assert!(!c.use_linear_projection && c.addition_embed_type.is_none());
    assert_eq!(c.down_block_types, UnetConfig::default().down_block_types);
    assert_eq!(c.up_block_types, UnetConfig::default().up_block_types);
    // Every key and shape of the real layout, and nothing else.
    let want: BTreeSet<(String, Vec<u64>)> = tensors.into_iter().collect();
    let got: BTreeSet<(String, Vec<u64>)> =
        Unet2dCondition::<B>::expected_tensors(c, KeyLayout::Ldm)
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.shape.iter().map(|&d| d as u64).collect()))
            .collect();
    let only_file: Vec<_> = want.difference(&got).take(5).collect();
    let only_model: Vec<_> = got.difference(&want).take(5).collect();
    assert!(
        only_file.is_empty() && only_model.is_empty(),
        "{only_file:?} / {only_model:?}"
    );
}

#[test]
fn detection_reads_the_tiny_fixtures_shapes() {
    for name in ["unet_sd", "unet_sdxl"] {
        let path = fixture(name).join("ldm.safetensors");
        let index = SafetensorsIndex::open(&path).unwrap();
        let config = UnetConfig::from_file(fixture(name).join("config.json")).unwrap();
        let tensors: Vec<(String, Vec<u64>)> = index
            .tensors()
            .iter()
            .map(|t| {
                let n = t
                    .name
                    .strip_prefix("model.diffusion_model.")
                    .unwrap()
                    .to_owned();
                (n, t.shape.clone())
            })
            .collect();
        // Heads and the text-time width are conventions, not shapes: compare the rest.
        let found = detect(tensors.iter().map(|(n, s)| (n.as_str(), s.as_slice()))).unwrap();
        let d = &found.config;
        assert_eq!(
            found.family,
            distorch_models::sd::SdFamily::Unknown,
            "{name}"
        );
        assert_eq!(d.block_out_channels, config.block_out_channels, "{name}");
        assert_eq!(d.layers_per_block, PerBlock::Many(vec![1, 1]), "{name}");
        assert_eq!(d.down_block_types, config.down_block_types, "{name}");
        assert_eq!(d.up_block_types, config.up_block_types, "{name}");
        assert_eq!(d.cross_attention_dim, PerBlock::One(24), "{name}");
        assert_eq!(
            d.use_linear_projection, config.use_linear_projection,
            "{name}"
        );
        assert_eq!(
            d.norm_num_groups, 16,
            "{name}: largest power of two dividing 16 and 32"
        );
        // What the shapes cannot tell is said: heads, groups (and SDXL's time-id width).
        let assumed = found.assumed();
        assert!(
            assumed[0].starts_with("attention heads 64 wide") && assumed[1] == "16 norm groups",
            "{name}: {assumed:?}"
        );
        assert_eq!(assumed.len(), if name == "unet_sdxl" { 3 } else { 2 });
        let depth = match &config.transformer_layers_per_block {
            PerBlock::One(n) => vec![*n; 2],
            PerBlock::Many(v) => v.clone(),
        };
        // Levels without attention have no depth to read; they default to 1.
        let attn: Vec<bool> = config
            .down_block_types
            .iter()
            .map(|t| t.starts_with("CrossAttn"))
            .collect();
        let want: Vec<usize> = depth
            .iter()
            .zip(&attn)
            .map(|(&d, &a)| if a { d } else { 1 })
            .collect();
        assert_eq!(
            d.transformer_layers_per_block,
            PerBlock::Many(want),
            "{name}"
        );
        assert_eq!(
            d.projection_class_embeddings_input_dim, config.projection_class_embeddings_input_dim,
            "{name}"
        );
    }
}

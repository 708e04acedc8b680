//! The UNet against diffusers' `UNet2DConditionModel` (fixtures from `tools/fixtures/gen.py`:
//! an SD-style config with conv projections, and an SDXL-style one with linear projections,
//! two transformer layers and the text-time embedding), plain and with ControlNet residuals,
//! resident and fully offloaded.

use std::path::{Path, PathBuf};

use crate::common::*;
use burn::tensor::Tensor;
use distorch_core::SafetensorsIndex;
use distorch_core::runtime::{DeviceMap, LoadOptions, Lookahead};
use distorch_models::{Error, Unet2dCondition, UnetConfig, UnetInput};

fn weights(name: &str) -> PathBuf {
    fixture(name).join("diffusion_pytorch_model.safetensors")
}

fn load(name: &str, weights: &Path, offload: bool) -> Result<Unet2dCondition<B>, Error> {
    let config = UnetConfig::from_file(fixture(name).join("config.json"))?;
    let index = SafetensorsIndex::open(weights)?;
    let (model, report) = load_as::<Unet2dCondition<B>>(weights, config, offload)?;
    assert!(
        report.missing.is_empty() && report.unused.is_empty(),
        "{report:?}"
    );
    assert_eq!(report.tensors, index.tensors().len());
    Ok(model)
}

fn input(name: &str, sdxl: bool, control: bool) -> UnetInput<B> {
    let t: Tensor<B, 1> = tensor(name, "timestep");
    let t = t.into_data().to_vec::<f32>().unwrap();
    let mut input = UnetInput::new(
        tensor(name, "sample"),
        t,
        tensor(name, "encoder_hidden_states"),
    );
    if sdxl {
        input = input.with_text_time(tensor(name, "text_embeds"), tensor(name, "time_ids"));
    }
    if control {
        let down = (0..4)
            .map(|i| tensor(name, &format!("down_block_res_samples.{i}")))
            .collect();
        input = input.with_control(down, tensor(name, "mid_block_res_sample"));
    }
    input
}

fn bits(t: Tensor<B, 4>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

#[test]
fn matches_diffusers_resident_and_offloaded() {
    for (name, sdxl) in [("unet_sd", false), ("unet_sdxl", true)] {
        let reference = fixture(name).join("reference.safetensors");
        let resident = load(name, &weights(name), false).unwrap();
        let offloaded = load(name, &weights(name), true).unwrap();
        for (control, key) in [(false, "out"), (true, "controlled_out")] {
            let out = resident.forward(input(name, sdxl, control)).unwrap();
            assert_close(&format!("{name} {key}"), out.clone(), read(&reference, key));
            let off = offloaded.forward(input(name, sdxl, control)).unwrap();
            assert_eq!(bits(out), bits(off), "{name} {key}: offloaded differs");
        }
        let stats = offloaded.streamer().take_stats();
        assert!(stats.prefetched + stats.on_demand > 0, "{stats:?}");
    }
}

#[test]
fn wrong_inputs_are_typed_errors() {
    let sd = load("unet_sd", &weights("unet_sd"), false).unwrap();
    let device = Default::default();
    let ctx = || Tensor::<B, 3>::zeros([1, 5, 24], &device);
    let e = sd
        .forward(UnetInput::new(
            Tensor::zeros([1, 4, 7, 8], &device),
            vec![1.0],
            ctx(),
        ))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid input `sample`: shape [1, 4, 7, 8]: expected 4 channels and a size divisible by 2"
    );
    let e = sd
        .forward(UnetInput::new(
            Tensor::zeros([1, 4, 8, 8], &device),
            vec![1.0],
            Tensor::zeros([1, 5, 32], &device),
        ))
        .unwrap_err();
    assert!(e.to_string().contains("expected [1, _, 24]"), "{e}");
    let e = sd
        .forward(UnetInput::new(
            Tensor::zeros([1, 4, 8, 8], &device),
            vec![1.0, 2.0],
            ctx(),
        ))
        .unwrap_err();
    assert!(
        e.to_string().contains("2 timesteps for a batch of 1"),
        "{e}"
    );
    let e = sd
        .forward(
            UnetInput::new(Tensor::zeros([1, 4, 8, 8], &device), vec![1.0], ctx()).with_control(
                vec![Tensor::zeros([1, 16, 8, 8], &device)],
                Tensor::zeros([1, 32, 4, 4], &device),
            ),
        )
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("1 residuals, the UNet has 4 skip connections"),
        "{e}"
    );

    let xl = load("unet_sdxl", &weights("unet_sdxl"), false).unwrap();
    let e = xl
        .forward(UnetInput::new(
            Tensor::zeros([1, 4, 8, 8], &device),
            vec![1.0],
            ctx(),
        ))
        .unwrap_err();
    assert!(
        e.to_string().contains("needs text_embeds and time_ids"),
        "{e}"
    );
}

#[test]
fn configs_that_change_the_maths_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("config.json");
    for (json, field) in [
        (
            r#"{"resnet_time_scale_shift": "scale_shift"}"#,
            "resnet_time_scale_shift",
        ),
        (r#"{"addition_embed_type": "text"}"#, "addition_embed_type"),
        (
            r#"{"down_block_types": ["A", "B", "C", "D"]}"#,
            "down_block_types",
        ),
        (r#"{"layers_per_block": [1, 2]}"#, "layers_per_block"),
        (r#"{"class_embed_type": "timestep"}"#, "class_embed_type"),
    ] {
        std::fs::write(&cfg, json).unwrap();
        let e = UnetConfig::from_file(&cfg).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("unsupported configuration: `{field}`")),
            "{json}: {e}"
        );
    }
    // The file's shapes are checked against the config before loading.
    let mut config = UnetConfig::from_file(fixture("unet_sd").join("config.json")).unwrap();
    config.cross_attention_dim = distorch_models::PerBlock::One(32);
    let index = SafetensorsIndex::open(weights("unet_sd")).unwrap();
    let split = distorch_models::load::split(&index);
    let e = <Unet2dCondition<B> as distorch_models::Model<B>>::load(
        &distorch_models::LoadContext {
            index: &index,
            component: &split.components[0],
            plan: &plan(&weights("unet_sd"), false),
            devices: &DeviceMap::new(Default::default()),
            options: &LoadOptions::default(),
            lookahead: Lookahead::default(),
        },
        config,
    )
    .err()
    .unwrap();
    assert!(
        e.to_string()
            .contains("attn2.to_k.weight` has shape [16, 24], the model expects [16, 32]"),
        "{e}"
    );
}

#[test]
fn sharded_folder_loads_through_load_model() {
    use distorch_alloc::{DeviceGraph, DeviceId};
    use distorch_models::{ComponentOptions, Loaded, Placement, load_model};
    let tmp = tempfile::tempdir().unwrap();
    let index = shard(
        "unet_sdxl",
        "diffusion_pytorch_model.safetensors",
        tmp.path(),
        3,
    );
    let opened = SafetensorsIndex::open(&index).unwrap();
    assert!(opened.is_sharded());
    assert_eq!(opened.files().len(), 3);
    let graph: DeviceGraph = "cuda:0=1gib,cpu=8gib".parse().unwrap();
    let placement = Placement::virtual_vram(
        DeviceId::cuda(0),
        Default::default(),
        1.0,
        vec![DeviceId::CPU],
    )
    .unwrap();
    let loaded: Loaded<Unet2dCondition<B>> =
        load_model(tmp.path(), None, &ComponentOptions::new(graph, placement)).unwrap();
    assert_eq!(loaded.report.tensors, opened.tensors().len());
    assert!(loaded.report.host_mapped.0 > 0, "{:?}", loaded.report);
    let out = loaded
        .model
        .forward(input("unet_sdxl", true, false))
        .unwrap();
    let reference = fixture("unet_sdxl").join("reference.safetensors");
    assert_close("sharded unet_sdxl", out.clone(), read(&reference, "out"));
    let resident = load("unet_sdxl", &weights("unet_sdxl"), false).unwrap();
    let want = resident.forward(input("unet_sdxl", true, false)).unwrap();
    assert_eq!(
        bits(out),
        bits(want),
        "sharded and offloaded differs from resident"
    );
}

//! ControlNet against diffusers' `ControlNetModel` (fixtures from `tools/fixtures/gen.py`: an
//! SD-style and an SDXL-style ControlNet for the tiny UNets, every weight random so the zero
//! convolutions are not zero), in both layouts, resident and offloaded, at scale 1, 0.7 and
//! in guess mode; its residuals drive the UNet to diffusers' controlled output.

#![allow(clippy::clone_on_copy)] // Devices are Copy on ndarray only.

use std::path::PathBuf;

use crate::common::*;
use burn::tensor::Tensor;
use distorch_models::{
    ComponentOptions, ControlNetConfig, ControlNetInput, ControlNetModel, ControlNetOutput, Loaded,
    Unet2dCondition, UnetInput, load_model,
};

const CASES: [(&str, &str, bool); 2] = [
    ("controlnet_sd", "unet_sd", false),
    ("controlnet_sdxl", "unet_sdxl", true),
];

fn options(offload: bool) -> ComponentOptions<B> {
    component_options(offload)
}

/// Loads a folder, or a single file with the folder's config (tiny models' heads do not follow
/// SD's conventions, so shapes cannot tell them).
fn load(path: PathBuf, offload: bool) -> ControlNetModel<B> {
    let config = path
        .is_file()
        .then(|| ControlNetConfig::from_file(path.with_file_name("config.json")).unwrap());
    let loaded: Loaded<ControlNetModel<B>> = load_model(path, config, &options(offload)).unwrap();
    assert!(
        loaded.report.missing.is_empty() && loaded.report.unused.is_empty(),
        "{:?}",
        loaded.report
    );
    loaded.model
}

fn input(name: &str, sdxl: bool) -> ControlNetInput<B> {
    let t: Tensor<B, 1> = tensor(name, "timestep");
    let mut input = ControlNetInput::new(
        tensor(name, "sample"),
        t.into_data().to_vec::<f32>().unwrap(),
        tensor(name, "encoder_hidden_states"),
        tensor(name, "controlnet_cond"),
    );
    if sdxl {
        input = input.with_text_time(tensor(name, "text_embeds"), tensor(name, "time_ids"));
    }
    input
}

fn check(name: &str, tag: &str, out: &ControlNetOutput<B>) {
    let reference = fixture(name).join("reference.safetensors");
    assert_eq!(out.down_block_res_samples.len(), 4);
    for (i, r) in out.down_block_res_samples.iter().enumerate() {
        let key = format!("{tag}down_block_res_samples.{i}");
        assert_close(&format!("{name} {key}"), r.clone(), read(&reference, &key));
    }
    let key = format!("{tag}mid_block_res_sample");
    assert_close(
        &format!("{name} {key}"),
        out.mid_block_res_sample.clone(),
        read(&reference, &key),
    );
}

fn bits(out: ControlNetOutput<B>) -> Vec<Vec<f32>> {
    out.down_block_res_samples
        .into_iter()
        .chain([out.mid_block_res_sample])
        .map(|t| t.into_data().to_vec::<f32>().unwrap())
        .collect()
}

#[test]
fn matches_diffusers_in_both_layouts_resident_and_offloaded() {
    for (name, _, sdxl) in CASES {
        for path in [fixture(name), fixture(name).join("ldm.safetensors")] {
            let resident = load(path.clone(), false);
            let offloaded = load(path.clone(), true);
            let what = format!("{name} ({})", path.display());
            for (tag, scale, guess) in [
                ("", 1.0, false),
                ("scaled.", 0.7, false),
                ("guess.", 0.7, true),
            ] {
                let run = |m: &ControlNetModel<B>| {
                    m.forward(input(name, sdxl).with_scale(scale).with_guess_mode(guess))
                        .unwrap()
                };
                let out = run(&resident);
                check(name, tag, &out);
                assert_eq!(
                    bits(out),
                    bits(run(&offloaded)),
                    "{what} {tag}: offloaded differs"
                );
            }
            let stats = offloaded.streamer().take_stats();
            assert!(stats.prefetched + stats.on_demand > 0, "{what}: {stats:?}");
        }
    }
}

#[test]
fn residuals_drive_the_unet_to_the_controlled_reference() {
    for (name, unet_name, sdxl) in CASES {
        let control = load(fixture(name), true);
        let unet: Loaded<Unet2dCondition<B>> =
            load_model(fixture(unet_name), None, &options(false)).unwrap();
        control.config().check_unet(unet.model.config()).unwrap();
        let t: Tensor<B, 1> = tensor(name, "timestep");
        let mut unet_input = UnetInput::new(
            tensor(name, "sample"),
            t.into_data().to_vec::<f32>().unwrap(),
            tensor(name, "encoder_hidden_states"),
        );
        if sdxl {
            unet_input =
                unet_input.with_text_time(tensor(name, "text_embeds"), tensor(name, "time_ids"));
        }
        let residuals = control
            .forward(ControlNetInput::for_unet(
                &unet_input,
                tensor(name, "controlnet_cond"),
            ))
            .unwrap();
        let out = unet.model.forward(residuals.apply(unet_input)).unwrap();
        assert_close(
            &format!("{name} controlled unet"),
            out,
            read(
                &fixture(name).join("reference.safetensors"),
                "controlled_unet_out",
            ),
        );
    }
}

#[test]
fn mismatches_are_typed_errors() {
    let control = load(fixture("controlnet_sd"), false);
    let xl: Loaded<Unet2dCondition<B>> =
        load_model(fixture("unet_sdxl"), None, &options(false)).unwrap();
    let e = control.config().check_unet(xl.model.config()).unwrap_err();
    assert!(
        e.to_string().contains("they were not made for each other"),
        "{e}"
    );

    let device = Default::default();
    let e = control
        .forward(ControlNetInput::new(
            Tensor::zeros([1, 4, 8, 8], &device),
            vec![1.0],
            Tensor::zeros([1, 5, 24], &device),
            Tensor::zeros([1, 3, 32, 32], &device),
        ))
        .err()
        .unwrap();
    assert_eq!(
        e.to_string(),
        "invalid input `controlnet_cond`: shape [1, 3, 32, 32]: expected [1, 3, 64, 64] (the hint \
         is 8× the latents' size)"
    );
    // A diffusers-layout file without its config cannot be guessed.
    let e = load_model::<B, ControlNetModel<B>>(
        fixture("controlnet_sd").join("diffusion_pytorch_model.safetensors"),
        None,
        &options(false),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("needs its config.json"), "{e}");
}

#[test]
fn single_file_architecture_is_detected_from_shapes() {
    use distorch_core::{ComponentKind, SafetensorsIndex};
    for (name, _, sdxl) in CASES {
        let want = ControlNetConfig::from_file(fixture(name).join("config.json")).unwrap();
        let index = SafetensorsIndex::open(fixture(name).join("ldm.safetensors")).unwrap();
        let split = distorch_models::load::split(&index);
        let c = &split.components[0];
        assert_eq!(c.kind, ComponentKind::ControlNet);
        let got = ControlNetConfig::detect_ldm(
            c.tensors.iter().map(|t| (c.local(t), t.shape.as_slice())),
        )
        .unwrap();
        assert_eq!(
            got.conditioning_embedding_out_channels,
            want.conditioning_embedding_out_channels
        );
        assert_eq!(got.conditioning_channels, 3);
        assert_eq!(got.unet.block_out_channels, want.unet.block_out_channels);
        assert_eq!(got.unet.down_block_types, want.unet.down_block_types);
        assert_eq!(
            got.unet.use_linear_projection,
            want.unet.use_linear_projection
        );
        assert_eq!(got.unet.has_text_time(), sdxl);
        assert_eq!(
            got.unet.projection_class_embeddings_input_dim,
            want.unet.projection_class_embeddings_input_dim
        );
    }
}

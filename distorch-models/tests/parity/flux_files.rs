//! A FLUX.1 pipeline loaded in one call from the files users keep (`Flux::load`): ComfyUI's
//! separate files (the BFL-layout transformer with its checkpoint prefix, CLIP-L, T5 and
//! `ae.safetensors`, each with its own placement) and ComfyUI's all-in-one checkpoint
//! (`model.diffusion_model.`, `text_encoders.clip_l.transformer.`,
//! `text_encoders.t5xxl.transformer.`, `vae.`), both equal to diffusers' `FluxPipeline` on the
//! tiny fixtures (`tools/fixtures/flux.py`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use distorch_core::ComponentKind;
use distorch_core::SafetensorsIndex;
use distorch_core::safetensors::write;
use distorch_models::ClipTextConfig;
use distorch_models::flux::dit::FluxConfig;
use distorch_models::flux::load::{FluxConfigs, FluxFiles, FluxOptions};
use distorch_models::flux::pipeline::{Flux, FluxTxt2Img};
use distorch_models::sampling::flow_match::FlowMatchConfig;

use crate::common::*;

/// The configurations the tiny models' shapes cannot tell (FLUX's rotary sections, CLIP's
/// 4-wide heads).
fn configs() -> FluxConfigs {
    FluxConfigs {
        transformer: Some(FluxConfig::from_file(fixture("flux_dit").join("config.json")).unwrap()),
        clip: Some(
            ClipTextConfig::from_file(fixture("pipeline_sd").join("text_encoder/config.json"))
                .unwrap(),
        ),
        ..FluxConfigs::default()
    }
}

/// An all-in-one checkpoint of the fixtures, ComfyUI's prefixes.
fn all_in_one(dir: &Path) -> PathBuf {
    let parts = [
        (fixture("flux_dit").join("bfl.safetensors"), ""),
        (
            fixture("pipeline_sd").join("text_encoder/model.safetensors"),
            "text_encoders.clip_l.transformer.",
        ),
        (
            fixture("t5").join("model.safetensors"),
            "text_encoders.t5xxl.transformer.",
        ),
        (fixture("flux_vae").join("ae.safetensors"), "vae."),
    ];
    let files: Vec<(SafetensorsIndex, Vec<u8>, &str)> = parts
        .iter()
        .map(|(p, prefix)| {
            (
                SafetensorsIndex::open(p).unwrap(),
                std::fs::read(p).unwrap(),
                *prefix,
            )
        })
        .collect();
    let mut specs = Vec::new();
    let mut data = Vec::new();
    for (index, bytes, prefix) in &files {
        for t in index.tensors() {
            specs.push((format!("{prefix}{}", t.name), t.dtype, t.shape.clone()));
            data.push(&bytes[t.file_offset as usize..(t.file_offset + t.bytes) as usize]);
        }
    }
    let path = dir.join("flux1-dev-all-in-one.safetensors");
    write(&path, &specs, &data, &BTreeMap::new()).unwrap();
    path
}

fn request() -> FluxTxt2Img<B> {
    let mut req = FluxTxt2Img::<B>::new("a red fox   in the snow");
    (req.width, req.height, req.steps, req.max_sequence_length) = (16, 16, 2, 16);
    req.latents = Some(tensor("flux_pipeline", "noise"));
    req
}

#[test]
fn flux_loads_from_separate_files_and_an_all_in_one_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = fixture("flux_pipeline").join("reference.safetensors");
    let separate = FluxFiles {
        transformer: fixture("flux_dit").join("bfl.safetensors"),
        clip: fixture("pipeline_sd").join("text_encoder/model.safetensors"),
        t5: fixture("t5").join("model.safetensors"),
        vae: fixture("flux_vae").join("ae.safetensors"),
        t5_tokenizer: fixture("t5_tokenizer").join("tokenizer.json"),
        clip_tokenizer: None,
        scheduler: FlowMatchConfig::flux_dev(),
        configs: configs(),
    };
    let checkpoint = all_in_one(tmp.path());
    let index = SafetensorsIndex::open(&checkpoint).unwrap();
    let kinds: Vec<ComponentKind> = distorch_models::load::split(&index)
        .components
        .iter()
        .map(|c| c.kind)
        .collect();
    assert_eq!(kinds.len(), 4, "{kinds:?}");
    let mut combined = FluxFiles::checkpoint(
        &checkpoint,
        fixture("t5_tokenizer"),
        FlowMatchConfig::flux_dev(),
    );
    combined.configs = configs();
    let mut images = Vec::new();
    for files in [separate, combined] {
        // The transformer offloaded, everything else resident: its own placement.
        let mut options = FluxOptions::all(component_options(false));
        options.transformer = component_options(true);
        let (flux, plans): (Flux<B>, _) = Flux::load(&files, &options).unwrap();
        assert!(
            plans
                .transformer
                .units()
                .iter()
                .any(|u| u.device == distorch_alloc::DeviceId::CPU)
        );
        let out = flux.txt2img(&request(), &mut |_| {}).unwrap();
        assert_close("latents", out.latents, read(&reference, "dev.latents"));
        assert_close("image", out.image.clone(), read(&reference, "dev.image"));
        images.push(out.image.into_data().to_vec::<f32>().unwrap());
    }
    assert_eq!(images[0], images[1], "the checkpoint's image differs");
}

#[test]
fn a_missing_tokenizer_fails_before_any_weight_is_read() {
    let mut files = FluxFiles::checkpoint(
        "/nonexistent/flux.safetensors",
        "/nonexistent/tokenizer.json",
        FlowMatchConfig::flux_dev(),
    );
    files.configs = configs();
    let e = match Flux::<B>::load(&files, &FluxOptions::all(component_options(false))) {
        Ok(_) => panic!("loaded without files"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("/nonexistent/tokenizer.json"), "{e}");
}

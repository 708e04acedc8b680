//! The VAE against diffusers' `AutoencoderKL` (fixture from `tools/fixtures/gen.py`: a tiny
//! random two-level config), resident and fully offloaded.

use std::path::Path;

use crate::common::*;
use burn::tensor::Tensor;
use distorch_core::SafetensorsIndex;
use distorch_core::runtime::{DeviceMap, LoadOptions, Lookahead};
use distorch_models::{AutoencoderKl, Error, VaeConfig};

fn load(weights: &Path, offload: bool) -> Result<AutoencoderKl<B>, Error> {
    let config = VaeConfig::from_file(fixture("vae").join("config.json"))?;
    let (model, report) = load_as::<AutoencoderKl<B>>(weights, config, offload)?;
    assert!(
        report.missing.is_empty() && report.unused.is_empty(),
        "{report:?}"
    );
    assert_eq!(report.tensors, 124);
    Ok(model)
}

fn input(key: &str) -> Tensor<B, 4> {
    tensor("vae", key)
}

fn weights() -> std::path::PathBuf {
    fixture("vae").join("diffusion_pytorch_model.safetensors")
}

#[test]
fn matches_diffusers_resident_and_offloaded() {
    let reference = fixture("vae").join("reference.safetensors");
    let resident = load(&weights(), false).unwrap();
    let offloaded = load(&weights(), true).unwrap();
    let (mean, logvar) = resident.encode(input("image")).unwrap();
    assert_close("latent_mean", mean.clone(), read(&reference, "latent_mean"));
    assert_close(
        "latent_logvar",
        logvar.clone(),
        read(&reference, "latent_logvar"),
    );
    let decoded = resident.decode(input("z")).unwrap();
    assert_close("decoded", decoded.clone(), read(&reference, "decoded"));

    let (mean2, logvar2) = offloaded.encode(input("image")).unwrap();
    let decoded2 = offloaded.decode(input("z")).unwrap();
    let bits = |t: Tensor<B, 4>| t.into_data().to_vec::<f32>().unwrap();
    assert_eq!(bits(mean), bits(mean2), "offloaded encode differs");
    assert_eq!(bits(logvar), bits(logvar2));
    assert_eq!(bits(decoded), bits(decoded2), "offloaded decode differs");
    let stats = offloaded.streamer().take_stats();
    assert!(
        stats.bytes_moved.values().any(|b| b.bytes() > 0),
        "{stats:?}"
    );
}

#[test]
fn wrong_inputs_and_configs_are_typed_errors() {
    let model = load(&weights(), false).unwrap();
    let device = Default::default();
    let e = model
        .encode(Tensor::<B, 4>::zeros([1, 4, 16, 16], &device))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid input `image`: shape [_, 4, 16, 16]: expected 3 channels and a size divisible by 2"
    );
    let e = model
        .encode(Tensor::<B, 4>::zeros([1, 3, 15, 16], &device))
        .unwrap_err();
    assert!(e.to_string().contains("divisible by 2"), "{e}");
    let e = model
        .decode(Tensor::<B, 4>::zeros([1, 3, 8, 8], &device))
        .unwrap_err();
    assert!(e.to_string().contains("expected 4 latent channels"), "{e}");

    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("config.json");
    std::fs::write(&cfg, r#"{"down_block_types": ["AttnDownEncoderBlock2D"]}"#).unwrap();
    let e = VaeConfig::from_file(&cfg).unwrap_err();
    assert_eq!(
        e.to_string(),
        "unsupported configuration: `down_block_types` = \"AttnDownEncoderBlock2D\" \
         (supported: DownEncoderBlock2D)"
    );
    std::fs::write(
        &cfg,
        r#"{"block_out_channels": [48], "norm_num_groups": 32}"#,
    )
    .unwrap();
    let e = VaeConfig::from_file(&cfg).unwrap_err();
    assert!(
        e.to_string().contains("must divide every block's channels"),
        "{e}"
    );
}

#[test]
fn a_missing_weight_is_named_before_loading() {
    let tmp = tempfile::tempdir().unwrap();
    let other = tmp.path().join("other.safetensors");
    // Drop the decoder's last conv and see the missing key named before anything loads.
    rewrite(&weights(), &other, |k| {
        (k != "decoder.conv_out.weight").then(|| k.to_owned())
    });
    let e = load(&other, true).err().unwrap();
    assert!(
        e.to_string()
            .ends_with("is missing 1 expected tensor(s): `decoder.conv_out.weight`"),
        "{e}"
    );
}

#[test]
fn single_file_layout_matches_diffusers() {
    // `ldm.safetensors`: the fixture in the original layout under `first_stage_model.`,
    // attention projections as 1×1 convolutions (checked with diffusers' converter).
    let path = fixture("vae").join("ldm.safetensors");
    let reference = fixture("vae").join("reference.safetensors");
    let index = SafetensorsIndex::open(&path).unwrap();
    let split = distorch_models::load::split(&index);
    let vae = split
        .components
        .iter()
        .find(|c| c.kind == distorch_core::ComponentKind::Vae)
        .unwrap();
    for offload in [false, true] {
        let (model, report) = <AutoencoderKl<B> as distorch_models::Model<B>>::load(
            &distorch_models::LoadContext {
                index: &index,
                component: vae,
                plan: &plan(&path, offload),
                devices: &DeviceMap::new(Default::default()),
                options: &LoadOptions::default(),
                lookahead: Lookahead::default(),
            },
            VaeConfig::from_file(fixture("vae").join("config.json")).unwrap(),
        )
        .unwrap();
        assert!(
            report.missing.is_empty() && report.unused.is_empty(),
            "{report:?}"
        );
        let (mean, logvar) = model.encode(input("image")).unwrap();
        assert_close("ldm latent_mean", mean, read(&reference, "latent_mean"));
        assert_close(
            "ldm latent_logvar",
            logvar,
            read(&reference, "latent_logvar"),
        );
        let decoded = model.decode(input("z")).unwrap();
        assert_close("ldm decoded", decoded, read(&reference, "decoded"));
    }
}

#[test]
fn sd15_single_file_vae_keys_and_shapes_are_all_covered() {
    let want = demo_shapes(distorch_core::ComponentKind::Vae);
    let config = VaeConfig {
        block_out_channels: vec![128, 256, 512, 512],
        down_block_types: vec!["DownEncoderBlock2D".into(); 4],
        up_block_types: vec!["UpDecoderBlock2D".into(); 4],
        layers_per_block: 2,
        ..VaeConfig::default()
    };
    let got: std::collections::BTreeSet<(String, Vec<usize>)> = config
        .expected_tensors_in(distorch_models::KeyLayout::Ldm)
        .into_iter()
        .map(|e| (e.name, e.shape))
        .collect();
    let only_file: Vec<_> = want.difference(&got).take(5).collect();
    let only_model: Vec<_> = got.difference(&want).take(5).collect();
    assert!(
        only_file.is_empty() && only_model.is_empty(),
        "{only_file:?} / {only_model:?}"
    );
}

/// FLUX.1's VAE shape (16 latent channels, no quant convolutions; `tools/fixtures/flux.py`) in
/// diffusers' folder and as BFL's `ae.safetensors` (LDM names, no prefix), resident and
/// offloaded; the single file's detected configuration carries FLUX.1's factors.
#[test]
fn a_flux_vae_matches_diffusers_in_both_layouts() {
    use distorch_models::{Loaded, Model, load_model};
    let dir = fixture("flux_vae");
    let reference = dir.join("reference.safetensors");
    let input = |key: &str| tensor::<4>("flux_vae", key);
    let mut outs = Vec::new();
    for path in [dir.clone(), dir.join("ae.safetensors")] {
        for offload in [false, true] {
            let m: Loaded<AutoencoderKl<B>> =
                load_model(&path, None, &component_options(offload)).unwrap();
            assert!(
                m.report.missing.is_empty() && m.report.unused.is_empty(),
                "{:?}",
                m.report
            );
            let c = m.model.config();
            assert_eq!((c.scaling_factor, c.shift_factor), (0.3611, Some(0.1159)));
            let (mean, logvar) = m.model.encode(input("image")).unwrap();
            assert_close("flux latent_mean", mean, read(&reference, "latent_mean"));
            assert_close(
                "flux latent_logvar",
                logvar,
                read(&reference, "latent_logvar"),
            );
            let decoded = m.model.decode(input("z")).unwrap();
            assert_close("flux decoded", decoded.clone(), read(&reference, "decoded"));
            outs.push(decoded.into_data().to_vec::<f32>().unwrap());
        }
    }
    assert!(outs.iter().all(|o| *o == outs[0]), "placements differ");
    let index = SafetensorsIndex::open(dir.join("ae.safetensors")).unwrap();
    let split = distorch_models::load::split(&index);
    let detected = AutoencoderKl::<B>::detect_config(&split.components[0]).unwrap();
    assert_eq!(
        detected,
        VaeConfig::from_file(dir.join("config.json")).unwrap()
    );
}

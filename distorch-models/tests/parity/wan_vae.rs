//! The Wan VAE against diffusers' `AutoencoderKLWan` (`tools/fixtures/wan.py`): a 9-frame
//! video encoded (first frame, then chunks of four, through the causal cache) and three
//! latent frames decoded one by one, in both key layouts, resident and fully offloaded.

use crate::common::*;
use burn::tensor::Tensor;
use distorch_core::SafetensorsIndex;
use distorch_models::wan::vae::{WanVae, WanVaeConfig, WanVaeLayout};

fn config() -> WanVaeConfig {
    WanVaeConfig::from_file(fixture("wan_vae").join("config.json")).unwrap()
}

fn bits(t: Tensor<B, 5>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

#[test]
fn wan_vae_matches_diffusers_in_both_layouts() {
    let dir = fixture("wan_vae");
    let reference = dir.join("reference.safetensors");
    let mut all = Vec::new();
    for (file, layout) in [
        (
            "diffusion_pytorch_model.safetensors",
            WanVaeLayout::Diffusers,
        ),
        ("original.safetensors", WanVaeLayout::Original),
    ] {
        for offload in [false, true] {
            let what = format!("{file}, offload {offload}");
            let (vae, report) = load_as::<WanVae<B>>(&dir.join(file), config(), offload).unwrap();
            assert_eq!(vae.layout(), layout);
            assert!(
                report.missing.is_empty() && report.unused.is_empty(),
                "{report:?}"
            );
            let (mean, logvar) = vae.encode(tensor("wan_vae", "video")).unwrap();
            assert_close(&what, mean.clone(), read(&reference, "latent_mean"));
            assert_close(&what, logvar.clone(), read(&reference, "latent_logvar"));
            let decoded = vae.decode(tensor("wan_vae", "z")).unwrap();
            assert_close(&what, decoded.clone(), read(&reference, "decoded"));
            let mut out = bits(mean);
            out.extend(bits(logvar));
            out.extend(bits(decoded));
            all.push(out);
        }
    }
    assert!(
        all.iter().all(|o| *o == all[0]),
        "outputs differ between layouts or placements"
    );
}

#[test]
fn the_configuration_is_read_from_the_shapes() {
    let dir = fixture("wan_vae");
    for file in [
        "diffusion_pytorch_model.safetensors",
        "original.safetensors",
    ] {
        let index = SafetensorsIndex::open(dir.join(file)).unwrap();
        let split = distorch_models::load::split(&index);
        let found = WanVaeConfig::detect(&split.components[0]).unwrap();
        let want = config();
        assert_eq!(
            (
                found.base_dim,
                found.z_dim,
                &found.dim_mult,
                found.num_res_blocks
            ),
            (
                want.base_dim,
                want.z_dim,
                &want.dim_mult,
                want.num_res_blocks
            ),
            "{file}"
        );
        assert_eq!(
            found.temperal_downsample, want.temperal_downsample,
            "{file}"
        );
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let dir = fixture("wan_vae");
    let (vae, _) = load_as::<WanVae<B>>(
        &dir.join("diffusion_pytorch_model.safetensors"),
        config(),
        false,
    )
    .unwrap();
    let video: Tensor<B, 5> = tensor("wan_vae", "video");
    let e = vae.encode(video.clone().narrow(2, 0, 6)).unwrap_err();
    assert!(e.to_string().contains("1 + 4k frames"), "{e}");
    let e = vae.encode(video.narrow(3, 0, 12)).unwrap_err();
    assert!(e.to_string().contains("divisible by 8"), "{e}");
    let z: Tensor<B, 5> = tensor("wan_vae", "z");
    let e = vae.decode(z.narrow(1, 0, 3)).unwrap_err();
    assert!(e.to_string().contains("3 channels"), "{e}");
}

//! The CLIP vision encoder against transformers' `CLIPVisionModelWithProjection`, resident and
//! offloaded, and CLIP's image preprocessing against transformers' processor (PIL backend)
//! on a fixed image, shrunk and enlarged.

#![allow(clippy::clone_on_copy)] // Devices are Copy on ndarray only.

use crate::common::*;
use burn::tensor::Tensor;
use distorch_core::SafetensorsIndex;
use distorch_models::vision::clip_image::{decode, preprocess};
use distorch_models::{ClipVisionConfig, ClipVisionModel, ClipVisionOutput, Loaded, load_model};

fn load(offload: bool) -> ClipVisionModel<B> {
    let loaded: Loaded<ClipVisionModel<B>> =
        load_model(fixture("clip_vision"), None, &component_options(offload)).unwrap();
    assert!(
        loaded.report.missing.is_empty() && loaded.report.unused.is_empty(),
        "{:?}",
        loaded.report
    );
    loaded.model
}

fn bits(o: ClipVisionOutput<B>) -> Vec<f32> {
    let mut v = o.image_embeds.into_data().to_vec::<f32>().unwrap();
    v.extend(
        Tensor::stack::<4>(o.hidden_states, 0)
            .into_data()
            .to_vec::<f32>()
            .unwrap(),
    );
    v
}

#[test]
fn matches_transformers_resident_and_offloaded() {
    let reference = fixture("clip_vision").join("reference.safetensors");
    let resident = load(false);
    let offloaded = load(true);
    let out = resident
        .forward(tensor("clip_vision", "pixel_values"))
        .unwrap();
    assert_close(
        "image_embeds",
        out.image_embeds.clone(),
        read(&reference, "image_embeds"),
    );
    assert_close(
        "last_hidden_state",
        out.last_hidden_state.clone(),
        read(&reference, "last_hidden_state"),
    );
    assert_close(
        "hidden_states",
        Tensor::stack::<4>(out.hidden_states.clone(), 0),
        read(&reference, "hidden_states"),
    );
    let off = offloaded
        .forward(tensor("clip_vision", "pixel_values"))
        .unwrap();
    assert_eq!(bits(out), bits(off), "offloaded differs");
    let stats = offloaded.streamer().take_stats();
    assert!(stats.prefetched + stats.on_demand > 0, "{stats:?}");

    let device = Default::default();
    let e = resident
        .forward(Tensor::zeros([1, 3, 30, 32], &device))
        .err()
        .unwrap();
    assert_eq!(
        e.to_string(),
        "invalid input `pixel_values`: shape [1, 3, 30, 32]: expected [B, 3, 32, 32]"
    );
}

#[test]
fn shapes_give_the_architecture() {
    let want = ClipVisionConfig::from_file(fixture("clip_vision").join("config.json")).unwrap();
    let index = SafetensorsIndex::open(fixture("clip_vision").join("model.safetensors")).unwrap();
    let split = distorch_models::load::split(&index);
    let got = ClipVisionConfig::detect(&split.components[0]).unwrap();
    assert_eq!(
        (got.hidden_size, got.intermediate_size, got.projection_dim),
        (
            want.hidden_size,
            want.intermediate_size,
            want.projection_dim
        )
    );
    assert_eq!(
        (
            got.num_hidden_layers,
            got.patch_size,
            got.image_size,
            got.num_channels
        ),
        (
            want.num_hidden_layers,
            want.patch_size,
            want.image_size,
            want.num_channels
        )
    );
}

#[test]
fn preprocessing_matches_the_reference_processor() {
    let bytes = std::fs::read(fixture("clip_vision").join("image.png")).unwrap();
    let image = decode(&bytes).unwrap();
    let reference = fixture("clip_vision").join("reference.safetensors");
    for size in [32, 80] {
        let got: Tensor<B, 4> = preprocess(&image, size, &Default::default()).unwrap();
        let (shape, want) = read(&reference, &format!("processed_{size}"));
        assert_eq!(got.dims().to_vec(), shape);
        let got = got.into_data().to_vec::<f32>().unwrap();
        // Same 8-bit pixels, so only the f32 rounding of the normalisation may differ.
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((f64::from(*g) - w).abs() < 1e-5, "{size}: [{i}] {g} vs {w}");
        }
    }
    let e = decode(b"not an image").unwrap_err();
    assert!(
        e.to_string()
            .starts_with("invalid input `image`: cannot be decoded"),
        "{e}"
    );
}

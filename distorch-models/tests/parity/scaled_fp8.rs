//! A ComfyUI scaled-fp8 single-file UNet (`tools/fixtures/scaled_fp8.py`: the tiny SD UNet's
//! linear weights as float8_e4m3fn with a per-tensor `scale_weight`, the `scaled_fp8`
//! marker) against diffusers' UNet holding the dequantised weights, resident and fully
//! offloaded; a LoRA on a scaled weight is refused before anything is read.

use std::sync::Arc;

use crate::common::*;
use burn::tensor::Tensor;
use distorch_lora::{LoraFile, Target};
use distorch_models::{
    ComponentLoras, Error, Loaded, Unet2dCondition, UnetConfig, UnetInput, load_model,
};

const NAME: &str = "unet_sd_scaled_fp8";

fn load(offload: bool) -> Result<Loaded<Unet2dCondition<B>>, Error> {
    let dir = fixture(NAME);
    let config = UnetConfig::from_file(dir.join("config.json"))?;
    load_model(
        dir.join("scaled_fp8.safetensors"),
        Some(config),
        &component_options(offload),
    )
}

fn input() -> UnetInput<B> {
    let t: Tensor<B, 1> = tensor(NAME, "timestep");
    UnetInput::new(
        tensor(NAME, "sample"),
        t.into_data().to_vec::<f32>().unwrap(),
        tensor(NAME, "encoder_hidden_states"),
    )
}

#[test]
fn scaled_fp8_unet_matches_diffusers_with_the_dequantised_weights() {
    let reference = fixture(NAME).join("reference.safetensors");
    let mut outs = Vec::new();
    for offload in [false, true] {
        let loaded = load(offload).unwrap();
        // Only the marker is left unused: every weight's scales went with it, and each
        // home holds the plan's bytes.
        let r = &loaded.report;
        assert!(r.missing.is_empty(), "{r:?}");
        assert_eq!(r.unused, ["scaled_fp8"]);
        let planned: Vec<_> = loaded
            .plan
            .devices()
            .iter()
            .filter(|d| d.model_bytes.0 > 0)
            .map(|d| (d.device, d.model_bytes))
            .collect();
        let held = loaded.model.streamer().store().bytes_per_device();
        assert_eq!(
            planned.iter().map(|p| p.1.0).sum::<u64>(),
            held.iter().map(|h| h.1.0).sum::<u64>()
        );
        let out = loaded.model.forward(input()).unwrap();
        assert_close(
            &format!("{NAME} offload={offload}"),
            out.clone(),
            read(&reference, "out"),
        );
        outs.push(out.into_data().to_vec::<f32>().unwrap());
    }
    assert_eq!(outs[0], outs[1], "offloaded differs from resident");
}

#[test]
fn a_lora_on_scaled_weights_is_refused() {
    let dir = fixture(NAME);
    let config = UnetConfig::from_file(dir.join("config.json")).unwrap();
    let mut options = component_options(false);
    let lora = Arc::new(LoraFile::open(fixture("lora").join("kohya.safetensors")).unwrap());
    options.loras = Some(ComponentLoras {
        files: vec![(lora, 1.0)],
        target: Target::Unet,
    });
    let e = load_model::<B, Unet2dCondition<B>>(
        dir.join("scaled_fp8.safetensors"),
        Some(config),
        &options,
    )
    .err()
    .expect("refused");
    assert!(
        matches!(&e, Error::Core(distorch_core::Error::ScaledFp8 { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("LoRAs on scaled-fp8"), "{e}");
}

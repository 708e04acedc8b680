//! A GGUF UNet as city96's ComfyUI-GGUF `convert.py` writes it (`sd1`, LDM keys without the
//! checkpoint prefix, reshaped tensors, a mix of every supported quantized type) against
//! diffusers' UNet with the dequantized weights (`tools/fixtures/gguf_unet.py`), resident and
//! fully offloaded.

use crate::common::*;
use burn::tensor::Tensor;
use distorch_core::{ComponentKind, DType, Format, SafetensorsIndex};
use distorch_models::{Model, Unet2dCondition, UnetConfig, UnetInput};

#[test]
fn a_comfyui_gguf_unet_matches_diffusers_with_its_dequantized_weights() {
    let path = fixture("unet_sd").join("unet.gguf");
    let index = SafetensorsIndex::open(&path).unwrap();
    assert_eq!(index.format(), Format::Gguf);
    let types: std::collections::BTreeSet<DType> =
        index.tensors().iter().map(|t| t.dtype).collect();
    for q in DType::QUANTIZED {
        assert!(types.contains(&q), "the fixture lacks {q}");
    }
    let split = distorch_models::load::split(&index);
    assert_eq!(split.components.len(), 1);
    let unet = &split.components[0];
    assert_eq!((unet.kind, unet.prefix), (ComponentKind::Unet, ""));
    let config = UnetConfig::from_file(fixture("unet_sd").join("config.json")).unwrap();
    let detected = <Unet2dCondition<B> as Model<B>>::detect_config(unet).unwrap();
    assert_eq!(detected.block_out_channels, config.block_out_channels);
    let mut outputs = Vec::new();
    for offload in [false, true] {
        let (model, report) =
            load_as::<Unet2dCondition<B>>(&path, config.clone(), offload).unwrap();
        assert!(
            report.unused.is_empty() && report.missing.is_empty(),
            "{report:?}"
        );
        let t: Tensor<B, 1> = tensor("unet_sd", "timestep");
        let input = UnetInput::new(
            tensor("unet_sd", "sample"),
            t.into_data().to_vec::<f32>().unwrap(),
            tensor("unet_sd", "encoder_hidden_states"),
        );
        let out = model.forward(input).unwrap();
        outputs.push(out.clone().into_data().to_vec::<f32>().unwrap());
        assert_close(
            &format!("gguf unet offload={offload}"),
            out,
            read(
                &fixture("unet_sd").join("gguf_reference.safetensors"),
                "out",
            ),
        );
    }
    assert_eq!(outputs[0], outputs[1], "resident and offloaded differ");
}

/// kohya's and PEFT's files of the same LoRA (`tools/fixtures/lora.py`) on the GGUF UNet:
/// each patched weight is dequantized, patched at f32 and kept at the compute dtype; the
/// reference is diffusers' UNet with the dequantized weights and the PEFT file through
/// `load_lora_adapter`.
#[test]
fn loras_on_a_gguf_unet_match_diffusers_with_the_dequantized_weights() {
    use distorch_lora::{LoraFile, Target};
    use distorch_models::{ComponentLoras, load_model};
    use std::sync::Arc;
    let path = fixture("unet_sd").join("unet.gguf");
    let config = UnetConfig::from_file(fixture("unet_sd").join("config.json")).unwrap();
    let want = read(
        &fixture("unet_sd").join("gguf_reference.safetensors"),
        "lora_out",
    );
    for file in ["kohya.safetensors", "peft.safetensors"] {
        let lora = Arc::new(LoraFile::open(fixture("lora").join(file)).unwrap());
        let mut outputs = Vec::new();
        for offload in [false, true] {
            let mut options = component_options(offload);
            options.loras = Some(ComponentLoras {
                files: vec![(Arc::clone(&lora), 0.8)],
                target: Target::Unet,
            });
            let loaded =
                load_model::<B, Unet2dCondition<B>>(&path, Some(config.clone()), &options).unwrap();
            assert!(!loaded.report.patched.is_empty());
            let t: Tensor<B, 1> = tensor("unet_sd", "timestep");
            let out = loaded
                .model
                .forward(UnetInput::new(
                    tensor("unet_sd", "sample"),
                    t.into_data().to_vec::<f32>().unwrap(),
                    tensor("unet_sd", "encoder_hidden_states"),
                ))
                .unwrap();
            outputs.push(out.clone().into_data().to_vec::<f32>().unwrap());
            assert_close(
                &format!("{file} on gguf offload={offload}"),
                out,
                want.clone(),
            );
        }
        assert_eq!(
            outputs[0], outputs[1],
            "{file}: resident and offloaded differ"
        );
    }
}

#[test]
fn a_gguf_given_as_a_lora_is_refused_by_name() {
    use distorch_core::gguf::{GgufTensorData, write_gguf};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lora.gguf");
    let data = [0u8; 16];
    let t = GgufTensorData {
        name: "lora_unet_x.lora_up.weight",
        dtype: DType::F32,
        shape: &[4],
        data: &data,
    };
    write_gguf(&path, &[], &[t]).unwrap();
    let err = distorch_lora::LoraFile::open(&path).unwrap_err();
    assert!(
        matches!(
            err,
            distorch_lora::Error::Core(distorch_core::Error::WrongFormat { found: "GGUF", .. })
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("expected a safetensors LoRA file, found GGUF"),
        "{err}"
    );
}

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

//! The UMT5 encoder against transformers' `UMT5EncoderModel` (`tools/fixtures/wan.py`): a
//! padded, masked row and a 140-token row (relative positions in the log-spaced buckets),
//! resident and fully offloaded.

use crate::common::*;
use distorch_core::SafetensorsIndex;
use distorch_models::text::umt5::{T5Variant, Umt5Config, Umt5Encoder};
use distorch_models::{Loaded, load_model};

/// The `input_ids` and `attention_mask` of fixture `name`'s reference.
fn inputs(name: &str) -> (Vec<u32>, Vec<u32>) {
    (ids(name, "input_ids"), ids(name, "attention_mask"))
}

fn ids(name: &str, key: &str) -> Vec<u32> {
    let (_, v) = read(&fixture(name).join("reference.safetensors"), key);
    v.iter().map(|&x| x as u32).collect()
}

#[test]
fn umt5_matches_transformers() {
    let dir = fixture("umt5");
    let weights = dir.join("model.safetensors");
    let reference = dir.join("reference.safetensors");
    let config = Umt5Config::from_file(dir.join("config.json")).unwrap();
    let (input_ids, mask) = inputs("umt5");
    let mut outs = Vec::new();
    for offload in [false, true] {
        let (m, report) = load_as::<Umt5Encoder<B>>(&weights, config.clone(), offload).unwrap();
        assert!(
            report.missing.is_empty() && report.unused.is_empty(),
            "{report:?}"
        );
        let out = m.forward(&input_ids, &mask, 2).unwrap();
        assert_close(
            &format!("last_hidden_state, offload {offload}"),
            out.clone(),
            read(&reference, "last_hidden_state"),
        );
        outs.push(out.into_data().to_vec::<f32>().unwrap());
    }
    assert_eq!(outs[0], outs[1], "offloaded differs");

    // The configuration read from the shapes is the file's.
    let index = SafetensorsIndex::open(&weights).unwrap();
    let split = distorch_models::load::split(&index);
    assert_eq!(Umt5Config::detect(&split.components[0]).unwrap(), config);
    // The folder loads through the generic loader, its config.json read.
    let m: Loaded<Umt5Encoder<B>> = load_model(&dir, None, &component_options(true)).unwrap();
    let out = m.model.forward(&input_ids, &mask, 2).unwrap();
    assert_eq!(out.into_data().to_vec::<f32>().unwrap(), outs[0]);
}

#[test]
fn bad_inputs_are_typed_errors() {
    let dir = fixture("umt5");
    let config = Umt5Config::from_file(dir.join("config.json")).unwrap();
    let (m, _) = load_as::<Umt5Encoder<B>>(&dir.join("model.safetensors"), config, false).unwrap();
    let e = m.forward(&[1, 2, 3], &[1, 1], 1).unwrap_err();
    assert!(e.to_string().contains("2 values for 3 ids"), "{e}");
    let e = m.forward(&[1, 2, 300], &[1, 1, 1], 1).unwrap_err();
    assert!(
        e.to_string().contains("outside the vocabulary of 300"),
        "{e}"
    );
    let e = m.forward(&[1, 2, 3], &[1, 1, 1], 2).unwrap_err();
    assert!(e.to_string().contains("do not split into 2"), "{e}");
}

/// The same encoder as city96's T5 GGUFs hold it (llama.cpp names, `t5encoder`, quantized
/// weights; `tools/fixtures/gguf_t5.py`) against transformers with the dequantized weights.
#[test]
fn a_llama_cpp_gguf_umt5_matches_transformers_with_its_dequantized_weights() {
    let dir = fixture("umt5");
    let weights = dir.join("model.gguf");
    let config = Umt5Config::from_file(dir.join("config.json")).unwrap();
    let index = distorch_models::load::open_index(&weights).unwrap();
    assert!(index.tensors().iter().any(|t| t.name == "shared.weight"));
    let split = distorch_models::load::split(&index);
    assert_eq!(Umt5Config::detect(&split.components[0]).unwrap(), config);
    let (input_ids, mask) = inputs("umt5");
    let mut outs = Vec::new();
    for offload in [false, true] {
        let m: Loaded<Umt5Encoder<B>> =
            load_model(&weights, Some(config.clone()), &component_options(offload)).unwrap();
        assert!(
            m.report.missing.is_empty() && m.report.unused.is_empty(),
            "{:?}",
            m.report
        );
        let out = m.model.forward(&input_ids, &mask, 2).unwrap();
        assert_close(
            &format!("gguf last_hidden_state, offload {offload}"),
            out.clone(),
            read(&dir.join("gguf_reference.safetensors"), "last_hidden_state"),
        );
        outs.push(out.into_data().to_vec::<f32>().unwrap());
    }
    assert_eq!(outs[0], outs[1], "offloaded differs");
}

/// T5 v1.1 (FLUX's T5-XXL: the position bias in block 0 only, shared by every block) against
/// transformers' `T5EncoderModel` (`tools/fixtures/flux.py`): with the padding masked, and
/// without a mask as `FluxPipeline` calls it; resident and fully offloaded.
#[test]
fn t5_v1_1_matches_transformers_with_and_without_a_mask() {
    let dir = fixture("t5");
    let weights = dir.join("model.safetensors");
    let reference = dir.join("reference.safetensors");
    let config = Umt5Config::from_file(dir.join("config.json")).unwrap();
    assert_eq!(config.variant, T5Variant::T5);
    let (input_ids, mask) = inputs("t5");
    let ones = vec![1; input_ids.len()];
    let mut outs = Vec::new();
    for offload in [false, true] {
        let (m, report) = load_as::<Umt5Encoder<B>>(&weights, config.clone(), offload).unwrap();
        assert!(
            report.missing.is_empty() && report.unused.is_empty(),
            "{report:?}"
        );
        let out = m.forward(&input_ids, &mask, 2).unwrap();
        assert_close(
            &format!("masked, offload {offload}"),
            out.clone(),
            read(&reference, "last_hidden_state"),
        );
        let unmasked = m.forward(&input_ids, &ones, 2).unwrap();
        assert_close(
            &format!("unmasked, offload {offload}"),
            unmasked,
            read(&reference, "unmasked_hidden_state"),
        );
        outs.push(out.into_data().to_vec::<f32>().unwrap());
    }
    assert_eq!(outs[0], outs[1], "offloaded differs");
    // Detected from the file: T5, since only block 0 has a position bias table.
    let index = SafetensorsIndex::open(&weights).unwrap();
    let split = distorch_models::load::split(&index);
    assert_eq!(Umt5Config::detect(&split.components[0]).unwrap(), config);
    // A T5 file loaded as UMT5 names the missing table of block 1.
    let umt5 = Umt5Config {
        variant: T5Variant::Umt5,
        ..config
    };
    let e = match load_as::<Umt5Encoder<B>>(&weights, umt5, false) {
        Ok(_) => panic!("a T5 file loaded as UMT5"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("encoder.block.1.layer.0.SelfAttention.relative_attention_bias"),
        "{e}"
    );
}

/// T5 v1.1 as ComfyUI's `t5xxl_fp8_e4m3fn_scaled.safetensors` holds T5-XXL (every linear
/// weight fp8 with a per-tensor `scale_weight`, the `scaled_fp8` marker;
/// `tools/fixtures/flux.py`) against transformers with the dequantised weights, resident and
/// offloaded.
#[test]
fn a_scaled_fp8_t5_matches_transformers_with_its_dequantised_weights() {
    let dir = fixture("t5");
    let config = Umt5Config::from_file(dir.join("config.json")).unwrap();
    let (input_ids, mask) = inputs("t5");
    let mut outs = Vec::new();
    for offload in [false, true] {
        let m: Loaded<Umt5Encoder<B>> = load_model(
            dir.join("scaled_fp8.safetensors"),
            Some(config.clone()),
            &component_options(offload),
        )
        .unwrap();
        assert!(m.report.missing.is_empty(), "{:?}", m.report);
        let out = m.model.forward(&input_ids, &mask, 2).unwrap();
        assert_close(
            &format!("scaled fp8, offload {offload}"),
            out.clone(),
            read(
                &dir.join("scaled_fp8_reference.safetensors"),
                "last_hidden_state",
            ),
        );
        outs.push(out.into_data().to_vec::<f32>().unwrap());
    }
    assert_eq!(outs[0], outs[1], "offloaded differs");
}

/// T5 v1.1 as city96's `t5-v1_1-xxl-encoder` GGUFs hold it (llama.cpp names, quantized
/// weights; `tools/fixtures/flux.py` through gguf_t5.py) against transformers with the
/// dequantized weights: detected as T5 (block 0's bias only), resident and offloaded.
#[test]
fn a_llama_cpp_gguf_t5_v1_1_matches_transformers_with_its_dequantized_weights() {
    let dir = fixture("t5");
    let weights = dir.join("model.gguf");
    let config = Umt5Config::from_file(dir.join("config.json")).unwrap();
    let index = distorch_models::load::open_index(&weights).unwrap();
    let split = distorch_models::load::split(&index);
    assert_eq!(Umt5Config::detect(&split.components[0]).unwrap(), config);
    let (input_ids, mask) = inputs("t5");
    let mut outs = Vec::new();
    for offload in [false, true] {
        let m: Loaded<Umt5Encoder<B>> =
            load_model(&weights, None, &component_options(offload)).unwrap();
        assert!(
            m.report.missing.is_empty() && m.report.unused.is_empty(),
            "{:?}",
            m.report
        );
        let out = m.model.forward(&input_ids, &mask, 2).unwrap();
        assert_close(
            &format!("gguf t5, offload {offload}"),
            out.clone(),
            read(&dir.join("gguf_reference.safetensors"), "last_hidden_state"),
        );
        outs.push(out.into_data().to_vec::<f32>().unwrap());
    }
    assert_eq!(outs[0], outs[1], "offloaded differs");
}

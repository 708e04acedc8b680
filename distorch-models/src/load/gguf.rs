//! GGUF files as ComfyUI-GGUF reads them: the names a family's GGUF files use, mapped to the
//! names its models expect ([`open_index`]). UNet, DiT and VAE GGUFs written by city96's
//! `convert.py` keep their original names; T5 encoders converted by llama.cpp (city96's
//! `t5-v1_1-xxl` and `umt5-xxl` GGUFs) use llama.cpp's (`enc.blk.N.attn_q.weight`).

use std::path::Path;

use distorch_core::{Format, SafetensorsIndex};

/// llama.cpp's T5 names and transformers', applied in this order (as ComfyUI-GGUF's
/// `T5_SD_MAP`).
const T5_NAMES: &[(&str, &str)] = &[
    ("enc.", "encoder."),
    (".blk.", ".block."),
    ("token_embd", "shared"),
    ("output_norm", "final_layer_norm"),
    ("attn_q", "layer.0.SelfAttention.q"),
    ("attn_k", "layer.0.SelfAttention.k"),
    ("attn_v", "layer.0.SelfAttention.v"),
    ("attn_o", "layer.0.SelfAttention.o"),
    ("attn_norm", "layer.0.layer_norm"),
    (
        "attn_rel_b",
        "layer.0.SelfAttention.relative_attention_bias",
    ),
    ("ffn_up", "layer.1.DenseReluDense.wi_1"),
    ("ffn_down", "layer.1.DenseReluDense.wo"),
    ("ffn_gate", "layer.1.DenseReluDense.wi_0"),
    ("ffn_norm", "layer.1.layer_norm"),
];

/// A llama.cpp T5 tensor name in transformers' naming (`None` for other names).
pub fn t5_name(name: &str) -> Option<String> {
    if !(name.starts_with("enc.") || name.starts_with("token_embd.")) {
        return None;
    }
    let mut out = name.to_owned();
    for (llama, hf) in T5_NAMES {
        out = out.replace(llama, hf);
    }
    Some(out)
}

/// Opens the weights index of the file at `path` (safetensors or GGUF) with GGUF files'
/// family names mapped to the ones distorch's models expect: a GGUF whose tensors carry
/// llama.cpp's T5 names (architecture `t5`, `t5encoder` or `umt5`, or `enc.blk.` keys) is read
/// with transformers' names.
pub fn open_index(path: impl AsRef<Path>) -> Result<SafetensorsIndex, distorch_core::Error> {
    let index = SafetensorsIndex::open(path)?;
    if index.format() != Format::Gguf {
        return Ok(index);
    }
    let arch = index
        .metadata()
        .get("general.architecture")
        .map(String::as_str);
    let llama_t5 = matches!(arch, Some("t5" | "t5encoder" | "umt5"))
        || index
            .tensors()
            .iter()
            .any(|t| t.name.starts_with("enc.blk."));
    if !llama_t5 {
        return Ok(index);
    }
    tracing::info!(
        path = %index.path().display(),
        arch = arch.unwrap_or("?"),
        "GGUF T5 encoder: llama.cpp tensor names read as transformers' (enc.blk.N.attn_q -> encoder.block.N.layer.0.SelfAttention.q)"
    );
    index.renamed(t5_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_cpp_t5_names_map_to_transformers() {
        for (llama, hf) in [
            (
                "enc.blk.0.attn_q.weight",
                "encoder.block.0.layer.0.SelfAttention.q.weight",
            ),
            (
                "enc.blk.11.attn_rel_b.weight",
                "encoder.block.11.layer.0.SelfAttention.relative_attention_bias.weight",
            ),
            (
                "enc.blk.3.ffn_gate.weight",
                "encoder.block.3.layer.1.DenseReluDense.wi_0.weight",
            ),
            (
                "enc.blk.3.ffn_up.weight",
                "encoder.block.3.layer.1.DenseReluDense.wi_1.weight",
            ),
            (
                "enc.blk.3.ffn_down.weight",
                "encoder.block.3.layer.1.DenseReluDense.wo.weight",
            ),
            (
                "enc.blk.3.ffn_norm.weight",
                "encoder.block.3.layer.1.layer_norm.weight",
            ),
            (
                "enc.blk.3.attn_norm.weight",
                "encoder.block.3.layer.0.layer_norm.weight",
            ),
            ("enc.output_norm.weight", "encoder.final_layer_norm.weight"),
            ("token_embd.weight", "shared.weight"),
        ] {
            assert_eq!(t5_name(llama).as_deref(), Some(hf), "{llama}");
        }
        assert_eq!(t5_name("input_blocks.0.0.weight"), None);
    }
}

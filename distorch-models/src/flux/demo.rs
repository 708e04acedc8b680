//! The FLUX.1 demo folder: FLUX.1's architecture at small widths (1 double and 2 single
//! blocks of two 128-wide heads, a 2-layer T5 v1.1, a 2-layer CLIP, the 16-channel VAE at
//! width 32) with deterministic random weights and a character-level T5 tokenizer, in
//! diffusers' layout. It runs the whole pipeline (and `distorch generate flux` without a
//! model) but draws an abstract image.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;

use crate::error::Error;
use crate::flux::dit::{FluxConfig, FluxTransformer};
use crate::sd::vae::VaeConfig;
use crate::text::clip::{ClipTextConfig, ClipTextModel};
use crate::text::t5_demo::{DemoFolder, write_weights};
use crate::text::umt5::{T5Variant, Umt5Config, Umt5Encoder};

/// The demo folder in `cache` (`demo-flux-small`), written once (a `complete` marker is
/// written last, so an interrupted write is redone).
pub fn ensure_in<B: Backend>(cache: &Path) -> Result<PathBuf, Error> {
    let dir = cache.join("demo-flux-small");
    if !dir.join("complete").exists() {
        tracing::info!(dir = %dir.display(), "writing the FLUX demo folder (random weights)");
        write_folder::<B>(&dir)?;
    }
    Ok(dir)
}

/// The demo models' configurations: CLIP, T5, the transformer, the VAE.
fn configs(vocab: usize) -> (ClipTextConfig, Umt5Config, FluxConfig, VaeConfig) {
    let clip = ClipTextConfig {
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        eos_token_id: 49407,
        ..ClipTextConfig::default()
    };
    let t5 = Umt5Config {
        vocab_size: vocab,
        d_model: 256,
        d_kv: 64,
        d_ff: 512,
        num_layers: 2,
        num_heads: 4,
        variant: T5Variant::T5,
        ..Umt5Config::default()
    };
    let dit = FluxConfig {
        num_layers: 1,
        num_single_layers: 2,
        num_attention_heads: 2,
        joint_attention_dim: t5.d_model,
        pooled_projection_dim: clip.hidden_size,
        ..FluxConfig::default()
    };
    let vae = VaeConfig {
        block_out_channels: vec![32; 4],
        down_block_types: vec!["DownEncoderBlock2D".into(); 4],
        up_block_types: vec!["UpDecoderBlock2D".into(); 4],
        latent_channels: 16,
        scaling_factor: 0.3611,
        shift_factor: Some(0.1159),
        use_quant_conv: false,
        use_post_quant_conv: false,
        ..VaeConfig::default()
    };
    (clip, t5, dit, vae)
}

/// Writes the demo folder to `dir` (`B` only names the models' tensors; nothing computes).
pub fn write_folder<B: Backend>(dir: &Path) -> Result<(), Error> {
    let folder = DemoFolder::create(
        dir,
        &[
            "text_encoder",
            "text_encoder_2",
            "tokenizer_2",
            "transformer",
            "vae",
            "scheduler",
        ],
    )?;
    let vocab = folder.tokenizer("tokenizer_2/tokenizer.json")?;
    let (clip, t5, dit, vae) = configs(vocab);
    folder.json(
        "text_encoder/config.json",
        serde_json::json!({"vocab_size": clip.vocab_size, "hidden_size": clip.hidden_size,
            "intermediate_size": clip.intermediate_size, "num_hidden_layers": clip.num_hidden_layers,
            "num_attention_heads": clip.num_attention_heads, "eos_token_id": clip.eos_token_id,
            "hidden_act": "quick_gelu"}),
    )?;
    folder.json(
        "text_encoder_2/config.json",
        serde_json::json!({"model_type": "t5", "vocab_size": t5.vocab_size, "d_model": t5.d_model,
            "d_kv": t5.d_kv, "d_ff": t5.d_ff, "num_layers": t5.num_layers,
            "num_heads": t5.num_heads, "feed_forward_proj": "gated-gelu"}),
    )?;
    folder.json(
        "transformer/config.json",
        serde_json::json!({"num_layers": dit.num_layers, "num_single_layers": dit.num_single_layers,
            "num_attention_heads": dit.num_attention_heads,
            "joint_attention_dim": dit.joint_attention_dim,
            "pooled_projection_dim": dit.pooled_projection_dim, "guidance_embeds": true}),
    )?;
    folder.json(
        "vae/config.json",
        serde_json::json!({"block_out_channels": vae.block_out_channels,
            "down_block_types": vae.down_block_types, "up_block_types": vae.up_block_types,
            "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,
            "use_quant_conv": false, "use_post_quant_conv": false}),
    )?;
    folder.json(
        "scheduler/scheduler_config.json",
        serde_json::json!({"shift": 3.0, "use_dynamic_shifting": true, "base_shift": 0.5,
            "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}),
    )?;
    write_weights(
        &folder.path("text_encoder/model.safetensors"),
        ClipTextModel::<B>::expected_tensors(&clip, "text_model.", false),
        1,
    )?;
    write_weights(
        &folder.path("text_encoder_2/model.safetensors"),
        Umt5Encoder::<B>::expected_tensors(&t5, "shared"),
        2,
    )?;
    write_weights(
        &folder.path("transformer/diffusion_pytorch_model.safetensors"),
        FluxTransformer::<B>::expected_tensors(&dit),
        3,
    )?;
    write_weights(
        &folder.path("vae/diffusion_pytorch_model.safetensors"),
        vae.expected_tensors(),
        4,
    )?;
    folder.complete()?;
    Ok(())
}

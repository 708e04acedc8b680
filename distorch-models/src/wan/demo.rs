//! The Wan demo folder: Wan 2.1's architecture at small widths (4 transformer blocks of 256,
//! a 2-layer UMT5, Wan's VAE at base width 16) with deterministic random weights and a
//! character-level tokenizer, in diffusers' layout. It runs the whole text-to-video pipeline
//! (and `distorch generate video` without a model) but draws abstract frames.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;

use crate::error::Error;
use crate::text::t5_demo::{DemoFolder, write_weights};
use crate::text::umt5::{Umt5Config, Umt5Encoder};
use crate::wan::dit::{WanDitConfig, WanTransformer};
use crate::wan::vae::{WanVae, WanVaeConfig};

/// The demo folder in `cache` (`demo-wan-small`), written once (a `complete` marker is
/// written last, so an interrupted write is redone).
pub fn ensure_in<B: Backend>(cache: &Path) -> Result<PathBuf, Error> {
    let dir = cache.join("demo-wan-small");
    if !dir.join("complete").exists() {
        tracing::info!(dir = %dir.display(), "writing the Wan demo folder (random weights)");
        write_folder::<B>(&dir)?;
    }
    Ok(dir)
}

/// Writes the demo folder to `dir` (`B` only names the models' tensors; nothing computes).
pub fn write_folder<B: Backend>(dir: &Path) -> Result<(), Error> {
    let folder = DemoFolder::create(dir, &["tokenizer", "text_encoder", "transformer", "vae"])?;
    let vocab = folder.tokenizer("tokenizer/tokenizer.json")?;
    let t5 = Umt5Config {
        vocab_size: vocab,
        d_model: 256,
        d_kv: 64,
        d_ff: 512,
        num_layers: 2,
        num_heads: 4,
        ..Umt5Config::default()
    };
    let dit = WanDitConfig {
        num_attention_heads: 2,
        attention_head_dim: 128,
        ffn_dim: 1024,
        num_layers: 4,
        text_dim: 256,
        ..WanDitConfig::default()
    };
    let vae = WanVaeConfig {
        base_dim: 16,
        ..WanVaeConfig::default()
    };
    folder.json(
        "text_encoder/config.json",
        serde_json::json!({"vocab_size": t5.vocab_size, "d_model": t5.d_model, "d_kv": t5.d_kv,
            "d_ff": t5.d_ff, "num_layers": t5.num_layers, "num_heads": t5.num_heads,
            "feed_forward_proj": "gated-gelu"}),
    )?;
    folder.json(
        "transformer/config.json",
        serde_json::json!({"num_attention_heads": dit.num_attention_heads,
            "attention_head_dim": dit.attention_head_dim, "ffn_dim": dit.ffn_dim,
            "num_layers": dit.num_layers, "text_dim": dit.text_dim}),
    )?;
    folder.json(
        "vae/config.json",
        serde_json::json!({"base_dim": vae.base_dim}),
    )?;
    write_weights(
        &folder.path("text_encoder/model.safetensors"),
        Umt5Encoder::<B>::expected_tensors(&t5, "shared"),
        1,
    )?;
    write_weights(
        &folder.path("transformer/diffusion_pytorch_model.safetensors"),
        WanTransformer::<B>::expected_tensors(&dit),
        2,
    )?;
    write_weights(
        &folder.path("vae/diffusion_pytorch_model.safetensors"),
        WanVae::<B>::expected_tensors(&vae),
        3,
    )?;
    folder.complete()?;
    Ok(())
}

//! [`ClipTextConfig`]: the fields of a transformers `CLIPTextConfig`, checked.

use std::path::Path;

use serde::Deserialize;

use crate::error::Error;
use crate::nn::Activation;

/// The fields of a transformers `CLIPTextConfig` the encoder uses (defaults as transformers').
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Width of the text projection.
    pub projection_dim: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Longest sequence (rows of the position embedding).
    pub max_position_embeddings: usize,
    /// `quick_gelu` (CLIP-L) or `gelu` (OpenCLIP).
    pub hidden_act: String,
    /// Layer-norm epsilon.
    pub layer_norm_eps: f64,
    /// The end-of-text token; `2` selects the legacy pooling (argmax of the ids).
    pub eos_token_id: u32,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: 2,
        }
    }
}

impl ClipTextConfig {
    /// Reads a `config.json` (a `CLIPTextConfig`, or a `CLIPConfig` whose `text_config` is
    /// used) and checks it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<ClipTextConfig, Error> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Config {
                path: path.to_path_buf(),
                reason: format!("not JSON: {e}"),
            })?;
        if let Some(inner) = value.get_mut("text_config") {
            value = inner.take();
        }
        let config: ClipTextConfig = crate::load::config::from_value(path, value)?;
        config.check()?;
        Ok(config)
    }

    /// Checks the values the maths depends on.
    pub fn check(&self) -> Result<(), Error> {
        Activation::from_name(&self.hidden_act)?;
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::Unsupported {
                field: "num_attention_heads",
                value: self.num_attention_heads.to_string(),
                reason: "must divide hidden_size",
            });
        }
        Ok(())
    }
}

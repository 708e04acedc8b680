//! The T5/UMT5 tokenizer (a SentencePiece unigram model), read from the `tokenizer.json` that
//! Wan's and UMT5's folders ship, through Hugging Face's own `tokenizers` crate: ids, the end
//! token appended, truncated and padded to a fixed length with an attention mask, as Wan's
//! pipeline asks transformers for them.

use std::path::Path;

use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::error::Error;

/// A T5/UMT5 tokenizer.
pub struct T5Tokenizer {
    inner: Tokenizer,
    pad_id: u32,
}

impl std::fmt::Debug for T5Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Tokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl T5Tokenizer {
    /// Reads a `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<T5Tokenizer, Error> {
        let path = path.as_ref();
        let inner = Tokenizer::from_file(path).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            reason: format!("not a tokenizer.json: {e}"),
        })?;
        let pad_id = inner.token_to_id("<pad>").unwrap_or(0);
        Ok(T5Tokenizer { inner, pad_id })
    }

    /// The `tokenizer.json` of a folder (a model folder, or its `tokenizer/`).
    pub fn from_folder(folder: impl AsRef<Path>) -> Result<T5Tokenizer, Error> {
        let folder = folder.as_ref();
        let direct = folder.join("tokenizer.json");
        let nested = folder.join("tokenizer").join("tokenizer.json");
        Self::from_file(if direct.is_file() { direct } else { nested })
    }

    /// Token ids of `prompt` with the end token, truncated to `max_len` (the end token kept)
    /// and padded to it, and the attention mask (1 for tokens, 0 for padding).
    pub fn encode(&self, prompt: &str, max_len: usize) -> Result<(Vec<u32>, Vec<u32>), Error> {
        let mut t = self.inner.clone();
        let bad = |e: tokenizers::Error| Error::Input {
            input: "prompt",
            reason: e.to_string(),
        };
        t.with_truncation(Some(TruncationParams {
            max_length: max_len,
            ..TruncationParams::default()
        }))
        .map_err(bad)?;
        t.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_len),
            pad_id: self.pad_id,
            pad_token: "<pad>".into(),
            ..PaddingParams::default()
        }));
        let enc = t.encode(prompt, true).map_err(bad)?;
        if enc
            .get_overflowing()
            .iter()
            .any(|o| !o.get_ids().is_empty())
        {
            tracing::warn!(max_len, "prompt truncated");
        }
        Ok((enc.get_ids().to_vec(), enc.get_attention_mask().to_vec()))
    }
}

//! The demo folders' T5 tokenizer: a character-level unigram `tokenizer.json` (ids, not
//! meaning: the demo weights are random), as Hugging Face's `tokenizers` reads it, and the
//! random weights the demo folders hold.

use std::collections::BTreeMap;

use std::path::Path;

/// Writes the tokenizer to `path`; returns its vocabulary size.
pub fn write_tokenizer(path: &Path) -> std::io::Result<usize> {
    let mut vocab: Vec<(String, f64)> = vec![
        ("<pad>".into(), 0.0),
        ("</s>".into(), 0.0),
        ("<unk>".into(), 0.0),
        ("▁".into(), -2.0),
    ];
    for c in (b' '..=b'~').map(char::from).filter(|c| !c.is_whitespace()) {
        vocab.push((c.to_string(), -3.0));
        vocab.push((format!("▁{c}"), -2.5));
    }
    let meta = serde_json::json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true});
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false,
        "lstrip": false, "rstrip": false, "normalized": false, "special": true})
    };
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<pad>"), special(1, "</s>"), special(2, "<unk>")],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, meta]},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}},
        "decoder": meta,
        "model": {"type": "Unigram", "unk_id": 2, "vocab": vocab, "byte_fallback": false},
    });
    std::fs::write(path, tokenizer.to_string())?;
    Ok(vocab.len())
}

/// Writes deterministic random bf16 weights for `expected` to `path` (see
/// [`distorch_core::write_random`]): demo models that run every layer but mean nothing.
pub fn write_weights(
    path: &Path,
    expected: Vec<distorch_core::runtime::ExpectedTensor>,
    seed: u64,
) -> Result<(), crate::Error> {
    let specs: Vec<_> = expected
        .into_iter()
        .map(|e| {
            (
                e.name,
                distorch_core::DType::BF16,
                e.shape.iter().map(|&d| d as u64).collect(),
            )
        })
        .collect();
    distorch_core::write_random(path, &specs, seed, &BTreeMap::new())?;
    Ok(())
}

/// A demo folder being written: sub-folders created, files written, every I/O error naming
/// the folder.
pub(crate) struct DemoFolder<'a> {
    dir: &'a Path,
}

impl<'a> DemoFolder<'a> {
    /// Creates `dir` and its sub-folders `subs`.
    pub(crate) fn create(dir: &'a Path, subs: &[&str]) -> Result<DemoFolder<'a>, crate::Error> {
        let folder = DemoFolder { dir };
        for sub in subs {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| folder.io(e))?;
        }
        Ok(folder)
    }

    fn io(&self, e: std::io::Error) -> crate::Error {
        crate::Error::Input {
            input: "demo folder",
            reason: format!("{}: {e}", self.dir.display()),
        }
    }

    /// `dir/rel`.
    pub(crate) fn path(&self, rel: &str) -> std::path::PathBuf {
        self.dir.join(rel)
    }

    /// Writes `value` as JSON to `rel`.
    pub(crate) fn json(&self, rel: &str, value: serde_json::Value) -> Result<(), crate::Error> {
        std::fs::write(self.path(rel), value.to_string()).map_err(|e| self.io(e))
    }

    /// Writes the demo tokenizer to `rel`; returns its vocabulary size.
    pub(crate) fn tokenizer(&self, rel: &str) -> Result<usize, crate::Error> {
        write_tokenizer(&self.path(rel)).map_err(|e| self.io(e))
    }

    /// Marks the folder complete (written last: an interrupted write is redone).
    pub(crate) fn complete(&self) -> Result<(), crate::Error> {
        std::fs::write(self.path("complete"), b"").map_err(|e| self.io(e))
    }
}

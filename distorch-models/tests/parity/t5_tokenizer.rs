//! The T5/UMT5 tokenizer against transformers' `T5TokenizerFast` (`tools/fixtures/
//! t5_tokenizer.py`: a unigram model trained there, its `tokenizer.json` written by
//! transformers), padded to 32: case, punctuation, NFKC (full-width), accents, CJK, unknown
//! pieces, extra spaces, tabs and newlines, the empty prompt, truncation.

use crate::common::fixture;
use distorch_models::text::t5_tokenizer::T5Tokenizer;

#[test]
fn ids_and_masks_match_transformers() {
    let dir = fixture("t5_tokenizer");
    let tok = T5Tokenizer::from_folder(&dir).unwrap();
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("prompts.json")).unwrap()).unwrap();
    let cases = cases.as_array().unwrap();
    assert_eq!(cases.len(), 11);
    for c in cases {
        let prompt = c["prompt"].as_str().unwrap();
        let want = |k: &str| -> Vec<u32> {
            c[k].as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        };
        let (ids, mask) = tok.encode(prompt, 32).unwrap();
        assert_eq!(ids, want("input_ids"), "{prompt:?}");
        assert_eq!(mask, want("attention_mask"), "{prompt:?}");
    }
}

#[test]
fn a_file_that_is_not_a_tokenizer_is_an_error() {
    let e = T5Tokenizer::from_file(fixture("umt5").join("config.json")).unwrap_err();
    assert!(e.to_string().contains("not a tokenizer.json"), "{e}");
}

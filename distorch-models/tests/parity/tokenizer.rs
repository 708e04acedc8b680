//! The CLIP tokenizer against transformers' `CLIPTokenizer` (ids from
//! `tools/fixtures/tokenizer.py` on tricky prompts: case, punctuation, contractions, digits,
//! unicode and NFC, emoji, special tokens in the text, whitespace, over-long), unpadded and
//! padded to 77 with either pad token.

use distorch_models::ClipTokenizer;

#[derive(serde::Deserialize)]
struct Case {
    prompt: String,
    ids: Vec<u32>,
    padded: Vec<u32>,
    padded_bang: Vec<u32>,
}

#[test]
fn matches_transformers_on_tricky_prompts() {
    let path = crate::common::fixture("tokenizer").join("prompts.json");
    let cases: Vec<Case> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let l = ClipTokenizer::bundled().unwrap();
    let g = ClipTokenizer::bundled().unwrap().with_pad("!").unwrap();
    assert_eq!(g.pad_id(), 0);
    for c in &cases {
        assert_eq!(l.encode(&c.prompt), c.ids, "{:?}", c.prompt);
        let (padded, cut) = l.encode_padded(&c.prompt, 77);
        assert_eq!(padded, c.padded, "{:?} padded", c.prompt);
        assert_eq!(cut, c.ids.len() > 77);
        assert_eq!(
            g.encode_padded(&c.prompt, 77).0,
            c.padded_bang,
            "{:?} padded with !",
            c.prompt
        );
    }
    assert!(
        cases.iter().any(|c| c.ids.len() > 77),
        "an over-long prompt is covered"
    );
}

#[test]
fn a_folder_vocabulary_takes_precedence() {
    let tmp = tempfile::tempdir().unwrap();
    let vocab = serde_json::json!({
        "a": 0, "b": 1, "b</w>": 2, "ab</w>": 3, "!": 4,
        "<|startoftext|>": 5, "<|endoftext|>": 6
    });
    std::fs::write(tmp.path().join("vocab.json"), vocab.to_string()).unwrap();
    std::fs::write(tmp.path().join("merges.txt"), "#version: 0.2\na b</w>\n").unwrap();
    std::fs::write(
        tmp.path().join("special_tokens_map.json"),
        r#"{"pad_token": {"content": "!"}}"#,
    )
    .unwrap();
    let t = ClipTokenizer::from_folder(tmp.path()).unwrap();
    assert_eq!(t.encode("AB"), [5, 3, 6]);
    assert_eq!(t.encode_padded("ab", 5).0, [5, 3, 6, 4, 4]);

    std::fs::write(tmp.path().join("merges.txt"), "#version: 0.2\nnot-a-pair\n").unwrap();
    let e = ClipTokenizer::from_folder(tmp.path()).unwrap_err();
    assert!(
        e.to_string()
            .contains("line 1: \"not-a-pair\" is not a pair"),
        "{e}"
    );
}

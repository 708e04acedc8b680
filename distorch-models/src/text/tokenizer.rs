//! CLIP's tokenizer, as transformers' `CLIPTokenizer`: special tokens taken out first, then
//! NFC, whitespace runs collapsed, lower-cased; split into letter runs, single digits,
//! punctuation runs and English contractions; byte-level characters; BPE with `</w>` word
//! ends; BOS/EOS; truncation and padding to 77.
//!
//! The vocabulary ships with the crate (CLIP's `bpe_simple_vocab_16e6.txt.gz` from the
//! MIT-licensed open_clip, see `assets/clip/LICENSE`); a diffusers folder's
//! `tokenizer/vocab.json` + `merges.txt` take precedence ([`ClipTokenizer::from_files`]).

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

use crate::error::Error;

/// The bundled vocabulary (merges) file.
const BUNDLED: &[u8] = include_bytes!("../../assets/clip/bpe_simple_vocab_16e6.txt.gz");
const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
/// The text encoders' context length.
pub const MAX_LENGTH: usize = 77;

/// A CLIP tokenizer.
pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    ranks: HashMap<(String, String), usize>,
    bytes: [char; 256],
    pattern: Regex,
    bos: u32,
    eos: u32,
    pad: u32,
    /// The pad token's text when it is not BOS or EOS: transformers then treats it as a
    /// special token, matched in the raw text too (SDXL's second tokenizer turns `!` into
    /// pad ids wherever it appears).
    pad_text: Option<String>,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab", &self.vocab.len())
            .field("pad", &self.pad)
            .finish()
    }
}

/// GPT-2's byte-to-character table: printable bytes map to themselves, the others to
/// characters from U+0100 up.
fn byte_chars() -> [char; 256] {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut out = ['\0'; 256];
    let mut n = 0;
    for b in 0..256u32 {
        out[b as usize] = if printable(b) {
            char::from_u32(b).unwrap_or('\0')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    out
}

impl ClipTokenizer {
    /// The tokenizer with the bundled CLIP vocabulary, padding with `<|endoftext|>` (CLIP-L's
    /// tokenizer; SDXL's second pads with `!`, see [`ClipTokenizer::with_pad`]).
    pub fn bundled() -> Result<ClipTokenizer, Error> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(BUNDLED)
            .read_to_string(&mut text)
            .map_err(|e| bad("bundled vocabulary", e.to_string()))?;
        let merges: Vec<&str> = text.lines().skip(1).take(49152 - 256 - 2).collect();
        // The table's characters in its own order: printable bytes first, then the others.
        let bytes = byte_chars();
        let mut order: Vec<char> = bytes
            .iter()
            .copied()
            .filter(|&c| (c as u32) < 256)
            .collect();
        order.extend(bytes.iter().copied().filter(|&c| (c as u32) >= 256));
        let mut vocab: Vec<String> = order.iter().map(|c| c.to_string()).collect();
        vocab.extend(order.iter().map(|c| format!("{c}</w>")));
        vocab.extend(merges.iter().map(|m| m.replace(' ', "")));
        vocab.extend([BOS.to_owned(), EOS.to_owned()]);
        let vocab = vocab
            .into_iter()
            .enumerate()
            .map(|(i, v)| (v, i as u32))
            .collect();
        Self::new(vocab, &merges)
    }

    /// A tokenizer from transformers' files (a diffusers `tokenizer/` folder).
    pub fn from_files(vocab: &Path, merges: &Path) -> Result<ClipTokenizer, Error> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| bad(&p.display().to_string(), e.to_string()))
        };
        let map: HashMap<String, u32> = serde_json::from_str(&read(vocab)?)
            .map_err(|e| bad(&vocab.display().to_string(), e.to_string()))?;
        let text = read(merges)?;
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .collect();
        Self::new(map, &lines)
    }

    /// A tokenizer from a diffusers `tokenizer/` folder (`vocab.json`, `merges.txt`, and
    /// the pad token of `special_tokens_map.json` or `tokenizer_config.json` when given).
    pub fn from_folder(dir: &Path) -> Result<ClipTokenizer, Error> {
        let mut t = Self::from_files(&dir.join("vocab.json"), &dir.join("merges.txt"))?;
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let Ok(text) = std::fs::read_to_string(dir.join(name)) else {
                continue;
            };
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| bad(&dir.join(name).display().to_string(), e.to_string()))?;
            let pad = match value.get("pad_token") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_owned),
                None => None,
            };
            if let Some(pad) = pad {
                t = t.with_pad(&pad).map_err(|_| {
                    bad(
                        &dir.join(name).display().to_string(),
                        format!("pad token {pad:?} is not in the vocabulary"),
                    )
                })?;
                break;
            }
        }
        Ok(t)
    }

    fn new(vocab: HashMap<String, u32>, merges: &[&str]) -> Result<ClipTokenizer, Error> {
        let id = |t: &str| {
            vocab
                .get(t)
                .copied()
                .ok_or_else(|| bad("vocabulary", format!("no {t} token")))
        };
        let (bos, eos) = (id(BOS)?, id(EOS)?);
        let mut ranks = HashMap::with_capacity(merges.len());
        for (i, m) in merges.iter().enumerate() {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| bad("merges", format!("line {}: {m:?} is not a pair", i + 1)))?;
            ranks.insert((a.to_owned(), b.to_owned()), i);
        }
        let pattern = Regex::new(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
            .map_err(|e| bad("pattern", e.to_string()))?;
        Ok(ClipTokenizer {
            vocab,
            ranks,
            bytes: byte_chars(),
            pattern,
            bos,
            eos,
            pad: eos,
            pad_text: None,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Pads with `token` instead (SDXL's second tokenizer pads with `!`).
    pub fn with_pad(mut self, token: &str) -> Result<ClipTokenizer, Error> {
        self.pad = self
            .vocab
            .get(token)
            .copied()
            .ok_or_else(|| bad("pad token", format!("{token:?} is not in the vocabulary")))?;
        self.pad_text = (token != BOS && token != EOS).then(|| token.to_owned());
        Ok(self)
    }

    /// The padding id.
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// The ids of `text` between BOS and EOS, neither truncated nor padded.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = vec![self.bos];
        // Special tokens are matched in the raw text, before normalisation.
        let mut rest = text;
        while !rest.is_empty() {
            let pad = self.pad_text.as_deref().map(|p| (p, self.pad));
            let next = [(BOS, self.bos), (EOS, self.eos)]
                .into_iter()
                .chain(pad)
                .filter_map(|(s, id)| rest.find(s).map(|at| (at, s, id)))
                .min_by_key(|(at, _, _)| *at);
            let (plain, special) = match next {
                Some((at, s, id)) => (&rest[..at], Some((s.len() + at, id))),
                None => (rest, None),
            };
            self.encode_plain(plain, &mut out);
            match special {
                Some((end, id)) => {
                    out.push(id);
                    rest = &rest[end..];
                }
                None => break,
            }
        }
        out.push(self.eos);
        out
    }

    /// `text` as the text encoder's input: `max_length` ids (77 for SD), truncated to BOS +
    /// `max_length − 2` tokens + EOS, padded with the pad id; and whether tokens were cut.
    pub fn encode_padded(&self, text: &str, max_length: usize) -> (Vec<u32>, bool) {
        let mut ids = self.encode(text);
        let cut = ids.len() > max_length;
        if cut {
            tracing::warn!(
                tokens = ids.len() - 2,
                kept = max_length.saturating_sub(2),
                "prompt longer than the text encoder's context; truncated"
            );
            ids.truncate(max_length.saturating_sub(1));
            ids.push(self.eos);
        }
        ids.resize(max_length, self.pad);
        (ids, cut)
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let normalised: String = text.nfc().collect();
        let mut collapsed = String::with_capacity(normalised.len());
        let mut space = false;
        for c in normalised.chars() {
            if c.is_whitespace() {
                space = true;
                continue;
            }
            if space {
                collapsed.push(' ');
                space = false;
            }
            collapsed.push(c);
        }
        let lower = collapsed.to_lowercase();
        for piece in self.pattern.find_iter(&lower) {
            let word: String = piece
                .as_str()
                .bytes()
                .map(|b| self.bytes[b as usize])
                .collect();
            out.extend(self.bpe(&word));
        }
    }

    /// Byte-pair merges of one word (its last symbol carrying `</w>`), lowest rank first.
    fn bpe(&self, word: &str) -> Vec<u32> {
        if let Some(hit) = self.cache.lock().ok().and_then(|c| c.get(word).cloned()) {
            return hit;
        }
        let mut parts: Vec<String> = word.chars().map(String::from).collect();
        if let Some(last) = parts.last_mut() {
            last.push_str("</w>");
        }
        loop {
            let best = parts
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    self.ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|r| (*r, i))
                })
                .min();
            let Some((_, i)) = best else { break };
            let (a, b) = (parts[i].clone(), parts[i + 1].clone());
            // Merge every occurrence of the pair, left to right.
            let mut merged = Vec::with_capacity(parts.len());
            let mut j = 0;
            while j < parts.len() {
                if j + 1 < parts.len() && parts[j] == a && parts[j + 1] == b {
                    merged.push(format!("{a}{b}"));
                    j += 2;
                } else {
                    merged.push(parts[j].clone());
                    j += 1;
                }
            }
            parts = merged;
        }
        let ids: Vec<u32> = parts
            .iter()
            .map(|p| self.vocab.get(p).copied().unwrap_or(self.eos))
            .collect();
        if let Ok(mut c) = self.cache.lock()
            && c.len() < 100_000
        {
            c.insert(word.to_owned(), ids.clone());
        }
        ids
    }
}

fn bad(what: &str, reason: String) -> Error {
    Error::Tokenizer {
        what: what.to_owned(),
        reason,
    }
}

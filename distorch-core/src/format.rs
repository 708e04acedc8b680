//! What a weights file is, told from its first bytes ([`Format`], [`sniff`]), so that a file
//! of another format is named as what it is instead of failing as a malformed one.

use std::io::Read;
use std::path::Path;

use crate::error::Error;

/// The weights file formats this crate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Hugging Face safetensors (a file, or the shards of a `*.safetensors.index.json`).
    Safetensors,
    /// GGUF (llama.cpp, city96's ComfyUI-GGUF).
    Gguf,
}

impl Format {
    /// Its name (`safetensors`, `GGUF`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Safetensors => "safetensors",
            Format::Gguf => "GGUF",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Reads the first bytes of `path`: `Ok(format)` for safetensors or GGUF, else
/// [`Error::WrongFormat`] naming what the file looks like (a PyTorch pickle, a zip archive, a
/// Git LFS pointer, an HTML page, ...).
pub fn sniff(path: impl AsRef<Path>) -> Result<Format, Error> {
    let path = path.as_ref();
    let prefix = read_prefix(path)?;
    if prefix.starts_with(b"GGUF") {
        return Ok(Format::Gguf);
    }
    match describe(&prefix) {
        "safetensors" | "unknown data" => Ok(Format::Safetensors),
        found => Err(Error::WrongFormat {
            path: path.to_path_buf(),
            expected: "safetensors or GGUF",
            found,
        }),
    }
}

/// What the file at `path` looks like ("unknown data" when it cannot be read).
pub(crate) fn describe_file(path: &Path) -> &'static str {
    read_prefix(path).map_or("unknown data", |p| describe(&p))
}

/// Up to the first 32 bytes of `path`.
fn read_prefix(path: &Path) -> Result<Vec<u8>, Error> {
    let mut prefix = [0u8; 32];
    let mut file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut n = 0;
    while n < prefix.len() {
        match file.read(&mut prefix[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(Error::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
    Ok(prefix[..n].to_vec())
}

/// What a file starting with `prefix` looks like.
pub(crate) fn describe(prefix: &[u8]) -> &'static str {
    let text = |s: &[u8]| prefix.starts_with(s);
    // A length prefix then the header's `{` (the prefix's bytes may read as text: 60 is `<`).
    if prefix.len() >= 9 && prefix[8] == b'{' && prefix[4..8] == [0; 4] {
        "safetensors"
    } else if text(b"GGUF") {
        "GGUF"
    } else if text(b"FUGG") {
        "big-endian GGUF (not supported)"
    } else if text(b"PK\x03\x04") {
        "a zip archive (a PyTorch .pt/.ckpt/.bin checkpoint: convert it to safetensors)"
    } else if prefix.len() >= 2 && prefix[0] == 0x80 && (2..=5).contains(&prefix[1]) {
        "a Python pickle (a PyTorch .ckpt/.bin checkpoint: convert it to safetensors)"
    } else if text(b"version https://git-lfs") {
        "a Git LFS pointer (the model itself was never downloaded)"
    } else if text(b"\x89HDF") {
        "HDF5 (a Keras .h5 file)"
    } else if text(b"<") || text(b"\xef\xbb\xbf<") {
        "HTML or XML text (an error page saved in place of the model?)"
    } else if text(b"{") || text(b"[") {
        "JSON text (a config or index file, not weights)"
    } else {
        "unknown data"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_named_by_their_first_bytes() {
        let mut st = 24u64.to_le_bytes().to_vec();
        st.extend_from_slice(b"{\"a\":1}");
        assert_eq!(describe(&st), "safetensors");
        assert_eq!(describe(b"GGUF\x03\0\0\0"), "GGUF");
        assert!(describe(b"PK\x03\x04rest").contains("zip"));
        assert!(describe(&[0x80, 0x02, b'c']).contains("pickle"));
        assert!(describe(b"version https://git-lfs.github.com/spec/v1").contains("LFS"));
        assert!(describe(b"<!DOCTYPE html>").contains("HTML"));
        assert!(describe(b"{\"weight_map\"").contains("JSON"));
        assert_eq!(describe(b"\0\0"), "unknown data");
    }
}

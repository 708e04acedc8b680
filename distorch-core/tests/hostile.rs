//! A corpus of corrupt and hostile safetensors files: each must give its typed error (the
//! variant is asserted per case) that names the file (and the tensor, when one is at fault),
//! and none may panic. The header is validated by Hugging Face's `safetensors` crate since
//! issue 20; this corpus is the proof that the errors kept their variants and context.

use std::path::Path;

use distorch_core::{Error, SafetensorsIndex};

/// A valid file: two F32 tensors `a` [2] and `b` [3] (20 bytes of data).
fn valid() -> Vec<u8> {
    file_with(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[3],"data_offsets":[8,20]}}"#,
        20,
    )
}

fn file_with(header: &str, data: usize) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend(std::iter::repeat_n(0x3f, data));
    out
}

fn with_len_prefix(len: u64, rest: &[u8]) -> Vec<u8> {
    let mut out = len.to_le_bytes().to_vec();
    out.extend_from_slice(rest);
    out
}

/// What the error must name besides the file.
enum Names {
    File,
    Tensor(&'static str),
}

/// Which typed error a case must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    FileTooSmall,
    HeaderTooLarge,
    InvalidHeader,
    InvalidTensor,
    UnknownDtype,
    SizeMismatch,
    InvalidOffsets,
    DataLengthMismatch,
    DuplicateTensor,
    Other,
}

fn kind(e: &Error) -> Kind {
    match e {
        Error::FileTooSmall { .. } => Kind::FileTooSmall,
        Error::HeaderTooLarge { .. } => Kind::HeaderTooLarge,
        Error::InvalidHeader { .. } => Kind::InvalidHeader,
        Error::InvalidTensor { .. } => Kind::InvalidTensor,
        Error::UnknownDtype { .. } => Kind::UnknownDtype,
        Error::SizeMismatch { .. } => Kind::SizeMismatch,
        Error::InvalidOffsets { .. } => Kind::InvalidOffsets,
        Error::DataLengthMismatch { .. } => Kind::DataLengthMismatch,
        Error::DuplicateTensor { .. } => Kind::DuplicateTensor,
        _ => Kind::Other,
    }
}

type Case = (String, Vec<u8>, Names, Kind);

fn corpus() -> Vec<Case> {
    let mut c: Vec<Case> = Vec::new();
    let good = valid();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap());
    // Truncated anywhere: inside the length prefix (too small to be a file), the header (its
    // length then runs past the file) and the data (less data than the tensors need).
    for cut in [
        0,
        1,
        4,
        7,
        8,
        9,
        20,
        60,
        good.len() - 21,
        good.len() - 20,
        good.len() - 1,
    ] {
        let kind = match cut as u64 {
            c if c < 8 => Kind::FileTooSmall,
            c if c < 8 + header_len => Kind::HeaderTooLarge,
            _ => Kind::DataLengthMismatch,
        };
        c.push((
            format!("truncated at {cut}"),
            good[..cut].to_vec(),
            Names::File,
            kind,
        ));
    }
    // One byte too many.
    let mut padded = good.clone();
    padded.push(0);
    c.push((
        "trailing byte".into(),
        padded,
        Names::File,
        Kind::DataLengthMismatch,
    ));
    // Header lengths that lie: too large for the cap or the file, or cutting the JSON short.
    for (what, len, kind) in [
        ("header length u64::MAX", u64::MAX, Kind::HeaderTooLarge),
        ("header length 2^40", 1 << 40, Kind::HeaderTooLarge),
        (
            "header length over the cap",
            100_000_001,
            Kind::HeaderTooLarge,
        ),
        (
            "header length past the file",
            good.len() as u64,
            Kind::HeaderTooLarge,
        ),
        (
            "header length one short",
            header_len - 1,
            Kind::InvalidHeader,
        ),
        ("header length zero", 0, Kind::InvalidHeader),
    ] {
        c.push((
            what.into(),
            with_len_prefix(len, &good[8..]),
            Names::File,
            kind,
        ));
    }
    let t = |what: &str, header: &str, data: usize, names: Names, kind: Kind| {
        (what.to_owned(), file_with(header, data), names, kind)
    };
    let tensor_cases = [
        (
            "overlapping offsets",
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
            Names::Tensor("b"),
            Kind::InvalidOffsets,
        ),
        (
            "gap between tensors",
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}}"#,
            20,
            Names::Tensor("b"),
            Kind::InvalidOffsets,
        ),
        (
            "out-of-range offsets",
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
            12,
            Names::File,
            Kind::DataLengthMismatch,
        ),
        (
            "offsets beyond u64",
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,18446744073709551616]}}"#,
            8,
            Names::Tensor("a"),
            Kind::InvalidTensor,
        ),
        (
            "end before begin",
            r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#,
            8,
            Names::Tensor("a"),
            Kind::InvalidTensor,
        ),
        (
            "wrong dtype size",
            r#"{"a":{"dtype":"F16","shape":[2],"data_offsets":[0,8]}}"#,
            8,
            Names::Tensor("a"),
            Kind::SizeMismatch,
        ),
        (
            "shape too small",
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,8]}}"#,
            8,
            Names::Tensor("a"),
            Kind::SizeMismatch,
        ),
        (
            "shape product overflow",
            r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,8]}}"#,
            8,
            Names::Tensor("a"),
            Kind::InvalidTensor,
        ),
        (
            "negative dimension",
            r#"{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#,
            8,
            Names::Tensor("a"),
            Kind::InvalidTensor,
        ),
        (
            "fractional dimension",
            r#"{"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}}"#,
            8,
            Names::Tensor("a"),
            Kind::InvalidTensor,
        ),
        (
            "unknown dtype",
            r#"{"a":{"dtype":"Q4_K","shape":[2],"data_offsets":[0,8]}}"#,
            8,
            Names::Tensor("a"),
            Kind::UnknownDtype,
        ),
        (
            "lower-case dtype",
            r#"{"a":{"dtype":"f32","shape":[2],"data_offsets":[0,8]}}"#,
            8,
            Names::Tensor("a"),
            Kind::UnknownDtype,
        ),
        (
            "dtype not a string",
            r#"{"a":{"dtype":4,"shape":[2],"data_offsets":[0,8]}}"#,
            8,
            Names::Tensor("a"),
            Kind::InvalidTensor,
        ),
        (
            "missing shape",
            r#"{"a":{"dtype":"F32","data_offsets":[0,8]}}"#,
            8,
            Names::Tensor("a"),
            Kind::InvalidTensor,
        ),
        (
            "missing offsets",
            r#"{"a":{"dtype":"F32","shape":[2]}}"#,
            8,
            Names::Tensor("a"),
            Kind::InvalidTensor,
        ),
        (
            "three offsets",
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4,8]}}"#,
            8,
            Names::Tensor("a"),
            Kind::InvalidTensor,
        ),
        (
            "unknown field",
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}}"#,
            8,
            Names::Tensor("a"),
            Kind::InvalidTensor,
        ),
        (
            "entry not an object",
            r#"{"a":[1,2,3]}"#,
            0,
            Names::Tensor("a"),
            Kind::InvalidTensor,
        ),
        (
            "duplicate names",
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
            16,
            Names::Tensor("a"),
            Kind::DuplicateTensor,
        ),
        (
            "metadata not strings",
            r#"{"__metadata__":{"k":1},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            8,
            Names::File,
            Kind::InvalidHeader,
        ),
        (
            "metadata not an object",
            r#"{"__metadata__":"x","a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            8,
            Names::File,
            Kind::InvalidHeader,
        ),
        (
            "header an array",
            r#"[{"dtype":"F32"}]"#,
            0,
            Names::File,
            Kind::InvalidHeader,
        ),
        ("header a number", "42", 0, Names::File, Kind::InvalidHeader),
        (
            "header empty object with data",
            "{}",
            8,
            Names::File,
            Kind::DataLengthMismatch,
        ),
        (
            "lone surrogate in a name",
            r#"{"\udc80":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            8,
            Names::File,
            Kind::InvalidHeader,
        ),
        (
            "unterminated JSON",
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#,
            8,
            Names::File,
            Kind::InvalidHeader,
        ),
        (
            "trailing JSON garbage",
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}xx"#,
            8,
            Names::File,
            Kind::InvalidHeader,
        ),
    ];
    for (what, header, data, names, kind) in tensor_cases {
        c.push(t(what, header, data, names, kind));
    }
    // Deep nesting must hit serde_json's recursion limit, not overflow the stack.
    let deep = format!("{{\"a\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
    c.push((
        "deeply nested header".into(),
        file_with(&deep, 0),
        Names::File,
        Kind::InvalidHeader,
    ));
    // A header that is not UTF-8.
    let mut not_utf8 = with_len_prefix(6, b"{\"\xff\":1}");
    not_utf8.truncate(8 + 6);
    c.push((
        "non-UTF-8 header".into(),
        not_utf8,
        Names::File,
        Kind::InvalidHeader,
    ));
    c
}

#[test]
fn every_hostile_file_is_a_typed_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus();
    assert!(corpus.len() >= 40, "corpus has {} files", corpus.len());
    for (i, (what, bytes, names, want)) in corpus.iter().enumerate() {
        let path = dir.path().join(format!("hostile-{i}.safetensors"));
        std::fs::write(&path, bytes).unwrap();
        let result = std::panic::catch_unwind(|| SafetensorsIndex::open(&path));
        let Ok(result) = result else {
            panic!("{what}: panicked");
        };
        let err = match result {
            Ok(idx) => panic!("{what}: accepted ({} tensors)", idx.tensors().len()),
            Err(e) => e,
        };
        let msg = err.to_string();
        assert_eq!(kind(&err), *want, "{what}: {msg}");
        assert!(
            msg.starts_with(&path.display().to_string()),
            "{what}: {msg}"
        );
        if let Names::Tensor(name) = names {
            assert!(msg.contains(&format!("`{name}`")), "{what}: {msg}");
        }
        assert!(
            !matches!(err, Error::Io { .. }) || bytes.len() < 8,
            "{what}: {msg}"
        );
    }
}

#[test]
fn the_valid_base_file_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let path: &Path = &dir.path().join("valid.safetensors");
    std::fs::write(path, valid()).unwrap();
    let idx = SafetensorsIndex::open(path).unwrap();
    assert_eq!(idx.tensors().len(), 2);
}

//! A corpus of corrupt and hostile GGUF files: each must be the typed error its fault calls
//! for (asserted by variant), naming the file (and the tensor or key at fault), and none may
//! panic or allocate past the file.

use distorch_core::gguf::GgufFile;
use distorch_core::{Error, SafetensorsIndex};

fn string(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

fn kv(key: &str, kind: u32, value: &[u8]) -> Vec<u8> {
    let mut out = string(key.as_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(value);
    out
}

fn kv_str(key: &str, value: &str) -> Vec<u8> {
    kv(key, 8, &string(value.as_bytes()))
}

fn tensor(name: &str, dims: &[u64], ty: u32, offset: u64) -> Vec<u8> {
    let mut out = string(name.as_bytes());
    out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    for d in dims {
        out.extend_from_slice(&d.to_le_bytes());
    }
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out
}

/// A file: header with the counts given (not necessarily the entries' counts), padding to
/// 32, then `data` bytes.
fn file(
    version: u32,
    counts: (u64, u64),
    kvs: &[Vec<u8>],
    infos: &[Vec<u8>],
    data: usize,
) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&counts.0.to_le_bytes());
    out.extend_from_slice(&counts.1.to_le_bytes());
    for k in kvs {
        out.extend_from_slice(k);
    }
    for t in infos {
        out.extend_from_slice(t);
    }
    out.resize(out.len().div_ceil(32) * 32, 0);
    out.extend(std::iter::repeat_n(0x11, data));
    out
}

/// The valid base: `a` F32 [2, 4] at 0 and `b` Q8_0 [32] at 32 (34 bytes), arch `sd1`.
fn base_parts() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    (
        vec![kv_str("general.architecture", "sd1")],
        vec![tensor("a", &[4, 2], 0, 0), tensor("b", &[32], 8, 32)],
    )
}

fn valid() -> Vec<u8> {
    let (kvs, infos) = base_parts();
    file(3, (2, 1), &kvs, &infos, 66)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Truncated,
    Limit,
    Invalid,
    Tensor,
    Version,
    Unsupported,
    Duplicate,
    WrongFormat,
}

fn kind(e: &Error) -> Option<Kind> {
    Some(match e {
        Error::GgufTruncated { .. } => Kind::Truncated,
        Error::GgufLimit { .. } => Kind::Limit,
        Error::GgufInvalid { .. } => Kind::Invalid,
        Error::GgufTensor { .. } => Kind::Tensor,
        Error::GgufVersion { .. } => Kind::Version,
        Error::UnsupportedGgmlType { .. } => Kind::Unsupported,
        Error::DuplicateTensor { .. } => Kind::Duplicate,
        Error::WrongFormat { .. } => Kind::WrongFormat,
        _ => return None,
    })
}

fn corpus() -> Vec<(String, Vec<u8>, Kind, &'static str)> {
    let mut c = Vec::new();
    let (kvs, infos) = base_parts();
    let good = valid();
    let header_end = 24 + kvs.iter().chain(&infos).map(Vec::len).sum::<usize>();
    // Truncated anywhere in the header (from the version on), in its padding and in the data.
    for cut in (4..header_end + 8)
        .step_by(3)
        .chain([good.len() - 1, good.len() - 40])
    {
        let fault = if cut >= header_end {
            Kind::Tensor
        } else {
            Kind::Truncated
        };
        c.push((
            format!("truncated at {cut}"),
            good[..cut].to_vec(),
            fault,
            "",
        ));
    }
    let base =
        |v, counts, kvs: &[Vec<u8>], infos: &[Vec<u8>], data| file(v, counts, kvs, infos, data);
    c.push((
        "version 1".into(),
        base(1, (2, 1), &kvs, &infos, 66),
        Kind::Version,
        "",
    ));
    c.push((
        "version 4".into(),
        base(4, (2, 1), &kvs, &infos, 66),
        Kind::Version,
        "",
    ));
    c.push((
        "big-endian".into(),
        base(3u32.swap_bytes(), (2, 1), &kvs, &infos, 66),
        Kind::Version,
        "",
    ));
    c.push((
        "huge tensor count".into(),
        base(3, (u64::MAX, 1), &kvs, &infos, 66),
        Kind::Limit,
        "",
    ));
    c.push((
        "huge key count".into(),
        base(3, (2, u64::MAX), &kvs, &infos, 66),
        Kind::Limit,
        "",
    ));
    c.push((
        "tensor count past the file".into(),
        base(3, (1000, 1), &kvs, &infos, 66),
        Kind::Truncated,
        "",
    ));
    c.push((
        "key count past the file".into(),
        base(3, (2, 1000), &kvs, &infos, 66),
        Kind::Truncated,
        "",
    ));
    // Strings.
    let mut long = 1u64.to_le_bytes().to_vec();
    long.truncate(0);
    long.extend_from_slice(&(1u64 << 40).to_le_bytes());
    c.push((
        "key length past the cap".into(),
        file(3, (0, 1), &[long], &[], 64),
        Kind::Limit,
        "",
    ));
    let past = [
        string(b"k")[..8].iter().map(|_| 0).collect::<Vec<u8>>(),
        vec![],
    ]
    .concat();
    let mut past = past;
    past[0] = 200;
    c.push((
        "key length past the end".into(),
        file(3, (0, 1), &[past], &[], 0),
        Kind::Truncated,
        "",
    ));
    let mut val = string(b"x");
    val[0] = 250;
    c.push((
        "value length past the end".into(),
        file(3, (0, 1), &[kv("k", 8, &val)], &[], 0),
        Kind::Truncated,
        "`k`",
    ));
    c.push((
        "key not UTF-8".into(),
        file(
            3,
            (0, 1),
            &[[
                string(&[0xff, 0xfe]),
                4u32.to_le_bytes().to_vec(),
                vec![0; 4],
            ]
            .concat()],
            &[],
            0,
        ),
        Kind::Invalid,
        "",
    ));
    c.push((
        "unknown value type".into(),
        file(3, (0, 1), &[kv("k", 13, &[0; 8])], &[], 0),
        Kind::Invalid,
        "`k`",
    ));
    c.push((
        "bool that is 2".into(),
        file(3, (0, 1), &[kv("k", 7, &[2])], &[], 0),
        Kind::Invalid,
        "`k`",
    ));
    let arr = |ty: u32, n: u64, rest: &[u8]| {
        [
            ty.to_le_bytes().to_vec(),
            n.to_le_bytes().to_vec(),
            rest.to_vec(),
        ]
        .concat()
    };
    c.push((
        "array of an unknown type".into(),
        file(3, (0, 1), &[kv("k", 9, &arr(77, 1, &[0; 8]))], &[], 0),
        Kind::Invalid,
        "`k`",
    ));
    c.push((
        "array count past the end".into(),
        file(
            3,
            (0, 1),
            &[kv("k", 9, &arr(4, u64::MAX / 2, &[0; 8]))],
            &[],
            0,
        ),
        Kind::Truncated,
        "`k`",
    ));
    c.push((
        "string array count past the end".into(),
        file(3, (0, 1), &[kv("k", 9, &arr(8, 1 << 40, &[0; 8]))], &[], 0),
        Kind::Truncated,
        "`k`",
    ));
    let mut nested = arr(4, 0, &[]);
    for _ in 0..6 {
        nested = arr(9, 1, &nested);
    }
    c.push((
        "arrays nested too deep".into(),
        file(3, (0, 1), &[kv("k", 9, &nested)], &[], 256),
        Kind::Limit,
        "`k`",
    ));
    let dup = vec![
        kv_str("general.architecture", "sd1"),
        kv_str("general.architecture", "sdxl"),
    ];
    c.push((
        "duplicate key".into(),
        file(3, (2, 2), &dup, &infos, 66),
        Kind::Invalid,
        "general.architecture",
    ));
    // Alignment.
    let align = |kind: u32, v: &[u8]| {
        let kvs = vec![kv("general.alignment", kind, v)];
        file(3, (2, 1), &kvs, &infos, 66)
    };
    c.push((
        "alignment 3".into(),
        align(4, &3u32.to_le_bytes()),
        Kind::Invalid,
        "general.alignment",
    ));
    c.push((
        "alignment 0".into(),
        align(4, &0u32.to_le_bytes()),
        Kind::Invalid,
        "general.alignment",
    ));
    c.push((
        "alignment as u64".into(),
        align(10, &32u64.to_le_bytes()),
        Kind::Invalid,
        "general.alignment",
    ));
    // Tensor infos.
    let with =
        |infos: Vec<Vec<u8>>, data: usize| file(3, (infos.len() as u64, 1), &kvs, &infos, data);
    c.push((
        "unaligned offset".into(),
        with(vec![tensor("a", &[4, 2], 0, 8)], 66),
        Kind::Tensor,
        "`a`",
    ));
    c.push((
        "offset past the end".into(),
        with(vec![tensor("a", &[4, 2], 0, 1 << 20)], 66),
        Kind::Tensor,
        "`a`",
    ));
    c.push((
        "offset overflowing".into(),
        with(vec![tensor("a", &[4, 2], 0, u64::MAX - 31)], 66),
        Kind::Tensor,
        "`a`",
    ));
    c.push((
        "data past the end".into(),
        with(vec![tensor("a", &[4, 200], 0, 0)], 66),
        Kind::Tensor,
        "`a`",
    ));
    c.push((
        "dims overflowing".into(),
        with(vec![tensor("a", &[u64::MAX, 4], 0, 0)], 66),
        Kind::Tensor,
        "`a`",
    ));
    c.push((
        "size overflowing".into(),
        with(vec![tensor("a", &[1 << 62, 2], 0, 0)], 66),
        Kind::Tensor,
        "`a`",
    ));
    c.push((
        "five dimensions".into(),
        with(vec![tensor("a", &[1, 1, 1, 1, 8], 0, 0)], 66),
        Kind::Tensor,
        "`a`",
    ));
    c.push((
        "row not whole blocks".into(),
        with(vec![tensor("b", &[16, 2], 8, 0)], 66),
        Kind::Tensor,
        "`b`",
    ));
    c.push((
        "unknown type".into(),
        with(vec![tensor("a", &[8], 99, 0)], 66),
        Kind::Unsupported,
        "`a`",
    ));
    c.push((
        "IQ4_NL".into(),
        with(vec![tensor("a", &[32], 20, 0)], 66),
        Kind::Unsupported,
        "IQ4_NL",
    ));
    c.push((
        "duplicate tensor".into(),
        with(vec![tensor("a", &[8], 0, 0), tensor("a", &[8], 0, 32)], 66),
        Kind::Duplicate,
        "`a`",
    ));
    c.push((
        "overlapping tensors".into(),
        with(vec![tensor("a", &[16], 0, 0), tensor("c", &[8], 0, 32)], 66),
        Kind::Tensor,
        "`a`",
    ));
    let orig = |shape: &[i32]| {
        let mut v = arr(5, shape.len() as u64, &[]);
        for d in shape {
            v.extend_from_slice(&d.to_le_bytes());
        }
        kv("comfy.gguf.orig_shape.a", 9, &v)
    };
    let reshaped = |kv: Vec<u8>| file(3, (2, 1), &[kv], &infos, 66);
    c.push((
        "orig_shape of another size".into(),
        reshaped(orig(&[3, 3])),
        Kind::Tensor,
        "`a`",
    ));
    c.push((
        "orig_shape negative".into(),
        reshaped(orig(&[-2, -4])),
        Kind::Tensor,
        "`a`",
    ));
    c.push((
        "orig_shape not an array".into(),
        reshaped(kv_str("comfy.gguf.orig_shape.a", "2,4")),
        Kind::Tensor,
        "`a`",
    ));
    c
}

#[test]
fn every_hostile_gguf_is_the_typed_error_its_fault_calls_for() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus();
    assert!(corpus.len() >= 60, "corpus has {} files", corpus.len());
    for (i, (what, bytes, want, names)) in corpus.into_iter().enumerate() {
        let path = dir.path().join(format!("hostile-{i}.gguf"));
        std::fs::write(&path, &bytes).unwrap();
        for result in [
            GgufFile::open(&path).map(|_| ()),
            SafetensorsIndex::open(&path).map(|_| ()),
        ] {
            let err = result.expect_err(&what);
            assert_eq!(kind(&err), Some(want), "{what}: {err}");
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()), "{what}: {msg}");
            assert!(msg.contains(names), "{what}: `{msg}` should name {names}");
        }
    }
}

#[test]
fn the_valid_base_file_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("valid.gguf");
    std::fs::write(&path, valid()).unwrap();
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.tensors.len(), 2);
    let index = SafetensorsIndex::open(&path).unwrap();
    let b = &index.tensors()[1];
    assert_eq!(
        (b.name.as_str(), b.bytes, b.shape.clone()),
        ("b", 34, vec![32])
    );
    assert_eq!(index.data_bytes(), 32 + 34);
}

#[test]
fn files_of_other_formats_are_named_as_what_they_are() {
    let dir = tempfile::tempdir().unwrap();
    for (bytes, found) in [
        (b"PK\x03\x04\x14\0\0\0".to_vec(), "zip"),
        (vec![0x80, 0x02, b'c', 0, 0, 0, 0, 0, 0, 0], "pickle"),
        (
            b"version https://git-lfs.github.com/spec/v1\n".to_vec(),
            "LFS",
        ),
        (b"<!DOCTYPE html><html></html>".to_vec(), "HTML"),
    ] {
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let err = SafetensorsIndex::open(&path).unwrap_err();
        assert!(matches!(err, Error::WrongFormat { .. }), "{err}");
        assert!(err.to_string().contains(found), "{err}");
    }
    let path = dir.path().join("model.gguf");
    std::fs::write(
        &path,
        16u64
            .to_le_bytes()
            .iter()
            .chain(b"{}              ")
            .copied()
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let err = GgufFile::open(&path).unwrap_err();
    assert!(
        matches!(
            err,
            Error::WrongFormat {
                found: "safetensors",
                ..
            }
        ),
        "{err}"
    );
}

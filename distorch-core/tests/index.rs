//! safetensors header validation and shard indexes (splitting by the model families'
//! conventions is tested in distorch-models).

use std::collections::BTreeMap;
use std::io::Write;

use distorch_core::safetensors::write_zeroed;
use distorch_core::{DType, Error, SafetensorsIndex};

fn raw_file(header: &str, data_len: usize) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    f.write_all(header.as_bytes()).unwrap();
    f.write_all(&vec![0u8; data_len]).unwrap();
    f.flush().unwrap();
    f
}

fn open_err(header: &str, data_len: usize) -> String {
    let f = raw_file(header, data_len);
    let e = SafetensorsIndex::open(f.path()).unwrap_err();
    let path = f.path().display().to_string();
    e.to_string().replace(&path, "FILE")
}

#[test]
fn reads_a_valid_header() {
    let f = raw_file(
        r#"{"__metadata__":{"format":"pt"},"b.weight":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]},"a.bias":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[12,16]}}"#,
        16,
    );
    let idx = SafetensorsIndex::open(f.path()).unwrap();
    assert_eq!(idx.tensors().len(), 2);
    assert_eq!(idx.tensors()[0].name, "b.weight");
    assert_eq!(idx.tensors()[1].dtype, DType::F8E4M3);
    assert_eq!(idx.metadata()["format"], "pt");
    assert_eq!(idx.data_bytes(), 16);
    let header_len = idx.tensors()[0].file_offset - 8;
    assert_eq!(idx.tensors()[1].file_offset, 8 + header_len + 12);
}

#[test]
fn rejects_bad_files_with_context() {
    let cases: &[(&str, usize, &str)] = &[
        (
            r#"{"w":{"dtype":"F16","shape":[2,3],"data_offsets":[0,10]}}"#,
            10,
            "FILE: tensor `w` is F16 [2, 3] = 12 bytes but its data_offsets span 10",
        ),
        (
            r#"{"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,2]}}"#,
            2,
            "FILE: tensor `w` has unknown dtype `Q4`",
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"v":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
            12,
            "FILE: tensor `v` starts at data offset 8 but the previous tensor ends at 4",
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"v":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}"#,
            6,
            "FILE: tensor `v` starts at data offset 2 but the previous tensor ends at 4",
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            4,
            "FILE: the header describes 8 bytes of tensor data but the file holds 4 (truncated or padded file)",
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#,
            8,
            "FILE: tensor `w`: shape [4294967296, 4294967296] overflows a 64-bit size",
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
            4,
            "FILE: tensor `w`: data_offsets [4, 0] end before they begin",
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[1]}}"#,
            0,
            "FILE: tensor `w`: missing field `data_offsets`",
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
            "FILE: tensor `w` appears twice in the header",
        ),
        (
            r#"[1,2]"#,
            0,
            "FILE: invalid safetensors header: not a JSON object (invalid type: sequence, expected an object of tensor entries at line 1 column 0)",
        ),
    ];
    for (header, data, expected) in cases {
        assert_eq!(&open_err(header, *data), expected, "header {header}");
    }
}

#[test]
fn rejects_oversized_and_tiny_files() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&u64::MAX.to_le_bytes()).unwrap();
    f.flush().unwrap();
    let e = SafetensorsIndex::open(f.path()).unwrap_err();
    assert!(matches!(e, Error::HeaderTooLarge { .. }), "{e}");

    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(b"abc").unwrap();
    f.flush().unwrap();
    let e = SafetensorsIndex::open(f.path()).unwrap_err();
    assert!(matches!(e, Error::FileTooSmall { len: 3, .. }), "{e}");

    let e = SafetensorsIndex::open("/nonexistent/x.safetensors").unwrap_err();
    assert!(
        e.to_string().starts_with("/nonexistent/x.safetensors: "),
        "{e}"
    );
}

#[test]
fn writer_output_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    let tensors = vec![
        ("x.weight".to_owned(), DType::BF16, vec![3, 5]),
        ("x.bias".to_owned(), DType::F32, vec![3]),
    ];
    write_zeroed(&path, &tensors, &BTreeMap::new()).unwrap();
    let idx = SafetensorsIndex::open(&path).unwrap();
    assert_eq!(idx.data_bytes(), 3 * 5 * 2 + 3 * 4);
    assert_eq!(idx.tensors()[0].shape, vec![3, 5]);
}

mod sharded {
    use std::collections::BTreeMap;
    use std::path::Path;

    use distorch_core::safetensors::write;
    use distorch_core::{DType, SafetensorsIndex};

    fn shard(dir: &Path, file: &str, names: &[&str]) {
        let specs: Vec<_> = names
            .iter()
            .map(|n| (n.to_string(), DType::F32, vec![2u64]))
            .collect();
        let data = vec![[0u8; 8].as_slice(); names.len()];
        write(dir.join(file), &specs, &data, &BTreeMap::new()).unwrap();
    }

    fn index(dir: &Path, json: &str) -> Result<SafetensorsIndex, distorch_core::Error> {
        let path = dir.join("model.safetensors.index.json");
        std::fs::write(&path, json).unwrap();
        SafetensorsIndex::open(path)
    }

    #[test]
    fn shards_are_one_index() {
        let tmp = tempfile::tempdir().unwrap();
        shard(tmp.path(), "a.safetensors", &["x", "y"]);
        shard(tmp.path(), "b.safetensors", &["z"]);
        let idx = index(
            tmp.path(),
            r#"{"metadata": {"total_size": 24}, "weight_map": {"x": "a.safetensors", "y": "a.safetensors", "z": "b.safetensors"}}"#,
        )
        .unwrap();
        assert!(idx.is_sharded());
        assert_eq!(idx.files().len(), 2);
        let where_: Vec<_> = idx
            .tensors()
            .iter()
            .map(|t| (t.name.as_str(), t.shard))
            .collect();
        assert_eq!(where_, [("x", 0), ("y", 0), ("z", 1)]);
        assert_eq!(idx.data_bytes(), 24);
        assert_eq!(idx.metadata()["total_size"], "24");
    }

    #[test]
    fn bad_indexes_are_typed_errors() {
        let tmp = tempfile::tempdir().unwrap();
        shard(tmp.path(), "a.safetensors", &["x", "y"]);
        shard(tmp.path(), "b.safetensors", &["y"]);
        for (json, says) in [
            (
                r#"{"weight_map": {"x": "b.safetensors"}}"#,
                "x is listed in b.safetensors but is not there",
            ),
            (
                r#"{"weight_map": {"x": "../a.safetensors"}}"#,
                "is not a file name next to the index",
            ),
            (
                r#"{"weight_map": {"x": "/etc/a.safetensors"}}"#,
                "is not a file name next to the index",
            ),
            (r#"{"weight_map": {}}"#, "the weight_map is empty"),
            (r#"{"weights": {}}"#, "not a shard index"),
            (
                r#"{"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}"#,
                "y (in a.safetensors and b.safetensors)",
            ),
            (r#"{"weight_map": {"x": "c.safetensors"}}"#, "c.safetensors"),
        ] {
            let e = index(tmp.path(), json).unwrap_err().to_string();
            assert!(e.contains(says), "{json}: {e}");
        }
    }
}

//! The GGUF reader and dequantization against gguf-py: `tests/fixtures/quants.gguf` was written
//! by gguf-py's `GGUFWriter` and `quants_expected.safetensors` holds `gguf.quants.dequantize`
//! of each tensor (`tools/fixtures/gguf_quants.py`).

use std::path::PathBuf;

use distorch_core::gguf::{GgufFile, Value};
use distorch_core::{DType, Format, SafetensorsIndex, quant};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn bytes(path: &std::path::Path, offset: u64, len: u64) -> Vec<u8> {
    let all = std::fs::read(path).unwrap();
    all[offset as usize..(offset + len) as usize].to_vec()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn gguf_py_files_are_read_with_their_types_shapes_and_metadata() {
    let path = fixture("quants.gguf");
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.version, 3);
    assert_eq!(file.architecture(), Some("sd1"));
    assert_eq!(file.alignment, 32);
    let index = SafetensorsIndex::open(&path).unwrap();
    assert_eq!(index.format(), Format::Gguf);
    assert_eq!(index.metadata()["general.architecture"], "sd1");
    let q4k = index.tensors().iter().find(|t| t.name == "q.Q4_K").unwrap();
    assert_eq!(
        (q4k.dtype, q4k.shape.clone(), q4k.bytes),
        (DType::Q4K, vec![4, 512], 1152)
    );
    let conv = index
        .tensors()
        .iter()
        .find(|t| t.name == "conv.weight")
        .unwrap();
    assert_eq!(
        conv.shape,
        vec![4, 2, 3, 3],
        "comfy.gguf.orig_shape applies"
    );
    let raw = file
        .tensors
        .iter()
        .find(|t| t.name == "conv.weight")
        .unwrap();
    assert_eq!(raw.dims, vec![18, 4], "GGML order is innermost first");
    assert!(matches!(
        file.get("comfy.gguf.orig_shape.conv.weight"),
        Some(Value::Array(_))
    ));
    assert_eq!(index.tensors().len(), 14);
}

#[test]
fn every_quantized_type_dequantizes_bit_exactly_as_gguf_py() {
    let path = fixture("quants.gguf");
    let index = SafetensorsIndex::open(&path).unwrap();
    let expected_path = fixture("quants_expected.safetensors");
    let expected = SafetensorsIndex::open(&expected_path).unwrap();
    let mut seen = Vec::new();
    for t in index.tensors().iter().filter(|t| t.dtype.is_quantized()) {
        let e = expected
            .tensors()
            .iter()
            .find(|e| e.name == t.name)
            .unwrap();
        let want = f32s(&bytes(&expected_path, e.file_offset, e.bytes));
        let mut got = vec![0f32; t.numel() as usize];
        quant::dequantize(t.dtype, &bytes(&path, t.file_offset, t.bytes), &mut got).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{} element {i}: {g} vs {w}",
                t.name
            );
        }
        assert!(want.iter().any(|v| *v < 0.0) && want.iter().any(|v| *v > 0.0));
        seen.push(t.dtype);
    }
    assert_eq!(seen, DType::QUANTIZED.to_vec());
}

#[test]
fn plain_types_in_a_gguf_hold_the_same_values() {
    let path = fixture("quants.gguf");
    let index = SafetensorsIndex::open(&path).unwrap();
    let expected_path = fixture("quants_expected.safetensors");
    let expected = SafetensorsIndex::open(&expected_path).unwrap();
    for name in ["p.F32", "p.F16", "p.BF16", "conv.weight"] {
        let t = index.tensors().iter().find(|t| t.name == name).unwrap();
        let e = expected.tensors().iter().find(|e| e.name == name).unwrap();
        assert_eq!(t.shape, e.shape, "{name}");
        let raw = bytes(&path, t.file_offset, t.bytes);
        let got: Vec<f32> = match t.dtype {
            DType::F32 => f32s(&raw),
            DType::F16 => raw
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::BF16 => raw
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => panic!("{name} is {other}"),
        };
        assert_eq!(
            got,
            f32s(&bytes(&expected_path, e.file_offset, e.bytes)),
            "{name}"
        );
    }
}

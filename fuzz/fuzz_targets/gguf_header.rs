//! Fuzzes the GGUF header reader: any bytes as a file must give a header or a typed error,
//! never a panic; an accepted header's tensors must lie inside the file, aligned and apart,
//! and dequantize without error.

#![no_main]

use distorch_core::gguf::GgufFile;
use distorch_core::quant;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("distorch-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("input.gguf");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    match GgufFile::open(&path) {
        Ok(file) => {
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            for t in &file.tensors {
                let end = t.file_offset + t.bytes;
                assert!(end <= data.len() as u64, "{}", t.name);
                assert_eq!((t.file_offset - file.data_start) % file.alignment, 0, "{}", t.name);
                assert_eq!(t.shape.iter().product::<u64>(), t.dims.iter().product::<u64>());
                ranges.push((t.file_offset, end));
                if t.dtype.is_quantized() && t.bytes < 1 << 16 {
                    let bytes = &data[t.file_offset as usize..end as usize];
                    let mut out = vec![0f32; t.shape.iter().product::<u64>() as usize];
                    quant::dequantize(t.dtype, bytes, &mut out).expect("accepted sizes dequantize");
                }
            }
            ranges.sort_unstable();
            assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0), "overlap");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});

//! Fuzzes the safetensors header reader: any bytes as a file must give an index or a typed
//! error, never a panic; an accepted index must describe exactly the file's data.

#![no_main]

use distorch_core::{Format, SafetensorsIndex};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("distorch-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("input.safetensors");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    match SafetensorsIndex::open(&path) {
        Ok(index) if index.format() == Format::Gguf => {
            for t in index.tensors() {
                assert!(t.file_offset + t.bytes <= data.len() as u64, "{}", t.name);
            }
        }
        Ok(index) => {
            let header = u64::from_le_bytes(data[..8].try_into().expect("accepted files have 8 bytes"));
            assert_eq!(8 + header + index.data_bytes(), data.len() as u64);
            for t in index.tensors() {
                assert!(t.file_offset + t.bytes <= data.len() as u64, "{}", t.name);
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});

//! Load benchmark: Load-Patch-Distribute of a generated ≥ 1 GiB f16 safetensors file, against
//! a plain sequential read of the same file, with the process's peak resident set.
//!
//! Run `cargo run --release --example load_bench -- --mode write` once (writes the file to the
//! temp folder), then one process per mode so each peak RSS is its own:
//!
//! - `--mode read`: read the file sequentially in 8 MiB chunks (the baseline);
//! - `--mode resident`: every unit on the compute device (ndarray: host memory, f32);
//! - `--mode host`: every unit on `cpu` — borrowed from the memory-mapped file, each value
//!   read once by the finiteness check;
//! - `--mode host-nocheck`: the same without the check (nothing is read at load time).
//!
//! Each prints one line: seconds (best of `--repeat N`, default 3), MB/s, bytes placed on the
//! host, the largest tensor and the peak RSS (`VmHWM`, as `/usr/bin/time -v` reports it).
//! `--cold` evicts the file from the page cache before each repetition
//! (`posix_fadvise(DONTNEED)`, Linux), so reads come from the disk.

#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use distorch::alloc::PinPolicy;
use distorch::core::runtime::{DeviceMap, LoadOptions, WeightStore};
use distorch::core::safetensors::write_zeroed;
use distorch::core::units;
use distorch::{
    ByteSize, DType, DeviceGraph, DeviceId, PlanRequest, SafetensorsIndex, VirtualVram,
};

type B = burn::backend::NdArray;

const TENSORS: usize = 64;
const ROWS: u64 = 2048;
const COLS: u64 = 4096; // 16 MiB of f16 per tensor, 1 GiB in all

fn path() -> PathBuf {
    std::env::temp_dir()
        .join("distorch-load-bench")
        .join("model.safetensors")
}

fn io(path: &std::path::Path) -> impl Fn(std::io::Error) -> distorch::Error + '_ {
    move |source| {
        distorch::core::Error::Io {
            path: path.to_path_buf(),
            source,
        }
        .into()
    }
}

/// Writes the file: `blocks.N.proj.weight` [2048, 4096] f16 of small pseudo-random values,
/// and an f32 bias each.
fn write_model() -> Result<(), distorch::Error> {
    let path = path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let mut specs = Vec::new();
    for i in 0..TENSORS {
        specs.push((
            format!("blocks.{i}.proj.weight"),
            DType::F16,
            vec![ROWS, COLS],
        ));
        specs.push((format!("blocks.{i}.proj.bias"), DType::F32, vec![ROWS]));
    }
    // The header and a sparse data region, then every tensor's bytes in place.
    write_zeroed(&path, &specs, &BTreeMap::new())?;
    let index = SafetensorsIndex::open(&path)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(io(&path))?;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for t in index.tensors() {
        let n = t.numel() as usize;
        let bytes: Vec<u8> = (0..n)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let v = ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
                match t.dtype {
                    DType::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
                    _ => v.to_le_bytes().to_vec(),
                }
            })
            .collect();
        use std::io::{Seek, SeekFrom, Write};
        file.seek(SeekFrom::Start(t.file_offset))
            .map_err(io(&path))?;
        file.write_all(&bytes).map_err(io(&path))?;
    }
    file.sync_all().map_err(io(&path))?;
    println!(
        "wrote {} ({})",
        path.display(),
        ByteSize(index.data_bytes())
    );
    Ok(())
}

/// Drops the file's pages from the page cache.
fn evict(path: &std::path::Path) -> Result<(), distorch::Error> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).map_err(io(path))?;
    // SAFETY: a valid open descriptor; the call only advises the kernel.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(io(path)(std::io::Error::from_raw_os_error(rc)));
    }
    Ok(())
}

fn peak_rss() -> Option<ByteSize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(ByteSize(kib * 1024))
}

fn main() -> Result<(), distorch::Error> {
    let arg = |name: &str| std::env::args().skip_while(|a| a != name).nth(1);
    let mode = arg("--mode").unwrap_or_else(|| "resident".into());
    let repeat: usize = arg("--repeat").and_then(|r| r.parse().ok()).unwrap_or(3);
    if mode == "write" {
        return write_model();
    }
    let path = path();
    let index =
        SafetensorsIndex::open(&path).inspect_err(|_| println!("run with --mode write first"))?;
    let file_bytes = std::fs::metadata(&path).map_err(io(&path))?.len();
    let largest = index.tensors().iter().map(|t| t.bytes).max().unwrap_or(0);
    let split = distorch::models::load::split(&index);
    let component = &split.components[0];
    let rule = distorch::core::runtime::device_rule::<B>(&Default::default());
    let inventory = units::inventory_with(component, &distorch::core::Homes::new(rule))?;
    let graph: DeviceGraph = "cuda:0=64gib,cpu=64gib".parse()?;
    let offload = match mode.as_str() {
        "read" | "resident" => ByteSize(0),
        "host" | "host-nocheck" => inventory.total_bytes(),
        other => {
            println!("unknown mode `{other}` (write, read, resident, host, host-nocheck)");
            std::process::exit(2);
        }
    };
    let vv = VirtualVram::new(DeviceId::cuda(0), offload, vec![DeviceId::CPU])?;
    let pin = PinPolicy {
        tiny_threshold: ByteSize(0),
        ..PinPolicy::default()
    };
    let plan = distorch::plan(
        &PlanRequest::virtual_vram(vv).with_pin(pin),
        &inventory,
        &graph,
    )?;
    let options = LoadOptions::<B> {
        check_finite: mode != "host-nocheck",
        ..LoadOptions::default()
    };
    let devices = DeviceMap::<B>::new(Default::default());
    let mut best = f64::INFINITY;
    let mut placed_host = 0u64;
    let mut kept = None;
    let cold = std::env::args().any(|a| a == "--cold");
    for _ in 0..repeat {
        drop(kept.take());
        if cold {
            evict(&path)?;
        }
        let start = Instant::now();
        if mode == "read" {
            let mut f = std::fs::File::open(&path).map_err(io(&path))?;
            let mut buf = vec![0u8; 8 << 20];
            while f.read(&mut buf).map_err(io(&path))? > 0 {}
        } else {
            let (store, report) = WeightStore::load(&index, component, &plan, &devices, &options)?;
            // ndarray's "device" is host memory too.
            placed_host = report.bytes_per_device.iter().map(|(_, b)| b.bytes()).sum();
            kept = Some(store);
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    println!(
        "mode={mode}{} backend=ndarray file_mb={:.0} load_s={best:.3} mb_per_s={:.0} placed_host_mb={:.0} largest_tensor_mb={:.0} peak_rss_mb={:.0}",
        if cold { " cold" } else { "" },
        file_bytes as f64 / 1e6,
        file_bytes as f64 / 1e6 / best,
        placed_host as f64 / 1e6,
        largest as f64 / 1e6,
        peak_rss().map_or(f64::NAN, |b| b.bytes() as f64 / 1e6),
    );
    drop(kept);
    Ok(())
}

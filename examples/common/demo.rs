//! What the pipeline examples share: the cache folder of their demo weights, random demo
//! weights, and the progress and streamer lines they print.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use distorch::DType;
use distorch::core::runtime::{ExpectedTensor, Streamer};
use distorch::core::write_random;
use distorch::models::Progress;

/// Warnings and errors from the library on stderr (`RUST_LOG` to see more).
pub fn log_to_stderr() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Exits with status 1 and the error's message when `result` is an error.
pub fn exit_on_error(result: Result<(), Box<dyn std::error::Error>>) {
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// The demo folder `name` in `$DISTORCH_CACHE`, else `~/.cache/distorch`.
pub fn cache_dir(name: &str) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let cache = std::env::var_os("DISTORCH_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/distorch")))
        .ok_or("no cache folder: set DISTORCH_CACHE")?;
    Ok(cache.join(name))
}

/// Random bf16 weights for `expected` (see `distorch::core::write_random`).
pub fn write_weights(
    path: &Path,
    expected: Vec<ExpectedTensor>,
    seed: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let specs: Vec<_> = expected
        .into_iter()
        .map(|e| {
            (
                e.name,
                DType::BF16,
                e.shape.iter().map(|&d| d as u64).collect(),
            )
        })
        .collect();
    write_random(path, &specs, seed, &BTreeMap::new())?;
    Ok(())
}

/// Prints a pipeline's progress, a line per event.
pub fn print_progress(p: Progress) {
    match p {
        Progress::Encoded { elapsed } => {
            println!("\nprompts encoded in {:.1} s", elapsed.as_secs_f64())
        }
        Progress::Step { done, of, elapsed } => {
            println!("step {done}/{of}: {:.1} s", elapsed.as_secs_f64())
        }
        Progress::Decoded { elapsed } => println!("decoded in {:.1} s", elapsed.as_secs_f64()),
    }
}

/// Prints (and resets) the transformer streamer's statistics.
pub fn print_streamer<B: Backend>(streamer: &Streamer<B>) {
    let stats = streamer.take_stats();
    let moved: u64 = stats.bytes_moved.values().map(|b| b.bytes()).sum();
    println!(
        "transformer streamer: {} fetches, {} resident, {} prefetched, {} on demand, {:.1} MB \
         moved, {:.1} ms waited",
        stats.fetches,
        stats.resident,
        stats.prefetched,
        stats.on_demand,
        moved as f64 / 1e6,
        stats.stall.as_secs_f64() * 1e3
    );
}

//! What the pipeline examples share: the cache folder of their demo weights and the progress
//! and streamer lines they print.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use distorch::core::runtime::Streamer;
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

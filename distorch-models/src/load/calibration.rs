//! What a device computes and moves for one model at one input size, measured once and
//! cached per device: each unit's compute time (a profiled pass) and what a streamed byte
//! costs (the link). Given to a load as [`crate::ComponentOptions::compute_times`] and the
//! donor's link in the device graph, it lets plans predict the pass and
//! `PlacementOrder::Auto` choose by the clock.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use burn::tensor::backend::Backend;
use distorch_core::runtime::Streamer;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// One model's costs on one device at one input size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Each unit's compute time per pass, by unit name.
    pub compute: BTreeMap<String, Duration>,
    /// What a streamed byte costs, as bytes per second: the link's rate while compute runs
    /// where transfers overlap compute, else the slowdown a streamed byte adds to the pass.
    pub link_bytes_per_sec: u64,
    /// Where transfers overlap compute: the compute time a GiB staged beside it adds
    /// ([`distorch_alloc::Staging::contention`]; zero on a GPU's copy engine). Give it to a
    /// load as [`crate::ComponentOptions::staging_contention`].
    #[serde(default)]
    pub contention: Duration,
}

/// Each unit's compute time in one pass: `pass` runs once to warm up, then once with the
/// streamer profiling ([`Streamer::set_profiling`]: the device synchronized at every fetch).
pub fn profile_units<B: Backend>(
    streamer: &Streamer<B>,
    mut pass: impl FnMut() -> Result<(), Error>,
) -> Result<BTreeMap<String, Duration>, Error> {
    pass()?;
    streamer.set_profiling(true);
    let run = pass();
    let profile = streamer.take_profile();
    streamer.set_profiling(false);
    run?;
    Ok(profile.into_iter().collect())
}

/// Calibrations by key (a device, a model file, an input size: see
/// [`CalibrationCache::key`]), kept in a JSON file so that a device is measured once.
#[derive(Debug)]
pub struct CalibrationCache {
    path: PathBuf,
    entries: BTreeMap<String, Calibration>,
}

impl CalibrationCache {
    /// The cache at `path` (a JSON file; empty when it does not exist yet).
    pub fn open(path: impl AsRef<Path>) -> Result<CalibrationCache, Error> {
        let path = path.as_ref().to_path_buf();
        let entries = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Config {
                path: path.clone(),
                reason: format!("not a calibration cache ({e}); delete it to start over"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                return Err(Error::Config {
                    path,
                    reason: e.to_string(),
                });
            }
        };
        Ok(CalibrationCache { path, entries })
    }

    /// The key of `model` (its size and modification time fingerprint it) on backend `B`'s
    /// `device` at `input` (a description of the input size, e.g. `latent=16x16 batch=2`).
    /// On backends that compute on the host it also holds the compute threads (rayon's pool
    /// here), which set both the units' times and whether staging overlaps them.
    pub fn key<B: Backend>(device: &B::Device, model: &Path, input: &str) -> String {
        let caps = distorch_core::runtime::Capabilities::of::<B>(device);
        let threads = match caps.staging_threads {
            Some(_) => format!(" threads={}", rayon::current_num_threads()),
            None => String::new(),
        };
        format!(
            "{} {device:?}{threads} {} {input}",
            B::name(device),
            crate::load::file_stamp(model)
        )
    }

    /// The calibration under `key`, if measured.
    pub fn get(&self, key: &str) -> Option<&Calibration> {
        self.entries.get(key)
    }

    /// Records `calibration` under `key` and writes the file.
    pub fn insert(&mut self, key: String, calibration: Calibration) -> Result<(), Error> {
        self.entries.insert(key, calibration);
        let io = |e: std::io::Error| Error::Config {
            path: self.path.clone(),
            reason: e.to_string(),
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let json = serde_json::to_vec_pretty(&self.entries).map_err(|e| Error::Config {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        std::fs::write(&self.path, json).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibrations_survive_the_file_and_bad_files_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/calibration.json");
        let mut cache = CalibrationCache::open(&path).unwrap();
        assert!(cache.get("k").is_none());
        let cal = Calibration {
            compute: [("unit.a".to_owned(), Duration::from_micros(1500))].into(),
            link_bytes_per_sec: 12_000_000_000,
            contention: Duration::from_millis(120),
        };
        cache.insert("k".into(), cal.clone()).unwrap();
        assert_eq!(CalibrationCache::open(&path).unwrap().get("k"), Some(&cal));
        std::fs::write(&path, b"{not json").unwrap();
        let e = CalibrationCache::open(&path).unwrap_err();
        assert!(matches!(e, Error::Config { .. }), "{e}");
    }
}

//! What a device computes and moves for one model at one input size, measured once and
//! cached per device: each unit's compute time (a profiled pass) and what a streamed byte
//! costs (the link). Given to a load as [`crate::ComponentOptions::calibration`] and the
//! donor's link in the device graph, it lets plans predict the pass and
//! `PlacementOrder::Auto` choose by the clock.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use burn::tensor::backend::Backend;
use distorch_core::runtime::{Capabilities, StreamStats, Streamer, upload_rate};
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// One model's costs on one device at one input size.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Calibration {
    /// Each unit's compute time per pass, by unit name.
    pub compute: BTreeMap<String, Duration>,
    /// What a streamed byte costs, as bytes per second: the link's rate while compute runs
    /// where transfers overlap compute, else the slowdown a streamed byte adds to the pass.
    pub link_bytes_per_sec: u64,
    /// Where transfers overlap compute: the compute time a GiB staged beside it adds
    /// ([`distorch_alloc::Staging::contention`]; zero on a GPU's copy engine).
    #[serde(default)]
    pub contention: Duration,
    /// Each streamed unit's transfer time from host memory, by unit name, where staging is
    /// host work ([`calibrate_streamed`]; empty on GPUs, whose link's rate applies).
    #[serde(default)]
    pub transfer: BTreeMap<String, Duration>,
}

impl Calibration {
    /// `inventory` with this calibration's compute and transfer times (what plans predict
    /// the pass from).
    pub fn timed(&self, inventory: distorch_alloc::Inventory) -> distorch_alloc::Inventory {
        inventory
            .with_compute(&self.compute)
            .with_transfer(&self.transfer)
    }
}

/// Each unit's compute time in one pass: `pass` runs once to warm up, once with the
/// streamer profiling ([`Streamer::set_profiling`]: the device synchronized at every fetch),
/// which gives each unit's share of the pass, and three times more as it runs unprofiled,
/// timed: the shares are scaled to the median of those, since synchronizing at every unit
/// changes how long a pass takes (lavapipe ran a profiled UNet pass in 7.0 s and the same
/// pass unprofiled in 8.2 s: its queue works differently when drained at every unit). The
/// times sum to that median: the resident pass.
pub fn profile_units<B: Backend>(
    streamer: &Streamer<B>,
    mut pass: impl FnMut() -> Result<(), Error>,
) -> Result<BTreeMap<String, Duration>, Error> {
    pass()?;
    let profile = profiled(streamer, &mut pass, Streamer::take_profile)?;
    let (resident, ()) = median_of_three(&mut pass, || ())?;
    Ok(scaled(profile, resident))
}

/// One run of `pass` with `streamer` profiling, and what `take` collects of it (profiling is
/// off again whether or not the pass failed).
fn profiled<B: Backend>(
    streamer: &Streamer<B>,
    pass: &mut impl FnMut() -> Result<(), Error>,
    take: impl FnOnce(&Streamer<B>) -> Vec<(String, Duration)>,
) -> Result<Vec<(String, Duration)>, Error> {
    streamer.set_profiling(true);
    let run = pass();
    let recorded = take(streamer);
    streamer.set_profiling(false);
    run.map(|()| recorded)
}

/// `pass` run three times, timed: the median run's time and what `after` returned after it.
fn median_of_three<T>(
    pass: &mut impl FnMut() -> Result<(), Error>,
    mut after: impl FnMut() -> T,
) -> Result<(Duration, T), Error> {
    let mut runs = Vec::with_capacity(3);
    for _ in 0..3 {
        let start = std::time::Instant::now();
        pass()?;
        runs.push((start.elapsed(), after()));
    }
    runs.sort_by_key(|r| r.0);
    Ok(runs.swap_remove(1))
}

/// `profile` scaled so that it sums to `whole` (as it is when it sums to nothing).
fn scaled(profile: Vec<(String, Duration)>, whole: Duration) -> BTreeMap<String, Duration> {
    let sum: Duration = profile.iter().map(|(_, d)| *d).sum();
    if sum.is_zero() {
        return profile.into_iter().collect();
    }
    let factor = whole.as_secs_f64() / sum.as_secs_f64();
    profile
        .into_iter()
        .map(|(n, d)| (n, d.mul_f64(factor)))
        .collect()
}

/// The second half of a calibration, after [`profile_units`] gave each unit's compute (whose
/// sum is the resident pass): `pass` runs the same model and input with every unit streamed
/// from a host home through `streamer` (the default look-ahead) — once to warm up, three
/// times timed (the median kept, with its statistics) and, where staging is host work, once
/// more with each unit's staging timed. Returns the calibration and the median streamed pass.
pub fn calibrate_streamed<B: Backend>(
    device: &B::Device,
    compute: BTreeMap<String, Duration>,
    streamer: &Streamer<B>,
    mut pass: impl FnMut() -> Result<(), Error>,
) -> Result<(Calibration, StreamedPass), Error> {
    let resident: Duration = compute.values().sum();
    pass()?;
    let _ = streamer.take_stats();
    let (time, stats) = median_of_three(&mut pass, || streamer.take_stats())?;
    let staging = if LinkKind::of::<B>(device).host_staging() {
        profiled(streamer, &mut pass, Streamer::take_staging_profile)?
    } else {
        Vec::new()
    };
    let (link, contention) = link_costs::<B>(device, resident, time, &stats);
    let calibration = Calibration {
        compute,
        link_bytes_per_sec: link,
        contention,
        transfer: unit_transfers::<B>(device, staging, resident, time),
    };
    Ok((calibration, StreamedPass { time, stats }))
}

/// The fully streamed pass a calibration measured (the median of three).
#[derive(Debug, Clone)]
pub struct StreamedPass {
    /// Its time.
    pub time: Duration,
    /// Its streamer statistics.
    pub stats: StreamStats,
}

/// How a streamed byte reaches compute, as a calibration measures it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkKind {
    /// A GPU uploading beside compute: the link is its own engine.
    Gpu,
    /// Host staging on cores the kernels leave: beside compute, sharing its memory.
    HostBeside,
    /// Host staging on the kernels' cores (ndarray by default): it adds to the pass.
    HostSerial,
    /// Uploads on the compute thread (wgpu): they add to the pass.
    ComputeThread,
}

impl LinkKind {
    fn of<B: Backend>(device: &B::Device) -> LinkKind {
        let caps = Capabilities::of::<B>(device);
        match (caps.transfers_overlap, caps.staging_threads) {
            (true, None) => LinkKind::Gpu,
            (true, Some(_)) => LinkKind::HostBeside,
            (false, Some(_)) => LinkKind::HostSerial,
            (false, None) => LinkKind::ComputeThread,
        }
    }

    /// Whether staging is host work, each unit's timed ([`unit_transfers`]).
    fn host_staging(self) -> bool {
        matches!(self, LinkKind::HostBeside | LinkKind::HostSerial)
    }
}

/// What a streamed byte costs on `device`, from the resident pass and the fully streamed one
/// with its [`StreamStats`]: `(link bytes per second, contention per GiB)`.
/// - A GPU uploading beside compute: the timed upload ([`upload_rate`]), no contention.
/// - ndarray with cores left to staging ([`Capabilities::staging_threads`]): the prefetch
///   thread's rate while compute ran (bytes it staged over the time it was busy), and what
///   the pass lost beyond its stall, per GiB moved (staging shares memory and caches with the
///   kernels).
/// - Where transfers cannot overlap compute: what streaming added to the pass, per byte
///   moved; streaming that added nothing measurable is taken as 1 ms a pass.
fn link_costs<B: Backend>(
    device: &B::Device,
    resident: Duration,
    streamed: Duration,
    stats: &StreamStats,
) -> (u64, Duration) {
    let moved: u64 = stats.bytes_moved.values().map(|b| b.bytes()).sum();
    let rate = |bytes: u64, time: Duration| (bytes as f64 / time.as_secs_f64()) as u64;
    match LinkKind::of::<B>(device) {
        LinkKind::Gpu => (upload_rate::<B>(device), Duration::ZERO),
        LinkKind::HostBeside => {
            let busy = stats.staging_busy.max(Duration::from_micros(1));
            let lost = streamed
                .saturating_sub(resident)
                .saturating_sub(stats.stall);
            let per_gib = lost.as_secs_f64() * (1u64 << 30) as f64 / moved.max(1) as f64;
            (
                rate(stats.staged_ahead.bytes(), busy),
                Duration::from_secs_f64(per_gib),
            )
        }
        LinkKind::HostSerial | LinkKind::ComputeThread => {
            (rate(moved, added(resident, streamed)), Duration::ZERO)
        }
    }
}

/// What streaming added to a pass, at least 1 ms.
fn added(resident: Duration, streamed: Duration) -> Duration {
    streamed
        .saturating_sub(resident)
        .max(Duration::from_millis(1))
}

/// Each streamed unit's transfer time, where staging is host work (ndarray widening weights:
/// a tensor above glibc's mmap threshold faults in fresh pages at every fetch, so a byte's
/// cost depends on the tensor it is in): its staging time in a fully streamed pass
/// ([`Streamer::take_staging_profile`]) — as measured beside compute where transfers overlap
/// it; scaled so that they sum to what streaming added to the pass (`streamed` − `resident`)
/// where they do not. Empty on GPUs (bytes over the link's rate).
fn unit_transfers<B: Backend>(
    device: &B::Device,
    staging: Vec<(String, Duration)>,
    resident: Duration,
    streamed: Duration,
) -> BTreeMap<String, Duration> {
    match LinkKind::of::<B>(device) {
        LinkKind::Gpu | LinkKind::ComputeThread => BTreeMap::new(),
        LinkKind::HostBeside => staging.into_iter().collect(),
        LinkKind::HostSerial => scaled(staging, added(resident, streamed)),
    }
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
    /// here), which set both the units' times and whether staging overlaps them, and, where
    /// `LP_NUM_THREADS` is set, the threads of Mesa's software Vulkan driver (lavapipe), which
    /// change every time measured on it.
    pub fn key<B: Backend>(device: &B::Device, model: &Path, input: &str) -> String {
        key_with::<B>(device, model, input, std::env::var("LP_NUM_THREADS").ok())
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

/// [`CalibrationCache::key`] with lavapipe's thread count (`LP_NUM_THREADS`) given.
fn key_with<B: Backend>(
    device: &B::Device,
    model: &Path,
    input: &str,
    driver_threads: Option<String>,
) -> String {
    let caps = distorch_core::runtime::Capabilities::of::<B>(device);
    let mut threads = match caps.staging_threads {
        Some(_) => format!(" threads={}", rayon::current_num_threads()),
        None => String::new(),
    };
    if let Some(lp) = driver_threads {
        threads.push_str(&format!(" LP_NUM_THREADS={lp}"));
    }
    // v3: profiles scaled to an unprofiled pass, contention and unit transfers measured.
    format!(
        "v3 {} {device:?}{threads} {} {input}",
        B::name(device),
        crate::load::file_stamp(model)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_are_scaled_to_the_unprofiled_pass() {
        let ms = Duration::from_millis;
        let profile = vec![("a".to_owned(), ms(30)), ("b".to_owned(), ms(10))];
        let s = scaled(profile.clone(), ms(80));
        assert_eq!((s["a"], s["b"]), (ms(60), ms(20)));
        let none = vec![("a".to_owned(), Duration::ZERO)];
        assert_eq!(scaled(none, ms(5))["a"], Duration::ZERO);
    }

    /// ndarray: without a spare core a streamed byte costs what it added to the pass; with
    /// one (`RAYON_NUM_THREADS` below the cores), the prefetch thread's rate and the pass's
    /// loss beyond its stall.
    #[test]
    fn link_costs_follow_how_transfers_meet_compute() {
        type B = burn::backend::NdArray;
        let ms = Duration::from_millis;
        let stats = StreamStats {
            bytes_moved: [(
                distorch_alloc::DeviceId::CPU,
                distorch_alloc::ByteSize::gib(1),
            )]
            .into(),
            stall: ms(100),
            staging_busy: ms(500),
            staged_ahead: distorch_alloc::ByteSize::mib(512),
            ..StreamStats::default()
        };
        let device = Default::default();
        let (link, contention) = link_costs::<B>(&device, ms(1000), ms(1300), &stats);
        if Capabilities::of::<B>(&device).transfers_overlap {
            assert_eq!(link, (1u64 << 30) * 2 / 2);
            assert_eq!(contention, ms(200));
        } else {
            // 1 GiB added 300 ms.
            assert_eq!(link, ((1u64 << 30) as f64 / 0.3) as u64);
            assert_eq!(contention, Duration::ZERO);
        }
        // Nothing measurable added: 1 ms a pass.
        let (link, _) = link_costs::<B>(&device, ms(1000), ms(900), &stats);
        if !Capabilities::of::<B>(&device).transfers_overlap {
            assert_eq!(link, (1u64 << 30) * 1000);
        }
    }

    /// ndarray: staging times as measured where a spare core stages beside compute, else
    /// scaled to what streaming added to the pass.
    #[test]
    fn unit_transfers_are_staging_times_on_the_host() {
        type B = burn::backend::NdArray;
        let ms = Duration::from_millis;
        let staging = vec![("a".to_owned(), ms(30)), ("b".to_owned(), ms(10))];
        let device = Default::default();
        let t = unit_transfers::<B>(&device, staging.clone(), ms(1000), ms(1080));
        if Capabilities::of::<B>(&device).transfers_overlap {
            assert_eq!((t["a"], t["b"]), (ms(30), ms(10)));
        } else {
            assert_eq!((t["a"], t["b"]), (ms(60), ms(20)));
        }
    }

    /// A calibration is measured again when the compute threads change: rayon's on ndarray,
    /// lavapipe's where `LP_NUM_THREADS` sets them (unset leaves earlier keys valid).
    #[test]
    fn keys_hold_the_threads_that_set_the_times() {
        type B = burn::backend::NdArray;
        let device = Default::default();
        let model = Path::new("model.safetensors");
        let plain = key_with::<B>(&device, model, "latent=8x8", None);
        let lp = key_with::<B>(&device, model, "latent=8x8", Some("1".into()));
        assert!(plain.contains(&format!(" threads={} ", rayon::current_num_threads())));
        assert!(!plain.contains("LP_NUM_THREADS"), "{plain}");
        assert!(lp.contains(" LP_NUM_THREADS=1 "), "{lp}");
        assert_ne!(plain, lp);
    }

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
            transfer: [("unit.a".to_owned(), Duration::from_micros(700))].into(),
        };
        cache.insert("k".into(), cal.clone()).unwrap();
        assert_eq!(CalibrationCache::open(&path).unwrap().get("k"), Some(&cal));
        std::fs::write(&path, b"{not json").unwrap();
        let e = CalibrationCache::open(&path).unwrap_err();
        assert!(matches!(e, Error::Config { .. }), "{e}");
    }
}

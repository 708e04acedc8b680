//! [`Streamer`]: hands a forward pass each unit's tensors on the compute device, staging the
//! next offloaded units on a background thread while the current one computes.
//!
//! The background thread prepares each unit's host data from the store's home — often the
//! memory-mapped file — in the dtype the device holds it in: a view of the mapped bytes (its
//! pages touched, so the upload does not fault them in) on GPU backends, a widened f32 copy on
//! ndarray (widened in a rayon pool of its own, on the cores the kernels' global pool leaves:
//! [`Capabilities::staging_threads`]). Where the backend orders work across threads
//! ([`UploadThread::Prefetch`]: CUDA, ndarray) the background thread also enqueues the
//! upload: on CUDA that is its own stream
//! (CubeCL 0.10 gives each thread a stream, stages mapped bytes through pinned memory at any
//! size, and makes the compute stream wait on an event before its first use of the uploaded
//! buffer), so the next unit's transfer overlaps the current unit's kernels. On wgpu
//! ([`UploadThread::Compute`]) buffers written from another thread were read stale by the
//! compute thread's kernels (caught by the bit-identity tests), so the compute thread enqueues
//! the upload when it asks for the unit. Either way the compute thread then casts (or decodes
//! fp8) to the compute dtype on the device. The weights cross in their storage dtype, so the
//! bytes moved are the unit's bytes at home. Units on a GPU donor are copied device to device
//! (CUDA), or read back through the host on backends without device-to-device copies (wgpu).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use distorch_alloc::{ByteSize, DeviceId};

use crate::error::Error;
use crate::runtime::backend::{Capabilities, UploadThread};
pub use crate::runtime::order::ExecutionOrder;
use crate::runtime::order::Order;
use crate::runtime::profile::Profile;
use crate::runtime::staging::{
    Prepared, resident_tensors, stage, staging_pool, to_device, upload, weights,
};
use crate::runtime::store::{LoadReport, WeightPatch, WeightStore};

/// How far the streamer looks ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lookahead {
    /// Offloaded units staged ahead of use, at most.
    pub units: usize,
    /// Bytes of staged units held ahead of use, at most (a unit larger than this is still
    /// fetched, on demand). Where the prefetch thread uploads ([`UploadThread::Prefetch`])
    /// these bytes are on the compute device, beside the plan's resident weights: leave them
    /// free in the compute device's budget.
    pub bytes: ByteSize,
}

impl Default for Lookahead {
    fn default() -> Self {
        Lookahead {
            units: 2,
            bytes: ByteSize::mib(512),
        }
    }
}

impl Lookahead {
    /// The streamer a plan predicts with ([`distorch_alloc::Staging`]): this look-ahead on
    /// `device`'s backend (whether its transfers overlap compute, [`Capabilities`]), with
    /// `contention` per GiB staged beside compute (a calibration's; zero if unmeasured).
    pub fn staging<B: Backend>(
        &self,
        device: &B::Device,
        contention: Duration,
    ) -> distorch_alloc::Staging {
        distorch_alloc::Staging {
            units: self.units,
            bytes: self.bytes,
            overlapped: Capabilities::of::<B>(device).transfers_overlap,
            contention,
        }
    }
}

/// What one pass cost.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Units asked for.
    pub fetches: usize,
    /// Of those, units resident on the compute device (free).
    pub resident: usize,
    /// Of those, offloaded units that were already staged (or being staged) when asked for.
    pub prefetched: usize,
    /// Of those, offloaded units the compute thread had to stage itself.
    pub on_demand: usize,
    /// Bytes uploaded to the compute device, per source device: the fetched units' bytes at
    /// their home, in their storage dtype (the plan's numbers).
    pub bytes_moved: BTreeMap<DeviceId, ByteSize>,
    /// Most host memory that staging had allocated at once: widened f32 copies (backends
    /// that hold f32), read-backs of GPU donors, padded fp8; views of mapped or owned host
    /// bytes allocate nothing.
    pub peak_staging_bytes: ByteSize,
    /// Time the compute thread spent on streamed weights: waiting for staging, staging them
    /// itself when they were not ready, enqueuing their upload (where it uploads:
    /// [`UploadThread::Compute`], or a unit staged on demand) and their casts.
    pub stall: Duration,
    /// Time the prefetch thread spent staging units ahead of use (and uploading them, where
    /// it uploads), beside the compute thread's work: with the bytes it staged, the link's
    /// rate while compute runs.
    pub staging_busy: Duration,
    /// Bytes the prefetch thread staged ahead of use (at their home, as `bytes_moved`).
    pub staged_ahead: ByteSize,
    /// Most bytes of streamed (non-resident) weights the streamer held at once: units staged
    /// ahead of use (in host memory, or on the compute device where the prefetch thread
    /// uploads), the one being staged, and the unit last handed out on the compute device.
    pub peak_extra_bytes: ByteSize,
}

/// A unit's tensors on the compute device.
#[derive(Debug, Clone)]
pub struct UnitWeights<B: Backend> {
    pub(crate) tensors: Vec<(String, Vec<usize>, Tensor<B, 1>)>,
}

impl<B: Backend> UnitWeights<B> {
    /// The tensor whose key ends with `.{param}` (or is `param`), reshaped to rank `D`.
    /// Trailing dimensions of size 1 beyond `D` are dropped (a 1×1 convolution's weight read
    /// as a linear layer's); any other rank mismatch gives `None`.
    pub fn get<const D: usize>(&self, param: &str) -> Option<Tensor<B, D>> {
        let (_, shape, t) = self.tensors.iter().find(|(name, _, _)| {
            name == param || name.rsplit_once('.').is_some_and(|(_, p)| p == param)
        })?;
        if shape.len() < D || shape[D..].iter().any(|&d| d != 1) {
            return None;
        }
        let dims: [usize; D] = shape[..D].try_into().ok()?;
        Some(super::reshape::reshaped(t, dims))
    }

    /// All tensors: key, shape, flattened data.
    pub fn tensors(&self) -> &[(String, Vec<usize>, Tensor<B, 1>)] {
        &self.tensors
    }
}

struct State<B: Backend> {
    /// The store streamed from; replaced whole by [`Streamer::repatch`].
    store: Arc<WeightStore<B>>,
    /// Bumped when the store is replaced: staging begun before is discarded.
    generation: u64,
    order: Order,
    ready: HashMap<usize, (Prepared<B>, u64)>,
    /// Host bytes allocated by the units staged and not yet uploaded.
    staging: u64,
    queue: VecDeque<usize>,
    in_flight: Option<usize>,
    /// Bytes ready, queued and in flight.
    held: u64,
    /// Bytes of the unit last handed out, if it was streamed.
    handed_out: u64,
    shutdown: bool,
    stats: StreamStats,
    /// When profiling: each fetch's unit and the moment it was asked for, the device
    /// synchronized first, and each staging's time (see [`Streamer::set_profiling`]).
    profile: Option<Profile>,
}

impl<B: Backend> State<B> {
    /// Notes `extra` host bytes being staged beside those already staged.
    fn note_staging(&mut self, extra: u64) {
        let now = ByteSize(self.staging + extra);
        self.stats.peak_staging_bytes = self.stats.peak_staging_bytes.max(now);
    }

    fn note_peak(&mut self) {
        let now = ByteSize(self.held + self.handed_out);
        if now > self.stats.peak_extra_bytes {
            self.stats.peak_extra_bytes = now;
        }
    }
}

struct Shared<B: Backend> {
    state: Mutex<State<B>>,
    /// Which thread uploads (fixed by the backend).
    uploads: UploadThread,
    changed: Condvar,
    /// Held while a re-patch builds the new store, so two cannot interleave.
    repatching: Mutex<()>,
    /// Whether fetches are being profiled (`State::profile` holds the marks).
    profiling: AtomicBool,
}

impl<B: Backend> Shared<B> {
    fn lock(&self) -> MutexGuard<'_, State<B>> {
        // A poisoned lock means the worker panicked while staging; the state is still
        // consistent enough to continue (the unit is simply staged on demand).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Streams a [`WeightStore`]'s offloaded units to the compute device in execution order.
///
/// The look-ahead follows the [`ExecutionOrder`]; after the last unit it wraps to the first,
/// so repeated passes (sampling steps) keep prefetching.
pub struct Streamer<B: Backend> {
    shared: Arc<Shared<B>>,
    lookahead: Lookahead,
    worker: Option<JoinHandle<()>>,
}

impl<B: Backend> Streamer<B> {
    /// Starts the background staging thread; the look-ahead follows the order recorded
    /// during the first pass ([`ExecutionOrder::Record`]).
    pub fn new(store: Arc<WeightStore<B>>, lookahead: Lookahead) -> Streamer<B> {
        let n = store.units().len();
        Self::start(store, lookahead, Order::new((0..n).collect(), true))
    }

    /// Like [`Streamer::new`] with the given execution order. Errors on a declared unit the
    /// store does not hold or that is named twice.
    pub fn with_order(
        store: Arc<WeightStore<B>>,
        lookahead: Lookahead,
        order: ExecutionOrder,
    ) -> Result<Streamer<B>, Error> {
        let n = store.units().len();
        let order = match order {
            ExecutionOrder::Plan => Order::new((0..n).collect(), false),
            ExecutionOrder::Record => Order::new((0..n).collect(), true),
            ExecutionOrder::Declared(names) => {
                let mut mask = vec![false; n];
                let mut order = Vec::with_capacity(n);
                for name in &names {
                    let i = store
                        .position(name)
                        .filter(|&i| !mask[i])
                        .ok_or_else(|| Error::UnknownUnit { unit: name.clone() })?;
                    mask[i] = true;
                    order.push(i);
                }
                order.extend((0..n).filter(|&i| !mask[i]));
                Order::new(order, false)
            }
        };
        Ok(Self::start(store, lookahead, order))
    }

    /// The units in the order the look-ahead follows now.
    pub fn execution_order(&self) -> Vec<String> {
        let st = self.shared.lock();
        let units = st.store.units();
        st.order
            .order
            .iter()
            .map(|&i| units[i].name.clone())
            .collect()
    }

    fn start(store: Arc<WeightStore<B>>, lookahead: Lookahead, order: Order) -> Streamer<B> {
        let caps = Capabilities::of::<B>(store.compute());
        let uploads = caps.upload_thread;
        tracing::debug!(?uploads, staging_threads = ?caps.staging_threads, "streamer started");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                store,
                generation: 0,
                order,
                ready: HashMap::new(),
                staging: 0,
                queue: VecDeque::new(),
                in_flight: None,
                held: 0,
                handed_out: 0,
                shutdown: false,
                stats: StreamStats::default(),
                profile: None,
            }),
            uploads,
            changed: Condvar::new(),
            repatching: Mutex::new(()),
            profiling: AtomicBool::new(false),
        });
        let worker_shared = Arc::clone(&shared);
        let worker = std::thread::Builder::new()
            .name("distorch-prefetch".into())
            .spawn(move || staging_pool(caps.staging_threads, || worker(&worker_shared)))
            .ok();
        if worker.is_none() {
            tracing::warn!("could not start the prefetch thread; staging will be on demand");
        }
        Streamer {
            shared,
            lookahead,
            worker,
        }
    }

    /// The store it streams from now (a re-patch replaces it).
    pub fn store(&self) -> Arc<WeightStore<B>> {
        Arc::clone(&self.shared.lock().store)
    }

    /// Re-patches the tensors `keys` from pristine weights with `patch`
    /// ([`WeightStore::repatch`]) and streams from the result from the next fetch on;
    /// units staged ahead from the old weights are dropped. A fetch running meanwhile gets
    /// the old weights or the new, never a mix within one tensor. On error nothing changes.
    pub fn repatch(
        &self,
        patch: Option<&dyn WeightPatch<B>>,
        keys: &[String],
    ) -> Result<LoadReport, Error> {
        let _one = self
            .shared
            .repatching
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (store, report) = self.store().repatch(patch, keys)?;
        let mut st = self.shared.lock();
        st.store = Arc::new(store);
        st.generation += 1;
        st.ready.clear();
        st.queue.clear();
        st.held = 0;
        st.staging = 0;
        drop(st);
        self.shared.changed.notify_all();
        Ok(report)
    }

    /// The tensors of `unit` on the compute device. An offloaded unit is taken from the
    /// staged units (waiting if it is being staged, staging it here if it was not) and its
    /// upload is enqueued; the next offloaded units are queued for staging.
    pub fn fetch(&self, unit: &str) -> Result<UnitWeights<B>, Error> {
        let store = self.store();
        let i = store.position(unit).ok_or_else(|| Error::UnknownUnit {
            unit: unit.to_owned(),
        })?;
        self.note_profile(&store, i);
        let u = &store.units()[i];
        if u.is_resident() {
            let mut st = self.shared.lock();
            st.order.note(i);
            st.stats.fetches += 1;
            st.stats.resident += 1;
            drop(st);
            return Ok(weights(u, resident_tensors(u, &store)));
        }
        let start = Instant::now();
        let mut st = self.shared.lock();
        st.order.note(i);
        st.stats.fetches += 1;
        let staged = loop {
            if let Some((t, alloc)) = st.ready.remove(&i) {
                st.held -= u.upload_bytes.0;
                st.stats.prefetched += 1;
                st.staging -= alloc;
                break t;
            }
            if st.in_flight == Some(i) {
                st = self
                    .shared
                    .changed
                    .wait(st)
                    .unwrap_or_else(|p| p.into_inner());
                continue;
            }
            if let Some(pos) = st.queue.iter().position(|&q| q == i) {
                st.queue.remove(pos);
                st.held -= u.upload_bytes.0;
            }
            st.stats.on_demand += 1;
            drop(st);
            let took = Instant::now();
            let (t, alloc) = stage(u, &store);
            let took = took.elapsed();
            st = self.shared.lock();
            st.note_staging(alloc);
            if let Some(p) = st.profile.as_mut() {
                p.staged(i, took);
            }
            break Prepared::Staged(t);
        };
        st.stats.stall += start.elapsed();
        *st.stats.bytes_moved.entry(u.home).or_default() += u.upload_bytes;
        st.handed_out = u.upload_bytes.0;
        st.note_peak();
        self.schedule(&mut st, &store, i);
        drop(st);
        self.shared.changed.notify_all();
        // Enqueuing the upload (where this thread does it) and the casts is compute-thread
        // time spent on weights too.
        let enqueue = Instant::now();
        let tensors = to_device(u, staged, &store);
        self.shared.lock().stats.stall += enqueue.elapsed();
        Ok(weights(u, tensors))
    }

    /// Records the moment unit `i` is asked for, after the work queued before it has run,
    /// when profiling.
    fn note_profile(&self, store: &WeightStore<B>, i: usize) {
        // One relaxed load on the fetch path when profiling is off.
        if !self.shared.profiling.load(Ordering::Relaxed) {
            return;
        }
        // Asynchronous backends: what was queued so far is the previous unit's work.
        let _ = B::sync(store.compute());
        let now = Instant::now();
        if let Some(p) = self.shared.lock().profile.as_mut() {
            p.fetched(i, now);
        }
    }

    /// Turns per-unit profiling on or off (off by default). While on, every fetch first waits
    /// for the compute device to finish what was queued (a slower pass), so that the time
    /// between two fetches is the earlier unit's compute and whatever ran before the next —
    /// the calibration `PlacementOrder::Auto`'s cost model takes ([`Streamer::take_profile`]);
    /// and each streamed unit's staging is timed ([`Streamer::take_staging_profile`]).
    pub fn set_profiling(&self, on: bool) {
        self.shared.lock().profile = on.then(Profile::default);
        self.shared.profiling.store(on, Ordering::Relaxed);
    }

    /// The profile since profiling was turned on (or last taken): each fetched unit's name
    /// and the time until the next fetch (the last unit's until now, the device
    /// synchronized), summed over the unit's fetches. Profiling stays on.
    pub fn take_profile(&self) -> Vec<(String, Duration)> {
        let store = self.store();
        let _ = B::sync(store.compute());
        let end = Instant::now();
        let name = |i: usize| store.units()[i].name.clone();
        match self.shared.lock().profile.as_mut() {
            Some(p) => p.take_compute(name, end).0,
            None => Vec::new(),
        }
    }

    /// The staging times since profiling was turned on (or last taken): each streamed unit's
    /// name and how long preparing its host data (and uploading it, where the prefetch thread
    /// uploads) took, ahead of use or on demand, summed over its fetches. What a unit's
    /// transfer costs where staging is host work (ndarray widening weights). Profiling stays
    /// on.
    pub fn take_staging_profile(&self) -> Vec<(String, Duration)> {
        let store = self.store();
        let name = |i: usize| store.units()[i].name.clone();
        match self.shared.lock().profile.as_mut() {
            Some(p) => p.take_staging(name).0,
            None => Vec::new(),
        }
    }

    /// Queues offloaded units after `i` in execution order (wrapping) within the look-ahead.
    fn schedule(&self, st: &mut State<B>, store: &WeightStore<B>, i: usize) {
        let units = store.units();
        let n = units.len();
        let at = st.order.pos[i];
        let mut taken = 0;
        for step in 1..n {
            if taken >= self.lookahead.units {
                break;
            }
            let j = st.order.order[(at + step) % n];
            let u = &units[j];
            if u.is_resident() {
                continue;
            }
            taken += 1;
            if st.ready.contains_key(&j) || st.in_flight == Some(j) || st.queue.contains(&j) {
                continue;
            }
            if st.held + u.upload_bytes.0 > self.lookahead.bytes.0 {
                break;
            }
            st.held += u.upload_bytes.0;
            st.queue.push_back(j);
        }
        st.note_peak();
    }

    /// Returns this pass's statistics and starts a new pass. Also logs them.
    pub fn take_stats(&self) -> StreamStats {
        let mut st = self.shared.lock();
        st.order.finish();
        let stats = std::mem::take(&mut st.stats);
        st.stats.peak_extra_bytes = ByteSize(st.held + st.handed_out);
        drop(st);
        tracing::debug!(
            fetches = stats.fetches,
            prefetched = stats.prefetched,
            on_demand = stats.on_demand,
            stall_ms = stats.stall.as_secs_f64() * 1e3,
            peak_extra = %stats.peak_extra_bytes,
            "stream pass"
        );
        stats
    }
}

impl<B: Backend> Drop for Streamer<B> {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.changed.notify_all();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn worker<B: Backend>(shared: &Shared<B>) {
    let mut st = shared.lock();
    loop {
        if st.shutdown {
            return;
        }
        let Some(j) = st.queue.pop_front() else {
            st = shared.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            continue;
        };
        st.in_flight = Some(j);
        let (store, generation) = (Arc::clone(&st.store), st.generation);
        drop(st);
        let unit = &store.units()[j];
        let busy = Instant::now();
        let (t, alloc) = stage(unit, &store);
        let (prepared, kept) = match shared.uploads {
            UploadThread::Prefetch => (Prepared::Uploaded(upload(unit, t, &store)), 0),
            UploadThread::Compute => (Prepared::Staged(t), alloc),
        };
        let busy = busy.elapsed();
        st = shared.lock();
        st.in_flight = None;
        st.stats.staging_busy += busy;
        st.stats.staged_ahead += unit.upload_bytes;
        if let Some(p) = st.profile.as_mut() {
            p.staged(j, busy);
        }
        if st.generation == generation {
            st.note_staging(alloc);
            st.staging += kept;
            st.ready.insert(j, (prepared, kept));
        }
        shared.changed.notify_all();
    }
}

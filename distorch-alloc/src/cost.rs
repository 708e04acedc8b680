//! What a pass costs under a plan: each unit's compute time, each streamed unit's transfer
//! (measured from host memory, [`Unit::transfer`], else its bytes over its home's link to the
//! compute device), the contention transfers cause beside compute, and the streamer's
//! prefetch limits — predicted
//! by simulating the pass ([`simulate`]), and used by [`crate::PlacementOrder::Auto`] to choose
//! what stays resident.
//!
//! The simulation follows the runtime's streamer: streamed units are staged in execution
//! order, one transfer at a time, at most `units` of them (and `bytes`) ahead of the unit
//! computing; a slot frees when its unit is fetched; a unit larger than the byte bound is
//! fetched on demand. When transfers cannot overlap compute (the upload runs on the compute
//! thread, as on wgpu, or staging shares every core with the kernels, as on ndarray by
//! default), every transfer adds to the step.

use std::time::Duration;

use crate::bytesize::ByteSize;
use crate::graph::DeviceInfo;
use crate::inventory::Unit;
use crate::plan::Warning;
use crate::planner::Layout;
use crate::request::PlanRequest;

/// The streamer's prefetch limits, as the runtime's `Lookahead` and `UploadThread` set them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Staging {
    /// Streamed units staged ahead of use, at most (at least 1).
    pub units: usize,
    /// Bytes of staged units held ahead of use, at most.
    pub bytes: ByteSize,
    /// Whether transfers run beside compute (a prefetch thread) or on the compute thread.
    pub overlapped: bool,
    /// Compute time that a GiB transferred beside compute adds to the pass: zero where the
    /// link has its own engine (a GPU's copy engine), measured where staging shares memory
    /// and caches with the kernels (ndarray widening weights on a spare core). Only counted
    /// when `overlapped`.
    pub contention: Duration,
}

impl Default for Staging {
    /// The runtime's defaults: 2 units, 512 MiB, prefetched beside compute, no contention.
    fn default() -> Self {
        Staging {
            units: 2,
            bytes: ByteSize::mib(512),
            overlapped: true,
            contention: Duration::ZERO,
        }
    }
}

impl Staging {
    /// What transferring `bytes` beside compute adds to the compute: [`Staging::contention`]
    /// per GiB.
    pub fn contention_of(&self, bytes: ByteSize) -> Duration {
        let nanos = self.contention.as_nanos() * u128::from(bytes.0) / (1u128 << 30);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// One unit of a pass, in execution order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassUnit {
    /// Its compute time.
    pub compute: Duration,
    /// Its transfer time to the compute device; zero for a resident unit.
    pub transfer: Duration,
    /// Its bytes in transit (counted against the staging bound).
    pub bytes: ByteSize,
}

/// A pass's predicted cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Prediction {
    /// The whole pass.
    pub step: Duration,
    /// Time the compute device waits for weights.
    pub stall: Duration,
    /// Compute alone (the pass with every unit resident).
    pub compute: Duration,
    /// Transfers alone, summed.
    pub transfer: Duration,
}

/// Simulates one pass over `units` (execution order) under `staging`, in steady state: the
/// pass after another, so that the first units' transfers may start during the previous
/// pass's last units, as the streamer's look-ahead wraps from one sampling step to the next.
/// Where transfers overlap compute, each streamed unit's transfer also slows the compute it
/// runs beside by [`Staging::contention_of`] its bytes (counted with the unit itself).
pub fn simulate(units: &[PassUnit], staging: Staging) -> Prediction {
    let compute: Duration = units.iter().map(|u| u.compute).sum();
    let transfer: Duration = units.iter().map(|u| u.transfer).sum();
    if !staging.overlapped {
        return Prediction {
            step: compute + transfer,
            stall: transfer,
            compute,
            transfer,
        };
    }
    let slowed = |u: &PassUnit| PassUnit {
        compute: if u.transfer.is_zero() {
            u.compute
        } else {
            u.compute + staging.contention_of(u.bytes)
        },
        ..*u
    };
    let twice: Vec<PassUnit> = units.iter().chain(units).map(slowed).collect();
    let streamed: Vec<usize> = (0..twice.len())
        .filter(|&i| !twice[i].transfer.is_zero())
        .collect();
    let mut sim = Pass {
        units: &twice,
        streamed: &streamed,
        staging,
        ready: vec![Duration::ZERO; twice.len()],
        issued: 0,
        in_flight: Vec::new(),
        link: Duration::ZERO,
    };
    sim.issue(Duration::ZERO);
    let (mut t, mut stall) = (Duration::ZERO, Duration::ZERO);
    let mut second = (Duration::ZERO, Duration::ZERO);
    for (i, u) in twice.iter().enumerate() {
        if i == units.len() {
            second = (t, stall);
        }
        if !u.transfer.is_zero() {
            if sim.issued <= sim.position(i) {
                // Not staged (too large for the bound, or the window never reached it):
                // fetched on demand, after whatever the link is busy with.
                sim.force(i, t);
            }
            let ready = sim.ready[i];
            if ready > t {
                stall += ready - t;
                t = ready;
            }
            sim.in_flight.retain(|&j| j != i);
            sim.issue(t);
        }
        t += u.compute;
    }
    Prediction {
        step: t - second.0,
        stall: stall - second.1,
        compute,
        transfer,
    }
}

/// The link assumed between a donor and the compute device when the graph declares none:
/// 16 GB/s, about PCIe 4.0 x16 from pageable host memory.
pub(crate) const DEFAULT_LINK: ByteSize = ByteSize(16_000_000_000);

/// The donor auto ranks for: the first row other than the compute device's that takes units
/// (a donor with a quota, or the rest-taking row).
pub(crate) fn primary_donor(layout: &Layout, compute_row: usize) -> Option<usize> {
    (0..layout.rows.len()).find(|&r| r != compute_row)
}

/// A donor's declared link to the compute device, else [`DEFAULT_LINK`] with a warning.
pub(crate) fn link_of(info: &DeviceInfo, warnings: &mut Vec<Warning>) -> u64 {
    match info.link_bytes_per_sec {
        Some(b) if b.0 > 0 => b.0,
        _ => {
            let w = Warning::AssumedLink {
                device: info.id,
                bytes_per_sec: DEFAULT_LINK,
            };
            if !warnings.contains(&w) {
                warnings.push(w);
            }
            DEFAULT_LINK.0
        }
    }
}

/// Unit `u`'s transfer from `info`: measured from host memory ([`Unit::transfer`]), else its
/// bytes over the donor's link.
pub(crate) fn transfer_of(u: &Unit, info: &DeviceInfo, warnings: &mut Vec<Warning>) -> Duration {
    match u.transfer {
        Some(t) if info.id == crate::DeviceId::CPU => t,
        _ => crate::auto::transfer_time(u.bytes, link_of(info, warnings)),
    }
}

/// The pass under `assignment` (rows of `layout`), when units carry compute times.
pub(crate) fn predict(
    request: &PlanRequest,
    units: &[Unit],
    layout: &Layout,
    assignment: &[Option<usize>],
    warnings: &mut Vec<Warning>,
) -> Option<Prediction> {
    if units.iter().all(|u| u.compute.is_zero()) {
        return None;
    }
    let pass: Vec<PassUnit> = units
        .iter()
        .zip(assignment)
        .map(|(u, a)| {
            let info = &layout.rows[a.expect("every unit is assigned by now")].info;
            let transfer = if info.id == layout.compute {
                std::time::Duration::ZERO
            } else {
                transfer_of(u, info, warnings)
            };
            PassUnit {
                compute: u.compute,
                transfer,
                bytes: u.bytes,
            }
        })
        .collect();
    Some(simulate(&pass, request.staging))
}

/// The simulation's state: which streamed units are staged, when each is ready, when the
/// link is free.
struct Pass<'a> {
    units: &'a [PassUnit],
    /// Indices of the streamed units, in execution order.
    streamed: &'a [usize],
    staging: Staging,
    /// When each unit's weights are on the compute device.
    ready: Vec<Duration>,
    /// Streamed units issued so far (a prefix of `streamed`).
    issued: usize,
    /// Issued units not yet fetched.
    in_flight: Vec<usize>,
    /// When the link is next free.
    link: Duration,
}

impl Pass<'_> {
    /// Position of unit `i` in the streamed list.
    fn position(&self, i: usize) -> usize {
        self.streamed.partition_point(|&j| j < i)
    }

    /// Issues the next streamed units the limits allow, from time `now`.
    fn issue(&mut self, now: Duration) {
        while let Some(&next) = self.streamed.get(self.issued) {
            let held: ByteSize = self.in_flight.iter().map(|&j| self.units[j].bytes).sum();
            let u = &self.units[next];
            let over = held.saturating_add(u.bytes) > self.staging.bytes;
            if self.in_flight.len() >= self.staging.units.max(1) || over {
                break;
            }
            self.start(next, now);
        }
    }

    /// Unit `i`'s transfer, starting when the link is free and not before `now`.
    fn start(&mut self, i: usize, now: Duration) {
        let begin = self.link.max(now);
        self.link = begin + self.units[i].transfer;
        self.ready[i] = self.link;
        self.in_flight.push(i);
        self.issued += 1;
    }

    /// Unit `i` fetched on demand at `now`: it and any streamed unit before it not yet
    /// issued are transferred now.
    fn force(&mut self, i: usize, now: Duration) {
        while self.issued <= self.position(i) {
            let next = self.streamed[self.issued];
            self.start(next, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn unit(compute: u64, transfer: u64) -> PassUnit {
        PassUnit {
            compute: ms(compute),
            transfer: ms(transfer),
            bytes: ByteSize::mib(if transfer > 0 { 10 } else { 0 }),
        }
    }

    #[test]
    fn resident_passes_cost_their_compute() {
        let p = simulate(&[unit(3, 0), unit(4, 0)], Staging::default());
        assert_eq!((p.step, p.stall), (ms(7), ms(0)));
    }

    #[test]
    fn a_transfer_hides_behind_earlier_compute() {
        // The second unit's 5 ms transfer starts at 0 and is ready before the first unit's
        // 10 ms of compute end.
        let p = simulate(&[unit(10, 0), unit(1, 5)], Staging::default());
        assert_eq!((p.step, p.stall), (ms(11), ms(0)));
        // A first unit streamed hides behind the previous pass's last unit: its transfer
        // starts when the look-ahead wraps, during that unit's 10 ms.
        let p = simulate(&[unit(1, 5), unit(10, 0)], Staging::default());
        assert_eq!((p.step, p.stall), (ms(11), ms(0)));
        // With only its own 1 ms of compute to hide behind, the link sets the pace: 5 ms a
        // pass, 4 of them waiting.
        let p = simulate(&[unit(1, 5)], Staging::default());
        assert_eq!((p.step, p.stall), (ms(5), ms(4)));
    }

    #[test]
    fn the_look_ahead_bounds_how_early_transfers_start() {
        // Three streamed units after 30 ms of compute: with one slot, the second and third
        // transfers wait for their predecessors' fetches.
        let units = [unit(30, 0), unit(1, 10), unit(1, 10), unit(1, 10)];
        let one = Staging {
            units: 1,
            ..Staging::default()
        };
        let wide = Staging {
            units: 3,
            ..Staging::default()
        };
        assert_eq!(simulate(&units, wide).stall, ms(0));
        // One slot: unit 1 is ready at 10 (hidden); unit 2 starts at unit 1's fetch (30),
        // ready at 40: waits 9 (from 31); unit 3 starts at unit 2's fetch (40), ready at 50:
        // waits 9 (from 41). 33 ms of compute + 18 ms of stall.
        let p = simulate(&units, one);
        assert_eq!((p.stall, p.step), (ms(18), ms(51)));
    }

    #[test]
    fn transfers_on_the_compute_thread_add_up() {
        let staging = Staging {
            overlapped: false,
            ..Staging::default()
        };
        let p = simulate(&[unit(10, 0), unit(1, 5)], staging);
        assert_eq!((p.step, p.stall), (ms(16), ms(5)));
    }

    #[test]
    fn contention_slows_compute_by_the_bytes_streamed() {
        // 10 MiB streamed at 1 GiB per 1024 ms of contention: 10 ms more compute, the
        // transfer itself still hidden behind the first unit.
        let staging = Staging {
            contention: ms(1024),
            ..Staging::default()
        };
        let p = simulate(&[unit(10, 0), unit(1, 5)], staging);
        assert_eq!((p.step, p.stall), (ms(21), ms(0)));
        // Not counted where transfers are the compute thread's: they add up already.
        let p = simulate(
            &[unit(10, 0), unit(1, 5)],
            Staging {
                overlapped: false,
                ..staging
            },
        );
        assert_eq!(p.step, ms(16));
    }

    #[test]
    fn a_unit_over_the_byte_bound_is_fetched_on_demand() {
        let big = PassUnit {
            bytes: ByteSize::gib(1),
            ..unit(1, 5)
        };
        let p = simulate(&[unit(10, 0), big], Staging::default());
        assert_eq!((p.step, p.stall), (ms(16), ms(5)));
    }
}

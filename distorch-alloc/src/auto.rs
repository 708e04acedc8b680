//! [`PlacementOrder::Auto`](crate::PlacementOrder::Auto): which units to stream, chosen by
//! the clock. Movable units are ranked once, greedily: each round simulates the pass with
//! every remaining candidate streamed in addition to those already ranked, and ranks first
//! those whose transfer adds the least time per byte (ties: the larger unit). A plan streams
//! a prefix of the ranking and keeps the rest resident, so a larger budget streams a subset
//! of what a smaller one streams — and the predicted step never grows with the budget.

use std::time::Duration;

use crate::bytesize::ByteSize;
use crate::cost::{PassUnit, Staging, simulate};
use crate::inventory::Unit;

/// The time `bytes` take over a link of `bytes_per_sec`.
pub(crate) fn transfer_time(bytes: ByteSize, bytes_per_sec: u64) -> Duration {
    if bytes_per_sec == 0 {
        return Duration::MAX;
    }
    let nanos = u128::from(bytes.0) * 1_000_000_000 / u128::from(bytes_per_sec);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// The rankings auto chooses among: its own ([`stream_ranking`]), and the other orders'
/// spreads as rankings — bit-reversed (interleave's), execution order (the front first, as
/// tail streams under virtual VRAM) and its reverse (the back first). Positions in `movable`.
pub(crate) fn rankings(
    units: &[Unit],
    movable: &[usize],
    transfers: &[Duration],
    staging: Staging,
) -> Vec<Vec<usize>> {
    let n = movable.len();
    let mut out = vec![stream_ranking(units, movable, transfers, staging)];
    let spread = crate::planner::bit_reversed(n);
    for r in [spread, (0..n).collect(), (0..n).rev().collect()] {
        if !out.contains(&r) {
            out.push(r);
        }
    }
    out
}

/// `movable` (indices into `units`) ranked best-to-stream first, each streamed in its
/// `transfers` time (by unit) under `staging`. Returns positions in `movable`.
pub(crate) fn stream_ranking(
    units: &[Unit],
    movable: &[usize],
    transfers: &[Duration],
    staging: Staging,
) -> Vec<usize> {
    let mut pass: Vec<PassUnit> = units
        .iter()
        .map(|u| PassUnit {
            compute: u.compute,
            transfer: Duration::ZERO,
            bytes: u.bytes,
        })
        .collect();
    let mut remaining: Vec<usize> = (0..movable.len()).collect();
    let mut ranked = Vec::with_capacity(movable.len());
    let mut current = simulate(&pass, staging).step;
    while !remaining.is_empty() {
        let mut scored: Vec<(Duration, ByteSize, usize)> = remaining
            .iter()
            .map(|&m| {
                let u = movable[m];
                pass[u].transfer = transfers[u];
                let added = simulate(&pass, staging).step.saturating_sub(current);
                pass[u].transfer = Duration::ZERO;
                (added, units[u].bytes, m)
            })
            .collect();
        // Least added time per byte first (cross-multiplied: no floats); then larger units;
        // then execution order, for a deterministic ranking.
        scored.sort_by(|a, b| {
            let lhs = a.0.as_nanos() * u128::from(b.1.0.max(1));
            let rhs = b.0.as_nanos() * u128::from(a.1.0.max(1));
            lhs.cmp(&rhs).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2))
        });
        // A batch per round keeps large models fast; small rounds near the end keep the
        // ranking sharp where the budget usually falls.
        let batch = (remaining.len() / 16).max(1);
        for &(_, _, m) in &scored[..batch] {
            let u = movable[m];
            pass[u].transfer = transfers[u];
            ranked.push(m);
        }
        remaining.retain(|m| !ranked[ranked.len() - batch..].contains(m));
        current = simulate(&pass, staging).step;
    }
    ranked
}

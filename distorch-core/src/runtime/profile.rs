//! What the streamer records while profiling ([`crate::runtime::Streamer::set_profiling`]):
//! the moment each unit is asked for (its compute is the time until the next ask) and how long
//! each streamed unit took to stage (its transfer, where staging is host work).

use std::time::{Duration, Instant};

/// Marks of one profiling session, by unit position in the store.
#[derive(Debug, Default)]
pub(crate) struct Profile {
    /// Each fetch: the unit and when it was asked for (the device synchronized first).
    fetches: Vec<(usize, Instant)>,
    /// Each staging of a streamed unit (ahead, or on demand): the unit and how long it took.
    staging: Vec<(usize, Duration)>,
}

impl Profile {
    pub(crate) fn fetched(&mut self, unit: usize, at: Instant) {
        self.fetches.push((unit, at));
    }

    pub(crate) fn staged(&mut self, unit: usize, took: Duration) {
        self.staging.push((unit, took));
    }

    /// Each fetched unit's time until the next fetch (the last one's until `end`), summed per
    /// unit, in first-fetch order; the fetch marks are cleared.
    pub(crate) fn take_compute(&mut self, name: impl Fn(usize) -> String, end: Instant) -> Totals {
        let marks = std::mem::take(&mut self.fetches);
        let mut totals = Totals::default();
        for (k, &(i, at)) in marks.iter().enumerate() {
            let until = marks.get(k + 1).map_or(end, |m| m.1);
            totals.add(name(i), until.saturating_duration_since(at));
        }
        totals
    }

    /// Each streamed unit's staging time, summed per unit, in first-staged order; the staging
    /// marks are cleared.
    pub(crate) fn take_staging(&mut self, name: impl Fn(usize) -> String) -> Totals {
        let mut totals = Totals::default();
        for (i, took) in std::mem::take(&mut self.staging) {
            totals.add(name(i), took);
        }
        totals
    }
}

/// Durations summed by unit name, in first-seen order.
#[derive(Debug, Default)]
pub(crate) struct Totals(pub(crate) Vec<(String, Duration)>);

impl Totals {
    fn add(&mut self, name: String, d: Duration) {
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some((_, t)) => *t += d,
            None => self.0.push((name, d)),
        }
    }
}

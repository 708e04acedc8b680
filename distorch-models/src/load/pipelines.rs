//! Whole pipelines through the model cache ([`Models`]): the pipeline loaded from the same,
//! unchanged files with the same options is shared; another is loaded after DisTorch2's
//! `eject_models` has unloaded what holds weights on its compute devices.

use std::sync::Arc;

use distorch_alloc::{ByteSize, DeviceGraph, DeviceId, Plan, PlanRequest};
use distorch_core::runtime::EjectPolicy;

use crate::error::Error;
use crate::load::Models;

/// What a cached pipeline load needs besides the loader.
pub(crate) struct CachedLoad<'a> {
    cache: &'a mut Models,
    /// Every component's cache key, joined.
    key: String,
    /// The components' compute devices.
    computes: Vec<DeviceId>,
    /// The devices plans may use (their free memory bounds nothing when ejecting all).
    graph: &'a DeviceGraph,
    /// DisTorch2's `eject_models`.
    eject_models: bool,
}

impl<'a> CachedLoad<'a> {
    /// A pipeline `family` (`sd`, `wan`, `flux`) whose components have the cache keys
    /// `keys` and are planned by `requests` on `graph`.
    pub(crate) fn new<'r>(
        cache: &'a mut Models,
        family: &str,
        keys: &[String],
        requests: impl IntoIterator<Item = &'r PlanRequest>,
        graph: &'a DeviceGraph,
        eject_models: bool,
    ) -> CachedLoad<'a> {
        CachedLoad {
            cache,
            key: format!("{family}:{}", keys.join("|")),
            computes: requests
                .into_iter()
                .filter_map(PlanRequest::compute)
                .collect(),
            graph,
            eject_models,
        }
    }

    /// The cached pipeline, or `load`'s (its components' plans give the bytes per device the
    /// cache records).
    pub(crate) fn get_or_load<P: Send + Sync + 'static>(
        self,
        load: impl FnOnce() -> Result<(P, Vec<Plan>), Error>,
    ) -> Result<Arc<P>, Error> {
        if let Some(hit) = self.cache.get(&self.key).and_then(|m| m.downcast().ok()) {
            tracing::debug!("pipeline cached");
            return Ok(hit);
        }
        if self.eject_models {
            let mut devices = self.computes;
            devices.sort();
            devices.dedup();
            for d in devices {
                let capacity = self.graph.get(d).map_or(ByteSize(u64::MAX), |i| i.free);
                self.cache
                    .make_room(d, ByteSize(0), capacity, EjectPolicy::EjectAll)?;
            }
        }
        let (pipeline, plans) = load()?;
        let pipeline = Arc::new(pipeline);
        self.cache
            .insert(self.key, pipeline.clone(), &bytes_per_device(&plans));
        Ok(pipeline)
    }
}

/// The model bytes the plans put on each device, summed.
fn bytes_per_device(plans: &[Plan]) -> Vec<(DeviceId, ByteSize)> {
    let mut bytes: Vec<(DeviceId, ByteSize)> = Vec::new();
    for row in plans.iter().flat_map(|p| p.devices()) {
        match bytes.iter_mut().find(|(d, _)| *d == row.device) {
            Some((_, total)) => *total = total.saturating_add(row.model_bytes),
            None => bytes.push((row.device, row.model_bytes)),
        }
    }
    bytes
}

//! [`ModelCache`]: loaded models per device, with DisTorch2's `eject_models` semantics made
//! real.

use std::collections::BTreeMap;
use std::sync::Arc;

use distorch_alloc::{ByteSize, DeviceId};

use crate::error::Error;

/// What to do with cached models before loading another onto a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EjectPolicy {
    /// `eject_models = true` (the loaders' default): unload every cached model that holds
    /// weights on the target device, whether or not the new one would fit.
    #[default]
    EjectAll,
    /// `eject_models = false`: evict least-recently-used models holding weights on the device,
    /// only as many as needed for the new one to fit.
    EvictLeastRecentlyUsed,
}

struct Entry<M: ?Sized> {
    id: String,
    model: Arc<M>,
    bytes: BTreeMap<DeviceId, ByteSize>,
    last_used: u64,
}

/// Loaded models, keyed by an id of the caller's choosing (a path and its allocation, say),
/// with the bytes each holds on each device.
///
/// `M` may be unsized: `ModelCache<dyn Any + Send + Sync>` holds models of several types
/// (what the model loaders share).
///
/// Removing a model from the cache drops the cache's handle; its memory is freed when the
/// last handle (`Arc`) a caller holds is dropped too.
pub struct ModelCache<M: ?Sized> {
    entries: Vec<Entry<M>>,
    clock: u64,
}

impl<M: ?Sized> Default for ModelCache<M> {
    fn default() -> Self {
        ModelCache {
            entries: Vec::new(),
            clock: 0,
        }
    }
}

impl<M: ?Sized> ModelCache<M> {
    /// An empty cache.
    pub fn new() -> Self {
        ModelCache::default()
    }

    /// The model cached under `id`, marking it used.
    pub fn get(&mut self, id: &str) -> Option<Arc<M>> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.iter_mut().find(|e| e.id == id).map(|e| {
            e.last_used = clock;
            Arc::clone(&e.model)
        })
    }

    /// Caches `model` under `id` (replacing a model with the same id) with the bytes it holds
    /// per device.
    pub fn insert(&mut self, id: impl Into<String>, model: Arc<M>, bytes: &[(DeviceId, ByteSize)]) {
        let id = id.into();
        self.entries.retain(|e| e.id != id);
        self.clock += 1;
        self.entries.push(Entry {
            id,
            model,
            bytes: bytes.iter().copied().collect(),
            last_used: self.clock,
        });
    }

    /// Removes a model; returns whether it was there.
    pub fn remove(&mut self, id: &str) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| e.id != id);
        self.entries.len() != before
    }

    /// Ids of the cached models, least recently used first.
    pub fn ids(&self) -> Vec<&str> {
        let mut e: Vec<&Entry<M>> = self.entries.iter().collect();
        e.sort_by_key(|e| e.last_used);
        e.into_iter().map(|e| e.id.as_str()).collect()
    }

    /// Bytes cached models hold on `device`.
    pub fn bytes_on(&self, device: DeviceId) -> ByteSize {
        self.entries
            .iter()
            .filter_map(|e| e.bytes.get(&device).copied())
            .sum()
    }

    /// Makes room on `device` for a model that needs `needed` bytes there, given `capacity`:
    /// the bytes the device offers to models (cached ones included). Applies `policy` and
    /// returns the ids it unloaded, or [`Error::WontFit`] when even after unloading the model
    /// cannot fit (the models already unloaded stay unloaded).
    pub fn make_room(
        &mut self,
        device: DeviceId,
        needed: ByteSize,
        capacity: ByteSize,
        policy: EjectPolicy,
    ) -> Result<Vec<String>, Error> {
        let mut ejected = Vec::new();
        let holds = |e: &Entry<M>| e.bytes.get(&device).is_some_and(|b| b.bytes() > 0);
        match policy {
            EjectPolicy::EjectAll => {
                let (gone, kept): (Vec<_>, Vec<_>) = self.entries.drain(..).partition(holds);
                self.entries = kept;
                ejected.extend(gone.into_iter().map(|e| e.id));
            }
            EjectPolicy::EvictLeastRecentlyUsed => {
                while self.bytes_on(device).saturating_add(needed) > capacity {
                    let Some(lru) = self
                        .entries
                        .iter()
                        .enumerate()
                        .filter(|(_, e)| holds(e))
                        .min_by_key(|(_, e)| e.last_used)
                        .map(|(i, _)| i)
                    else {
                        break;
                    };
                    ejected.push(self.entries.remove(lru).id);
                }
            }
        }
        for id in &ejected {
            tracing::info!(%device, model = id.as_str(), "ejected");
        }
        let available = capacity.saturating_sub(self.bytes_on(device));
        if needed > available {
            return Err(Error::WontFit {
                device,
                needed,
                available,
            });
        }
        Ok(ejected)
    }
}

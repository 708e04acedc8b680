//! Re-patching a loaded store from pristine weights: [`WeightStore::repatch`].

use std::collections::{BTreeSet, HashMap};

use burn::tensor::backend::Backend;
use distorch_alloc::ByteSize;

use crate::error::Error;
use crate::runtime::backend::DonorCopy;
use crate::runtime::load::{Fingerprint, Home, Loader, unit_bytes};
use crate::runtime::store::{DeviceMap, LoadOptions, LoadReport, Stored, WeightPatch, WeightStore};

/// A tensor's home, owning its device (a donor's device comes from its tensor).
enum Owned<B: Backend> {
    Compute,
    Donor(B::Device, DonorCopy),
    Host,
}

impl<B: Backend> WeightStore<B> {
    /// A copy of this store in which the tensors `keys` are read again from the weights
    /// file — pristine, whatever earlier patches did — then `patch` is applied to them as
    /// [`WeightStore::load`] applies it (on the compute device at f32, rounded to the
    /// storage dtype, sent to the same home). Every other tensor is shared with this store,
    /// not copied. A key the patch does not change gets its file bytes back: at a host home
    /// it is borrowed from the mapping again.
    ///
    /// This is how a LoRA's strength changes without a reload: `keys` are the tensors the
    /// old and the new patch touch. Nothing changes unless every key is re-read and
    /// patched: an unknown key or a weights file modified since loading is an error before
    /// anything is read.
    pub fn repatch(
        &self,
        patch: Option<&dyn WeightPatch<B>>,
        keys: &[String],
    ) -> Result<(WeightStore<B>, LoadReport), Error> {
        let mut at = HashMap::new();
        for (u, unit) in self.units.iter().enumerate() {
            for (t, tensor) in unit.tensors.iter().enumerate() {
                at.insert(tensor.name.as_str(), (u, t));
            }
        }
        let keys: BTreeSet<&str> = keys.iter().map(String::as_str).collect();
        let mut todo = Vec::with_capacity(keys.len());
        for key in keys {
            let &(u, t) = at.get(key).ok_or_else(|| Error::UnknownTensor {
                key: key.to_owned(),
            })?;
            let tensor = &self.units[u].tensors[t];
            if self.units[u].scales.iter().any(|&(w, _)| w == t) {
                return Err(Error::ScaledFp8 {
                    path: self.files[tensor.origin.shard].clone(),
                    name: key.to_owned(),
                    reason: crate::runtime::load::SCALED_FP8_PATCH,
                });
            }
            let home = match &tensor.data {
                Stored::Device(_) => Owned::<B>::Compute,
                Stored::Donor(d, copy) => Owned::Donor(d.device(), *copy),
                Stored::Host(_) => Owned::Host,
            };
            todo.push((u, t, home));
        }
        let mut shards: Vec<usize> = todo
            .iter()
            .map(|&(u, t, _)| self.units[u].tensors[t].origin.shard)
            .collect();
        shards.sort_unstable();
        shards.dedup();
        for s in shards {
            let path = &self.files[s];
            if Fingerprint::of(path)? != self.fingerprints[s] {
                return Err(Error::SourceChanged { path: path.clone() });
            }
        }

        let devices = DeviceMap::new(self.compute.clone());
        let options = LoadOptions {
            patch,
            // Checked when loaded, and the file is unchanged since.
            check_finite: false,
            precision: self.precision,
            compute: self.compute_dtype,
            ..LoadOptions::default()
        };
        let mut loader = Loader::new(
            &self.files,
            &devices,
            &options,
            self.rule,
            LoadReport::default(),
        );
        let mut fresh = Vec::with_capacity(todo.len());
        for (u, t, home) in &todo {
            let old = &self.units[*u].tensors[*t];
            let home = match home {
                Owned::Compute => Home::Compute,
                Owned::Donor(d, copy) => Home::Donor(d, *copy),
                Owned::Host => Home::Host,
            };
            fresh.push(loader.tensor(&old.origin, &old.name, home)?);
        }

        let mut store = self.clone();
        for ((u, t, _), tensor) in todo.iter().zip(fresh) {
            store.units[*u].tensors[*t] = tensor;
        }
        let mut touched: Vec<usize> = todo.iter().map(|(u, _, _)| *u).collect();
        touched.sort_unstable();
        touched.dedup();
        for u in touched {
            let unit = &mut store.units[u];
            let (bytes, upload) = unit_bytes(&unit.tensors);
            unit.bytes = ByteSize(bytes);
            unit.upload_bytes = ByteSize(upload);
        }
        let mut report = loader.report;
        report.tensors = todo.len();
        tracing::info!(
            tensors = report.tensors,
            patched = report.patched.len(),
            read = %report.bytes_read,
            "re-patched"
        );
        Ok((store, report))
    }
}

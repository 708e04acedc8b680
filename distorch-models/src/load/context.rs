//! [`LoadContext`]: what a model's loader is given — the opened file, the component, its plan
//! and devices, how to load — and the step every loader ends with: the weights placed and a
//! streamer over them.

use std::sync::Arc;

use burn::tensor::backend::Backend;
use distorch_alloc::Plan;
use distorch_core::runtime::{
    DeviceMap, ExecutionOrder, ExpectedTensor, LoadOptions, LoadReport, Lookahead, Streamer,
    WeightStore,
};
use distorch_core::{Component, SafetensorsIndex};

use crate::error::Error;
use crate::load::shapes::units_in_order;

/// Everything a [`Model`](crate::Model) needs to load its weights: the loaders build it
/// after planning; tests and benchmarks that place weights by hand build it themselves.
pub struct LoadContext<'a, B: Backend> {
    /// The opened weights file (or shard set).
    pub index: &'a SafetensorsIndex,
    /// The component's tensors in it.
    pub component: &'a Component<'a>,
    /// Where each unit goes.
    pub plan: &'a Plan,
    /// The Burn devices the plan's device ids stand for.
    pub devices: &'a DeviceMap<B>,
    /// Finite checks, patches, the compute dtype (see [`LoadOptions`]).
    pub options: &'a LoadOptions<'a, B>,
    /// The streamer's staging look-ahead.
    pub lookahead: Lookahead,
}

impl<B: Backend> LoadContext<'_, B> {
    /// Places the `expected` tensors (each checked by name and shape; see
    /// [`WeightStore::load`]) and starts a streamer whose look-ahead follows `order`.
    pub(crate) fn stream(
        &self,
        expected: &[ExpectedTensor],
        order: impl FnOnce(&WeightStore<B>) -> ExecutionOrder,
    ) -> Result<(Arc<Streamer<B>>, LoadReport), Error> {
        let options = self.options.expecting(expected);
        let (store, report) = WeightStore::load(
            self.index,
            self.component,
            self.plan,
            self.devices,
            &options,
        )?;
        let order = order(&store);
        let streamer = Streamer::with_order(Arc::new(store), self.lookahead, order)?;
        Ok((Arc::new(streamer), report))
    }

    /// [`LoadContext::stream`] in the order the `expected` tensors are listed (as the
    /// forward pass uses them).
    pub(crate) fn stream_declared(
        &self,
        expected: &[ExpectedTensor],
    ) -> Result<(Arc<Streamer<B>>, LoadReport), Error> {
        let order = ExecutionOrder::Declared(units_in_order(expected));
        self.stream(expected, |_| order)
    }

    /// [`LoadContext::stream`] with the order recorded during the first pass.
    pub(crate) fn stream_recorded(
        &self,
        expected: &[ExpectedTensor],
    ) -> Result<(Arc<Streamer<B>>, LoadReport), Error> {
        self.stream(expected, |_| ExecutionOrder::Record)
    }
}

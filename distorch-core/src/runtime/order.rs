//! The order in which a forward pass asks for units, which the streamer's look-ahead follows:
//! declared by the model, recorded during the first pass, or the plan's.

/// The order in which a forward pass asks for units, which the look-ahead follows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ExecutionOrder {
    /// The plan's order (the store's), which follows key names.
    Plan,
    /// Recorded during the first pass (until a unit is asked for a second time, or
    /// [`Streamer::take_stats`](crate::runtime::Streamer::take_stats)); the plan's order is followed until then. Units the first
    /// pass never asked for keep their plan order, after the recorded ones.
    #[default]
    Record,
    /// Declared by the model: unit names in the order its forward pass uses them.
    Declared(Vec<String>),
}

/// The look-ahead's order: `order[k]` is a unit index, `pos[i]` its place in `order`.
pub(crate) struct Order {
    pub(crate) order: Vec<usize>,
    pub(crate) pos: Vec<usize>,
    /// Units seen so far while recording; `None` once the order is fixed.
    recording: Option<(Vec<usize>, Vec<bool>)>,
}

impl Order {
    pub(crate) fn new(order: Vec<usize>, record: bool) -> Order {
        let mut pos = vec![0; order.len()];
        for (k, &i) in order.iter().enumerate() {
            pos[i] = k;
        }
        let n = order.len();
        Order {
            order,
            pos,
            recording: record.then(|| (Vec::new(), vec![false; n])),
        }
    }

    /// Notes a fetch of unit `i`; a unit seen before ends the recording.
    pub(crate) fn note(&mut self, i: usize) {
        let Some((seen, mask)) = &mut self.recording else {
            return;
        };
        if mask[i] {
            self.finish();
        } else {
            mask[i] = true;
            seen.push(i);
        }
    }

    pub(crate) fn finish(&mut self) {
        let Some((mut seen, mask)) = self.recording.take() else {
            return;
        };
        if seen.is_empty() {
            self.recording = Some((seen, mask));
            return;
        }
        seen.extend(self.order.iter().copied().filter(|&i| !mask[i]));
        tracing::debug!(units = seen.len(), "execution order recorded");
        *self = Order::new(seen, false);
    }
}

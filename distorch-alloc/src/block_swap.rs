//! Block swap for transformer models (DiTs): the last `to_swap` blocks of each of a model's
//! block lists (Wan's `blocks.`; FLUX's double- and single-stream blocks) live on a swap
//! device and are streamed in when used; everything else stays on the compute device (unless
//! named for offloading, as the text and image embedders may be).

use crate::device::DeviceId;
use crate::error::Error;
use crate::graph::DeviceGraph;
use crate::inventory::Inventory;
use crate::plan::{Plan, Quota};
use crate::planner::{Layout, RowSpec, finish};
use crate::request::PlanRequest;

/// Which blocks and units go to the swap device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSwap {
    /// The compute device.
    pub compute: DeviceId,
    /// Where swapped blocks live (`cpu` or another GPU).
    pub swap_device: DeviceId,
    /// The model's block lists, each with how many of its blocks are swapped.
    pub lists: Vec<BlockList>,
    /// Prefixes of other units moved to the swap device too (the text embedder for
    /// `offload_txt_emb`, the image embedder for `offload_img_emb`).
    pub offload: Vec<String>,
}

/// One list of transformer blocks: units named `{prefix}{N}.…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockList {
    /// The prefix of the block units, followed by the block number and a dot (`blocks.`).
    pub prefix: String,
    /// How many blocks, counted from the last one, live on the swap device.
    pub to_swap: usize,
}

impl BlockSwap {
    /// The last `blocks_to_swap` of the units under `blocks.N.` on `swap_device`.
    pub fn new(compute: DeviceId, swap_device: DeviceId, blocks_to_swap: usize) -> BlockSwap {
        BlockSwap::of_lists(compute, swap_device, [("blocks.", blocks_to_swap)])
    }

    /// The last blocks of each list — `(prefix, blocks to swap)` — on `swap_device` (FLUX:
    /// `[("double_blocks.", n), ("single_blocks.", m)]`).
    pub fn of_lists<S: Into<String>>(
        compute: DeviceId,
        swap_device: DeviceId,
        lists: impl IntoIterator<Item = (S, usize)>,
    ) -> BlockSwap {
        BlockSwap {
            compute,
            swap_device,
            lists: lists
                .into_iter()
                .map(|(prefix, to_swap)| BlockList {
                    prefix: prefix.into(),
                    to_swap,
                })
                .collect(),
            offload: Vec::new(),
        }
    }

    /// Also moves the units under `prefix` to the swap device.
    pub fn offloading(mut self, prefix: impl Into<String>) -> BlockSwap {
        self.offload.push(prefix.into());
        self
    }
}

impl BlockList {
    /// The block number of a unit, if it is in a block of this list.
    fn block_of(&self, unit: &str) -> Option<usize> {
        let rest = unit.strip_prefix(&self.prefix)?;
        let (n, _) = rest.split_once('.').unwrap_or((rest, ""));
        n.parse().ok()
    }

    /// The first swapped block of this list in `inventory`.
    fn first_swapped(&self, inventory: &Inventory) -> Result<usize, Error> {
        let blocks = inventory
            .units()
            .iter()
            .filter_map(|u| self.block_of(&u.name))
            .max()
            .map_or(0, |m| m + 1);
        if blocks == 0 {
            return Err(Error::BlockSwap {
                reason: format!(
                    "the {} has no units under `{}N.`: block swap is for transformer blocks",
                    inventory.component(),
                    self.prefix
                ),
            });
        }
        if self.to_swap > blocks {
            return Err(Error::BlockSwap {
                reason: format!(
                    "{} blocks to swap under `{}N.` but the {} has {blocks} blocks",
                    self.to_swap,
                    self.prefix,
                    inventory.component()
                ),
            });
        }
        Ok(blocks - self.to_swap)
    }
}

/// Places `inventory` as `swap` says: swapped blocks and offloaded units on the swap device,
/// the rest on the compute device (pinned units stay there whatever the request's pinning,
/// except inside a swapped block, which moves whole).
pub(crate) fn plan(
    swap: &BlockSwap,
    request: &PlanRequest,
    inventory: &Inventory,
    graph: &DeviceGraph,
) -> Result<Plan, Error> {
    let compute = graph.require(swap.compute, "compute device")?;
    let device = graph.require(swap.swap_device, "swap device")?;
    if swap.swap_device == swap.compute {
        return Err(Error::BlockSwap {
            reason: format!("the swap device `{}` is the compute device", swap.compute),
        });
    }
    let units = inventory.units();
    let first: Vec<usize> = swap
        .lists
        .iter()
        .map(|l| l.first_swapped(inventory))
        .collect::<Result<_, _>>()?;
    let mut assignment = Vec::with_capacity(units.len());
    let mut pinned = Vec::with_capacity(units.len());
    for u in units {
        let in_swapped_block = swap
            .lists
            .iter()
            .zip(&first)
            .any(|(l, &f)| l.block_of(&u.name).is_some_and(|b| b >= f));
        let swapped =
            in_swapped_block || swap.offload.iter().any(|p| u.name.starts_with(p.as_str()));
        assignment.push(Some(usize::from(swapped)));
        pinned.push(false);
    }
    let layout = Layout {
        rows: vec![
            RowSpec::new(*compute, Quota::Rest),
            RowSpec::new(*device, Quota::Bytes(device.free)),
        ],
        compute: swap.compute,
        sink: Some(0),
        vv_budget: None,
        cpu_default: false,
    };
    finish(
        request,
        inventory,
        layout,
        0,
        &assignment,
        &pinned,
        Vec::new(),
    )
}

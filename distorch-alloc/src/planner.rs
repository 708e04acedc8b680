//! The planner: `(request, inventory, device graph) -> Plan`. Pure and deterministic.
//!
//! 1. Resolve the compute device and check every named device is in the graph.
//! 2. Pin norms, lone biases, embeddings (by policy) and units under the tiny threshold to
//!    the compute device; they count against its quota first.
//! 3. Turn the allocation into rows with byte budgets; exactly one row may take the rest.
//! 4. Deal the movable units: rows with a budget in order, each first-fit (interleave) or
//!    contiguously (tail) up to its budget; the rest-taking row gets what is left.
//! 5. Check that no device receives more than its free memory.

use crate::bytesize::ByteSize;
use crate::device::DeviceId;
use crate::error::Error;
use crate::graph::{DeviceGraph, DeviceInfo};
use crate::inventory::{Inventory, Unit, UnitKind};
use crate::number::mul_div_floor;
use crate::plan::{DeviceRow, PlacedUnit, Plan, Quota, Role, Warning};
use crate::request::{
    Allocation, EmbeddingPolicy, PinPolicy, PlacementOrder, PlanRequest, VirtualVram,
};
use crate::spec::{AllocSpec, Mode, Value};

/// Plans where every unit of `inventory` lives. See the module docs for the steps and the
/// crate docs for the rules.
pub fn plan(
    request: &PlanRequest,
    inventory: &Inventory,
    graph: &DeviceGraph,
) -> Result<Plan, Error> {
    let units = inventory.units();
    let pinned: Vec<bool> = units.iter().map(|u| is_pinned(u, &request.pin)).collect();
    // Pinned units live on the compute device: at their device size.
    let pinned_bytes: ByteSize = units
        .iter()
        .zip(&pinned)
        .filter(|(_, p)| **p)
        .map(|(u, _)| u.device_bytes)
        .sum();
    let movable: Vec<usize> = (0..units.len()).filter(|&i| !pinned[i]).collect();
    // Virtual VRAM is counted at the donors, like DisTorch2's (the model bytes they take);
    // donors in host memory hold a unit at its host size.
    let movable_bytes: ByteSize = movable.iter().map(|&i| units[i].bytes).sum();

    let mut warnings = Vec::new();
    let layout = match &request.allocation {
        Allocation::Expert { spec, compute } => expert_layout(spec, *compute, inventory, graph)?,
        Allocation::VirtualVram(vv) => vv_layout(vv, movable_bytes, graph, &mut warnings)?,
        Allocation::BlockSwap(swap) => {
            return crate::block_swap::plan(swap, request, inventory, graph);
        }
    };
    let compute_row = layout
        .rows
        .iter()
        .position(|r| r.info.id == layout.compute)
        .expect("layout always has a compute row");
    let deal = Deal {
        units,
        movable: &movable,
        pinned: &pinned,
        pinned_bytes,
        layout: &layout,
        compute_row,
        order: request.order,
    };
    let assignment = match request.order {
        PlacementOrder::Auto => {
            let donor = crate::cost::primary_donor(&layout, compute_row);
            let transfers: Vec<_> = units
                .iter()
                .map(|u| match donor {
                    Some(r) => crate::cost::transfer_of(u, &layout.rows[r].info, &mut warnings),
                    None => crate::auto::transfer_time(u.bytes, crate::cost::DEFAULT_LINK.0),
                })
                .collect();
            let rankings = crate::auto::rankings(units, &movable, &transfers, request.staging);
            deal.fastest(request, &rankings, &mut warnings, inventory)?
        }
        order => deal.run(
            &visiting_order(order, movable.len()),
            &mut warnings,
            inventory,
        )?,
    };

    finish(
        request,
        inventory,
        layout,
        compute_row,
        &assignment,
        &pinned,
        warnings,
    )
}

/// Rows for virtual VRAM: the compute device takes the rest; donors follow in order, each
/// capped by its free memory, all together by the bytes to move.
fn vv_layout(
    vv: &VirtualVram,
    movable_bytes: ByteSize,
    graph: &DeviceGraph,
    warnings: &mut Vec<Warning>,
) -> Result<Layout, Error> {
    let compute = graph.require(vv.compute(), "compute device")?;
    let to_move = vv.amount().min(movable_bytes);
    if vv.amount() > movable_bytes {
        warnings.push(Warning::VirtualVramAboveModel {
            requested: vv.amount(),
            movable: movable_bytes,
        });
    }
    let mut rows = vec![RowSpec::new(*compute, Quota::Rest)];
    let mut available = ByteSize::ZERO;
    for &d in vv.donors() {
        let info = graph.require(d, "donor list")?;
        available = available.saturating_add(info.free);
        rows.push(RowSpec::new(*info, Quota::Bytes(info.free)));
    }
    if available < to_move {
        return Err(Error::DonorsTooSmall {
            donors: vv.donors().to_vec(),
            needed: to_move,
            available,
            missing: to_move.saturating_sub(available),
        });
    }
    Ok(Layout {
        rows,
        compute: vv.compute(),
        sink: Some(0),
        // The donors take up to the amount asked for, each unit at its size there: a unit
        // may be larger on a GPU donor than in host memory, so the amount is not capped at
        // the model's host bytes (everything movable still fits when it was asked for).
        vv_budget: Some(vv.amount()),
        cpu_default: false,
    })
}

/// Deals movable units to every row with a quota, in row order; the rest-taking row waits.
fn deal_budgets(
    layout: &Layout,
    compute_row: usize,
    pinned_bytes: ByteSize,
    order: PlacementOrder,
    dealer: &mut Dealer<'_>,
    warnings: &mut Vec<Warning>,
) {
    let mut vv_left = layout.vv_budget;
    for (r, row) in layout.rows.iter().enumerate() {
        let Quota::Bytes(quota) = row.quota else {
            continue;
        };
        let mut budget = quota.min(row.info.free);
        if quota > row.info.free && layout.vv_budget.is_none() {
            warnings.push(Warning::QuotaAboveFree {
                device: row.info.id,
                quota,
                free: row.info.free,
            });
        }
        if r == compute_row {
            if pinned_bytes > quota {
                warnings.push(Warning::PinnedOverQuota {
                    device: row.info.id,
                    pinned: pinned_bytes,
                    quota,
                });
            }
            budget = budget.saturating_sub(pinned_bytes);
        }
        if let Some(left) = vv_left {
            budget = budget.min(left);
        }
        let taken = dealer.deal(r, row.info.id, budget, order);
        vv_left = vv_left.map(|l| l.saturating_sub(taken));
    }
}

/// Everything dealing needs besides the visiting order.
struct Deal<'a> {
    units: &'a [Unit],
    movable: &'a [usize],
    pinned: &'a [bool],
    pinned_bytes: ByteSize,
    layout: &'a Layout,
    compute_row: usize,
    order: PlacementOrder,
}

impl Deal<'_> {
    /// Every unit's row when movable units are visited in `visit` order: the rows with a
    /// budget in order, the rest-taking row the remainder, pinned units the compute row.
    fn run(
        &self,
        visit: &[usize],
        warnings: &mut Vec<Warning>,
        inventory: &Inventory,
    ) -> Result<Vec<Option<usize>>, Error> {
        let mut assignment: Vec<Option<usize>> = vec![None; self.units.len()];
        let mut dealer = Dealer {
            units: self.units,
            compute: self.layout.compute,
            movable: self.movable,
            visit,
            assignment: &mut assignment,
            cursor: 0,
        };
        deal_budgets(
            self.layout,
            self.compute_row,
            self.pinned_bytes,
            self.order,
            &mut dealer,
            warnings,
        );
        let (leftover_units, leftover_bytes) = dealer.leftovers();
        if leftover_units > 0 {
            let Some(sink) = self.layout.sink else {
                return Err(Error::Unplaced {
                    placed: inventory.total_bytes().saturating_sub(leftover_bytes),
                    total: inventory.total_bytes(),
                    unplaced: leftover_bytes,
                    units: leftover_units,
                });
            };
            dealer.give_rest(sink);
        }
        for (i, p) in self.pinned.iter().enumerate() {
            if *p {
                assignment[i] = Some(self.compute_row);
            }
        }
        Ok(assignment)
    }

    /// Auto: the assignment of the ranking whose pass is predicted fastest (the first on a
    /// tie). Each ranking's plans are nested in the budget, so the fastest of them is never
    /// slower with more room.
    fn fastest(
        &self,
        request: &PlanRequest,
        rankings: &[Vec<usize>],
        warnings: &mut Vec<Warning>,
        inventory: &Inventory,
    ) -> Result<Vec<Option<usize>>, Error> {
        let mut best: Option<(std::time::Duration, Vec<Option<usize>>, Vec<Warning>)> = None;
        let mut first_error = None;
        for visit in rankings {
            let mut w = warnings.clone();
            match self.run(visit, &mut w, inventory) {
                Ok(a) => {
                    let step =
                        crate::cost::predict(request, self.units, self.layout, &a, &mut Vec::new())
                            .map_or(std::time::Duration::ZERO, |p| p.step);
                    if best.as_ref().is_none_or(|(b, _, _)| step < *b) {
                        best = Some((step, a, w));
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match (best, first_error) {
            (Some((_, a, w)), _) => {
                *warnings = w;
                Ok(a)
            }
            (None, Some(e)) => Err(e),
            (None, None) => Ok(vec![Some(self.compute_row); self.units.len()]),
        }
    }
}

fn is_pinned(unit: &Unit, pin: &PinPolicy) -> bool {
    match unit.kind {
        UnitKind::Norm | UnitKind::Bias => true,
        UnitKind::Embedding if pin.embeddings == EmbeddingPolicy::Pinned => true,
        _ => unit.device_bytes < pin.tiny_threshold,
    }
}

/// One device row before units are dealt.
pub(crate) struct RowSpec {
    pub(crate) info: DeviceInfo,
    quota: Quota,
}

impl RowSpec {
    pub(crate) fn new(info: DeviceInfo, quota: Quota) -> RowSpec {
        RowSpec { info, quota }
    }
}

pub(crate) struct Layout {
    pub(crate) rows: Vec<RowSpec>,
    pub(crate) compute: DeviceId,
    pub(crate) sink: Option<usize>,
    /// Virtual VRAM only: the bytes all donors together may take.
    pub(crate) vv_budget: Option<ByteSize>,
    /// The rest-taking row is `cpu`, appended because the allocation had no `*`.
    pub(crate) cpu_default: bool,
}

/// Rows for an expert allocation: entries in order, compute first if the string does not
/// name it, `cpu` appended as the remainder device when there is no `*` (bytes and fraction
/// modes, when `cpu` is not named); in ratio mode without `*` the last entry takes the rest.
fn expert_layout(
    spec: &AllocSpec,
    compute: Option<DeviceId>,
    inventory: &Inventory,
    graph: &DeviceGraph,
) -> Result<Layout, Error> {
    let first = spec.entries().first().ok_or(Error::EmptyAllocation)?;
    let compute = compute.unwrap_or(first.device);
    // A ratio is a share of the model at the size it has on that device.
    let model_total = |device: DeviceId| inventory.bytes_on(device, compute);
    let compute_info = *graph.require(compute, "compute device")?;
    let ratio = if spec.mode() == Some(Mode::Ratio) {
        let (weights, sum, scale) = spec
            .ratio_weights()
            .expect("a parsed spec's ratios fit (checked when parsing)");
        // With a `*`, ratios are percentages of the model; without, shares of their sum.
        let whole = if spec.star().is_some() {
            100 * 10u128.pow(scale)
        } else {
            sum
        };
        Some((weights, whole))
    } else {
        None
    };
    let mut rows = Vec::with_capacity(spec.entries().len() + 2);
    let mut sink = None;
    for (i, e) in spec.entries().iter().enumerate() {
        let info = *graph.require(e.device, "allocation")?;
        let quota = match e.value {
            Value::Star => {
                sink = Some(i);
                Quota::Rest
            }
            Value::Bytes(b) => Quota::Bytes(b),
            Value::Fraction(f) => {
                let q = f.mul_floor(u128::from(info.total.0)).unwrap_or(u128::MAX);
                Quota::Bytes(ByteSize(u64::try_from(q).unwrap_or(u64::MAX)))
            }
            Value::Ratio(_) => {
                let (weights, whole) = ratio.as_ref().expect("ratio mode");
                let w = weights[i].unwrap_or(0);
                let total = model_total(e.device);
                let q = mul_div_floor(u128::from(total.0), w, *whole).unwrap_or(0);
                Quota::Bytes(ByteSize(u64::try_from(q).unwrap_or(u64::MAX)))
            }
        };
        rows.push(RowSpec::new(info, quota));
    }
    if sink.is_none() && ratio.is_some() {
        let last = rows.len() - 1;
        rows[last].quota = Quota::Rest;
        sink = Some(last);
    }
    let mut cpu_default = false;
    if sink.is_none()
        && !spec.contains(DeviceId::CPU)
        && let Some(cpu) = graph.get(DeviceId::CPU)
    {
        rows.push(RowSpec::new(*cpu, Quota::Rest));
        sink = Some(rows.len() - 1);
        cpu_default = true;
    }
    if !spec.contains(compute) {
        rows.insert(0, RowSpec::new(compute_info, Quota::Bytes(ByteSize::ZERO)));
        sink = sink.map(|s| s + 1);
    }
    Ok(Layout {
        rows,
        compute,
        sink,
        vv_budget: None,
        cpu_default,
    })
}

/// The order in which rows look at movable units (indices into the movable list).
fn visiting_order(order: PlacementOrder, n: usize) -> Vec<usize> {
    match order {
        PlacementOrder::Tail | PlacementOrder::Auto => (0..n).collect(),
        PlacementOrder::Interleave => bit_reversed(n),
    }
}

/// The bit-reversal permutation of `0..n`: every prefix is spread evenly over `0..n`.
pub(crate) fn bit_reversed(n: usize) -> Vec<usize> {
    let bits = usize::BITS - n.saturating_sub(1).leading_zeros();
    let mut out = Vec::with_capacity(n);
    for i in 0..(1usize << bits) {
        let j = if bits == 0 {
            0
        } else {
            i.reverse_bits() >> (usize::BITS - bits)
        };
        if j < n {
            out.push(j);
        }
    }
    out
}

/// Deals movable units to rows.
struct Dealer<'a> {
    units: &'a [Unit],
    /// The compute device (a unit's size depends on where it goes, [`Unit::bytes_on`]).
    compute: DeviceId,
    movable: &'a [usize],
    visit: &'a [usize],
    assignment: &'a mut [Option<usize>],
    /// Tail order: position in `movable` where the next row starts.
    cursor: usize,
}

impl Dealer<'_> {
    /// Gives `row` (on `device`) units up to `budget` bytes, each counted at its size there
    /// ([`Unit::bytes_on`]); returns the bytes given.
    fn deal(
        &mut self,
        row: usize,
        device: DeviceId,
        budget: ByteSize,
        order: PlacementOrder,
    ) -> ByteSize {
        let mut left = budget.0;
        let compute = self.compute;
        let size = |u: &Unit| u.bytes_on(device, compute).0;
        match order {
            PlacementOrder::Interleave => {
                for &m in self.visit {
                    let u = self.movable[m];
                    let b = size(&self.units[u]);
                    if self.assignment[u].is_none() && b <= left {
                        self.assignment[u] = Some(row);
                        left -= b;
                    }
                }
            }
            PlacementOrder::Auto => left = self.deal_ranked(row, device == compute, left, size),
            PlacementOrder::Tail => {
                while let Some(&u) = self.movable.get(self.cursor) {
                    let b = size(&self.units[u]);
                    if b > left {
                        break;
                    }
                    self.assignment[u] = Some(row);
                    left -= b;
                    self.cursor += 1;
                }
            }
        }
        ByteSize(budget.0 - left)
    }

    /// Auto order: the compute device keeps the lowest-ranked units (from the end of the
    /// ranking), donors take the best-ranked (from its start); each stops at the first unit
    /// that does not fit, so a larger budget takes a superset. Returns the budget left.
    fn deal_ranked(
        &mut self,
        row: usize,
        keeps: bool,
        mut left: u64,
        size: impl Fn(&Unit) -> u64,
    ) -> u64 {
        let ranked: Vec<usize> = if keeps {
            self.visit.iter().rev().copied().collect()
        } else {
            self.visit.to_vec()
        };
        for m in ranked {
            let u = self.movable[m];
            if self.assignment[u].is_some() {
                continue;
            }
            let b = size(&self.units[u]);
            if b > left {
                break;
            }
            self.assignment[u] = Some(row);
            left -= b;
        }
        left
    }

    /// Movable units not yet dealt: (count, bytes).
    fn leftovers(&self) -> (usize, ByteSize) {
        self.movable
            .iter()
            .filter(|&&u| self.assignment[u].is_none())
            .fold((0, ByteSize::ZERO), |(n, b), &u| {
                (n + 1, b + self.units[u].bytes)
            })
    }

    /// Gives every undealt movable unit to `row`.
    fn give_rest(&mut self, row: usize) {
        for &u in self.movable {
            self.assignment[u].get_or_insert(row);
        }
    }
}

/// Builds the rows' totals, checks capacities and assembles the plan.
pub(crate) fn finish(
    request: &PlanRequest,
    inventory: &Inventory,
    layout: Layout,
    compute_row: usize,
    assignment: &[Option<usize>],
    pinned: &[bool],
    mut warnings: Vec<Warning>,
) -> Result<Plan, Error> {
    let mut rows: Vec<DeviceRow> = layout
        .rows
        .iter()
        .enumerate()
        .map(|(i, r)| DeviceRow {
            device: r.info.id,
            role: if i == compute_row {
                Role::Compute
            } else {
                Role::Donor
            },
            total: r.info.total,
            free: r.info.free,
            quota: r.quota,
            model_bytes: ByteSize::ZERO,
            units: 0,
            pinned_bytes: ByteSize::ZERO,
        })
        .collect();
    let mut placed = Vec::with_capacity(inventory.len());
    for ((u, a), &p) in inventory.units().iter().zip(assignment).zip(pinned) {
        let r = a.expect("every unit is assigned by now");
        let row = &mut rows[r];
        let bytes = u.bytes_on(row.device, layout.compute);
        row.model_bytes += bytes;
        row.units += 1;
        if p {
            row.pinned_bytes += bytes;
        }
        placed.push(PlacedUnit {
            name: u.name.clone(),
            bytes,
            kind: u.kind,
            device: row.device,
            pinned: p,
        });
    }
    for (i, row) in rows.iter().enumerate() {
        if row.model_bytes > row.free {
            let hint = if i == compute_row && layout.vv_budget.is_some() {
                format!(
                    "; raise virtual VRAM by at least {}",
                    row.model_bytes.saturating_sub(row.free)
                )
            } else if i == compute_row && row.pinned_bytes > row.free {
                format!("; its pinned units alone need {}", row.pinned_bytes)
            } else {
                String::new()
            };
            return Err(Error::DeviceOverCapacity {
                device: row.device,
                needed: row.model_bytes,
                free: row.free,
                hint,
            });
        }
    }
    if let Some(sink) = layout.sink.filter(|_| layout.cpu_default) {
        let bytes = rows[sink].model_bytes;
        if bytes > ByteSize::ZERO {
            warnings.push(Warning::RemainderToCpu { bytes });
        }
    }
    let total = rows.iter().map(|r| r.model_bytes).sum();
    let prediction = crate::cost::predict(
        request,
        inventory.units(),
        &layout,
        assignment,
        &mut warnings,
    );
    Ok(Plan {
        component: inventory.component().to_owned(),
        compute: layout.compute,
        order: request.order,
        total,
        dtypes: inventory.dtypes().cloned(),
        rows,
        sink: layout.sink,
        units: placed,
        warnings,
        prediction,
    })
}

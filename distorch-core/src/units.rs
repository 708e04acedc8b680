//! From a component's tensors to the planner's [`Inventory`]: grouping tensors into placement
//! units, telling their kind, and approximating execution order.

use std::cmp::Ordering;
use std::collections::HashMap;

use distorch_alloc::{ByteSize, DtypeLabels, Inventory, Unit, UnitKind};

use crate::components::Component;
use crate::dtype::DType;
use crate::error::Error;
use crate::home::Homes;
use crate::safetensors::TensorInfo;

/// Last key segments that name a parameter of a layer rather than a layer.
const PARAM_NAMES: &[&str] = &[
    "weight",
    "bias",
    "scale",
    "shift",
    "gamma",
    "beta",
    "running_mean",
    "running_var",
    "num_batches_tracked",
    "in_proj_weight",
    "in_proj_bias",
    // ComfyUI scaled fp8: a weight's per-tensor scales live with it.
    "scale_weight",
    "scale_input",
];

/// The unit a tensor belongs to: its name without a trailing parameter segment.
pub fn unit_name(tensor: &str) -> &str {
    match tensor.rsplit_once('.') {
        Some((unit, param)) if PARAM_NAMES.contains(&param) => unit,
        _ => tensor,
    }
}

/// Builds the planner's inventory for one component. Unit names keep the component's key
/// prefix stripped; execution order is approximated from key names by the component's
/// [`Conventions`](crate::components::Conventions).
///
/// Units are counted as a GPU backend holds them ([`Homes::default`]); [`inventory_with`]
/// says how the backend that will load them holds them.
pub fn inventory(component: &Component<'_>) -> Result<Inventory, Error> {
    inventory_with(component, &Homes::default())
}

/// [`inventory`] with each unit's size at host and device homes as `homes` says, and the
/// dtypes labelled for plan reports.
pub fn inventory_with(component: &Component<'_>, homes: &Homes<'_>) -> Result<Inventory, Error> {
    let groups = group(component);
    let mut names: Vec<&str> = groups.keys().copied().collect();
    let order = component.conventions.segment_order;
    names.sort_by(|a, b| execution_cmp(order, a, b));
    let units = names
        .iter()
        .enumerate()
        .map(|(order, &name)| {
            let tensors = &groups[name];
            let (host, device) = group_bytes(component, tensors, homes);
            Unit::new(
                name,
                ByteSize(host),
                order as u32,
                kind_of(component.conventions.embeddings, name, tensors),
            )
            .with_device_bytes(ByteSize(device))
        })
        .collect();
    let mut dtypes: Vec<DType> = component.tensors.iter().map(|t| t.dtype).collect();
    dtypes.sort();
    dtypes.dedup();
    let labels = DtypeLabels {
        storage: dtypes
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("+"),
        held: homes.device.describe(&dtypes),
        compute: homes.compute.name().to_owned(),
    };
    Ok(Inventory::new(component.kind.name(), units)?.with_dtypes(labels))
}

/// The bytes of one unit's `tensors` in host memory and at a device home, as `homes` counts
/// them (the planner's two sizes; loading checks a plan against the same numbers).
pub(crate) fn group_bytes(
    component: &Component<'_>,
    tensors: &[&TensorInfo],
    homes: &Homes<'_>,
) -> (u64, u64) {
    tensors.iter().fold((0u64, 0u64), |(h, d), t| {
        let (th, td) = homes.bytes(component.local(t), t.dtype, t.numel(), t.bytes);
        (h.saturating_add(th), d.saturating_add(td))
    })
}

/// A component's tensors grouped by unit name (component prefix stripped).
pub(crate) fn group<'a>(component: &Component<'a>) -> HashMap<&'a str, Vec<&'a TensorInfo>> {
    let mut groups: HashMap<&str, Vec<&TensorInfo>> = HashMap::new();
    for t in &component.tensors {
        let local = component.local(t);
        groups.entry(unit_name(local)).or_default().push(t);
    }
    groups
}

/// What a unit is, from its name and its tensors' shapes; a unit whose last segment is one
/// of `embeddings` is an embedding table.
pub fn kind_of(embeddings: &[&str], unit: &str, tensors: &[&TensorInfo]) -> UnitKind {
    let last = unit.rsplit('.').next().unwrap_or(unit);
    if embeddings.contains(&last) {
        return UnitKind::Embedding;
    }
    let param = |t: &&TensorInfo| t.name.rsplit('.').next().unwrap_or("").to_owned();
    let max_rank = tensors.iter().map(|t| t.shape.len()).max().unwrap_or(0);
    let lower = last.to_ascii_lowercase();
    if lower.contains("norm") || lower.starts_with("ln_") || lower == "ln" {
        return UnitKind::Norm;
    }
    if max_rank >= 2 {
        return UnitKind::Weight;
    }
    if tensors.iter().all(|t| param(t) == "bias") {
        UnitKind::Bias
    } else if tensors.iter().any(|t| param(t) == "weight") {
        // A 1-D weight is a normalisation scale.
        UnitKind::Norm
    } else {
        UnitKind::Bias
    }
}

/// Orders two unit names by the approximate execution order: segment by segment, known
/// segments by their place in `order`, numbers numerically, the rest alphabetically.
fn execution_cmp(order: &[&str], a: &str, b: &str) -> Ordering {
    let mut sa = a.split('.');
    let mut sb = b.split('.');
    loop {
        match (sa.next(), sb.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => {
                let c = segment_cmp(order, x, y);
                if c != Ordering::Equal {
                    return c;
                }
            }
        }
    }
}

fn segment_cmp(order: &[&str], x: &str, y: &str) -> Ordering {
    let rank = |s: &str| order.iter().position(|k| *k == s);
    match (x.parse::<u64>(), y.parse::<u64>()) {
        (Ok(a), Ok(b)) => return a.cmp(&b),
        (Ok(_), Err(_)) => return Ordering::Less,
        (Err(_), Ok(_)) => return Ordering::Greater,
        _ => {}
    }
    match (rank(x), rank(y)) {
        (Some(a), Some(b)) => a.cmp(&b),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => natural_cmp(x, y),
    }
}

/// Compares strings with embedded numbers numerically (`layer2` < `layer10`).
fn natural_cmp(x: &str, y: &str) -> Ordering {
    let chunks = |s: &str| {
        let mut out: Vec<(bool, String)> = Vec::new();
        for c in s.chars() {
            let digit = c.is_ascii_digit();
            match out.last_mut() {
                Some((d, buf)) if *d == digit => buf.push(c),
                _ => out.push((digit, c.to_string())),
            }
        }
        out
    };
    let (cx, cy) = (chunks(x), chunks(y));
    for ((dx, px), (dy, py)) in cx.iter().zip(&cy) {
        let c = if *dx && *dy {
            let (tx, ty) = (px.trim_start_matches('0'), py.trim_start_matches('0'));
            tx.len().cmp(&ty.len()).then_with(|| tx.cmp(ty))
        } else {
            px.cmp(py)
        };
        if c != Ordering::Equal {
            return c;
        }
    }
    cx.len().cmp(&cy.len()).then_with(|| x.cmp(y))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names_strip_parameter_segments() {
        assert_eq!(unit_name("a.b.to_q.weight"), "a.b.to_q");
        assert_eq!(unit_name("a.in_proj_bias"), "a");
        assert_eq!(unit_name("model.text_projection"), "model.text_projection");
        assert_eq!(unit_name("logit_scale"), "logit_scale");
    }

    #[test]
    fn execution_order_follows_known_segments_and_numbers() {
        let mut names = vec![
            "out.2",
            "output_blocks.0.0.in_layers.2",
            "input_blocks.10.0.in_layers.2",
            "input_blocks.2.1.proj_out",
            "input_blocks.2.1.transformer_blocks.0.attn1.to_q",
            "input_blocks.2.1.proj_in",
            "middle_block.1.proj_in",
            "time_embed.0",
            "input_blocks.2.0.emb_layers.1",
            "input_blocks.2.0.in_layers.2",
        ];
        // The relative order of these segments in Stable Diffusion's UNet (the model crate's
        // conventions give the full table).
        const ORDER: &[&str] = &[
            "time_embed",
            "input_blocks",
            "middle_block",
            "output_blocks",
            "out",
            "in_layers",
            "emb_layers",
            "proj_in",
            "transformer_blocks",
            "proj_out",
        ];
        names.sort_by(|a, b| execution_cmp(ORDER, a, b));
        assert_eq!(
            names,
            [
                "time_embed.0",
                "input_blocks.2.0.in_layers.2",
                "input_blocks.2.0.emb_layers.1",
                "input_blocks.2.1.proj_in",
                "input_blocks.2.1.transformer_blocks.0.attn1.to_q",
                "input_blocks.2.1.proj_out",
                "input_blocks.10.0.in_layers.2",
                "middle_block.1.proj_in",
                "output_blocks.0.0.in_layers.2",
                "out.2",
            ]
        );
        assert_eq!(natural_cmp("layer2", "layer10"), Ordering::Less);
        assert_eq!(natural_cmp("norm1", "norm1"), Ordering::Equal);
    }
}

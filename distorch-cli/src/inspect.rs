//! `distorch inspect`.

use std::collections::BTreeMap;

use distorch::ByteSize;
use distorch::core::{SafetensorsIndex, TensorInfo, components, units};
use serde_json::json;

use crate::Failure;
use crate::cli::InspectArgs;

fn dtype_counts(tensors: &[&TensorInfo]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for t in tensors {
        *out.entry(t.dtype.to_string()).or_insert(0) += 1;
    }
    out
}

pub fn run(args: &InspectArgs) -> Result<(), Failure> {
    let path = args.source.path()?;
    let index = SafetensorsIndex::open(&path)?;
    let split = components::split(&index);
    let mut rows = Vec::new();
    for c in &split.components {
        let inventory = units::inventory(c)?;
        rows.push((c, inventory));
    }
    let other_bytes: u64 = split.other.iter().map(|t| t.bytes).sum();
    if args.json {
        let comps: Vec<_> = rows
            .iter()
            .map(|(c, inv)| {
                json!({
                    "component": c.kind.name(),
                    "prefix": c.prefix,
                    "tensors": c.tensors.len(),
                    "units": inv.len(),
                    "bytes": c.bytes(),
                    "dtypes": dtype_counts(&c.tensors),
                })
            })
            .collect();
        println!(
            "{}",
            json!({
                "file": path.display().to_string(),
                "file_bytes": index.file_len(),
                "tensors": index.tensors().len(),
                "data_bytes": index.data_bytes(),
                "components": comps,
                "other": {
                    "tensors": split.other.len(),
                    "bytes": other_bytes,
                    "names": split.other.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
                },
                "metadata": index.metadata(),
            })
        );
        return Ok(());
    }
    println!(
        "{}: {} tensors, {} of tensor data",
        path.display(),
        index.tensors().len(),
        ByteSize(index.data_bytes())
    );
    println!(
        "  {:<12} {:<24} {:>8} {:>6} {:>12}  dtypes",
        "component", "prefix", "tensors", "units", "bytes"
    );
    for (c, inv) in &rows {
        let dtypes: Vec<String> = dtype_counts(&c.tensors)
            .iter()
            .map(|(d, n)| format!("{d}×{n}"))
            .collect();
        println!(
            "  {:<12} {:<24} {:>8} {:>6} {:>12}  {}",
            c.kind.name(),
            if c.prefix.is_empty() { "-" } else { c.prefix },
            c.tensors.len(),
            inv.len(),
            ByteSize(c.bytes()).to_string(),
            dtypes.join(" ")
        );
    }
    if !split.other.is_empty() {
        let names: Vec<&str> = split
            .other
            .iter()
            .take(5)
            .map(|t| t.name.as_str())
            .collect();
        println!(
            "  other: {} tensor(s), {} ({}{})",
            split.other.len(),
            ByteSize(other_bytes),
            names.join(", "),
            if split.other.len() > 5 { ", ..." } else { "" }
        );
    }
    for (k, v) in index.metadata() {
        println!("  metadata {k}: {v}");
    }
    Ok(())
}

//! The human-readable plan report.

use std::fmt;

use crate::bytesize::ByteSize;
use crate::plan::Plan;

fn pct(part: ByteSize, whole: ByteSize) -> String {
    if whole.0 == 0 {
        return "-".to_owned();
    }
    format!("{:.2}%", part.0 as f64 * 100.0 / whole.0 as f64)
}

pub(crate) fn render(plan: &Plan, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    writeln!(
        f,
        "plan for {}: {} in {} units, compute on {}, order {}",
        plan.component(),
        plan.total_bytes(),
        plan.units().len(),
        plan.compute(),
        plan.order()
    )?;
    if let Some(d) = plan.dtypes() {
        write!(f, "dtypes: storage {}, compute {}", d.storage, d.compute)?;
        if let Some(held) = &d.held {
            write!(f, " ({held})")?;
        }
        writeln!(f)?;
    }
    let header = [
        "device",
        "role",
        "capacity",
        "free",
        "model bytes",
        "% of device",
        "% of model",
        "units",
    ];
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for row in plan.devices() {
        table.push(vec![
            row.device.to_string(),
            row.role.name().to_owned(),
            row.total.to_string(),
            row.free.to_string(),
            row.model_bytes.to_string(),
            pct(row.model_bytes, row.total),
            pct(row.model_bytes, plan.total_bytes()),
            row.units.to_string(),
        ]);
    }
    write_table(f, &table)?;

    writeln!(f)?;
    let mut kinds: Vec<Vec<String>> = vec![
        std::iter::once("layer kind".to_owned())
            .chain(plan.devices().iter().map(|r| r.device.to_string()))
            .collect(),
    ];
    for (kind, bytes) in plan.kind_distribution() {
        kinds.push(
            std::iter::once(kind.name().to_owned())
                .chain(bytes.iter().map(|b| b.to_string()))
                .collect(),
        );
    }
    write_table(f, &kinds)?;

    writeln!(f)?;
    writeln!(f, "bytes string:    {}", plan.bytes_string())?;
    write!(f, "fraction string: {}", plan.fraction_string())?;
    if let Some(p) = plan.prediction() {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        write!(
            f,
            "\npredicted pass:  {:.1} ms ({:.1} ms compute, {:.1} ms of transfers, {:.1} ms \
             stalled waiting for weights)",
            ms(p.step),
            ms(p.compute),
            ms(p.transfer),
            ms(p.stall)
        )?;
    }
    for w in plan.warnings() {
        write!(f, "\nwarning: {w}")?;
    }
    Ok(())
}

fn write_table(f: &mut fmt::Formatter<'_>, rows: &[Vec<String>]) -> fmt::Result {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, w))| {
                if c == 0 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        if i > 0 {
            writeln!(f)?;
        }
        write!(f, "  {}", cells.join("  ").trim_end())?;
    }
    writeln!(f)
}

//! Plans an SD1.5-shaped UNet on an 8 GiB GPU with 1 GiB of it kept resident, and prints the
//! report. Run: `cargo run --example plan`

#![allow(clippy::print_stdout)]

use distorch::models::sd::demo::DemoModel;
use distorch::{AllocSpec, ComponentKind, DeviceGraph, PlanRequest, SafetensorsIndex};

fn main() -> Result<(), distorch::Error> {
    let dir = std::env::temp_dir().join("distorch-example");
    let path = DemoModel::Sd15.ensure_in(&dir)?;
    let index = SafetensorsIndex::open(&path)?;
    let unet = distorch::models::load::inventory_for(&index, ComponentKind::Unet)?;
    let spec: AllocSpec = "cuda:0,1gb;cpu,*".parse()?;
    let graph: DeviceGraph = "cuda:0=8gib,cpu=32gib".parse()?;
    let plan = distorch::plan(&PlanRequest::expert(spec), &unet, &graph)?;
    println!("{plan}");
    Ok(())
}

//! Text to image with the library in one load and one call: a checkpoint (single file or
//! diffusers folder; default: the demo checkpoint, SD 1.5's shapes with random weights), the
//! UNet under an allocation string, a PNG out. The command line with every placement flag is
//! `distorch generate image` (`cargo run --release -p distorch-cli -- generate image --help`).
//!
//! ```text
//! cargo run --release --example txt2img -- [CHECKPOINT] [ALLOCATION] [PROMPT]
//! ```

#![allow(clippy::print_stdout)]

use distorch::models::sd::demo::DemoModel;
use distorch::models::sd::pipeline::to_rgb8;
use distorch::models::{CheckpointOptions, Placement, StableDiffusion};
use distorch::{DeviceGraph, DeviceId, PlanRequest};

type B = distorch::backends::NdArray;

#[path = "common/malloc.rs"]
mod malloc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    malloc::keep_freed_memory();
    let mut args = std::env::args().skip(1);
    let ckpt = match args.next() {
        Some(path) => path.into(),
        None => DemoModel::Sd15.ensure_random_in(&std::env::temp_dir().join("distorch"))?,
    };
    let allocation = args.next().unwrap_or_else(|| "cpu,*".into());
    let prompt = args
        .next()
        .unwrap_or_else(|| "a red fox in the snow".into());

    let graph: DeviceGraph = distorch::backends::detect().graph;
    let (cpu, device) = (DeviceId::CPU, Default::default());
    let mut options = CheckpointOptions::<B>::new(graph, cpu, device, device)?;
    options.unet = Placement {
        request: PlanRequest::expert_with_compute(allocation.parse()?, cpu),
        ..options.unet
    };
    let sd = StableDiffusion::<B>::load(&ckpt, &options)?;
    println!("{}", sd.loaded[0].1);
    let mut request = sd.request(prompt);
    (request.steps, request.width, request.height) = (4, 256, 256);
    let image = sd.generate(&request, &mut |_| {})?.image;
    to_rgb8(image)?.save("txt2img.png")?;
    println!("wrote txt2img.png");
    Ok(())
}

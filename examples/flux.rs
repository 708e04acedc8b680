//! FLUX.1 text to image with the library: one load (each component with its own options; the
//! transformer's last blocks swapped to host memory when computing on a GPU) and one call.
//! The command line with every flag is `distorch generate flux`.
//!
//! ```text
//! cargo run --release --example flux -- [FLUX_DIFFUSERS_FOLDER] [PROMPT]
//! ```
//!
//! Without a folder it uses the demo folder (FLUX.1's architecture at small widths, random
//! weights: an abstract image), written once to the temporary folder.

#![allow(clippy::print_stdout)]

use distorch::models::flux::load::{FluxFiles, FluxOptions};
use distorch::models::flux::pipeline::{Flux, FluxTxt2Img};
use distorch::models::sd::pipeline::to_rgb8;
use distorch::models::{ComponentOptions, Placement};
use distorch::{DeviceGraph, DeviceId};

type B = distorch::backends::NdArray;

#[path = "common/malloc.rs"]
mod malloc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    malloc::keep_freed_memory();
    let mut args = std::env::args().skip(1);
    let folder = match args.next() {
        Some(f) => f.into(),
        None => {
            distorch::models::flux::demo::ensure_in::<B>(&std::env::temp_dir().join("distorch"))?
        }
    };
    let prompt = args
        .next()
        .unwrap_or_else(|| "a red fox in the snow".into());

    let graph: DeviceGraph = distorch::backends::detect().graph;
    let on_cpu = Placement::<B>::on(DeviceId::CPU, Default::default());
    let options = FluxOptions::all(ComponentOptions::new(graph, on_cpu));
    let (flux, plans) = Flux::load(&FluxFiles::diffusers(&folder)?, &options)?;
    println!("{}", plans.transformer);
    let mut request = FluxTxt2Img::<B>::new(prompt);
    (request.width, request.height, request.steps) = (64, 64, 2);
    request.max_sequence_length = 64;
    let image = flux.txt2img(&request, &mut |_| {})?.image;
    to_rgb8(image)?.save("flux.png")?;
    println!("wrote flux.png");
    Ok(())
}

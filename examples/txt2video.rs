//! Text to video with Wan 2.1 and the library: one load, the transformer's last blocks
//! swapped to host memory when computing on a GPU, one call, a PNG per frame. The command
//! line with every flag is `distorch generate video`.
//!
//! ```text
//! cargo run --release --example txt2video -- [WAN_DIFFUSERS_FOLDER] [PROMPT]
//! ```
//!
//! Without a folder it uses the demo folder (Wan's architecture at small widths, random
//! weights: abstract frames), written once to the temporary folder.

#![allow(clippy::print_stdout)]

use distorch::models::wan::load::{WanFiles, WanOptions};
use distorch::models::wan::pipeline::{Txt2Video, Wan, frame_rgb8};
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
            distorch::models::wan::demo::ensure_in::<B>(&std::env::temp_dir().join("distorch"))?
        }
    };
    let prompt = args
        .next()
        .unwrap_or_else(|| "a red fox in the snow".into());

    let graph: DeviceGraph = distorch::backends::detect().graph;
    let on_cpu = Placement::<B>::on(DeviceId::CPU, Default::default());
    let options = WanOptions::all(ComponentOptions::new(graph, on_cpu));
    let (wan, plans) = Wan::load(&WanFiles::diffusers(&folder), &options)?;
    println!("{}", plans.transformer);
    let mut request = Txt2Video::<B>::new(prompt);
    (request.frames, request.width, request.height, request.steps) = (5, 64, 64, 2);
    request.max_sequence_length = 64;
    let video = wan.txt2video(&request, &mut |_| {})?.video;
    for i in 0..video.dims()[2] {
        frame_rgb8(&video, i)?.save(format!("frame_{i:03}.png"))?;
    }
    println!("wrote {} frames", video.dims()[2]);
    Ok(())
}

//! Text to video with Wan 2.1: a prompt in, a PNG per frame out, the transformer's last
//! blocks swapped to another device and streamed in when used.
//!
//! ```text
//! cargo run --release --example txt2video -- --prompt "..." [--model WAN_DIFFUSERS_FOLDER]
//!     [--negative ...] [--frames 1+4k] [--width W --height H] [--steps N] [--guidance X]
//!     [--shift X] [--seed N] [--max-sequence-length N] [--device cpu|wgpu:0|cuda:N]
//!     [--blocks-to-swap N] [--swap-device DEV] [--prefetch-blocks N] [--offload-txt-emb]
//!     [--devices DECL] --out-dir frames/
//! ```
//!
//! `--model` is a diffusers Wan folder (`tokenizer/`, `text_encoder/`, `transformer/`,
//! `vae/`; single-file weights in the original layout work for each component too). Without
//! it the example writes a small demo folder once (Wan's architecture at small widths —
//! 4 blocks of 256, a 2-layer UMT5, Wan's VAE at base width 16 — deterministic random
//! weights and a character-level tokenizer, in `$DISTORCH_CACHE`, else `~/.cache/distorch`):
//! it runs the whole pipeline but draws abstract frames. Prints each component's plan and
//! the transformer's streamer statistics.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;

use burn::tensor::backend::Backend;
use clap::Parser;
use distorch::backends::{OnBackend, on_device};
use distorch::core::runtime::{DeviceMap, Lookahead};
use distorch::models::wan::dit::WanDitConfig;
use distorch::models::wan::load::{WanFiles, WanOptions};
use distorch::models::wan::pipeline::{Txt2Video, Wan, frame_rgb8};
use distorch::models::{ComponentOptions, Placement};
use distorch::{BlockSwap, DeviceGraph, DeviceId, PlanRequest};

#[derive(Parser)]
struct Args {
    /// A diffusers Wan folder (default: the demo).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative: String,
    /// Frames: 1 + 4k.
    #[arg(long, default_value_t = 9)]
    frames: usize,
    #[arg(long, default_value_t = 64)]
    width: usize,
    #[arg(long, default_value_t = 64)]
    height: usize,
    #[arg(long, default_value_t = 4)]
    steps: usize,
    #[arg(long, default_value_t = 5.0)]
    guidance: f64,
    /// The sampler's shift (3 at 480p, 5 at 720p).
    #[arg(long, default_value_t = 3.0)]
    shift: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tokens per prompt (Wan: 512).
    #[arg(long, default_value_t = 512)]
    max_sequence_length: usize,
    /// The compute device.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The compute dtype of every model: f32, f16, bf16, or auto (each model's own half type
    /// where the device computes in it, the VAE at f32 for f16 weights; f32 on ndarray).
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Transformer blocks, counted from the last, kept on --swap-device (default: half).
    #[arg(long)]
    blocks_to_swap: Option<usize>,
    /// Where swapped blocks live.
    #[arg(long, default_value = "cpu")]
    swap_device: String,
    /// Swapped blocks staged ahead of use.
    #[arg(long, default_value_t = 1)]
    prefetch_blocks: usize,
    /// Keep the transformer's text embedder on --swap-device too.
    #[arg(long)]
    offload_txt_emb: bool,
    /// Declared devices instead of detection (`cuda:0=8gib,cpu=32gib`).
    #[arg(long)]
    devices: Option<String>,
    #[arg(long, default_value = "frames")]
    out_dir: PathBuf,
}

type Failure = Box<dyn std::error::Error>;

#[path = "common/demo.rs"]
mod demo;
#[path = "common/malloc.rs"]
mod malloc;

fn main() {
    malloc::keep_freed_memory();
    demo::log_to_stderr();
    demo::exit_on_error(dispatch(&Args::parse()));
}

/// The example on the backend `--device` names (`distorch::backends::on_device`).
struct Example<'a>(&'a Args);

impl OnBackend for Example<'_> {
    type Output = Result<(), Failure>;
    fn run<B: Backend>(self, compute: DeviceId, device: B::Device) -> Result<(), Failure> {
        run::<B>(self.0, compute, device)
    }
}

fn dispatch(args: &Args) -> Result<(), Failure> {
    on_device(args.device.parse()?, Example(args))?
}

fn run<B: Backend>(args: &Args, compute: DeviceId, device: B::Device) -> Result<(), Failure> {
    let folder = match &args.model {
        Some(m) => m.clone(),
        None => {
            println!(
                "no --model: the demo Wan folder (random weights: the frames will be abstract)"
            );
            distorch::models::wan::demo::ensure_in::<B>(&demo::cache_dir("")?)?
        }
    };
    let graph = match &args.devices {
        Some(d) => DeviceGraph::declare(d)?,
        None => distorch::backends::detect().graph,
    };
    // On a CPU-only build the compute device is host memory too: there is nothing to swap to.
    let on = |id: DeviceId| Placement::<B>::on(id, device.clone());
    let dtype = distorch::core::ComputeDtype::parse_or_auto(&args.dtype)?;
    let options = |p: Placement<B>| ComponentOptions {
        dtype,
        ..ComponentOptions::new(graph.clone(), p)
    };

    let config = WanDitConfig::from_file(folder.join("transformer").join("config.json"))?;
    let swap_device: DeviceId = args.swap_device.parse()?;
    let blocks = args.blocks_to_swap.unwrap_or(config.num_layers / 2);
    let mut dit_options = if swap_device == compute {
        println!("(compute and swap device are both {compute}: no block swap)");
        options(on(compute))
    } else {
        let mut swap = BlockSwap::new(compute, swap_device, blocks);
        if args.offload_txt_emb {
            swap = swap
                .offloading("condition_embedder.text_embedder.")
                .offloading("text_embedding.");
        }
        options(Placement {
            request: PlanRequest::block_swap(swap),
            devices: DeviceMap::new(device.clone()),
        })
    };
    dit_options.lookahead = Lookahead {
        units: args.prefetch_blocks.max(1) * config.units_per_block(),
        ..Lookahead::default()
    };
    let mut files = WanFiles::diffusers(&folder);
    files.configs.transformer = Some(config);
    let (wan, plans) = Wan::load(
        &files,
        &WanOptions {
            transformer: dit_options,
            ..WanOptions::all(options(on(compute)))
        },
    )?;
    for (name, plan) in [
        ("text encoder", &plans.text_encoder),
        ("transformer", &plans.transformer),
        ("vae", &plans.vae),
    ] {
        println!("\n[{name}]\n{plan}");
    }
    let mut req = Txt2Video::<B>::new(args.prompt.clone());
    req.negative_prompt = args.negative.clone();
    req.frames = args.frames;
    req.width = args.width;
    req.height = args.height;
    req.steps = args.steps;
    req.guidance = args.guidance;
    req.shift = args.shift;
    req.seed = args.seed;
    req.max_sequence_length = args.max_sequence_length;
    let video = wan.txt2video(&req, &mut demo::print_progress)?;
    demo::print_streamer(wan.transformer.streamer());
    std::fs::create_dir_all(&args.out_dir)?;
    let frames = video.video.dims()[2];
    for i in 0..frames {
        let path = args.out_dir.join(format!("frame_{i:03}.png"));
        frame_rgb8(&video.video, i)?.save(&path)?;
    }
    println!("wrote {frames} frames to {}", args.out_dir.display());
    Ok(())
}

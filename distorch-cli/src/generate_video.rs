//! `distorch generate video`: Wan 2.1 text to video from a diffusers folder or the demo
//! folder, the transformer placed by the seeds' loader inputs or by block swap.

use std::path::PathBuf;

use burn::tensor::backend::Backend;
use clap::Args;
use distorch::core::runtime::{DeviceMap, Lookahead, Streamer};
use distorch::models::wan::dit::WanDitConfig;
use distorch::models::wan::load::{WanFiles, WanOptions};
use distorch::models::wan::pipeline::{Txt2Video, Wan, frame_rgb8};
use distorch::models::{ComponentOptions, Placement};
use distorch::{BlockSwap, DeviceId, PlanRequest};

use crate::Failure;
use crate::generate::{
    ClipPlacement, DitParsed, Generate, Outcome, UnetPlacement, dispatch, sampling_bar,
};

/// `generate video`.
#[derive(Args)]
pub struct VideoArgs {
    /// A diffusers Wan 2.1 folder (default: the demo folder, Wan's architecture at small
    /// widths with random weights, written once to the cache folder).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative: String,
    /// Frames: 1 + 4k.
    #[arg(long, default_value_t = 9)]
    pub frames: usize,
    #[arg(long, default_value_t = 64)]
    pub width: usize,
    #[arg(long, default_value_t = 64)]
    pub height: usize,
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    #[arg(long, default_value_t = 5.0)]
    pub guidance: f64,
    /// The sampler's shift (3 at 480p, 5 at 720p).
    #[arg(long, default_value_t = 3.0)]
    pub shift: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tokens per prompt (Wan: 512).
    #[arg(long, default_value_t = 512)]
    pub max_sequence_length: usize,
    /// The transformer's placement (the `--unet-*` flags name the denoiser).
    #[command(flatten)]
    pub unet_placement: UnetPlacement,
    /// UMT5's placement.
    #[command(flatten)]
    pub clip_placement: ClipPlacement,
    /// Where the VAE computes (default: the transformer's compute device).
    #[arg(long)]
    pub vae_device: Option<String>,
    /// Block swap instead: this many of the transformer's last blocks live on
    /// --swap-device and stream in when used.
    #[arg(long, conflicts_with_all = ["unet_virtual_vram_gb", "unet_expert_mode_allocations"])]
    pub blocks_to_swap: Option<usize>,
    /// Where swapped blocks live.
    #[arg(long, default_value = "cpu")]
    pub swap_device: String,
    /// Swapped blocks staged ahead of use.
    #[arg(long, default_value_t = 1)]
    pub prefetch_blocks: usize,
    /// With block swap, keep the text embedder on --swap-device too.
    #[arg(long)]
    pub offload_txt_emb: bool,
    /// Declared devices instead of detection (`cuda:0=8gib,cpu=32gib`).
    #[arg(long)]
    pub devices: Option<String>,
    /// Compute dtype: f32, f16, bf16, or auto.
    #[arg(long, value_name = "DTYPE", default_value = "auto", value_parser = crate::cli::parse_dtype)]
    pub dtype: crate::cli::DtypeArg,
    /// The folder the frames are written to (frame_000.png, ...).
    #[arg(long, default_value = "frames")]
    pub out_dir: PathBuf,
}

fn parse(a: &VideoArgs) -> Result<DitParsed, Failure> {
    DitParsed::parse(
        &a.unet_placement,
        &a.clip_placement,
        a.vae_device.as_deref(),
        a.devices.as_deref(),
        &a.swap_device,
        a.dtype.0,
    )
}

/// Runs `generate video`.
pub fn video(args: &VideoArgs) -> Result<(), Failure> {
    let parsed = parse(args)?;
    dispatch(parsed.place.unet.compute_device, Video { args, parsed })
}

struct Video<'a> {
    args: &'a VideoArgs,
    parsed: DitParsed,
}

impl Generate for Video<'_> {
    fn generate<B: Backend>(self, compute: DeviceId, device: B::Device) -> Outcome {
        generate::<B>(self.args, self.parsed, compute, device)
    }
}

fn generate<B: Backend>(
    args: &VideoArgs,
    p: DitParsed,
    compute: DeviceId,
    device: B::Device,
) -> Result<(), Box<dyn std::error::Error>> {
    let folder = match &args.model {
        Some(m) => m.clone(),
        None => {
            println!(
                "No --model: the demo Wan folder (random weights: the frames will be abstract)."
            );
            distorch::models::wan::demo::ensure_in::<B>(&crate::cli::cache_dir())?
        }
    };
    let config = WanDitConfig::from_file(folder.join("transformer").join("config.json"))?;
    let transformer = transformer_options::<B>(args, &p, &config, compute, &device)?;
    let bind = &distorch::bind_device::<B>;
    let options = |placement: Placement<B>| p.options(placement);
    let mut files = WanFiles::diffusers(&folder);
    files.configs.transformer = Some(config);
    let (wan, plans) = Wan::load(
        &files,
        &WanOptions {
            transformer,
            text_encoder: options(p.place.clip.placement::<B>(compute, &device, bind)?),
            vae: options(p.place.vae.placement::<B>(compute, &device, bind)?),
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
    (req.frames, req.width, req.height) = (args.frames, args.width, args.height);
    (req.steps, req.guidance, req.shift) = (args.steps, args.guidance, args.shift);
    req.seed = args.seed;
    req.max_sequence_length = args.max_sequence_length;
    let (_bar, mut progress) = sampling_bar(args.steps)?;
    let video = wan.txt2video(&req, &mut progress)?;
    print_streamer("transformer", wan.transformer.streamer());
    std::fs::create_dir_all(&args.out_dir)?;
    let frames = video.video.dims()[2];
    for i in 0..frames {
        frame_rgb8(&video.video, i)?.save(args.out_dir.join(format!("frame_{i:03}.png")))?;
    }
    println!("wrote {frames} frames to {}", args.out_dir.display());
    Ok(())
}

/// The transformer's options: block swap when asked (and the swap device is another), else
/// its placement.
fn transformer_options<B: Backend>(
    args: &VideoArgs,
    p: &DitParsed,
    config: &WanDitConfig,
    compute: DeviceId,
    device: &B::Device,
) -> Result<ComponentOptions<B>, Box<dyn std::error::Error>> {
    let bind = &distorch::bind_device::<B>;
    let options = |placement: Placement<B>| p.options(placement);
    Ok(match args.blocks_to_swap {
        Some(_) if p.swap == compute => {
            println!("(compute and swap device are both {compute}: no block swap)");
            options(p.place.unet.placement::<B>(compute, device, bind)?)
        }
        Some(blocks) => {
            let mut swap = BlockSwap::new(compute, p.swap, blocks);
            if args.offload_txt_emb {
                swap = swap
                    .offloading("condition_embedder.text_embedder.")
                    .offloading("text_embedding.");
            }
            let mut o = options(Placement {
                request: PlanRequest::block_swap(swap),
                devices: DeviceMap::new(device.clone()),
            });
            o.lookahead = Lookahead {
                units: args.prefetch_blocks.max(1) * config.units_per_block(),
                ..Lookahead::default()
            };
            o
        }
        None => options(p.place.unet.placement::<B>(compute, device, bind)?),
    })
}

/// Prints (and resets) a streamer's statistics.
pub(crate) fn print_streamer<B: Backend>(name: &str, streamer: &Streamer<B>) {
    let stats = streamer.take_stats();
    let moved: u64 = stats.bytes_moved.values().map(|b| b.bytes()).sum();
    println!(
        "{name} streamer: {} fetches, {} resident, {} prefetched, {} on demand, {:.1} MB moved, \
         {:.1} ms waited",
        stats.fetches,
        stats.resident,
        stats.prefetched,
        stats.on_demand,
        moved as f64 / 1e6,
        stats.stall.as_secs_f64() * 1e3
    );
}

//! `distorch generate flux`: FLUX.1 text to image from a diffusers folder or the demo folder,
//! the transformer placed by the seeds' loader inputs or by block swap over its double- and
//! single-stream blocks.

use std::path::PathBuf;

use burn::tensor::backend::Backend;
use clap::Args;
use distorch::core::runtime::{DeviceMap, Lookahead};
use distorch::models::flux::dit::{FluxConfig, FluxLayout, FluxTransformer};
use distorch::models::flux::load::{FluxFiles, FluxOptions};
use distorch::models::flux::pipeline::{Flux, FluxTxt2Img};
use distorch::models::{ComponentOptions, Placement};
use distorch::{DeviceId, PlanRequest};

use crate::Failure;
use crate::generate::{
    ClipPlacement, DitParsed, Generate, Outcome, UnetPlacement, dispatch, sampling_bar,
};
use crate::generate_video::print_streamer;

/// `generate flux`.
#[derive(Args)]
pub struct FluxArgs {
    /// A diffusers FLUX.1 folder (default: the demo folder, FLUX.1's architecture at small
    /// widths with random weights, written once to the cache folder).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    /// A negative prompt, used with --true-cfg above 1.
    #[arg(long)]
    pub negative: Option<String>,
    /// True classifier-free guidance scale (two transformer passes a step).
    #[arg(long, default_value_t = 1.0)]
    pub true_cfg: f64,
    #[arg(long, default_value_t = 1024)]
    pub width: usize,
    #[arg(long, default_value_t = 1024)]
    pub height: usize,
    #[arg(long, default_value_t = 28)]
    pub steps: usize,
    /// The guidance FLUX.1-dev embeds (schnell has none: ignored there).
    #[arg(long, default_value_t = 3.5)]
    pub guidance: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// T5 tokens (FLUX.1-dev: 512, schnell: 256).
    #[arg(long, default_value_t = 512)]
    pub max_sequence_length: usize,
    /// The transformer's placement (the `--unet-*` flags name the denoiser).
    #[command(flatten)]
    pub unet_placement: UnetPlacement,
    /// CLIP-L's and T5's placement.
    #[command(flatten)]
    pub clip_placement: ClipPlacement,
    /// Where the VAE computes (default: the transformer's compute device).
    #[arg(long)]
    pub vae_device: Option<String>,
    /// Block swap instead: this many of the last double-stream blocks live on
    /// --swap-device and stream in when used.
    #[arg(long, conflicts_with_all = ["unet_virtual_vram_gb", "unet_expert_mode_allocations"])]
    pub blocks_to_swap: Option<usize>,
    /// With block swap, this many of the last single-stream blocks too.
    #[arg(long, requires = "blocks_to_swap")]
    pub single_blocks_to_swap: Option<usize>,
    /// Where swapped blocks live.
    #[arg(long, default_value = "cpu")]
    pub swap_device: String,
    /// Swapped double-stream blocks staged ahead of use.
    #[arg(long, default_value_t = 1)]
    pub prefetch_blocks: usize,
    /// Declared devices instead of detection (`cuda:0=24gib,cpu=64gib`).
    #[arg(long)]
    pub devices: Option<String>,
    /// Compute dtype: f32, f16, bf16, or auto.
    #[arg(long, value_name = "DTYPE", default_value = "auto", value_parser = crate::cli::parse_dtype)]
    pub dtype: crate::cli::DtypeArg,
    #[arg(long, default_value = "flux.png")]
    pub out: PathBuf,
}

fn parse(a: &FluxArgs) -> Result<DitParsed, Failure> {
    DitParsed::parse(
        &a.unet_placement,
        &a.clip_placement,
        a.vae_device.as_deref(),
        a.devices.as_deref(),
        &a.swap_device,
        a.dtype.0,
    )
}

/// Runs `generate flux`.
pub fn flux(args: &FluxArgs) -> Result<(), Failure> {
    let parsed = parse(args)?;
    dispatch(parsed.place.unet.compute_device, Run { args, parsed })
}

struct Run<'a> {
    args: &'a FluxArgs,
    parsed: DitParsed,
}

impl Generate for Run<'_> {
    fn generate<B: Backend>(self, compute: DeviceId, device: B::Device) -> Outcome {
        generate::<B>(self.args, self.parsed, compute, device)
    }
}

/// The transformer's options: block swap when asked (and the swap device is another), else
/// its placement.
fn transformer_options<B: Backend>(
    args: &FluxArgs,
    p: &DitParsed,
    config: &FluxConfig,
    compute: DeviceId,
    device: &B::Device,
) -> Result<ComponentOptions<B>, Box<dyn std::error::Error>> {
    let placement = match args.blocks_to_swap {
        Some(double) if p.swap != compute => Placement {
            request: PlanRequest::block_swap(FluxLayout::Diffusers.block_swap(
                compute,
                p.swap,
                double,
                args.single_blocks_to_swap.unwrap_or(0),
            )),
            devices: DeviceMap::new(device.clone()),
        },
        Some(_) => {
            println!("(compute and swap device are both {compute}: no block swap)");
            p.place
                .unet
                .placement::<B>(compute, device, &distorch::bind_device::<B>)?
        }
        None => p
            .place
            .unet
            .placement::<B>(compute, device, &distorch::bind_device::<B>)?,
    };
    let mut o = p.options(placement);
    // Stage whole double-stream blocks: the units of the first one, in diffusers' names.
    let mut units: Vec<String> = FluxTransformer::<B>::expected_tensors(config)
        .into_iter()
        .filter(|t| t.name.starts_with("transformer_blocks.0."))
        .map(|t| distorch::core::units::unit_name(&t.name).to_owned())
        .collect();
    units.sort_unstable();
    units.dedup();
    o.lookahead = Lookahead {
        units: args.prefetch_blocks.max(1) * units.len().max(1),
        ..Lookahead::default()
    };
    Ok(o)
}

fn generate<B: Backend>(
    args: &FluxArgs,
    p: DitParsed,
    compute: DeviceId,
    device: B::Device,
) -> Result<(), Box<dyn std::error::Error>> {
    let folder = match &args.model {
        Some(m) => m.clone(),
        None => {
            println!(
                "No --model: the demo FLUX folder (random weights: the image will be abstract)."
            );
            distorch::models::flux::demo::ensure_in::<B>(&crate::cli::cache_dir())?
        }
    };
    let mut files = FluxFiles::diffusers(&folder)?;
    let config = FluxConfig::from_file(folder.join("transformer").join("config.json"))?;
    let transformer = transformer_options::<B>(args, &p, &config, compute, &device)?;
    files.configs.transformer = Some(config);
    let bind = &distorch::bind_device::<B>;
    let options = |placement: Placement<B>| p.options(placement);
    let text = options(p.place.clip.placement::<B>(compute, &device, bind)?);
    let (flux, plans) = Flux::load(
        &files,
        &FluxOptions {
            transformer,
            clip: text.clone(),
            t5: text,
            vae: options(p.place.vae.placement::<B>(compute, &device, bind)?),
        },
    )?;
    for (name, plan) in [
        ("CLIP", &plans.clip),
        ("T5", &plans.t5),
        ("transformer", &plans.transformer),
        ("vae", &plans.vae),
    ] {
        println!("\n[{name}]\n{plan}");
    }
    let mut req = FluxTxt2Img::<B>::new(args.prompt.clone());
    req.negative_prompt = args.negative.clone();
    req.true_cfg_scale = args.true_cfg;
    (req.width, req.height, req.steps) = (args.width, args.height, args.steps);
    req.guidance = args.guidance;
    req.seed = args.seed;
    req.max_sequence_length = args.max_sequence_length;
    let (_bar, mut progress) = sampling_bar(args.steps)?;
    let out = flux.txt2img(&req, &mut progress)?;
    print_streamer("transformer", flux.transformer.streamer());
    distorch::models::sd::pipeline::to_rgb8(out.image)?.save(&args.out)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

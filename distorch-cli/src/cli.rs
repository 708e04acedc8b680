//! Command-line arguments.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use distorch::models::sd::demo::DemoModel;

use crate::Failure;

/// Plan and inspect how a diffusion model is split across devices.
#[derive(Parser)]
#[command(name = "distorch", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Plan where every weight of a model goes, and print the plan.
    Plan(PlanArgs),
    /// List the components, tensors, dtypes and bytes of a weights file.
    Inspect(InspectArgs),
    /// Show the devices this build detects and the backends it has.
    Devices(DevicesArgs),
    /// Run one component's forward pass on named input tensors and write named outputs.
    Run(RunArgs),
    /// Generate an image (txt2img) or a video (Wan), each component placed as asked.
    Generate {
        #[command(subcommand)]
        kind: crate::generate::GenerateKind,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Task {
    /// UNet: in sample, timestep, encoder_hidden_states [, text_embeds, time_ids,
    /// down_block_additional_residuals.N, mid_block_additional_residual]; out sample.
    Unet,
    /// VAE encoder: in image; out latent_mean, latent_logvar.
    VaeEncode,
    /// VAE decoder: in z; out image.
    VaeDecode,
    /// CLIP text encoder: in input_ids; out last_hidden_state, hidden_states (stacked),
    /// pooler_output [, text_embeds].
    ClipText,
    /// ControlNet: in sample, timestep, encoder_hidden_states, controlnet_cond [,
    /// conditioning_scale, text_embeds, time_ids]; out down_block_res_samples.N,
    /// mid_block_res_sample.
    Controlnet,
    /// CLIP vision encoder: in pixel_values; out image_embeds, last_hidden_state,
    /// hidden_states (stacked).
    ClipVision,
    /// T5/UMT5 encoder: in input_ids [, attention_mask]; out last_hidden_state.
    T5,
    /// Wan transformer: in hidden_states (B, C, F, H, W), timestep, encoder_hidden_states; out
    /// sample.
    WanDit,
    /// FLUX transformer: in hidden_states [B, N, C], encoder_hidden_states,
    /// pooled_projections, timestep, img_ids [N, 3], txt_ids [T, 3] [, guidance]; out sample.
    FluxDit,
    /// Wan VAE encoder: in video [B,3,1+4k,H,W]; out latent_mean, latent_logvar.
    WanVaeEncode,
    /// Wan VAE decoder: in z; out video.
    WanVaeDecode,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RunComponent {
    Unet,
    Vae,
    /// The CLIP-L encoder (transformers layout).
    ClipL,
    /// The OpenCLIP encoder (SDXL's second, SD 2.x's only).
    ClipG,
}

#[derive(Args)]
pub struct RunArgs {
    /// What to run.
    #[arg(value_enum)]
    pub task: Task,
    /// A diffusers component folder (config.json + weights) or a .safetensors file (a
    /// single-file checkpoint, or one component).
    #[arg(long)]
    pub model: PathBuf,
    /// Which component of a single-file checkpoint (needed for SDXL's two text encoders).
    #[arg(long, value_enum)]
    pub component: Option<RunComponent>,
    /// The component's config.json (default: the folder's; single-file models are detected).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Input tensors by name (.safetensors).
    #[arg(long)]
    pub inputs: PathBuf,
    /// Where to write the outputs (.safetensors, f32).
    #[arg(long)]
    pub out: PathBuf,
    /// The compute device: cpu (ndarray), wgpu:0 or cuda:N (builds with those features).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Expert allocation string, e.g. "wgpu:0,0b;cpu,*" (everything streamed from the host).
    #[arg(long, conflicts_with_all = ["virtual_vram"])]
    pub expert: Option<String>,
    /// GiB of the model to move off the compute device onto --donor.
    #[arg(long)]
    pub virtual_vram: Option<f64>,
    /// Donor devices for --virtual-vram.
    #[arg(long, default_value = "cpu")]
    pub donor: String,
    /// Declared devices instead of detection, e.g. "wgpu:0=8gib,cpu=16gib".
    #[arg(long)]
    pub devices: Option<String>,
    /// Block swap (wan-dit, flux-dit): this many of the last transformer blocks (FLUX: of
    /// the double-stream blocks) live on --swap-device and are streamed in when used.
    #[arg(long, conflicts_with_all = ["expert", "virtual_vram"])]
    pub blocks_to_swap: Option<usize>,
    /// Block swap (flux-dit): this many of the last single-stream blocks too.
    #[arg(long, requires = "blocks_to_swap")]
    pub single_blocks_to_swap: Option<usize>,
    /// Where swapped blocks live.
    #[arg(long, default_value = "cpu")]
    pub swap_device: String,
    /// Swapped blocks staged ahead of use.
    #[arg(long, default_value_t = 1)]
    pub prefetch_blocks: usize,
    /// With block swap, keep the text embedder (FLUX: the context embedder) on
    /// --swap-device too.
    #[arg(long)]
    pub offload_txt_emb: bool,
    /// A LoRA patched in while the weights load, `PATH[:STRENGTH]` (strength 1 by default);
    /// repeatable. For the unet, clip-text, wan-dit and flux-dit tasks.
    #[arg(long, value_name = "PATH[:STRENGTH]")]
    pub lora: Vec<String>,
    /// Keep LoRA-patched weights of fp8 models at bf16 (true, the default); `false`
    /// re-quantises them to fp8 with seeded stochastic rounding (half the memory).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub high_precision_loras: bool,
    /// Units smaller than this stay on the compute device (`0b` streams every unit an
    /// allocation moves off it).
    #[arg(long, default_value = "64kib")]
    pub tiny_threshold: String,
    /// The dtype the forward pass computes in: f32 (the default), f16, bf16, or `auto` (the
    /// model's own half type where the device computes in it, else f32). Inputs are cast to
    /// it; outputs are written as f32.
    #[arg(long, value_name = "DTYPE", default_value = "f32", value_parser = parse_dtype)]
    pub dtype: DtypeArg,
}

/// `--dtype`: a compute dtype, or `None` for `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DtypeArg(pub Option<distorch::core::ComputeDtype>);

pub(crate) fn parse_dtype(s: &str) -> Result<DtypeArg, String> {
    distorch::core::ComputeDtype::parse_or_auto(s)
        .map(DtypeArg)
        .map_err(|e| format!("{e} (or auto)"))
}

/// Which file to read: a path, or a generated demo checkpoint.
#[derive(Args)]
pub struct Source {
    /// A .safetensors file (single-file checkpoint or one component).
    #[arg(required_unless_present = "demo", conflicts_with = "demo")]
    pub file: Option<PathBuf>,
    /// Use a built-in demo checkpoint instead of FILE: zero weights at the real model's
    /// shapes, written once (sparse, so only its header uses disk) to the cache folder
    /// ($DISTORCH_CACHE_DIR, else $XDG_CACHE_HOME/distorch, else ~/.cache/distorch).
    #[arg(long, value_enum)]
    pub demo: Option<Demo>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Demo {
    /// Stable Diffusion 1.5 (UNet, CLIP-L, VAE), fp16.
    Sd15,
}

impl Source {
    /// The path to read, writing the demo checkpoint first if needed.
    pub fn path(&self) -> Result<PathBuf, Failure> {
        match (&self.file, self.demo) {
            (Some(f), _) => Ok(f.clone()),
            (None, Some(Demo::Sd15)) => Ok(DemoModel::Sd15.ensure_in(&cache_dir())?),
            (None, None) => Err(Failure::Other("give a FILE or --demo".into())),
        }
    }
}

/// The demo files' folder ($DISTORCH_CACHE_DIR, else $XDG_CACHE_HOME/distorch, else
/// ~/.cache/distorch).
pub fn cache_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("DISTORCH_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|p| p.join("distorch")))
        .or_else(|| env("HOME").map(|p| Path::new(&p).join(".cache").join("distorch")))
        .unwrap_or_else(|| std::env::temp_dir().join("distorch"))
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ComponentArg {
    Unet,
    Clip,
    Vae,
    Controlnet,
    ClipVision,
    /// A one-component file that is none of the above.
    Model,
    /// Every component in the file, each planned on its own.
    All,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OrderArg {
    /// Spread offloaded units evenly through execution order.
    Interleave,
    /// Contiguous runs, as the original DisTorch2.
    Tail,
    /// Chosen by the clock: stream the units whose transfers compute hides best (needs
    /// --latent for the UNet's compute times; the donor's link from --devices `@GB/s`).
    Auto,
}

#[derive(Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub source: Source,
    /// Which component to plan.
    #[arg(long, value_enum, default_value = "all")]
    pub component: ComponentArg,
    /// Expert allocation string, e.g. "cuda:0,2.5gb;cpu,*", "cuda:0,25%;cpu,75%" or
    /// "cuda:0,0.2126;cpu,*". An empty string means none (use --virtual-vram).
    #[arg(long, conflicts_with_all = ["virtual_vram", "donor"])]
    pub expert: Option<String>,
    /// GiB of the model to move off the compute device onto the donors (0-1024).
    #[arg(long)]
    pub virtual_vram: Option<f64>,
    /// Compute device (default: the expert string's first device; with --virtual-vram, the
    /// first GPU in the device graph).
    #[arg(long)]
    pub compute: Option<String>,
    /// Donor devices for --virtual-vram, filled in order, e.g. "cuda:1,cpu".
    #[arg(long, default_value = "cpu")]
    pub donor: String,
    /// Declared devices instead of detection, e.g. "cuda:0=24gib,cuda:1=24gib/20gib,cpu=64gib"
    /// (DEVICE=TOTAL, then optionally /FREE and @LINK/s).
    #[arg(long)]
    pub devices: Option<String>,
    /// Which units go where.
    #[arg(long, value_enum, default_value = "interleave")]
    pub order: OrderArg,
    /// Units smaller than this stay on the compute device.
    #[arg(long, default_value = "64kib")]
    pub tiny_threshold: String,
    /// Print one JSON object per planned component (one line each) instead of the report.
    #[arg(long)]
    pub json: bool,
    /// Predict the pass for a UNet at this latent size (`128x128` for a 1024² SDXL image):
    /// each unit's compute from its shapes and --tflops, each streamed unit's transfer over
    /// its donor's link (`@GB/s` in --devices).
    #[arg(long, value_name = "HxW", value_parser = parse_latent)]
    pub latent: Option<(usize, usize)>,
    /// Samples per pass (2 with classifier-free guidance).
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// The compute device's effective rate in TFLOP/s for the predictions (default: an
    /// assumed rate per device kind, said in the report).
    #[arg(long)]
    pub tflops: Option<f64>,
    /// Streamed units staged ahead of use (the runtime's default: 2).
    #[arg(long, default_value_t = 2)]
    pub prefetch_units: usize,
}

fn parse_latent(s: &str) -> Result<(usize, usize), String> {
    let (h, w) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("`{s}`: expected HxW, e.g. 128x128"))?;
    let n = |v: &str| match v.trim().parse::<usize>() {
        Ok(n) if (1..=4096).contains(&n) => Ok(n),
        _ => Err(format!("`{s}`: sides are whole numbers from 1 to 4096")),
    };
    Ok((n(h)?, n(w)?))
}

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub source: Source,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct DevicesArgs {
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

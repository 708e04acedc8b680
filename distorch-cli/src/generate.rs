//! `distorch generate image`: txt2img (optionally with a ControlNet) from a checkpoint, a
//! diffusers folder or the demo checkpoint, each component placed by the seeds' loader inputs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use burn::tensor::backend::Backend;
use clap::{Args, Subcommand};
use distorch::backends::{OnBackend, on_device};
use distorch::core::ComputeDtype;
use distorch::core::runtime::PatchPrecision;
use distorch::models::sd::demo::DemoModel;
use distorch::models::sd::load::{file_bytes, hint_image};
use distorch::models::sd::pipeline::to_rgb8;
use distorch::models::{
    CheckpointOptions, ComponentOptions, Control, ControlNetModel, LoadProgress, Loaded, LoraSpec,
    ModelFolders, ModelKind, Placement, PlacementSpec, Progress, SamplerKind, StableDiffusion,
    load_model,
};
use distorch::{DeviceGraph, DeviceId};
use indicatif::{ProgressBar, ProgressStyle};

use crate::Failure;
use crate::generate_video::VideoArgs;

/// What to generate.
#[derive(Subcommand)]
pub enum GenerateKind {
    /// An image from a prompt (SD 1.x/2.x/SDXL; ControlNet with --controlnet and --hint).
    Image(Box<ImageArgs>),
    /// A video from a prompt (Wan 2.1 text to video).
    Video(Box<VideoArgs>),
    /// An image from a prompt with FLUX.1 (dev or schnell).
    Flux(Box<crate::generate_flux::FluxArgs>),
}

/// One component's placement, as DisTorch2's loaders take it (strings, parsed before loading).
#[derive(Args, Clone)]
pub struct UnetPlacement {
    /// Where the UNet computes: cpu, wgpu:N or cuda:N (builds with those features).
    #[arg(long, default_value = "cpu")]
    pub unet_compute_device: String,
    /// GiB of the UNet moved off its compute device onto --unet-donor-device (default: 4 on a
    /// GPU, as DisTorch2; 0 on cpu).
    #[arg(long)]
    pub unet_virtual_vram_gb: Option<f64>,
    /// Where the moved UNet weights live, in order (`cpu`, `cuda:1,cpu`).
    #[arg(long, default_value = "cpu")]
    pub unet_donor_device: String,
    /// An allocation string for the UNet instead (`cuda:0,2.5gb;cpu,*`).
    #[arg(long, conflicts_with = "unet_virtual_vram_gb")]
    pub unet_expert_mode_allocations: Option<String>,
}

/// The text encoders' placement.
#[derive(Args, Clone)]
pub struct ClipPlacement {
    /// Where the text encoders compute: another device of the UNet's backend (`cuda:1`), or
    /// cpu (on a GPU run: weights in host memory, streamed to the UNet's device).
    #[arg(long, default_value = "cpu")]
    pub clip_compute_device: String,
    /// GiB of the text encoders moved off their compute device.
    #[arg(long, default_value_t = 0.0)]
    pub clip_virtual_vram_gb: f64,
    /// Where the moved text-encoder weights live.
    #[arg(long, default_value = "cpu")]
    pub clip_donor_device: String,
    /// An allocation string for the text encoders instead.
    #[arg(long)]
    pub clip_expert_mode_allocations: Option<String>,
}

/// `generate image`.
#[derive(Args)]
pub struct ImageArgs {
    /// Checkpoint file, diffusers folder, or a name in the model folders (default: the demo
    /// checkpoint, SD 1.5's shapes with random weights, written once to the cache folder).
    #[arg(long)]
    pub ckpt: Option<String>,
    /// A UNet file used instead of the checkpoint's (safetensors or GGUF).
    #[arg(long)]
    pub unet: Option<String>,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative: String,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub cfg: f64,
    /// euler, euler_a, ddim or dpmpp_2m_karras.
    #[arg(long, default_value = "euler", value_parser = parse_sampler)]
    pub sampler: SamplerKind,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    #[arg(long, default_value_t = 512)]
    pub height: usize,
    #[command(flatten)]
    pub unet_placement: UnetPlacement,
    #[command(flatten)]
    pub clip_placement: ClipPlacement,
    /// Where the VAE computes (default: the UNet's compute device).
    #[arg(long)]
    pub vae_device: Option<String>,
    /// A ControlNet (computes on the UNet's device).
    #[arg(long, requires = "hint")]
    pub controlnet: Option<String>,
    /// The ControlNet's hint image.
    #[arg(long, requires = "controlnet")]
    pub hint: Option<PathBuf>,
    #[arg(long, default_value_t = 1.0)]
    pub control_strength: f32,
    /// A LoRA, `PATH_OR_NAME[:MODEL_STRENGTH[:CLIP_STRENGTH]]`; repeatable.
    #[arg(long, value_name = "LORA[:MODEL[:CLIP]]")]
    pub lora: Vec<String>,
    /// Keep LoRA-patched weights of fp8 models at bf16 (true) or re-quantise them to fp8.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub high_precision_loras: bool,
    /// DisTorch2's eject_models: unload cached models on the target devices before loading.
    /// One command loads one pipeline into a fresh process, so there is nothing to unload;
    /// the flag is passed to the library's loader (`CheckpointOptions::eject_models`).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub eject_models: bool,
    /// A ComfyUI `models/` folder to find names in.
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
    /// A ComfyUI `extra_model_paths.yaml`.
    #[arg(long)]
    pub extra_model_paths: Option<PathBuf>,
    /// Declared devices instead of detection (`cuda:0=8gib,cpu=32gib`).
    #[arg(long)]
    pub devices: Option<String>,
    /// The model predicts v (SD 2.x 768-v) rather than noise.
    #[arg(long)]
    pub v_prediction: bool,
    /// Compute dtype: f32, f16, bf16, or auto (the checkpoint's half type where the device
    /// computes in it; f32 on cpu).
    #[arg(long, value_name = "DTYPE", default_value = "auto", value_parser = crate::cli::parse_dtype)]
    pub dtype: crate::cli::DtypeArg,
    #[arg(long, default_value = "out.png")]
    pub out: PathBuf,
}

/// A component's placement strings, parsed (see [`PlacementSpec::parse`]).
fn placement_spec(
    device: &str,
    gb: f64,
    donors: &str,
    expert: Option<&str>,
) -> Result<PlacementSpec, Failure> {
    Ok(PlacementSpec::parse(device, gb, donors, expert)?)
}

/// The placements every generator takes, parsed before anything is read: the denoiser's
/// (`--unet-*`), the text encoders' (`--clip-*`), the VAE's (`--vae-device`, else the
/// denoiser's device), and the device graph (`--devices`, else detected).
pub(crate) struct Placements {
    pub(crate) unet: PlacementSpec,
    pub(crate) clip: PlacementSpec,
    pub(crate) vae: PlacementSpec,
    pub(crate) graph: DeviceGraph,
}

/// The flags of a transformer pipeline (`generate video`, `generate flux`), parsed before
/// anything loads: the placements, where swapped blocks live, the compute dtype.
pub(crate) struct DitParsed {
    pub(crate) place: Placements,
    pub(crate) swap: DeviceId,
    pub(crate) dtype: Option<ComputeDtype>,
}

impl DitParsed {
    pub(crate) fn parse(
        u: &UnetPlacement,
        c: &ClipPlacement,
        vae_device: Option<&str>,
        devices: Option<&str>,
        swap_device: &str,
        dtype: Option<ComputeDtype>,
    ) -> Result<DitParsed, Failure> {
        Ok(DitParsed {
            place: Placements::parse(u, c, vae_device, devices, 0.0)?,
            swap: swap_device.parse()?,
            dtype,
        })
    }

    /// A component's options under `placement`, on the parsed devices, in the parsed dtype.
    pub(crate) fn options<B: Backend>(&self, placement: Placement<B>) -> ComponentOptions<B> {
        ComponentOptions {
            dtype: self.dtype,
            ..ComponentOptions::new(self.place.graph.clone(), placement)
        }
    }
}

impl Placements {
    /// Parses the flags; `gpu_gb` is the denoiser's virtual VRAM when computing on a GPU
    /// and none is given (0 on the CPU).
    pub(crate) fn parse(
        u: &UnetPlacement,
        c: &ClipPlacement,
        vae_device: Option<&str>,
        devices: Option<&str>,
        gpu_gb: f64,
    ) -> Result<Placements, Failure> {
        let compute: DeviceId = u.unet_compute_device.parse()?;
        let default_gb = if compute == DeviceId::CPU {
            0.0
        } else {
            gpu_gb
        };
        let unet = placement_spec(
            &u.unet_compute_device,
            u.unet_virtual_vram_gb.unwrap_or(default_gb),
            &u.unet_donor_device,
            u.unet_expert_mode_allocations.as_deref(),
        )?;
        let clip = placement_spec(
            &c.clip_compute_device,
            c.clip_virtual_vram_gb,
            &c.clip_donor_device,
            c.clip_expert_mode_allocations.as_deref(),
        )?;
        let vae = PlacementSpec::on(match vae_device {
            Some(d) => d.parse()?,
            None => compute,
        });
        let graph = match devices {
            Some(d) => DeviceGraph::declare(d)?,
            None => distorch::backends::detect().graph,
        };
        Ok(Placements {
            unet,
            clip,
            vae,
            graph,
        })
    }
}

/// A progress bar over `steps` sampling steps, and the pipelines' progress callback that
/// drives it.
pub(crate) fn sampling_bar(
    steps: usize,
) -> Result<(ProgressBar, impl FnMut(Progress)), Box<dyn std::error::Error>> {
    let bar = bar(
        steps as u64,
        "sampling {bar:30} {pos}/{len} steps  {per_sec}  eta {eta}",
    )?;
    let b = bar.clone();
    Ok((bar, move |e| match e {
        Progress::Step { .. } => b.inc(1),
        Progress::Decoded { .. } => b.finish_and_clear(),
        Progress::Encoded { .. } => {}
    }))
}

/// Everything parsed from strings, before anything is read.
struct Parsed {
    unet: PlacementSpec,
    clip: PlacementSpec,
    vae: PlacementSpec,
    graph: DeviceGraph,
    dtype: Option<ComputeDtype>,
    sampler: SamplerKind,
}

fn parse(a: &ImageArgs) -> Result<Parsed, Failure> {
    let p = Placements::parse(
        &a.unet_placement,
        &a.clip_placement,
        a.vae_device.as_deref(),
        a.devices.as_deref(),
        4.0,
    )?;
    Ok(Parsed {
        unet: p.unet,
        clip: p.clip,
        vae: p.vae,
        graph: p.graph,
        dtype: a.dtype.0,
        sampler: a.sampler,
    })
}

fn parse_sampler(s: &str) -> Result<SamplerKind, String> {
    SamplerKind::from_name(s).map_err(|e| e.to_string())
}

/// Runs `generate image`.
pub fn image(args: &ImageArgs) -> Result<(), Failure> {
    let parsed = parse(args)?;
    dispatch(parsed.unet.compute_device, Image { args, parsed })
}

struct Image<'a> {
    args: &'a ImageArgs,
    parsed: Parsed,
}

impl Generate for Image<'_> {
    fn generate<B: Backend>(self, compute: DeviceId, device: B::Device) -> Outcome {
        generate_image::<B>(self.args, self.parsed, compute, device)
    }
}

/// What a generator returns.
pub(crate) type Outcome = Result<(), Box<dyn std::error::Error>>;

/// A `generate` subcommand, written once for every backend.
pub(crate) trait Generate {
    /// Runs on backend `B`, the denoiser computing on `device` (`compute` in plans).
    fn generate<B: Backend>(self, compute: DeviceId, device: B::Device) -> Outcome;
}

/// Runs `g` on the backend that computes on `compute` (`distorch::backends::on_device`).
pub(crate) fn dispatch<G: Generate>(compute: DeviceId, g: G) -> Result<(), Failure> {
    struct On<G>(G);
    impl<G: Generate> OnBackend for On<G> {
        type Output = Outcome;
        fn run<B: Backend>(self, compute: DeviceId, device: B::Device) -> Outcome {
            self.0.generate::<B>(compute, device)
        }
    }
    on_device(compute, On(g))?.map_err(other)
}

fn other(e: Box<dyn std::error::Error>) -> Failure {
    Failure::Other(e.to_string())
}

pub(crate) fn bar(len: u64, template: &str) -> Result<ProgressBar, Box<dyn std::error::Error>> {
    let bar = ProgressBar::new(len);
    bar.set_style(ProgressStyle::with_template(template)?);
    Ok(bar)
}

fn folders(args: &ImageArgs) -> Result<ModelFolders, Box<dyn std::error::Error>> {
    let mut folders = match &args.models_dir {
        Some(d) => ModelFolders::from_models_dir(d)?,
        None => ModelFolders::new(),
    };
    if let Some(y) = &args.extra_model_paths {
        folders.add_extra_model_paths(y)?;
    }
    Ok(folders)
}

fn generate_image<B: Backend>(
    args: &ImageArgs,
    p: Parsed,
    compute: DeviceId,
    device: B::Device,
) -> Result<(), Box<dyn std::error::Error>> {
    let folders = folders(args)?;
    let ckpt = match &args.ckpt {
        Some(name) => folders.resolve(ModelKind::Checkpoints, name)?,
        None => {
            println!(
                "No --ckpt: the demo checkpoint (SD 1.5 shapes, random weights: the image will \
                 be abstract). Give --ckpt for real images."
            );
            DemoModel::Sd15.ensure_random_in(&crate::cli::cache_dir())?
        }
    };
    let mut options = checkpoint_options::<B>(args, &p, &folders, compute, &device)?;
    let loading = bar(
        file_bytes(&ckpt)?,
        "loading  {bar:30} {bytes}/{total_bytes}  {bytes_per_sec}",
    )?;
    let b = loading.clone();
    options.progress = Some(LoadProgress(Arc::new(move |bytes| b.inc(bytes))));
    let t = Instant::now();
    let mut sd = StableDiffusion::<B>::load(&ckpt, &options)?;
    loading.finish_and_clear();
    println!(
        "loaded {} ({}) in {:.1} s",
        ckpt.display(),
        sd.family,
        t.elapsed().as_secs_f64()
    );
    for (name, plan, _) in &sd.loaded {
        println!("\n[{name}]\n{plan}");
    }
    for (name, report) in &sd.loras {
        println!(
            "LoRA on {name}: {} tensors patched, {} modules unmatched",
            report.matched.len(),
            report.unmatched.len()
        );
    }
    if args.v_prediction {
        sd.scheduler.prediction_type =
            distorch::models::sampling::scheduler::PredictionType::VPrediction;
    }
    let control = controlnet::<B>(args, &folders, &options, &sd)?;
    let mut request = sd.request(args.prompt.clone());
    request.negative = args.negative.clone();
    request.steps = args.steps;
    request.cfg = args.cfg;
    request.sampler = p.sampler;
    request.seed = args.seed;
    request.width = args.width;
    request.height = args.height;
    if let (Some(c), Some(hint)) = (&control, &args.hint) {
        request.control = Some(Control {
            model: &c.model,
            hint: hint_image::<B>(hint, args.width, args.height, &device)?,
            strength: args.control_strength,
        });
    }
    let (_bar, mut progress) = sampling_bar(args.steps)?;
    let out = sd.generate(&request, &mut progress)?;
    for (i, t) in out.step_times.iter().enumerate() {
        println!("step {:>3}: {:>8.1} ms", i + 1, t.as_secs_f64() * 1e3);
    }
    crate::generate_video::print_streamer("unet", sd.unet.streamer());
    to_rgb8(out.image)?.save(&args.out)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

/// The pipeline's options from the parsed placements and the LoRA / UNet flags.
fn checkpoint_options<B: Backend>(
    args: &ImageArgs,
    p: &Parsed,
    folders: &ModelFolders,
    compute: DeviceId,
    device: &B::Device,
) -> Result<CheckpointOptions<B>, Box<dyn std::error::Error>> {
    let bind = &distorch::bind_device::<B>;
    let mut options =
        CheckpointOptions::<B>::new(p.graph.clone(), compute, device.clone(), device.clone())?;
    options.unet = p.unet.placement::<B>(compute, device, bind)?;
    options.clip = p.clip.placement::<B>(compute, device, bind)?;
    options.vae = p.vae.placement::<B>(compute, device, bind)?;
    options.dtype = p.dtype;
    options.eject_models = args.eject_models;
    options.precision = if args.high_precision_loras {
        PatchPrecision::High
    } else {
        PatchPrecision::Fp8Stochastic { seed: 0 }
    };
    for spec in &args.lora {
        options.loras.push(LoraSpec::parse(spec, folders)?);
    }
    if let Some(name) = &args.unet {
        options.unet_file = Some(folders.resolve(ModelKind::DiffusionModels, name)?);
    }
    Ok(options)
}

/// The ControlNet of `--controlnet`, checked against the UNet, on the UNet's placement.
fn controlnet<B: Backend>(
    args: &ImageArgs,
    folders: &ModelFolders,
    options: &CheckpointOptions<B>,
    sd: &StableDiffusion<B>,
) -> Result<Option<Loaded<ControlNetModel<B>>>, Box<dyn std::error::Error>> {
    let Some(name) = &args.controlnet else {
        return Ok(None);
    };
    let path = folders.resolve(ModelKind::ControlNet, name)?;
    let compute = options.unet.request.compute().unwrap_or(DeviceId::CPU);
    let placement = Placement::on(compute, options.unet.devices.compute().clone());
    let mut opts = ComponentOptions::new(options.graph.clone(), placement);
    opts.dtype = options.dtype;
    let loaded: Loaded<ControlNetModel<B>> = load_model(path, None, &opts)?;
    loaded.model.config().check_unet(sd.unet.config())?;
    println!("\n[controlnet]\n{}", loaded.plan);
    Ok(Some(loaded))
}

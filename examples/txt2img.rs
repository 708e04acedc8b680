//! Text to image: a prompt in, a PNG out, each component of the model placed as asked.
//!
//! ```text
//! cargo run --release --example txt2img -- [--ckpt PATH_OR_NAME] --prompt "..."
//!     [--negative ...] [--steps N] [--cfg X] [--sampler euler|euler_a|ddim|dpmpp_2m_karras]
//!     [--seed N] [--width W --height H] [--device cpu|wgpu:0|cuda:N] [--unet PATH_OR_NAME]
//!     [--unet-virtual-vram GB --unet-donor DEV | --unet-expert STR] [--clip-device DEV]
//!     [--vae-device DEV] [--controlnet PATH_OR_NAME --hint IMG [--control-strength X]]
//!     [--lora NAME[:MODEL[:CLIP]]]... [--models-dir DIR] [--extra-model-paths YAML]
//!     [--devices DECL] [--v-prediction]
//!     --out out.png
//! ```
//!
//! `--ckpt` is a single-file checkpoint (SD 1.x/2.x/SDXL), a diffusers pipeline folder, or a
//! name found in `--models-dir` (a ComfyUI `models/` folder) and `--extra-model-paths`.
//! `--unet` loads the UNet from its own file instead (a GGUF from city96's ComfyUI-GGUF, or a
//! safetensors UNet), the text encoders and the VAE still from `--ckpt`.
//! Without it, the example writes a demo checkpoint once (SD 1.5's shapes, deterministic
//! random weights; about 2 GB in `$DISTORCH_CACHE`, else `~/.cache/distorch`): it runs the
//! whole pipeline but draws an abstract image. `--device wgpu:0` and `cuda:N` need the
//! facade's `wgpu` / `cuda` features.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use clap::Parser;
use distorch::alloc::parse_device_list;
use distorch::backends::{OnBackend, on_device};
use distorch::core::ComputeDtype;
use distorch::core::runtime::DeviceMap;
use distorch::lora::LoraFile;
use distorch::models::sd::demo::DemoModel;
use distorch::models::sd::pipeline::to_rgb8;
use distorch::models::{
    CheckpointOptions, ClipTokenizer, ComponentFiles, ComponentOptions, Control, ControlNetModel,
    LoadProgress, Loaded, LoraSpec, ModelFolders, ModelKind, Placement, Progress, SamplerKind,
    SchedulerConfig, StableDiffusion, Txt2Img, load_model,
};
use distorch::{ByteSize, DeviceGraph, DeviceId, PlanRequest, SafetensorsIndex, VirtualVram};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
struct Args {
    /// Checkpoint file, diffusers folder, or a name in the model folders (default: the demo).
    #[arg(long)]
    ckpt: Option<String>,
    /// A UNet file used instead of the checkpoint's (ComfyUI's UNETLoader / UnetLoaderGGUF):
    /// safetensors or GGUF, a path or a name in `diffusion_models/` (`unet/`).
    #[arg(long)]
    unet: Option<String>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative: String,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    cfg: f64,
    #[arg(long, default_value = "euler")]
    sampler: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 512)]
    width: usize,
    #[arg(long, default_value_t = 512)]
    height: usize,
    /// The compute device.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// GiB of the UNet moved off the compute device (DisTorch2's default: 4).
    #[arg(long)]
    unet_virtual_vram: Option<f64>,
    /// Where the moved UNet weights live.
    #[arg(long, default_value = "cpu")]
    unet_donor: String,
    /// An allocation string for the UNet instead (`cuda:0,2.5gb;cpu,*`).
    #[arg(long)]
    unet_expert: Option<String>,
    /// Where the text encoders compute.
    #[arg(long, default_value = "cpu")]
    clip_device: String,
    /// Where the VAE computes (default: the compute device).
    #[arg(long)]
    vae_device: Option<String>,
    #[arg(long)]
    controlnet: Option<String>,
    #[arg(long)]
    hint: Option<PathBuf>,
    #[arg(long, default_value_t = 1.0)]
    control_strength: f32,
    /// A ComfyUI `models/` folder to find names in.
    #[arg(long)]
    models_dir: Option<PathBuf>,
    /// A ComfyUI `extra_model_paths.yaml`.
    #[arg(long)]
    extra_model_paths: Option<PathBuf>,
    /// Declared devices instead of detection (`cuda:0=8gib,cpu=32gib`).
    #[arg(long)]
    devices: Option<String>,
    /// A LoRA, `PATH_OR_NAME[:MODEL_STRENGTH[:CLIP_STRENGTH]]` (1 and the model strength by
    /// default); repeatable. Names are looked up in the `loras` folders.
    #[arg(long, value_name = "LORA[:MODEL[:CLIP]]")]
    lora: Vec<String>,
    /// The model predicts v (SD 2.x 768-v) rather than noise.
    #[arg(long)]
    v_prediction: bool,
    /// The compute dtype of every component: f32, f16, bf16, or auto (the checkpoint's own
    /// half type where the device computes in it, the VAE at f32 for f16 checkpoints; f32 on
    /// ndarray).
    #[arg(long, default_value = "auto")]
    dtype: String,
    #[arg(long, default_value = "out.png")]
    out: PathBuf,
}

#[path = "common/malloc.rs"]
mod malloc;

fn main() {
    malloc::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Err(e) = dispatch(&args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

type Failure = Box<dyn std::error::Error>;

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
    let graph = match &args.devices {
        Some(d) => DeviceGraph::declare(d)?,
        None => distorch::backends::detect().graph,
    };
    let mut folders = match &args.models_dir {
        Some(d) => ModelFolders::from_models_dir(d)?,
        None => ModelFolders::new(),
    };
    if let Some(y) = &args.extra_model_paths {
        folders.add_extra_model_paths(y)?;
    }
    let ckpt = match &args.ckpt {
        Some(name) => folders.resolve(ModelKind::Checkpoints, name)?,
        None => {
            let dir = std::env::var_os("DISTORCH_CACHE")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/distorch")))
                .ok_or("no cache folder: set DISTORCH_CACHE")?;
            println!(
                "No --ckpt: using the demo checkpoint (SD 1.5 shapes, random weights — the \
                 image will be abstract). Point --ckpt at a real SD 1.x/2.x/SDXL checkpoint \
                 or diffusers folder for real images."
            );
            let t = Instant::now();
            let path = DemoModel::Sd15.ensure_random_in(&dir)?;
            println!(
                "demo checkpoint: {} ({:.1} s)",
                path.display(),
                t.elapsed().as_secs_f64()
            );
            path
        }
    };

    // Placements: the UNet as DisTorch2's loader, the text encoders and the VAE on a device.
    // One build computes on one backend: "cpu" for a component of a GPU run means its weights
    // live in host memory and stream to the compute device.
    let place = |name: &str| -> Result<Placement<B>, Failure> {
        let id: DeviceId = name.parse()?;
        if id == compute {
            Ok(Placement::on(compute, device.clone()))
        } else if id == DeviceId::CPU {
            let all = VirtualVram::new(compute, ByteSize(1 << 50), vec![DeviceId::CPU])?;
            Ok(Placement {
                request: PlanRequest::virtual_vram(all),
                devices: DeviceMap::new(device.clone()),
            })
        } else {
            Err(format!("{name}: use the compute device ({compute}) or cpu").into())
        }
    };
    let mut options =
        CheckpointOptions::<B>::new(graph.clone(), compute, device.clone(), device.clone())?;
    options.dtype = ComputeDtype::parse_or_auto(&args.dtype)?;
    let unet_request = match (&args.unet_expert, args.unet_virtual_vram) {
        (Some(e), _) => PlanRequest::expert_with_compute(e.parse()?, compute),
        (None, Some(gib)) => PlanRequest::virtual_vram(VirtualVram::from_gib(
            compute,
            gib,
            parse_device_list(&args.unet_donor)?,
        )?),
        (None, None) if compute == DeviceId::CPU => {
            PlanRequest::virtual_vram(VirtualVram::none(compute))
        }
        (None, None) => options.unet.request.clone(),
    };
    options.unet.request = unet_request;
    options.clip = place(&args.clip_device)?;
    options.vae = place(args.vae_device.as_deref().unwrap_or(&args.device))?;

    for spec in &args.lora {
        let mut parts = spec.rsplitn(3, ':').collect::<Vec<_>>();
        parts.reverse();
        // Trailing numbers are strengths; the rest (which may hold ':') is the name.
        let numbers: Vec<f32> = parts
            .iter()
            .rev()
            .map_while(|p| p.parse::<f32>().ok())
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let name_parts = parts.len() - numbers.len();
        let name = parts[..name_parts.max(1)].join(":");
        let model = numbers.first().copied().unwrap_or(1.0);
        let clip = numbers.get(1).copied().unwrap_or(model);
        let path = folders.resolve(ModelKind::Loras, &name)?;
        options.loras.push(LoraSpec {
            file: Arc::new(LoraFile::open(&path)?),
            model,
            clip,
        });
    }
    if let Some(name) = &args.unet {
        options.unet_file = Some(folders.resolve(ModelKind::DiffusionModels, name)?);
    }
    let loading = ProgressBar::new(checkpoint_bytes(&ckpt)?);
    loading.set_style(
        ProgressStyle::with_template("loading {bar:30} {bytes}/{total_bytes}  {bytes_per_sec}")
            .map_err(|e| e.to_string())?,
    );
    let bar = loading.clone();
    options.progress = Some(LoadProgress(Arc::new(move |bytes| bar.inc(bytes))));
    let t = Instant::now();
    let sd = if ckpt.is_dir() {
        StableDiffusion::<B>::load_diffusers(&ckpt, &options)?
    } else {
        StableDiffusion::<B>::load_single_file(&ckpt, &options)?
    };
    loading.finish_and_clear();
    let read: u64 = sd
        .loaded
        .iter()
        .map(|(_, _, r)| r.bytes_read.0 + r.host_mapped.0)
        .sum();
    println!(
        "loaded {} ({}) in {:.1} s, {:.2} GB placed",
        ckpt.display(),
        sd.family,
        t.elapsed().as_secs_f64(),
        read as f64 / 1e9
    );
    for (name, plan, _) in &sd.loaded {
        println!("\n[{name}]\n{plan}");
    }
    for (name, report) in &sd.loras {
        println!(
            "LoRA on {name}: {} tensors patched, {} modules unmatched{}",
            report.matched.len(),
            report.unmatched.len(),
            report
                .unmatched
                .first()
                .map_or(String::new(), |u| format!(" (first: {u})"))
        );
    }

    let tokenizers = tokenizers(&ckpt, sd.text_encoders.len())?;
    let scheduler_file = ckpt.join("scheduler/scheduler_config.json");
    let mut scheduler = if scheduler_file.is_file() {
        SchedulerConfig::from_file(&scheduler_file)?
    } else {
        SchedulerConfig::default()
    };
    if args.v_prediction {
        scheduler.prediction_type =
            distorch::models::sampling::scheduler::PredictionType::VPrediction;
    }

    let control: Option<Loaded<ControlNetModel<B>>> = match &args.controlnet {
        Some(name) => {
            let path = folders.resolve(ModelKind::ControlNet, name)?;
            let mut opts =
                ComponentOptions::new(graph.clone(), Placement::on(compute, device.clone()));
            opts.dtype = options.dtype;
            let loaded: Loaded<ControlNetModel<B>> = load_model(path, None, &opts)?;
            loaded.model.config().check_unet(sd.unet.config())?;
            println!("\n[controlnet]\n{}", loaded.plan);
            Some(loaded)
        }
        None => None,
    };
    let hint = match (&control, &args.hint) {
        (Some(_), Some(p)) => Some(hint_tensor::<B>(p, args.width, args.height, &device)?),
        (Some(_), None) => return Err("--controlnet needs --hint IMAGE".into()),
        (None, Some(_)) => return Err("--hint needs --controlnet".into()),
        (None, None) => None,
    };

    let request = Txt2Img {
        negative: args.negative.clone(),
        steps: args.steps,
        cfg: args.cfg,
        sampler: SamplerKind::from_name(&args.sampler)?,
        scheduler,
        seed: args.seed,
        width: args.width,
        height: args.height,
        latents: None,
        control: control.as_ref().zip(hint).map(|(c, hint)| Control {
            model: &c.model,
            hint,
            strength: args.control_strength,
        }),
        ..Txt2Img::new(args.prompt.clone())
    };
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("sampling {bar:30} {pos}/{len} steps  {per_sec}  eta {eta}")
            .map_err(|e| e.to_string())?,
    );
    let mut report = Vec::new();
    let out = sd.txt2img(&tokenizers, &request, &mut |p| match p {
        Progress::Step { elapsed, .. } => {
            bar.inc(1);
            report.push(elapsed);
        }
        Progress::Encoded { elapsed } => report.push(elapsed),
        Progress::Decoded { .. } => bar.finish_and_clear(),
    })?;
    println!();
    for (i, t) in out.step_times.iter().enumerate() {
        println!("step {:>3}: {:>8.1} ms", i + 1, t.as_secs_f64() * 1e3);
    }
    let stats = sd.unet.streamer().take_stats();
    let moved: u64 = stats.bytes_moved.values().map(|b| b.0).sum();
    println!(
        "unet streamer: {} fetches, {} resident, {} prefetched, {} on demand, {:.2} GB moved, \
         stall {:.1} ms",
        stats.fetches,
        stats.resident,
        stats.prefetched,
        stats.on_demand,
        moved as f64 / 1e9,
        stats.stall.as_secs_f64() * 1e3
    );
    to_rgb8(out.image)?.save(&args.out)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

/// Bytes of tensor data in a checkpoint file or a diffusers pipeline folder's components.
fn checkpoint_bytes(ckpt: &Path) -> Result<u64, Failure> {
    if !ckpt.is_dir() {
        return Ok(SafetensorsIndex::open(ckpt)?.data_bytes());
    }
    let mut total = 0;
    for part in ["unet", "vae", "text_encoder", "text_encoder_2"] {
        let dir = ckpt.join(part);
        if dir.is_dir() {
            let files = ComponentFiles::find(&dir)?;
            total += SafetensorsIndex::open(files.weights)?.data_bytes();
        }
    }
    Ok(total)
}

/// One tokenizer per text encoder: the diffusers folder's own when it has them, else the
/// bundled CLIP vocabulary (SDXL's second encoder pads with `!`).
fn tokenizers(ckpt: &Path, encoders: usize) -> Result<Vec<ClipTokenizer>, Failure> {
    (0..encoders)
        .map(|i| {
            let dir = ckpt.join(if i == 0 { "tokenizer" } else { "tokenizer_2" });
            if dir.join("vocab.json").is_file() {
                Ok(ClipTokenizer::from_folder(&dir)?)
            } else if i == 1 {
                Ok(ClipTokenizer::bundled()?.with_pad("!")?)
            } else {
                Ok(ClipTokenizer::bundled()?)
            }
        })
        .collect()
}

/// The hint image resized to the output size, [1, 3, h, w] in [0, 1].
fn hint_tensor<B: Backend>(
    path: &Path,
    width: usize,
    height: usize,
    device: &B::Device,
) -> Result<Tensor<B, 4>, Failure> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let image = distorch::models::vision::clip_image::decode(&bytes)?;
    let image = image::imageops::resize(
        &image,
        width as u32,
        height as u32,
        image::imageops::FilterType::Lanczos3,
    );
    let mut values = vec![0f32; 3 * width * height];
    for (x, y, p) in image.enumerate_pixels() {
        for c in 0..3 {
            values[(c * height + y as usize) * width + x as usize] = f32::from(p[c]) / 255.0;
        }
    }
    Ok(Tensor::from_data(
        TensorData::new(values, [1, 3, height, width]),
        device,
    ))
}

//! Text to image with FLUX.1: a prompt in, a PNG out, the transformer's last double- and
//! single-stream blocks swapped to another device and streamed in when used.
//!
//! ```text
//! cargo run --release --example flux -- --prompt "..." [--model FLUX_DIFFUSERS_FOLDER]
//!     [--width W --height H] [--steps N] [--guidance X] [--negative ... --true-cfg X]
//!     [--seed N] [--max-sequence-length N] [--device cpu|wgpu:0|cuda:N] [--dtype DTYPE]
//!     [--double-blocks-to-swap N] [--single-blocks-to-swap N] [--swap-device DEV]
//!     [--devices DECL] --out flux.png
//! ```
//!
//! `--model` is a diffusers FLUX folder (`text_encoder/` CLIP-L, `text_encoder_2/` T5,
//! `tokenizer_2/`, `transformer/`, `vae/`, `scheduler/`; CLIP's tokenizer is read from
//! `tokenizer/` when it is there, else the bundled one). Without it the example writes a
//! small demo folder once (FLUX.1's architecture at small widths — 1 double and 2 single
//! blocks of two 128-wide heads, a 2-layer T5 v1.1, a 2-layer CLIP, the 16-channel VAE at
//! width 32 — deterministic random weights and a character-level T5 tokenizer, in
//! `$DISTORCH_CACHE`, else `~/.cache/distorch`): it runs the whole pipeline but draws an
//! abstract image. Prints each component's plan and the transformer's streamer statistics.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use clap::Parser;
use distorch::backends::{OnBackend, on_device};
use distorch::core::runtime::{DeviceMap, Lookahead};
use distorch::models::flux::dit::{FluxConfig, FluxLayout, FluxTransformer};
use distorch::models::flux::load::{FluxFiles, FluxOptions};
use distorch::models::flux::pipeline::{Flux, FluxTxt2Img};
use distorch::models::text::umt5::{T5Variant, Umt5Config, Umt5Encoder};
use distorch::models::{ClipTextConfig, ClipTextModel, ComponentOptions, Placement, VaeConfig};
use distorch::{DeviceGraph, DeviceId, PlanRequest};

#[derive(Parser)]
struct Args {
    /// A diffusers FLUX folder (default: the demo).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    /// A negative prompt, used with --true-cfg above 1.
    #[arg(long)]
    negative: Option<String>,
    /// True classifier-free guidance scale (two transformer passes a step).
    #[arg(long, default_value_t = 1.0)]
    true_cfg: f64,
    #[arg(long, default_value_t = 64)]
    width: usize,
    #[arg(long, default_value_t = 64)]
    height: usize,
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// The guidance value FLUX.1-dev embeds (schnell has none).
    #[arg(long, default_value_t = 3.5)]
    guidance: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// T5 tokens (FLUX.1-dev: 512, schnell: 256).
    #[arg(long, default_value_t = 512)]
    max_sequence_length: usize,
    /// The compute device.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The compute dtype of every model: f32, f16, bf16, or auto (each model's own half type
    /// where the device computes in it; f32 on ndarray).
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Double-stream blocks, counted from the last, kept on --swap-device (default: half).
    #[arg(long)]
    double_blocks_to_swap: Option<usize>,
    /// Single-stream blocks, counted from the last, kept on --swap-device (default: half).
    #[arg(long)]
    single_blocks_to_swap: Option<usize>,
    /// Where swapped blocks live.
    #[arg(long, default_value = "cpu")]
    swap_device: String,
    /// Declared devices instead of detection (`cuda:0=8gib,cpu=32gib`).
    #[arg(long)]
    devices: Option<String>,
    #[arg(long, default_value = "flux.png")]
    out: PathBuf,
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

/// The model folder: `--model`, or the demo folder (written once).
fn folder(args: &Args) -> Result<PathBuf, Failure> {
    if let Some(m) = &args.model {
        return Ok(m.clone());
    }
    let dir = demo::cache_dir("demo-flux-small")?;
    if !dir.join("complete").exists() {
        println!(
            "writing the demo FLUX folder (random weights: the image will be abstract) to {}",
            dir.display()
        );
        write_demo(&dir)?;
    }
    Ok(dir)
}

fn run<B: Backend>(args: &Args, compute: DeviceId, device: B::Device) -> Result<(), Failure> {
    let folder = folder(args)?;
    let graph = match &args.devices {
        Some(d) => DeviceGraph::declare(d)?,
        None => distorch::backends::detect().graph,
    };
    let on = |id: DeviceId| Placement::<B>::on(id, device.clone());
    let dtype = distorch::core::ComputeDtype::parse_or_auto(&args.dtype)?;
    let options = |p: Placement<B>| ComponentOptions {
        dtype,
        ..ComponentOptions::new(graph.clone(), p)
    };

    let config = FluxConfig::from_file(folder.join("transformer").join("config.json"))?;
    let swap_device: DeviceId = args.swap_device.parse()?;
    let mut dit_options = if swap_device == compute {
        println!("(compute and swap device are both {compute}: no block swap)");
        options(on(compute))
    } else {
        let swap = FluxLayout::Diffusers.block_swap(
            compute,
            swap_device,
            args.double_blocks_to_swap.unwrap_or(config.num_layers / 2),
            args.single_blocks_to_swap
                .unwrap_or(config.num_single_layers / 2),
        );
        options(Placement {
            request: PlanRequest::block_swap(swap),
            devices: DeviceMap::new(device.clone()),
        })
    };
    // One double-stream block (16 units) staged ahead.
    dit_options.lookahead = Lookahead {
        units: 16,
        ..Lookahead::default()
    };
    let mut files = FluxFiles::diffusers(&folder)?;
    files.configs.transformer = Some(config);
    let (flux, plans) = Flux::load(
        &files,
        &FluxOptions {
            transformer: dit_options,
            ..FluxOptions::all(options(on(compute)))
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
    req.width = args.width;
    req.height = args.height;
    req.steps = args.steps;
    req.guidance = args.guidance;
    req.seed = args.seed;
    req.max_sequence_length = args.max_sequence_length;
    let out = flux.txt2img(&req, &mut demo::print_progress)?;
    demo::print_streamer(flux.transformer.streamer());
    distorch::models::sd::pipeline::to_rgb8(out.image)?.save(&args.out)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

/// Writes the demo folder: small FLUX-architecture models with random weights.
fn write_demo(dir: &Path) -> Result<(), Failure> {
    type Nd = distorch::backends::NdArray;
    for sub in [
        "text_encoder",
        "text_encoder_2",
        "tokenizer_2",
        "transformer",
        "vae",
        "scheduler",
    ] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let vocab =
        distorch::models::text::t5_demo::write_tokenizer(&dir.join("tokenizer_2/tokenizer.json"))?;
    let clip = ClipTextConfig {
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        eos_token_id: 49407,
        ..ClipTextConfig::default()
    };
    let t5 = Umt5Config {
        vocab_size: vocab,
        d_model: 256,
        d_kv: 64,
        d_ff: 512,
        num_layers: 2,
        num_heads: 4,
        variant: T5Variant::T5,
        ..Umt5Config::default()
    };
    let dit = FluxConfig {
        num_layers: 1,
        num_single_layers: 2,
        num_attention_heads: 2,
        joint_attention_dim: t5.d_model,
        pooled_projection_dim: clip.hidden_size,
        ..FluxConfig::default()
    };
    let vae = VaeConfig {
        block_out_channels: vec![32; 4],
        down_block_types: vec!["DownEncoderBlock2D".into(); 4],
        up_block_types: vec!["UpDecoderBlock2D".into(); 4],
        latent_channels: 16,
        scaling_factor: 0.3611,
        shift_factor: Some(0.1159),
        use_quant_conv: false,
        use_post_quant_conv: false,
        ..VaeConfig::default()
    };
    let json = |v: serde_json::Value, path: PathBuf| std::fs::write(path, v.to_string());
    json(
        serde_json::json!({"vocab_size": clip.vocab_size, "hidden_size": clip.hidden_size,
            "intermediate_size": clip.intermediate_size, "num_hidden_layers": clip.num_hidden_layers,
            "num_attention_heads": clip.num_attention_heads, "eos_token_id": clip.eos_token_id,
            "hidden_act": "quick_gelu"}),
        dir.join("text_encoder/config.json"),
    )?;
    json(
        serde_json::json!({"model_type": "t5", "vocab_size": t5.vocab_size, "d_model": t5.d_model,
            "d_kv": t5.d_kv, "d_ff": t5.d_ff, "num_layers": t5.num_layers,
            "num_heads": t5.num_heads, "feed_forward_proj": "gated-gelu"}),
        dir.join("text_encoder_2/config.json"),
    )?;
    json(
        serde_json::json!({"num_layers": dit.num_layers, "num_single_layers": dit.num_single_layers,
            "num_attention_heads": dit.num_attention_heads,
            "joint_attention_dim": dit.joint_attention_dim,
            "pooled_projection_dim": dit.pooled_projection_dim, "guidance_embeds": true}),
        dir.join("transformer/config.json"),
    )?;
    json(
        serde_json::json!({"block_out_channels": vae.block_out_channels,
            "down_block_types": vae.down_block_types, "up_block_types": vae.up_block_types,
            "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,
            "use_quant_conv": false, "use_post_quant_conv": false}),
        dir.join("vae/config.json"),
    )?;
    json(
        serde_json::json!({"shift": 3.0, "use_dynamic_shifting": true, "base_shift": 0.5,
            "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}),
        dir.join("scheduler/scheduler_config.json"),
    )?;
    distorch::models::text::t5_demo::write_weights(
        &dir.join("text_encoder/model.safetensors"),
        ClipTextModel::<Nd>::expected_tensors(&clip, "text_model.", false),
        1,
    )?;
    distorch::models::text::t5_demo::write_weights(
        &dir.join("text_encoder_2/model.safetensors"),
        Umt5Encoder::<Nd>::expected_tensors(&t5, "shared"),
        2,
    )?;
    distorch::models::text::t5_demo::write_weights(
        &dir.join("transformer/diffusion_pytorch_model.safetensors"),
        FluxTransformer::<Nd>::expected_tensors(&dit),
        3,
    )?;
    distorch::models::text::t5_demo::write_weights(
        &dir.join("vae/diffusion_pytorch_model.safetensors"),
        vae.expected_tensors(),
        4,
    )?;
    std::fs::write(dir.join("complete"), b"")?;
    Ok(())
}

//! `distorch run`: one component's forward pass on named input tensors, weights placed as
//! asked, named outputs written — the parity harness against diffusers / transformers.

use std::path::PathBuf;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use distorch::alloc::{DeviceGraph, DeviceId, PlanRequest, VirtualVram, parse_device_list};
use distorch::core::runtime::{DeviceMap, LoadOptions, Lookahead, WeightPatch};
use distorch::core::{Component, ComponentKind, SafetensorsIndex, components, units};
use distorch::lora::{LoraFile, LoraPatch, Target};
use distorch::models::{
    AutoencoderKl, ClipLayout, ClipTextConfig, ClipTextModel, ClipVisionConfig, ClipVisionModel,
    ComponentFiles, ControlNetConfig, ControlNetInput, ControlNetModel, KeyLayout, Unet2dCondition,
    UnetConfig, UnetInput, VaeConfig, text_encoders,
};

use crate::Failure;
use crate::cli::{RunArgs, RunComponent, Task};
use crate::tensors::{Inputs, Outputs};

impl From<distorch::models::Error> for Failure {
    fn from(e: distorch::models::Error) -> Self {
        match e {
            distorch::models::Error::Alloc(a) => a.into(),
            other => Failure::Other(other.to_string()),
        }
    }
}

pub fn run(args: &RunArgs) -> Result<(), Failure> {
    if args.dtype != "f32" {
        return Err(Failure::Other(format!(
            "--dtype {}: only f32 compute is implemented (weights of any dtype are widened)",
            args.dtype
        )));
    }
    let device: DeviceId = args.device.parse()?;
    match device.kind() {
        distorch::alloc::DeviceKind::Cpu => {
            #[cfg(feature = "ndarray")]
            return run_on::<distorch::backends::NdArray>(args, device, Default::default());
        }
        distorch::alloc::DeviceKind::Wgpu if device.index() == 0 => {
            #[cfg(feature = "wgpu")]
            return run_on::<distorch::backends::Wgpu>(args, device, Default::default());
        }
        distorch::alloc::DeviceKind::Cuda => {
            #[cfg(feature = "cuda")]
            return run_on::<distorch::backends::Cuda>(
                args,
                device,
                burn::backend::cuda::CudaDevice::new(device.index() as usize),
            );
        }
        _ => {}
    }
    Err(Failure::Other(format!(
        "--device {device}: this build cannot compute there (backends compiled in: {}; wgpu \
         means wgpu:0, the default adapter)",
        distorch::backends::compiled()
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// Where the weights are: a component folder (config.json + weights) or one file.
struct Model {
    weights: PathBuf,
    config: Option<PathBuf>,
}

fn model(args: &RunArgs) -> Result<Model, Failure> {
    let p = &args.model;
    if p.is_dir() {
        let files = ComponentFiles::find(p)?;
        let (weights, config) = (files.weights, files.config);
        Ok(Model {
            weights,
            config: args.config.clone().or(config.exists().then_some(config)),
        })
    } else {
        Ok(Model {
            weights: p.clone(),
            config: args.config.clone(),
        })
    }
}

/// The component the task runs, from a checkpoint (`--component`) or a one-component file.
fn component<'a>(
    index: &'a SafetensorsIndex,
    task: Task,
    wanted: Option<RunComponent>,
) -> Result<Component<'a>, Failure> {
    let split = components::split(index);
    let kind = match task {
        Task::Unet => ComponentKind::Unet,
        Task::VaeEncode | Task::VaeDecode => ComponentKind::Vae,
        Task::ClipText => ComponentKind::Clip,
        Task::Controlnet => ComponentKind::ControlNet,
        Task::ClipVision => ComponentKind::ClipVision,
    };
    let found = split.components.iter().find(|c| c.kind == kind);
    let c = match (found, split.components.as_slice()) {
        (Some(c), _) => c.clone(),
        (None, [only]) if only.kind == ComponentKind::Model => only.clone(),
        _ => {
            return Err(Failure::Other(format!(
                "{}: no {kind} in the file",
                index.path().display()
            )));
        }
    };
    if kind != ComponentKind::Clip {
        return Ok(c);
    }
    let encoders = text_encoders(&c);
    let want = match wanted {
        Some(RunComponent::ClipG) => Some(ClipLayout::OpenClip),
        Some(RunComponent::ClipL) => Some(ClipLayout::Transformers),
        _ => None,
    };
    match (want, encoders.len()) {
        (None, 1) => Ok(encoders[0].0.clone()),
        (None, _) => Err(Failure::Other(format!(
            "{}: {} text encoders; choose one with --component clip-l or clip-g",
            index.path().display(),
            encoders.len()
        ))),
        (Some(layout), _) => encoders
            .into_iter()
            .find(|(_, l)| *l == layout)
            .map(|(c, _)| c)
            .ok_or_else(|| {
                Failure::Other(format!(
                    "{}: no {} text encoder",
                    index.path().display(),
                    if layout == ClipLayout::OpenClip {
                        "OpenCLIP (clip-g)"
                    } else {
                        "CLIP-L"
                    }
                ))
            }),
    }
}

fn request(args: &RunArgs, device: DeviceId) -> Result<PlanRequest, Failure> {
    Ok(match (&args.expert, args.virtual_vram) {
        (Some(e), _) => PlanRequest::expert_with_compute(e.parse()?, device),
        (None, Some(gib)) => {
            let donors = parse_device_list(&args.donor)?;
            PlanRequest::virtual_vram(VirtualVram::from_gib(device, gib, donors)?)
        }
        (None, None) => PlanRequest::virtual_vram(VirtualVram::none(device)),
    })
}

fn run_on<B: Backend>(
    args: &RunArgs,
    device_id: DeviceId,
    device: B::Device,
) -> Result<(), Failure> {
    let graph = match &args.devices {
        Some(d) => DeviceGraph::declare(d)?,
        None => distorch::backends::detect().graph,
    };
    let request = request(args, device_id)?;
    let inputs = Inputs::read(&args.inputs)?;
    let model = model(args)?;
    let index = SafetensorsIndex::open(&model.weights)?;
    let c = component(&index, args.task, args.component)?;
    let devices = DeviceMap::<B>::new(device.clone());
    let options = LoadOptions::default();
    let look = Lookahead::default();
    let mut out = Outputs::default();
    let plan_with = |order: &[String]| -> Result<distorch::Plan, Failure> {
        let inv = units::inventory(&c)?.in_order(order);
        Ok(distorch::plan(&request, &inv, &graph)?)
    };
    match args.task {
        Task::Unet => {
            let (config, layout) = unet_config(&model, &c)?;
            let plan = plan_with(&Unet2dCondition::<B>::execution_order(&config, layout)?)?;
            let patch = loras::<B, Unet2dCondition<B>>(args, &c, &config, Target::Unet)?;
            let options = LoadOptions {
                patch: patch.as_ref().map(|p| p as &dyn WeightPatch<B>),
                ..LoadOptions::default()
            };
            let (unet, _) =
                Unet2dCondition::<B>::load(&index, &c, &plan, &devices, config, &options, look)?;
            let mut input = unet_input(&inputs, &device)?;
            if inputs.has("mid_block_additional_residual") {
                let down = (0..)
                    .map(|i| format!("down_block_additional_residuals.{i}"))
                    .take_while(|n| inputs.has(n))
                    .map(|n| inputs.tensor(&n, &device))
                    .collect::<Result<Vec<_>, _>>()?;
                input = input.with_control(
                    down,
                    inputs.tensor("mid_block_additional_residual", &device)?,
                );
            }
            out.push("sample", unet.forward(input)?)?;
            log_stats(unet.streamer());
        }
        Task::Controlnet => {
            let config = match &model.config {
                Some(p) => ControlNetConfig::from_file(p)?,
                None => <ControlNetModel<B> as distorch::models::Model<B>>::detect_config(&c)?,
            };
            let order = ControlNetModel::<B>::execution_order(&config, KeyLayout::of_unet(&c))?;
            let plan = plan_with(&order)?;
            let (control, _) =
                ControlNetModel::<B>::load(&index, &c, &plan, &devices, config, &options, look)?;
            let base = unet_input(&inputs, &device)?;
            let mut input =
                ControlNetInput::for_unet(&base, inputs.tensor("controlnet_cond", &device)?);
            if inputs.has("conditioning_scale") {
                match inputs.values("conditioning_scale")?.1.as_slice() {
                    [scale] => input = input.with_scale(*scale as f32),
                    other => {
                        return Err(Failure::Other(format!(
                            "input `conditioning_scale` has {} values; expected one",
                            other.len()
                        )));
                    }
                }
            }
            let res = control.forward(input)?;
            for (i, t) in res.down_block_res_samples.into_iter().enumerate() {
                out.push(&format!("down_block_res_samples.{i}"), t)?;
            }
            out.push("mid_block_res_sample", res.mid_block_res_sample)?;
            log_stats(control.streamer());
        }
        Task::ClipVision => {
            let config = match &model.config {
                Some(p) => ClipVisionConfig::from_file(p)?,
                None => ClipVisionConfig::detect(&c)?,
            };
            let plan = plan_with(&[])?;
            let (vision, _) =
                ClipVisionModel::<B>::load(&index, &c, &plan, &devices, config, &options, look)?;
            let enc = vision.forward(inputs.tensor("pixel_values", &device)?)?;
            out.push("image_embeds", enc.image_embeds)?;
            out.push("last_hidden_state", enc.last_hidden_state)?;
            out.push("hidden_states", Tensor::stack::<4>(enc.hidden_states, 0))?;
            log_stats(vision.streamer());
        }
        Task::VaeEncode | Task::VaeDecode => {
            let config = match &model.config {
                Some(p) => VaeConfig::from_file(p)?,
                None => VaeConfig::detect(&c, 0.18215)?,
            };
            let plan = plan_with(&[])?;
            let (vae, _) =
                AutoencoderKl::<B>::load(&index, &c, &plan, &devices, config, &options, look)?;
            if args.task == Task::VaeEncode {
                let (mean, logvar) = vae.encode(inputs.tensor("image", &device)?)?;
                out.push("latent_mean", mean)?;
                out.push("latent_logvar", logvar)?;
            } else {
                out.push("image", vae.decode(inputs.tensor("z", &device)?)?)?;
            }
            log_stats(vae.streamer());
        }
        Task::ClipText => {
            let config = match &model.config {
                Some(p) => ClipTextConfig::from_file(p)?,
                None => ClipTextConfig::detect(&c)?,
            };
            let plan = plan_with(&[])?;
            let patch = loras::<B, ClipTextModel<B>>(args, &c, &config, Target::TextEncoder(0))?;
            let options = LoadOptions {
                patch: patch.as_ref().map(|p| p as &dyn WeightPatch<B>),
                ..LoadOptions::default()
            };
            let (clip, _) =
                ClipTextModel::<B>::load(&index, &c, &plan, &devices, config, &options, look)?;
            let (shape, ids) = inputs.values("input_ids")?;
            let [batch, _] = shape.as_slice().try_into().map_err(|_| {
                Failure::Other(format!(
                    "input `input_ids` has shape {shape:?}; expected [B, T]"
                ))
            })?;
            let ids: Vec<u32> = ids
                .iter()
                .map(|&x| u32::try_from(x as i64).unwrap_or(u32::MAX))
                .collect();
            let enc = clip.forward(&ids, batch)?;
            out.push("last_hidden_state", enc.last_hidden_state)?;
            out.push("hidden_states", Tensor::stack::<4>(enc.hidden_states, 0))?;
            out.push("pooler_output", enc.pooled_output)?;
            if let Some(t) = enc.text_embeds {
                out.push("text_embeds", t)?;
            }
            log_stats(clip.streamer());
        }
    }
    out.write(&args.out)
}

/// The `--lora` files mapped onto component `c` of model `M` (their modules for `target`;
/// for a CLIP-G encoder, kohya's `lora_te2_*` are text encoder 2, so both are tried).
fn loras<B: Backend, M: distorch::models::Model<B>>(
    args: &RunArgs,
    c: &Component<'_>,
    config: &M::Config,
    target: Target,
) -> Result<Option<LoraPatch>, Failure> {
    if args.lora.is_empty() {
        return Ok(None);
    }
    if !matches!(args.task, Task::Unet | Task::ClipText) {
        return Err(Failure::Other(
            "--lora applies to the unet and clip-text tasks".into(),
        ));
    }
    let mut files = Vec::new();
    for spec in &args.lora {
        let (path, strength) = match spec.rsplit_once(':') {
            Some((p, s)) if s.parse::<f32>().is_ok() => (p, s.parse::<f32>().unwrap_or(1.0)),
            _ => (spec.as_str(), 1.0),
        };
        files.push((
            LoraFile::open(path).map_err(distorch::models::Error::from)?,
            strength,
        ));
    }
    let refs: Vec<(&LoraFile, f32)> = files.iter().map(|(f, s)| (f, *s)).collect();
    let target = match (target, args.component) {
        (Target::TextEncoder(_), Some(RunComponent::ClipG)) => Target::TextEncoder(1),
        (t, _) => t,
    };
    let (patch, report) = distorch::models::lora_patch::<B, M>(c, config, &refs, target)?;
    tracing::info!(
        matched = report.matched.len(),
        unmatched = report.unmatched.len(),
        "LoRA applied"
    );
    Ok(Some(patch))
}

/// The inputs the UNet and a ControlNet share: `sample`, `timestep`,
/// `encoder_hidden_states` and SDXL's `text_embeds` / `time_ids`.
fn unet_input<B: Backend>(inputs: &Inputs, device: &B::Device) -> Result<UnetInput<B>, Failure> {
    let (_, t) = inputs.values("timestep")?;
    let mut input = UnetInput::new(
        inputs.tensor("sample", device)?,
        t.iter().map(|&x| x as f32).collect(),
        inputs.tensor("encoder_hidden_states", device)?,
    );
    if inputs.has("text_embeds") || inputs.has("time_ids") {
        input = input.with_text_time(
            inputs.tensor("text_embeds", device)?,
            inputs.tensor("time_ids", device)?,
        );
    }
    Ok(input)
}

fn unet_config(model: &Model, c: &Component<'_>) -> Result<(UnetConfig, KeyLayout), Failure> {
    let layout = KeyLayout::of_unet(c);
    let config = match (&model.config, layout) {
        (Some(p), _) => UnetConfig::from_file(p)?,
        (None, KeyLayout::Ldm) => {
            let found = UnetConfig::detect(c)?;
            tracing::info!(family = found.family, "detected the UNet's architecture");
            found.config
        }
        (None, KeyLayout::Diffusers) => {
            return Err(Failure::Other(
                "a diffusers-layout UNet needs its config.json (a folder as --model, or --config)"
                    .into(),
            ));
        }
    };
    Ok((config, layout))
}

fn log_stats<B: Backend>(s: &distorch::core::runtime::Streamer<B>) {
    let st = s.take_stats();
    tracing::info!(
        fetches = st.fetches,
        resident = st.resident,
        streamed = st.prefetched + st.on_demand,
        "forward done"
    );
}

//! `distorch run`: one component's forward pass on named input tensors, weights placed as
//! asked, named outputs written — the parity harness against diffusers / transformers.

use std::path::PathBuf;
use std::sync::Arc;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use distorch::alloc::{
    BlockSwap, DeviceGraph, DeviceId, PinPolicy, PlanRequest, VirtualVram, parse_byte_size,
    parse_device_list,
};
use distorch::backends::{OnBackend, on_device};
use distorch::core::runtime::{DeviceMap, Lookahead, PatchPrecision};
use distorch::core::{Component, ComponentKind, SafetensorsIndex};
use distorch::lora::{LoraFile, Target};
use distorch::models::flux::dit::{FluxInput, FluxLayout, FluxTransformer};
use distorch::models::text::umt5::Umt5Encoder;
use distorch::models::wan::dit::{WanDitInput, WanTransformer};
use distorch::models::wan::vae::WanVae;
use distorch::models::{
    AutoencoderKl, ClipLayout, ClipTextModel, ClipVisionModel, ComponentFiles, ComponentLoras,
    ComponentOptions, ControlNetInput, ControlNetModel, Placement, Unet2dCondition, UnetInput,
    load_component, text_encoders,
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

/// `distorch run` on the backend `--device` names.
struct Run<'a>(&'a RunArgs);

impl OnBackend for Run<'_> {
    type Output = Result<(), Failure>;
    fn run<B: Backend>(self, id: DeviceId, device: B::Device) -> Result<(), Failure> {
        run_on::<B>(self.0, id, device)
    }
}

pub fn run(args: &RunArgs) -> Result<(), Failure> {
    on_device(args.device.parse()?, Run(args))?
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
    let split = distorch::models::load::split(index);
    let kind = match task {
        Task::Unet | Task::WanDit | Task::FluxDit => ComponentKind::Unet,
        Task::T5 => ComponentKind::Model,
        Task::VaeEncode | Task::VaeDecode | Task::WanVaeEncode | Task::WanVaeDecode => {
            ComponentKind::Vae
        }
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

fn request(args: &RunArgs, device: DeviceId, c: &Component<'_>) -> Result<PlanRequest, Failure> {
    if let Some(n) = args.blocks_to_swap {
        let swap_device = args.swap_device.parse()?;
        let swap = match args.task {
            Task::WanDit if args.single_blocks_to_swap.is_none() => {
                BlockSwap::new(device, swap_device, n)
            }
            Task::FluxDit => FluxLayout::of(c).block_swap(
                device,
                swap_device,
                n,
                args.single_blocks_to_swap.unwrap_or(0),
            ),
            Task::WanDit => {
                return Err(Failure::Other(
                    "--single-blocks-to-swap applies to the flux-dit task".into(),
                ));
            }
            _ => {
                return Err(Failure::Other(
                    "--blocks-to-swap applies to the wan-dit and flux-dit tasks".into(),
                ));
            }
        };
        // The text embedder in whichever layout the file has.
        let swap = if args.offload_txt_emb {
            [
                "condition_embedder.text_embedder.",
                "text_embedding.",
                "context_embedder.",
                "txt_in.",
            ]
            .into_iter()
            .fold(swap, BlockSwap::offloading)
        } else {
            swap
        };
        return Ok(PlanRequest::block_swap(swap));
    }
    let pin = PinPolicy {
        tiny_threshold: parse_byte_size(&args.tiny_threshold)?,
        ..PinPolicy::default()
    };
    Ok(match (&args.expert, args.virtual_vram) {
        (Some(e), _) => PlanRequest::expert_with_compute(e.parse()?, device),
        (None, Some(gib)) => {
            let donors = parse_device_list(&args.donor)?;
            PlanRequest::virtual_vram(VirtualVram::from_gib(device, gib, donors)?)
        }
        (None, None) => PlanRequest::virtual_vram(VirtualVram::none(device)),
    }
    .with_pin(pin))
}

/// What every task loads its component from.
struct Source<'a, B: Backend> {
    args: &'a RunArgs,
    model: &'a Model,
    index: &'a SafetensorsIndex,
    component: &'a Component<'a>,
    options: ComponentOptions<B>,
}

impl<B: Backend> Source<'_, B> {
    /// The component as model `M`: its configuration from `--config` or the folder, else
    /// read from its shapes; planned in the model's execution order and loaded by the
    /// library's loader, with the `--lora` files' modules for `target` patched in.
    fn load<M: distorch::models::Model<B>>(&self, target: Option<Target>) -> Result<M, Failure> {
        let config = match &self.model.config {
            Some(p) => M::config_from_file(p)?,
            None => M::detect_config(self.component)?,
        };
        let mut options = self.options.clone();
        options.loras = loras(self.args, target)?;
        if !self.args.high_precision_loras {
            options.precision = PatchPrecision::Fp8Stochastic { seed: 0 };
        }
        let loaded = load_component::<B, M>(self.index, self.component, config, &options)?;
        if !loaded.lora.matched.is_empty() || !loaded.lora.unmatched.is_empty() {
            tracing::info!(
                matched = loaded.lora.matched.len(),
                unmatched = loaded.lora.unmatched.len(),
                "LoRA applied"
            );
        }
        Ok(loaded.model)
    }
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
    let inputs = Inputs::read(&args.inputs)?;
    let model = model(args)?;
    let index = distorch::models::load::open_index(&model.weights)?;
    let c = component(&index, args.task, args.component)?;
    let placement = Placement {
        request: request(args, device_id, &c)?,
        devices: DeviceMap::<B>::new(device.clone()),
    };
    let mut options = ComponentOptions::new(graph, placement);
    options.dtype = args.dtype.0;
    if args.blocks_to_swap.is_some() {
        options.lookahead = Lookahead {
            units: args.prefetch_blocks.max(1) * units_per_block(&c, args.task),
            ..Lookahead::default()
        };
    }
    let src = Source {
        args,
        model: &model,
        index: &index,
        component: &c,
        options,
    };
    let mut out = Outputs::default();
    match args.task {
        Task::Unet => {
            let unet: Unet2dCondition<B> = src.load(Some(Target::Unet))?;
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
            let control: ControlNetModel<B> = src.load(None)?;
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
            let vision: ClipVisionModel<B> = src.load(None)?;
            let enc = vision.forward(inputs.tensor("pixel_values", &device)?)?;
            out.push("image_embeds", enc.image_embeds)?;
            out.push("last_hidden_state", enc.last_hidden_state)?;
            out.push("hidden_states", Tensor::stack::<4>(enc.hidden_states, 0))?;
            log_stats(vision.streamer());
        }
        Task::VaeEncode | Task::VaeDecode => {
            let vae: AutoencoderKl<B> = src.load(None)?;
            if args.task == Task::VaeEncode {
                let (mean, logvar) = vae.encode(inputs.tensor("image", &device)?)?;
                out.push("latent_mean", mean)?;
                out.push("latent_logvar", logvar)?;
            } else {
                out.push("image", vae.decode(inputs.tensor("z", &device)?)?)?;
            }
            log_stats(vae.streamer());
        }
        Task::T5 => {
            let t5: Umt5Encoder<B> = src.load(None)?;
            let (batch, ids) = id_rows(&inputs, "input_ids")?;
            let mask = if inputs.has("attention_mask") {
                id_rows(&inputs, "attention_mask")?.1
            } else {
                vec![1; ids.len()]
            };
            out.push("last_hidden_state", t5.forward(&ids, &mask, batch)?)?;
            log_stats(t5.streamer());
        }
        Task::WanDit => {
            let dit: WanTransformer<B> = src.load(Some(Target::Unet))?;
            let (_, t) = inputs.values("timestep")?;
            let input = WanDitInput {
                hidden_states: inputs.tensor("hidden_states", &device)?,
                timestep: t.iter().map(|&x| x as f32).collect(),
                encoder_hidden_states: inputs.tensor("encoder_hidden_states", &device)?,
            };
            out.push("sample", dit.forward(input)?)?;
            log_stats(dit.streamer());
        }
        Task::FluxDit => {
            let dit: FluxTransformer<B> = src.load(Some(Target::Unet))?;
            let input = FluxInput {
                hidden_states: inputs.tensor("hidden_states", &device)?,
                encoder_hidden_states: inputs.tensor("encoder_hidden_states", &device)?,
                pooled_projections: inputs.tensor("pooled_projections", &device)?,
                timestep: floats(&inputs, "timestep")?,
                img_ids: positions(&inputs, "img_ids")?,
                txt_ids: positions(&inputs, "txt_ids")?,
                guidance: match inputs.has("guidance") {
                    true => Some(floats(&inputs, "guidance")?),
                    false => None,
                },
            };
            out.push("sample", dit.forward(input)?)?;
            log_stats(dit.streamer());
        }
        Task::WanVaeEncode | Task::WanVaeDecode => {
            let vae: WanVae<B> = src.load(None)?;
            if args.task == Task::WanVaeEncode {
                let (mean, logvar) = vae.encode(inputs.tensor("video", &device)?)?;
                out.push("latent_mean", mean)?;
                out.push("latent_logvar", logvar)?;
            } else {
                out.push("video", vae.decode(inputs.tensor("z", &device)?)?)?;
            }
            log_stats(vae.streamer());
        }
        Task::ClipText => {
            // kohya's `lora_te2_*` are SDXL's second encoder, OpenCLIP-G.
            let encoder = usize::from(args.component == Some(RunComponent::ClipG));
            let clip: ClipTextModel<B> = src.load(Some(Target::TextEncoder(encoder)))?;
            let (batch, ids) = id_rows(&inputs, "input_ids")?;
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

/// The `--lora PATH[:STRENGTH]` files, with their modules for `target` (tasks without one
/// take no LoRA).
fn loras(args: &RunArgs, target: Option<Target>) -> Result<Option<ComponentLoras>, Failure> {
    if args.lora.is_empty() {
        return Ok(None);
    }
    let Some(target) = target else {
        return Err(Failure::Other(
            "--lora applies to the unet, clip-text, wan-dit and flux-dit tasks".into(),
        ));
    };
    let mut files = Vec::new();
    for spec in &args.lora {
        let (path, strength) = match spec.rsplit_once(':') {
            Some((p, s)) if s.parse::<f32>().is_ok() => (p, s.parse::<f32>().unwrap_or(1.0)),
            _ => (spec.as_str(), 1.0),
        };
        let file = LoraFile::open(path).map_err(distorch::models::Error::from)?;
        files.push((Arc::new(file), strength));
    }
    Ok(Some(ComponentLoras { files, target }))
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

/// Integer rows `[B, T]` of input `name`: the batch and the values (negative or too large
/// values become `u32::MAX`, which the models reject as outside the vocabulary).
fn id_rows(inputs: &Inputs, name: &str) -> Result<(usize, Vec<u32>), Failure> {
    let (shape, ids) = inputs.values(name)?;
    let [batch, _] = shape.as_slice().try_into().map_err(|_| {
        Failure::Other(format!(
            "input `{name}` has shape {shape:?}; expected [B, T]"
        ))
    })?;
    let ids = ids
        .iter()
        .map(|&x| u32::try_from(x as i64).unwrap_or(u32::MAX))
        .collect();
    Ok((batch, ids))
}

/// The values of input `name` as f32.
fn floats(inputs: &Inputs, name: &str) -> Result<Vec<f32>, Failure> {
    Ok(inputs.values(name)?.1.iter().map(|&x| x as f32).collect())
}

/// Input `name` as rows of three positions (`[N, 3]`: FLUX's `img_ids`, `txt_ids`).
fn positions(inputs: &Inputs, name: &str) -> Result<Vec<[f32; 3]>, Failure> {
    let (shape, v) = inputs.values(name)?;
    if !matches!(shape.as_slice(), [_, 3]) {
        return Err(Failure::Other(format!(
            "input `{name}` has shape {shape:?}; expected [N, 3]"
        )));
    }
    Ok(v.chunks(3)
        .map(|p| [p[0] as f32, p[1] as f32, p[2] as f32])
        .collect())
}

/// Units of the first transformer block (Wan's `blocks.0.`, FLUX's first double-stream
/// block): the look-ahead of one block.
fn units_per_block(c: &Component<'_>, task: Task) -> usize {
    let first = match task {
        Task::FluxDit => format!("{}0.", FluxLayout::of(c).double_blocks()),
        _ => "blocks.0.".to_owned(),
    };
    let mut units: Vec<&str> = c
        .local_names()
        .filter(|n| n.starts_with(&first))
        .map(distorch::core::units::unit_name)
        .collect();
    units.sort_unstable();
    units.dedup();
    units.len().max(1)
}

fn log_stats<B: Backend>(s: &distorch::core::runtime::Streamer<B>) {
    let st = s.take_stats();
    let moved: u64 = st.bytes_moved.values().map(|b| b.0).sum();
    let streamed_units: u64 = s
        .store()
        .units()
        .iter()
        .filter(|u| u.home != s.store().compute_id())
        .map(|u| u.bytes.0)
        .sum();
    tracing::info!(
        fetches = st.fetches,
        resident = st.resident,
        streamed = st.prefetched + st.on_demand,
        bytes_moved = moved,
        streamed_unit_bytes = streamed_units,
        peak_staging_bytes = st.peak_staging_bytes.0,
        compute_dtype = %s.store().compute_dtype(),
        "forward done"
    );
}

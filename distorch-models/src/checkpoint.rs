//! Loading a Stable Diffusion single-file checkpoint (SD 1.x, SD 2.x, SDXL) as its three
//! kinds of model, each with its **own** allocation — the library's counterpart of
//! DisTorch2's `CheckpointLoaderAdvancedDisTorch2MultiGPU` — and each component alone.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use distorch_alloc::{DeviceGraph, DeviceId, Plan, PlanRequest, VirtualVram};
use distorch_core::runtime::{
    DeviceMap, LoadOptions, LoadReport, Lookahead, PatchPrecision, Streamer,
};
use distorch_core::{Component, ComponentKind, ComputeDtype, SafetensorsIndex, components};

use crate::clip::{ClipTextConfig, ClipTextModel};
use crate::clip_keys::{ClipKeys, ClipLayout};
use distorch_core::runtime::ExpectedTensor;
use distorch_lora::{LoraFile, LoraReport, ModelTensor, Target};

use crate::error::Error;
use crate::keymap::KeyLayout;
use crate::loader::{
    ComponentLoras, ComponentOptions, LoadProgress, Loaded, LoraState, Model, load_component,
    load_model, shape_map, to_usize,
};
use crate::unet::Unet2dCondition;
use crate::unet_config::UnetConfig;
use crate::unet_ldm::detect;
use crate::vae::{AutoencoderKl, VaeConfig};

/// Where one component goes: what to ask the planner, and the Burn devices its plan's
/// device ids stand for.
#[derive(Debug, Clone)]
pub struct Placement<B: Backend> {
    /// The allocation (virtual VRAM, an expert string, or all on one device).
    pub request: PlanRequest,
    /// The compute device and any GPU donors.
    pub devices: DeviceMap<B>,
}

impl<B: Backend> Placement<B> {
    /// `gib` of the model moved off `compute` (bound to `device`) onto `donors`, as the
    /// DisTorch2 loaders' `virtual_vram_gb` and `donor_device`.
    pub fn virtual_vram(
        compute: DeviceId,
        device: B::Device,
        gib: f64,
        donors: Vec<DeviceId>,
    ) -> Result<Placement<B>, Error> {
        let vv = VirtualVram::from_gib(compute, gib, donors)?;
        Ok(Placement {
            request: PlanRequest::virtual_vram(vv),
            devices: DeviceMap::new(device),
        })
    }

    /// Everything on `compute` (bound to `device`).
    pub fn on(compute: DeviceId, device: B::Device) -> Placement<B> {
        Placement {
            request: PlanRequest::virtual_vram(VirtualVram::none(compute)),
            devices: DeviceMap::new(device),
        }
    }
}

/// The three placements of a checkpoint and what the loaders share. [`CheckpointOptions::new`]
/// gives DisTorch2's defaults.
#[derive(Debug, Clone)]
pub struct CheckpointOptions<B: Backend> {
    /// The devices plans may use.
    pub graph: DeviceGraph,
    /// The UNet's placement.
    pub unet: Placement<B>,
    /// The text encoders' placement.
    pub clip: Placement<B>,
    /// The VAE's placement.
    pub vae: Placement<B>,
    /// Staging look-ahead of every component's streamer.
    pub lookahead: Lookahead,
    /// Check weights for NaN/inf while loading.
    pub check_finite: bool,
    /// Configurations to use instead of detecting them from the file (tiny or unusual
    /// models whose heads or norm groups do not follow SD's conventions).
    pub unet_config: Option<UnetConfig>,
    /// See `unet_config`.
    pub vae_config: Option<VaeConfig>,
    /// See `unet_config`; one per text encoder, in the file's order.
    pub clip_configs: Option<Vec<ClipTextConfig>>,
    /// Told the bytes of each tensor placed, across components (for a progress bar).
    pub progress: Option<LoadProgress>,
    /// LoRAs, patched into the UNet (model strength) and the text encoders (CLIP strength)
    /// while they load.
    pub loras: Vec<LoraSpec>,
    /// How LoRA-patched tensors of fp8 checkpoints are stored (see
    /// [`ComponentOptions::precision`]).
    pub precision: PatchPrecision,
    /// Every component's compute dtype (see [`ComponentOptions::dtype`]); `None`, the
    /// default, is each component's own half type where the device computes in it (f16 or
    /// bf16 on GPU backends for half and fp8 checkpoints, the VAE kept at f32 for f16 ones as
    /// diffusers' `force_upcast` does), else f32 (always on ndarray).
    pub dtype: Option<ComputeDtype>,
}

/// A LoRA with ComfyUI's two strengths.
#[derive(Debug, Clone)]
pub struct LoraSpec {
    /// The LoRA.
    pub file: Arc<LoraFile>,
    /// Strength on the denoiser.
    pub model: f32,
    /// Strength on the text encoders.
    pub clip: f32,
}

impl<B: Backend> CheckpointOptions<B> {
    /// DisTorch2's defaults: the UNet on `compute` with 4 GiB of virtual VRAM on `cpu` (all
    /// of it on `compute` when that is the CPU), the text encoders computed on `cpu` (bound
    /// to `cpu_device`), the VAE on `compute`.
    pub fn new(
        graph: DeviceGraph,
        compute: DeviceId,
        device: B::Device,
        cpu_device: B::Device,
    ) -> Result<CheckpointOptions<B>, Error> {
        Ok(CheckpointOptions {
            graph,
            unet: if compute == DeviceId::CPU {
                Placement::on(compute, device.clone())
            } else {
                Placement::virtual_vram(compute, device.clone(), 4.0, vec![DeviceId::CPU])?
            },
            clip: Placement::on(DeviceId::CPU, cpu_device),
            vae: Placement::on(compute, device),
            lookahead: Lookahead::default(),
            check_finite: true,
            unet_config: None,
            vae_config: None,
            clip_configs: None,
            progress: None,
            loras: Vec::new(),
            precision: PatchPrecision::High,
            dtype: None,
        })
    }
}

/// A loaded Stable Diffusion checkpoint.
pub struct StableDiffusion<B: Backend> {
    /// What the UNet's shapes say: `SD 1.x`, `SD 2.x`, `SDXL`, `SDXL refiner` or `unknown`.
    pub family: &'static str,
    /// The UNet.
    pub unet: Unet2dCondition<B>,
    /// The text encoders in the file's order (SDXL: CLIP-L, then OpenCLIP-bigG).
    pub text_encoders: Vec<ClipTextModel<B>>,
    /// The VAE.
    pub vae: AutoencoderKl<B>,
    /// Each component's plan and load report, by name (`unet`, `clip.0`, `clip.1`, `vae`).
    pub loaded: Vec<(String, Plan, LoadReport)>,
    /// What the LoRAs matched in each component they touch.
    pub loras: Vec<(String, LoraReport)>,
    /// Each LoRA-able component's tensors as LoRAs name them, for [`StableDiffusion::set_loras`].
    lora_states: Vec<(String, LoraState)>,
}

impl<B: Backend> CheckpointOptions<B> {
    fn component(&self, placement: &Placement<B>) -> ComponentOptions<B> {
        ComponentOptions {
            graph: self.graph.clone(),
            placement: placement.clone(),
            lookahead: self.lookahead,
            check_finite: self.check_finite,
            progress: self.progress.clone(),
            loras: None,
            precision: self.precision,
            dtype: self.dtype,
        }
    }

    /// The options of one component with the LoRAs' modules for `target`.
    fn with_loras(&self, placement: &Placement<B>, target: Target) -> ComponentOptions<B> {
        let mut o = self.component(placement);
        if !self.loras.is_empty() {
            let files = self
                .loras
                .iter()
                .map(|l| {
                    let strength = if target == Target::Unet {
                        l.model
                    } else {
                        l.clip
                    };
                    (Arc::clone(&l.file), strength)
                })
                .collect();
            o.loras = Some(ComponentLoras { files, target });
        }
        o
    }
}

/// The loaded components, gathered with their plans and reports.
#[derive(Default)]
struct Gathered(
    Vec<(String, Plan, LoadReport)>,
    Vec<(String, LoraReport)>,
    Vec<(String, LoraState)>,
);

impl Gathered {
    fn keep<M>(&mut self, name: String, loaded: Loaded<M>) -> M {
        if !loaded.lora.matched.is_empty() || !loaded.lora.unmatched.is_empty() {
            self.1.push((name.clone(), loaded.lora));
        }
        if name != "vae" {
            self.2.push((name.clone(), loaded.lora_state));
        }
        self.0.push((name, loaded.plan, loaded.report));
        loaded.model
    }
}

impl<B: Backend> StableDiffusion<B> {
    /// Loads every component of the single-file checkpoint at `path`, each planned and
    /// placed as `options` says. Architectures are detected from keys and shapes unless
    /// `options` gives them.
    pub fn load_single_file(
        path: impl AsRef<Path>,
        options: &CheckpointOptions<B>,
    ) -> Result<StableDiffusion<B>, Error> {
        let index = SafetensorsIndex::open(path.as_ref())?;
        let split = components::split(&index);
        let find = |kind: ComponentKind| {
            split
                .components
                .iter()
                .find(|c| c.kind == kind)
                .ok_or_else(|| Error::Input {
                    input: "checkpoint",
                    reason: format!(
                        "{}: no {kind} in the file (a checkpoint has unet, clip and vae)",
                        index.path().display()
                    ),
                })
        };
        let mut loaded = Gathered::default();

        let unet_c = find(ComponentKind::Unet)?;
        let (family, unet_config) = match &options.unet_config {
            Some(c) => ("unknown", c.clone()),
            None => {
                let d = UnetConfig::detect(unet_c)?;
                (d.family, d.config)
            }
        };
        let unet = load_component(
            &index,
            unet_c,
            unet_config,
            &options.with_loras(&options.unet, Target::Unet),
        )?;
        let unet = loaded.keep("unet".into(), unet);

        let clip_c = find(ComponentKind::Clip)?;
        let mut text_encoders = Vec::new();
        for (i, sub) in encoders(clip_c).into_iter().enumerate() {
            let config = match options.clip_configs.as_ref().and_then(|c| c.get(i)) {
                Some(c) => c.clone(),
                None => ClipTextConfig::detect(&sub)?,
            };
            let clip_options = options.with_loras(&options.clip, Target::TextEncoder(i));
            let model = load_component(&index, &sub, config, &clip_options)?;
            text_encoders.push(loaded.keep(format!("clip.{i}"), model));
        }

        let vae_c = find(ComponentKind::Vae)?;
        let scaling = if family.starts_with("SDXL") {
            0.13025
        } else {
            0.18215
        };
        let vae_config = match &options.vae_config {
            Some(c) => c.clone(),
            None => VaeConfig::detect(vae_c, scaling)?,
        };
        let vae = load_component(&index, vae_c, vae_config, &options.component(&options.vae))?;
        let vae = loaded.keep("vae".into(), vae);
        tracing::info!(family, encoders = text_encoders.len(), "checkpoint loaded");
        Ok(StableDiffusion {
            family,
            unet,
            text_encoders,
            vae,
            loaded: loaded.0,
            loras: loaded.1,
            lora_states: loaded.2,
        })
    }

    /// Loads a diffusers pipeline folder: `unet/`, `vae/`, `text_encoder/` and, for SDXL,
    /// `text_encoder_2/`, each a `config.json` and its weights (one `.safetensors` file —
    /// `diffusion_pytorch_model.safetensors` or `model.safetensors`, else the one there,
    /// e.g. an `.fp16.` variant — or sharded weights, `*.safetensors.index.json`; see
    /// [`crate::ComponentFiles::find`]), each planned and placed as `options` says.
    pub fn load_diffusers(
        folder: impl AsRef<Path>,
        options: &CheckpointOptions<B>,
    ) -> Result<StableDiffusion<B>, Error> {
        let folder = folder.as_ref();
        let mut loaded = Gathered::default();
        let unet = load_model(
            folder.join("unet"),
            options.unet_config.clone(),
            &options.with_loras(&options.unet, Target::Unet),
        )?;
        let unet = loaded.keep("unet".into(), unet);
        let mut text_encoders = Vec::new();
        for (i, name) in ["text_encoder", "text_encoder_2"].into_iter().enumerate() {
            let dir = folder.join(name);
            if !dir.is_dir() {
                continue;
            }
            let config = options
                .clip_configs
                .as_ref()
                .and_then(|c| c.get(i))
                .cloned();
            let clip_options = options.with_loras(&options.clip, Target::TextEncoder(i));
            let model = load_model(dir, config, &clip_options)?;
            text_encoders.push(loaded.keep(format!("clip.{i}"), model));
        }
        let vae = load_model(
            folder.join("vae"),
            options.vae_config.clone(),
            &options.component(&options.vae),
        )?;
        let vae = loaded.keep("vae".into(), vae);
        let family = match text_encoders.len() {
            2 => "SDXL",
            _ => "unknown",
        };
        Ok(StableDiffusion {
            family,
            unet,
            text_encoders,
            vae,
            loaded: loaded.0,
            loras: loaded.1,
            lora_states: loaded.2,
        })
    }
}

impl<B: Backend> StableDiffusion<B> {
    /// Replaces the LoRAs (other strengths, other files, or none) without reloading: in the
    /// UNet (model strengths) and every text encoder (CLIP strengths), only the tensors the
    /// old or the new LoRAs touch are re-read from the checkpoint — pristine — patched and put
    /// back at their homes (see [`Loaded::set_loras`]). Every component's LoRAs are mapped and
    /// checked before any weight changes; `loras` is updated to what they matched.
    pub fn set_loras(&mut self, loras: &[LoraSpec]) -> Result<(), Error> {
        let mut prepared = Vec::with_capacity(self.lora_states.len());
        for (name, state) in &self.lora_states {
            let target = match name.strip_prefix("clip.") {
                Some(i) => Target::TextEncoder(i.parse().unwrap_or(0)),
                None => Target::Unet,
            };
            let files = loras
                .iter()
                .map(|l| {
                    let s = if target == Target::Unet {
                        l.model
                    } else {
                        l.clip
                    };
                    (Arc::clone(&l.file), s)
                })
                .collect();
            prepared.push(state.prepare(&ComponentLoras { files, target })?);
        }
        self.loras.clear();
        for ((name, state), p) in self.lora_states.iter_mut().zip(prepared) {
            let streamer = match name.strip_prefix("clip.") {
                Some(i) => self
                    .text_encoders
                    .get(i.parse::<usize>().unwrap_or(0))
                    .map(|e| e.streamer()),
                None => Some(self.unet.streamer()),
            };
            let Some(streamer) = streamer else { continue };
            let (report, _) = state.apply(streamer, p)?;
            if !report.matched.is_empty() || !report.unmatched.is_empty() {
                self.loras.push((name.clone(), report));
            }
        }
        Ok(())
    }
}

/// The text encoders of a CLIP component, each with its key layout: SDXL numbers them
/// (`0.`, `1.` under `conditioner.embedders.`); SD 1.x/2.x and one-encoder files have one.
pub fn text_encoders<'a>(c: &Component<'a>) -> Vec<(Component<'a>, ClipLayout)> {
    encoders(c)
        .into_iter()
        .map(|e| {
            let shapes = shape_map(&e);
            let layout = ClipKeys::detect(shapes.keys().map(String::as_str)).layout;
            (e, layout)
        })
        .collect()
}

impl ClipTextConfig {
    /// The configuration of the (one) text encoder in `c`, read from its shapes (see the
    /// conventions in [`crate::clip`]: 64-wide heads, quick_gelu for transformers-layout
    /// weights, gelu for OpenCLIP).
    pub fn detect(c: &Component<'_>) -> Result<ClipTextConfig, Error> {
        let shapes = shape_map(c);
        ClipKeys::detect(shapes.keys().map(String::as_str))
            .detect_config(|k| shapes.get(k).map(|s| to_usize(s)))
    }
}

impl VaeConfig {
    /// The configuration of a single-file (LDM layout) VAE component from its shapes; a
    /// diffusers-layout VAE needs its `config.json`.
    pub fn detect(c: &Component<'_>, scaling_factor: f64) -> Result<VaeConfig, Error> {
        let shapes = shape_map(c);
        VaeConfig::detect_ldm(|k| shapes.get(k).map(|s| to_usize(s)), scaling_factor)
    }
}

impl UnetConfig {
    /// The architecture of a single-file (LDM layout) UNet component, from its keys and
    /// shapes; a diffusers-layout UNet needs its `config.json`.
    pub fn detect(c: &Component<'_>) -> Result<crate::unet_ldm::DetectedUnet, Error> {
        let shapes = shape_map(c);
        detect(shapes.iter().map(|(k, s)| (k.as_str(), s.as_slice())))
    }
}

/// The error for a diffusers-layout file given without its `config.json`: its shapes do not
/// say everything the model needs.
pub(crate) fn needs_config(model: &str) -> Error {
    Error::Input {
        input: "model",
        reason: format!(
            "a diffusers-layout {model} needs its config.json (load its folder, or give the \
             configuration)"
        ),
    }
}

/// Tensors with their module names in two layouts (expected tensors listed in the same
/// order), for LoRA mapping.
pub(crate) fn both_names(ours: Vec<ExpectedTensor>, file: Vec<ExpectedTensor>) -> Vec<ModelTensor> {
    let module = |k: &str| k.rsplit_once('.').map_or(k, |(m, _)| m).to_owned();
    ours.into_iter()
        .zip(file)
        .map(|(o, f)| {
            let mut modules = vec![module(&o.name)];
            if module(&f.name) != modules[0] {
                modules.push(module(&f.name));
            }
            ModelTensor {
                key: f.name,
                modules,
                shape: f.shape,
                rows: None,
            }
        })
        .collect()
}

/// The text encoders of a CLIP component (see [`text_encoders`]).
fn encoders<'a>(c: &Component<'a>) -> Vec<Component<'a>> {
    let mut numbered: Vec<&str> = c
        .tensors
        .iter()
        .filter_map(|t| {
            let l = c.local(t);
            let (head, _) = l.split_once('.')?;
            head.parse::<u32>().ok().map(|_| head)
        })
        .collect();
    numbered.sort_by_key(|h| h.parse::<u32>().unwrap_or(u32::MAX));
    numbered.dedup();
    if numbered.is_empty() {
        return vec![c.clone()];
    }
    numbered
        .into_iter()
        .map(|head| Component {
            kind: c.kind,
            prefix: c.prefix,
            tensors: c
                .tensors
                .iter()
                .filter(|t| c.local(t).starts_with(&format!("{head}.")))
                .copied()
                .collect(),
        })
        .collect()
}

impl<B: Backend> Model<B> for Unet2dCondition<B> {
    type Config = UnetConfig;
    const KIND: ComponentKind = ComponentKind::Unet;
    fn config_from_file(path: &Path) -> Result<UnetConfig, Error> {
        UnetConfig::from_file(path)
    }
    fn detect_config(c: &Component<'_>) -> Result<UnetConfig, Error> {
        if KeyLayout::of_unet(c) == KeyLayout::Diffusers {
            return Err(needs_config("UNet"));
        }
        let found = UnetConfig::detect(c)?;
        tracing::info!(family = found.family, "detected the UNet's architecture");
        Ok(found.config)
    }
    fn execution_order(config: &UnetConfig, c: &Component<'_>) -> Result<Vec<String>, Error> {
        Unet2dCondition::<B>::execution_order(config, KeyLayout::of_unet(c))
    }
    /// Each tensor under its diffusers module name and its original (LDM) one, whichever
    /// layout the file has: kohya LoRAs use the former, ComfyUI's own the latter.
    fn lora_tensors(config: &UnetConfig, c: &Component<'_>) -> Result<Vec<ModelTensor>, Error> {
        let ours = Unet2dCondition::<B>::expected_tensors(config, KeyLayout::Diffusers)?;
        let ldm = Unet2dCondition::<B>::expected_tensors(config, KeyLayout::Ldm)?;
        let file = Unet2dCondition::<B>::expected_tensors(config, KeyLayout::of_unet(c))?;
        let mut tensors = both_names(ours, file);
        for (t, l) in tensors.iter_mut().zip(ldm) {
            let m = l.name.rsplit_once('.').map_or(l.name.as_str(), |(m, _)| m);
            if !t.modules.iter().any(|x| x == m) {
                t.modules.push(m.to_owned());
            }
        }
        Ok(tensors)
    }
    fn streamer(&self) -> &Streamer<B> {
        self.streamer()
    }
    fn load(
        index: &SafetensorsIndex,
        c: &Component<'_>,
        plan: &Plan,
        devices: &DeviceMap<B>,
        config: UnetConfig,
        options: &LoadOptions<'_, B>,
        lookahead: Lookahead,
    ) -> Result<(Self, LoadReport), Error> {
        Unet2dCondition::load(index, c, plan, devices, config, options, lookahead)
    }
}

impl<B: Backend> Model<B> for ClipTextModel<B> {
    type Config = ClipTextConfig;
    const KIND: ComponentKind = ComponentKind::Clip;
    fn config_from_file(path: &Path) -> Result<ClipTextConfig, Error> {
        ClipTextConfig::from_file(path)
    }
    fn detect_config(c: &Component<'_>) -> Result<ClipTextConfig, Error> {
        match encoders(c).as_slice() {
            [one] => ClipTextConfig::detect(one),
            many => Err(Error::Input {
                input: "model",
                reason: format!(
                    "{} text encoders in the file: pick one with `text_encoders` and \
                     `load_component`",
                    many.len()
                ),
            }),
        }
    }
    fn execution_order(config: &ClipTextConfig, c: &Component<'_>) -> Result<Vec<String>, Error> {
        let keys = ClipKeys::detect(c.local_names());
        let projection = c.local_names().any(|n| n == keys.projection_key());
        Ok(keys.order(config, projection))
    }
    /// transformers' names, from `text_model.` on, whatever prefix the file puts before it
    /// (kohya's `lora_te_text_model_*`, PEFT's `text_encoder.text_model.*`); OpenCLIP-layout
    /// weights (SD 2.x, SDXL's second encoder in single files) under the same names, q, k
    /// and v as row slices of the fused `in_proj`.
    fn lora_tensors(_: &ClipTextConfig, c: &Component<'_>) -> Result<Vec<ModelTensor>, Error> {
        let keys = ClipKeys::detect(c.local_names());
        let mut tensors = Vec::new();
        for mut t in crate::loader::own_modules(c) {
            let m = t.modules[0].clone();
            if keys.layout == ClipLayout::OpenClip {
                tensors.extend(crate::clip_keys::open_clip_lora_names(&keys, t));
                continue;
            }
            let alias = match m.find("text_model.") {
                Some(i) => m[i..].to_owned(),
                None => format!("text_model.{m}"),
            };
            t.modules.push(alias);
            tensors.push(t);
        }
        Ok(tensors)
    }
    fn streamer(&self) -> &Streamer<B> {
        self.streamer()
    }
    fn load(
        index: &SafetensorsIndex,
        c: &Component<'_>,
        plan: &Plan,
        devices: &DeviceMap<B>,
        config: ClipTextConfig,
        options: &LoadOptions<'_, B>,
        lookahead: Lookahead,
    ) -> Result<(Self, LoadReport), Error> {
        ClipTextModel::load(index, c, plan, devices, config, options, lookahead)
    }
}

impl<B: Backend> Model<B> for AutoencoderKl<B> {
    type Config = VaeConfig;
    const KIND: ComponentKind = ComponentKind::Vae;
    fn config_from_file(path: &Path) -> Result<VaeConfig, Error> {
        VaeConfig::from_file(path)
    }
    /// SD 1.x's scaling factor (0.18215) unless a configuration is given: the VAE's
    /// shapes do not tell it (SDXL's is 0.13025; the checkpoint loader sets it).
    fn detect_config(c: &Component<'_>) -> Result<VaeConfig, Error> {
        if KeyLayout::of_vae(c) == KeyLayout::Diffusers {
            return Err(needs_config("VAE"));
        }
        VaeConfig::detect(c, 0.18215)
    }
    fn execution_order(_: &VaeConfig, _: &Component<'_>) -> Result<Vec<String>, Error> {
        // File order: the encoder, then the decoder, is how the VAE is used.
        Ok(Vec::new())
    }
    fn streamer(&self) -> &Streamer<B> {
        self.streamer()
    }
    fn load(
        index: &SafetensorsIndex,
        c: &Component<'_>,
        plan: &Plan,
        devices: &DeviceMap<B>,
        config: VaeConfig,
        options: &LoadOptions<'_, B>,
        lookahead: Lookahead,
    ) -> Result<(Self, LoadReport), Error> {
        AutoencoderKl::load(index, c, plan, devices, config, options, lookahead)
    }
}

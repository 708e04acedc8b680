//! Loading a Stable Diffusion single-file checkpoint (SD 1.x, SD 2.x, SDXL) as its three
//! kinds of model, each with its **own** allocation — the library's counterpart of
//! DisTorch2's `CheckpointLoaderAdvancedDisTorch2MultiGPU` — and each component alone.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use distorch_alloc::{DeviceGraph, DeviceId, Plan};
use distorch_core::runtime::{LoadReport, Lookahead, PatchPrecision};
use distorch_core::{ComponentKind, ComputeDtype, SafetensorsIndex};

use crate::sampling::scheduler::SchedulerConfig;
use crate::text::clip::{ClipTextConfig, ClipTextModel};
use crate::text::tokenizer::ClipTokenizer;
use distorch_lora::{LoraFile, LoraReport, Target};

use crate::error::Error;
use crate::load::Placement;
use crate::load::{
    ComponentLoras, ComponentOptions, LoadProgress, Loaded, LoraState, load_component, load_model,
};
use crate::sd::SdFamily;
use crate::sd::unet::Unet2dCondition;
use crate::sd::unet::config::UnetConfig;
use crate::sd::vae::{AutoencoderKl, VaeConfig};
use crate::text::clip_keys::encoders;

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
    /// A UNet file to load instead of the checkpoint's own (ComfyUI's `UNETLoader` /
    /// city96's `UnetLoaderGGUF` beside the checkpoint's CLIP and VAE): a single-file UNet in
    /// safetensors or GGUF (original or diffusers keys), its architecture detected from its
    /// shapes unless `unet_config` gives it.
    pub unet_file: Option<std::path::PathBuf>,
    /// DisTorch2's `eject_models` (default true): [`StableDiffusion::load_cached`] unloads
    /// every cached model on the components' compute devices before loading; false keeps them.
    pub eject_models: bool,
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

impl LoraSpec {
    /// `loras` for one component: the model strengths for the UNet, the CLIP strengths for
    /// a text encoder.
    fn for_target(loras: &[LoraSpec], target: Target) -> ComponentLoras {
        let files = loras
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
        ComponentLoras { files, target }
    }
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
            unet_file: None,
            eject_models: true,
        })
    }
}

/// A loaded Stable Diffusion checkpoint.
pub struct StableDiffusion<B: Backend> {
    /// What the UNet's shapes say (`Unknown` when its configuration was given, or for a
    /// diffusers folder that is not SDXL's).
    pub family: SdFamily,
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
    /// One tokenizer per text encoder: a diffusers folder's own, else the bundled CLIP
    /// vocabulary (SDXL's second encoder padding with `!`).
    pub tokenizers: Vec<ClipTokenizer>,
    /// The scheduler: a diffusers folder's `scheduler/scheduler_config.json`, else SD's
    /// default ([`SchedulerConfig::default`]); [`StableDiffusion::request`] starts from it.
    pub scheduler: SchedulerConfig,
}

impl<B: Backend> CheckpointOptions<B> {
    pub(crate) fn component(&self, placement: &Placement<B>) -> ComponentOptions<B> {
        ComponentOptions {
            graph: self.graph.clone(),
            placement: placement.clone(),
            lookahead: self.lookahead,
            check_finite: self.check_finite,
            progress: self.progress.clone(),
            loras: None,
            precision: self.precision,
            dtype: self.dtype,
            calibration: None,
        }
    }

    /// The options of one component with the LoRAs' modules for `target`.
    pub(crate) fn with_loras(
        &self,
        placement: &Placement<B>,
        target: Target,
    ) -> ComponentOptions<B> {
        let mut o = self.component(placement);
        if !self.loras.is_empty() {
            o.loras = Some(LoraSpec::for_target(&self.loras, target));
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
    /// The checkpoint of the components gathered.
    fn into_model<B: Backend>(
        self,
        family: SdFamily,
        unet: Unet2dCondition<B>,
        text_encoders: Vec<ClipTextModel<B>>,
        vae: AutoencoderKl<B>,
        folder: Option<&Path>,
    ) -> Result<StableDiffusion<B>, Error> {
        let tokenizers = crate::sd::load::tokenizers(folder, text_encoders.len())?;
        let scheduler = crate::sd::load::scheduler(folder)?;
        Ok(StableDiffusion {
            family,
            unet,
            text_encoders,
            vae,
            loaded: self.0,
            loras: self.1,
            lora_states: self.2,
            tokenizers,
            scheduler,
        })
    }

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
        let split = crate::load::split(&index);
        let find = |kind: ComponentKind| {
            split
                .components
                .iter()
                .find(|c| c.kind == kind)
                .ok_or_else(|| Error::MissingComponent {
                    file: index.path().to_path_buf(),
                    kind,
                    hint: " (a checkpoint has unet, clip and vae)",
                })
        };
        let mut loaded = Gathered::default();

        let (family, unet) = match &options.unet_file {
            Some(file) => Self::separate_unet(file, options)?,
            None => Self::unet_of(&index, find(ComponentKind::Unet)?, options)?,
        };
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
        let scaling = family.vae_scaling_factor();
        let vae_config = match &options.vae_config {
            Some(c) => c.clone(),
            None => VaeConfig::detect(vae_c, scaling)?,
        };
        let vae = load_component(&index, vae_c, vae_config, &options.component(&options.vae))?;
        let vae = loaded.keep("vae".into(), vae);
        tracing::info!(
            family = family.name(),
            encoders = text_encoders.len(),
            "checkpoint loaded"
        );
        loaded.into_model(family, unet, text_encoders, vae, None)
    }

    /// The UNet component `c` of `index`, its family and configuration detected unless given.
    fn unet_of(
        index: &SafetensorsIndex,
        c: &distorch_core::Component<'_>,
        options: &CheckpointOptions<B>,
    ) -> Result<(SdFamily, Loaded<Unet2dCondition<B>>), Error> {
        let (family, config) = match &options.unet_config {
            Some(c) => (SdFamily::Unknown, c.clone()),
            None => {
                let d = UnetConfig::detect(c)?;
                (d.family, d.config)
            }
        };
        let unet = load_component(
            index,
            c,
            config,
            &options.with_loras(&options.unet, Target::Unet),
        )?;
        Ok((family, unet))
    }

    /// The UNet of [`CheckpointOptions::unet_file`] (safetensors or GGUF).
    fn separate_unet(
        file: &Path,
        options: &CheckpointOptions<B>,
    ) -> Result<(SdFamily, Loaded<Unet2dCondition<B>>), Error> {
        let index = crate::load::open_index(file)?;
        let split = crate::load::split(&index);
        let c = split
            .components
            .iter()
            .find(|c| c.kind == ComponentKind::Unet)
            .ok_or_else(|| Error::MissingComponent {
                file: file.to_path_buf(),
                kind: ComponentKind::Unet,
                hint: " (--unet names a UNet file)",
            })?;
        tracing::info!(file = %file.display(), format = %index.format(), "UNet from its own file");
        Self::unet_of(&index, c, options)
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
        let unet = match &options.unet_file {
            Some(file) => Self::separate_unet(file, options)?.1,
            None => load_model(
                folder.join("unet"),
                options.unet_config.clone(),
                &options.with_loras(&options.unet, Target::Unet),
            )?,
        };
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
            2 => SdFamily::Sdxl,
            _ => SdFamily::Unknown,
        };
        loaded.into_model(family, unet, text_encoders, vae, Some(folder))
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
            prepared.push(state.prepare(&LoraSpec::for_target(loras, target))?);
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

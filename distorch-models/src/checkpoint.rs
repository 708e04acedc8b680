//! Loading a Stable Diffusion single-file checkpoint (SD 1.x, SD 2.x, SDXL) as its three
//! kinds of model, each with its **own** allocation — the library's counterpart of
//! DisTorch2's `CheckpointLoaderAdvancedDisTorch2MultiGPU` — and each component alone.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::backend::Backend;
use distorch_alloc::{DeviceGraph, DeviceId, Plan, PlanRequest, VirtualVram};
use distorch_core::runtime::{DeviceMap, LoadOptions, LoadReport, Lookahead};
use distorch_core::{Component, ComponentKind, SafetensorsIndex, components, units};

use crate::clip::{ClipTextConfig, ClipTextModel};
use crate::clip_keys::{ClipKeys, ClipLayout};
use crate::error::Error;
use crate::keymap::KeyLayout;
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
}

impl<B: Backend> CheckpointOptions<B> {
    /// DisTorch2's defaults: the UNet on `compute` with 4 GiB of virtual VRAM on `cpu`, the
    /// text encoders computed on `cpu` (bound to `cpu_device`), the VAE on `compute`.
    pub fn new(
        graph: DeviceGraph,
        compute: DeviceId,
        device: B::Device,
        cpu_device: B::Device,
    ) -> Result<CheckpointOptions<B>, Error> {
        Ok(CheckpointOptions {
            graph,
            unet: Placement::virtual_vram(compute, device.clone(), 4.0, vec![DeviceId::CPU])?,
            clip: Placement::on(DeviceId::CPU, cpu_device),
            vae: Placement::on(compute, device),
            lookahead: Lookahead::default(),
            check_finite: true,
            unet_config: None,
            vae_config: None,
            clip_configs: None,
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
        let load = LoadOptions {
            check_finite: options.check_finite,
            ..LoadOptions::default()
        };
        let mut loaded = Vec::new();

        let unet_c = find(ComponentKind::Unet)?;
        let shapes = shape_map(unet_c);
        let (family, unet_config) = match &options.unet_config {
            Some(c) => ("unknown", c.clone()),
            None => {
                let d = detect(shapes.iter().map(|(k, s)| (k.as_str(), s.as_slice())))?;
                (d.family, d.config)
            }
        };
        let order = Unet2dCondition::<B>::execution_order(&unet_config, KeyLayout::Ldm)?;
        let plan = plan_for(unet_c, &order, &options.unet, &options.graph)?;
        let (unet, report) = Unet2dCondition::load(
            &index,
            unet_c,
            &plan,
            &options.unet.devices,
            unet_config,
            &load,
            options.lookahead,
        )?;
        loaded.push(("unet".to_owned(), plan, report));

        let clip_c = find(ComponentKind::Clip)?;
        let mut text_encoders = Vec::new();
        for (i, sub) in encoders(clip_c).into_iter().enumerate() {
            let shapes = shape_map(&sub);
            let keys = ClipKeys::detect(shapes.keys().map(String::as_str));
            let config = match options.clip_configs.as_ref().and_then(|c| c.get(i)) {
                Some(c) => c.clone(),
                None => keys.detect_config(|k| shapes.get(k).map(|s| to_usize(s)))?,
            };
            let projection = shapes.contains_key(&keys.projection_key());
            let plan = plan_for(
                &sub,
                &keys.order(&config, projection),
                &options.clip,
                &options.graph,
            )?;
            let (model, report) = ClipTextModel::load(
                &index,
                &sub,
                &plan,
                &options.clip.devices,
                config,
                &load,
                options.lookahead,
            )?;
            loaded.push((format!("clip.{i}"), plan, report));
            text_encoders.push(model);
        }

        let vae_c = find(ComponentKind::Vae)?;
        let shapes = shape_map(vae_c);
        let scaling = if family.starts_with("SDXL") {
            0.13025
        } else {
            0.18215
        };
        let vae_config = match &options.vae_config {
            Some(c) => c.clone(),
            None => VaeConfig::detect_ldm(|k| shapes.get(k).map(|s| to_usize(s)), scaling)?,
        };
        let plan = plan_for(vae_c, &[] as &[String], &options.vae, &options.graph)?;
        let (vae, report) = AutoencoderKl::load(
            &index,
            vae_c,
            &plan,
            &options.vae.devices,
            vae_config,
            &load,
            options.lookahead,
        )?;
        loaded.push(("vae".to_owned(), plan, report));
        tracing::info!(family, encoders = text_encoders.len(), "checkpoint loaded");
        Ok(StableDiffusion {
            family,
            unet,
            text_encoders,
            vae,
            loaded,
        })
    }
}

impl<B: Backend> StableDiffusion<B> {
    /// Loads a diffusers pipeline folder: `unet/`, `vae/`, `text_encoder/` and, for SDXL,
    /// `text_encoder_2/`, each a `config.json` and one `.safetensors` file
    /// (`diffusion_pytorch_model.safetensors` or `model.safetensors`, else the one there,
    /// e.g. an `.fp16.` variant), each planned and placed as `options` says. Sharded weights
    /// (`*.safetensors.index.json`) are not supported yet and are an error.
    pub fn load_diffusers(
        folder: impl AsRef<Path>,
        options: &CheckpointOptions<B>,
    ) -> Result<StableDiffusion<B>, Error> {
        let folder = folder.as_ref();
        let load = LoadOptions {
            check_finite: options.check_finite,
            ..LoadOptions::default()
        };
        let mut loaded = Vec::new();

        let (config_path, index) = component_folder(&folder.join("unet"))?;
        let config = match &options.unet_config {
            Some(c) => c.clone(),
            None => UnetConfig::from_file(&config_path)?,
        };
        let split = components::split(&index);
        let c = first(&split, &index)?;
        let order = Unet2dCondition::<B>::execution_order(&config, KeyLayout::Diffusers)?;
        let plan = plan_for(c, &order, &options.unet, &options.graph)?;
        let (unet, report) = Unet2dCondition::load(
            &index,
            c,
            &plan,
            &options.unet.devices,
            config,
            &load,
            options.lookahead,
        )?;
        loaded.push(("unet".to_owned(), plan, report));

        let mut text_encoders = Vec::new();
        for (i, name) in ["text_encoder", "text_encoder_2"].into_iter().enumerate() {
            let dir = folder.join(name);
            if !dir.is_dir() {
                continue;
            }
            let (config_path, index) = component_folder(&dir)?;
            let config = match options.clip_configs.as_ref().and_then(|c| c.get(i)) {
                Some(c) => c.clone(),
                None => ClipTextConfig::from_file(&config_path)?,
            };
            let split = components::split(&index);
            let c = first(&split, &index)?;
            let shapes = shape_map(c);
            let keys = ClipKeys::detect(shapes.keys().map(String::as_str));
            let projection = shapes.contains_key(&keys.projection_key());
            let plan = plan_for(
                c,
                &keys.order(&config, projection),
                &options.clip,
                &options.graph,
            )?;
            let (model, report) = ClipTextModel::load(
                &index,
                c,
                &plan,
                &options.clip.devices,
                config,
                &load,
                options.lookahead,
            )?;
            loaded.push((format!("clip.{i}"), plan, report));
            text_encoders.push(model);
        }

        let (config_path, index) = component_folder(&folder.join("vae"))?;
        let config = match &options.vae_config {
            Some(c) => c.clone(),
            None => VaeConfig::from_file(&config_path)?,
        };
        let split = components::split(&index);
        let c = first(&split, &index)?;
        let plan = plan_for(c, &[] as &[String], &options.vae, &options.graph)?;
        let (vae, report) = AutoencoderKl::load(
            &index,
            c,
            &plan,
            &options.vae.devices,
            config,
            &load,
            options.lookahead,
        )?;
        loaded.push(("vae".to_owned(), plan, report));
        let family = match text_encoders.len() {
            2 => "SDXL",
            _ => "unknown",
        };
        Ok(StableDiffusion {
            family,
            unet,
            text_encoders,
            vae,
            loaded,
        })
    }
}

/// The config path and weights index of a diffusers component folder.
fn component_folder(dir: &Path) -> Result<(std::path::PathBuf, SafetensorsIndex), Error> {
    let bad = |reason: String| Error::Input {
        input: "model folder",
        reason: format!("{}: {reason}", dir.display()),
    };
    let entries: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| bad(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    let named = |suffix: &str| {
        entries
            .iter()
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .cloned()
            .collect::<Vec<_>>()
    };
    if !named(".safetensors.index.json").is_empty() {
        return Err(bad(
            "sharded weights (*.safetensors.index.json) are not supported yet".into(),
        ));
    }
    let mut files = named(".safetensors");
    files.sort();
    let preferred = ["diffusion_pytorch_model.safetensors", "model.safetensors"];
    let weights = preferred
        .iter()
        .map(|n| dir.join(n))
        .find(|p| files.contains(p))
        .or_else(|| (files.len() == 1).then(|| files[0].clone()))
        .ok_or_else(|| {
            bad(if files.is_empty() {
                "no .safetensors file".into()
            } else {
                format!("several weight files and none of {preferred:?}")
            })
        })?;
    Ok((dir.join("config.json"), SafetensorsIndex::open(weights)?))
}

fn first<'a>(
    split: &'a distorch_core::Split<'a>,
    index: &SafetensorsIndex,
) -> Result<&'a Component<'a>, Error> {
    split.components.first().ok_or_else(|| Error::Input {
        input: "model folder",
        reason: format!("{}: no tensors", index.path().display()),
    })
}

/// Tensor shapes of a component by local key (component prefix stripped).
fn shape_map(c: &Component<'_>) -> HashMap<String, Vec<u64>> {
    c.tensors
        .iter()
        .map(|t| (c.local(t).to_owned(), t.shape.clone()))
        .collect()
}

fn to_usize(s: &[u64]) -> Vec<usize> {
    s.iter().map(|&d| d as usize).collect()
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

/// The plan of one component: its inventory in the model's execution order, then the
/// placement's request.
fn plan_for<B: Backend, S: AsRef<str>>(
    c: &Component<'_>,
    order: &[S],
    placement: &Placement<B>,
    graph: &DeviceGraph,
) -> Result<Plan, Error> {
    let inventory = units::inventory(c)?.in_order(order);
    Ok(distorch_alloc::plan(&placement.request, &inventory, graph)?)
}

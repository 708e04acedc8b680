//! Loading a FLUX.1 pipeline from the files users keep: a diffusers folder
//! ([`FluxFiles::diffusers`]), ComfyUI's separate files (`diffusion_models/flux1-dev`,
//! `text_encoders/clip_l` + `t5xxl` — ComfyUI's DualCLIPLoader with `type=flux` — and
//! `vae/ae`), or ComfyUI's all-in-one checkpoint ([`FluxFiles::checkpoint`]), each component
//! placed by its own [`ComponentOptions`] (T5-XXL's 9.5 GB on the CPU or streamed while the
//! transformer keeps the GPU, say).

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use distorch_alloc::Plan;

use crate::error::Error;
use crate::flux::dit::{FluxConfig, FluxTransformer};
use crate::flux::pipeline::Flux;
use std::sync::Arc;

use crate::load::{CachedLoad, ComponentOptions, Loaded, Models, cache_key, load_model};
use crate::sampling::flow_match::FlowMatchConfig;
use crate::sd::vae::{AutoencoderKl, VaeConfig};
use crate::text::clip::{ClipTextConfig, ClipTextModel};
use crate::text::t5_tokenizer::T5Tokenizer;
use crate::text::tokenizer::ClipTokenizer;
use crate::text::umt5::{Umt5Config, Umt5Encoder};

/// Where each component of a FLUX.1 pipeline is: a component folder (weights and
/// `config.json`) or a weights file (one component, or a checkpoint holding it).
#[derive(Debug, Clone)]
pub struct FluxFiles {
    /// The transformer.
    pub transformer: PathBuf,
    /// CLIP-L.
    pub clip: PathBuf,
    /// T5-XXL.
    pub t5: PathBuf,
    /// The VAE.
    pub vae: PathBuf,
    /// T5's `tokenizer.json`, or a folder holding it (directly or in `tokenizer/`): the
    /// weights files do not carry it.
    pub t5_tokenizer: PathBuf,
    /// CLIP's tokenizer folder (`vocab.json`, `merges.txt`); `None`: the bundled one.
    pub clip_tokenizer: Option<PathBuf>,
    /// The scheduler.
    pub scheduler: FlowMatchConfig,
    /// Configurations given instead of the folders' `config.json` or the shapes.
    pub configs: FluxConfigs,
}

/// Configurations that override what a component's folder or shapes say.
#[derive(Debug, Clone, Default)]
pub struct FluxConfigs {
    /// The transformer's.
    pub transformer: Option<FluxConfig>,
    /// CLIP-L's.
    pub clip: Option<ClipTextConfig>,
    /// T5's.
    pub t5: Option<Umt5Config>,
    /// The VAE's.
    pub vae: Option<VaeConfig>,
}

/// How each component is placed and computes.
#[derive(Debug, Clone)]
pub struct FluxOptions<B: Backend> {
    /// The transformer's options (block swap, say).
    pub transformer: ComponentOptions<B>,
    /// CLIP-L's.
    pub clip: ComponentOptions<B>,
    /// T5's.
    pub t5: ComponentOptions<B>,
    /// The VAE's.
    pub vae: ComponentOptions<B>,
}

impl<B: Backend> FluxOptions<B> {
    /// The same options for every component.
    pub fn all(options: ComponentOptions<B>) -> FluxOptions<B> {
        FluxOptions {
            transformer: options.clone(),
            clip: options.clone(),
            t5: options.clone(),
            vae: options,
        }
    }
}

/// Where each component went.
#[derive(Debug, Clone)]
pub struct FluxPlans {
    /// The transformer's plan.
    pub transformer: Plan,
    /// CLIP-L's.
    pub clip: Plan,
    /// T5's.
    pub t5: Plan,
    /// The VAE's.
    pub vae: Plan,
}

impl FluxFiles {
    /// A diffusers FLUX.1 folder: `transformer/`, `text_encoder/` (CLIP-L), `text_encoder_2/`
    /// (T5), `tokenizer_2/`, `vae/`, `scheduler/scheduler_config.json` and, when there,
    /// `tokenizer/` (CLIP's).
    pub fn diffusers(folder: impl AsRef<Path>) -> Result<FluxFiles, Error> {
        let f = folder.as_ref();
        let clip_tokenizer = f.join("tokenizer");
        Ok(FluxFiles {
            transformer: f.join("transformer"),
            clip: f.join("text_encoder"),
            t5: f.join("text_encoder_2"),
            vae: f.join("vae"),
            t5_tokenizer: f.join("tokenizer_2"),
            clip_tokenizer: clip_tokenizer
                .join("vocab.json")
                .is_file()
                .then_some(clip_tokenizer),
            scheduler: FlowMatchConfig::from_file(f.join("scheduler/scheduler_config.json"))?,
            configs: FluxConfigs::default(),
        })
    }

    /// ComfyUI's all-in-one checkpoint (`model.diffusion_model.`,
    /// `text_encoders.clip_l.transformer.`, `text_encoders.t5xxl.transformer.`, `vae.`), with
    /// T5's tokenizer and the scheduler (FLUX.1-dev's: [`FlowMatchConfig::flux_dev`]; schnell's:
    /// the default) given.
    pub fn checkpoint(
        path: impl AsRef<Path>,
        t5_tokenizer: impl AsRef<Path>,
        scheduler: FlowMatchConfig,
    ) -> FluxFiles {
        let p = path.as_ref().to_path_buf();
        FluxFiles {
            transformer: p.clone(),
            clip: p.clone(),
            t5: p.clone(),
            vae: p,
            t5_tokenizer: t5_tokenizer.as_ref().to_path_buf(),
            clip_tokenizer: None,
            scheduler,
            configs: FluxConfigs::default(),
        }
    }
}

impl<B: Backend> Flux<B> {
    /// Loads every component of `files`, each placed by its options in `options`, the
    /// tokenizers read first (a missing one fails before any weight is read).
    pub fn load(
        files: &FluxFiles,
        options: &FluxOptions<B>,
    ) -> Result<(Flux<B>, FluxPlans), Error> {
        let t5_tokenizer = match &files.t5_tokenizer {
            p if p.is_dir() => T5Tokenizer::from_folder(p)?,
            p => T5Tokenizer::from_file(p)?,
        };
        let clip_tokenizer = match &files.clip_tokenizer {
            Some(dir) => ClipTokenizer::from_folder(dir)?,
            None => ClipTokenizer::bundled()?,
        };
        let c = &files.configs;
        let clip: Loaded<ClipTextModel<B>> =
            load_model(&files.clip, c.clip.clone(), &options.clip)?;
        let t5: Loaded<Umt5Encoder<B>> = load_model(&files.t5, c.t5.clone(), &options.t5)?;
        let transformer: Loaded<FluxTransformer<B>> = load_model(
            &files.transformer,
            c.transformer.clone(),
            &options.transformer,
        )?;
        let vae: Loaded<AutoencoderKl<B>> = load_model(&files.vae, c.vae.clone(), &options.vae)?;
        let plans = FluxPlans {
            transformer: transformer.plan,
            clip: clip.plan,
            t5: t5.plan,
            vae: vae.plan,
        };
        Ok((
            Flux {
                clip_tokenizer,
                clip: clip.model,
                t5_tokenizer,
                t5: t5.model,
                transformer: transformer.model,
                vae: vae.model,
                scheduler: files.scheduler.clone(),
            },
            plans,
        ))
    }

    /// [`Flux::load`] through `cache`: the pipeline already loaded from the same, unchanged
    /// files with the same options is shared (with its plans); otherwise, with
    /// `eject_models` (DisTorch2's default), every cached model holding weights on a
    /// component's compute device is unloaded first.
    pub fn load_cached(
        cache: &mut Models,
        files: &FluxFiles,
        options: &FluxOptions<B>,
        eject_models: bool,
    ) -> Result<Arc<(Flux<B>, FluxPlans)>, Error>
    where
        Flux<B>: Send + Sync + 'static,
    {
        let c = &files.configs;
        let keys = [
            cache_key::<B, ClipTextModel<B>>(&files.clip, c.clip.as_ref(), &options.clip),
            cache_key::<B, Umt5Encoder<B>>(&files.t5, c.t5.as_ref(), &options.t5),
            cache_key::<B, FluxTransformer<B>>(
                &files.transformer,
                c.transformer.as_ref(),
                &options.transformer,
            ),
            cache_key::<B, AutoencoderKl<B>>(&files.vae, c.vae.as_ref(), &options.vae),
            format!(
                "{:?}|{:?}|{:?}",
                files.t5_tokenizer, files.clip_tokenizer, files.scheduler
            ),
        ];
        let o = [
            &options.clip,
            &options.t5,
            &options.transformer,
            &options.vae,
        ];
        CachedLoad::new(
            cache,
            "flux",
            &keys,
            o.map(|o| &o.placement.request),
            &options.transformer.graph,
            eject_models,
        )
        .get_or_load(|| {
            let (flux, plans) = Flux::load(files, options)?;
            let list = vec![
                plans.clip.clone(),
                plans.t5.clone(),
                plans.transformer.clone(),
                plans.vae.clone(),
            ];
            Ok(((flux, plans), list))
        })
    }
}

//! Loading a Wan 2.1 text-to-video pipeline in one call: a diffusers folder
//! ([`WanFiles::diffusers`]) or the files ComfyUI users keep (`diffusion_models/wan2.1_t2v…`,
//! `text_encoders/umt5_xxl…`, `vae/wan_2.1_vae`), each component placed by its own
//! [`ComponentOptions`] (block swap for the transformer, say).

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use distorch_alloc::Plan;

use crate::error::Error;
use std::sync::Arc;

use crate::load::{CachedLoad, ComponentOptions, Loaded, Models, cache_key, load_model};
use crate::text::t5_tokenizer::T5Tokenizer;
use crate::text::umt5::{Umt5Config, Umt5Encoder};
use crate::wan::dit::{WanDitConfig, WanTransformer};
use crate::wan::pipeline::Wan;
use crate::wan::vae::{WanVae, WanVaeConfig};

/// Where each component of a Wan pipeline is: a component folder (weights and
/// `config.json`) or a weights file.
#[derive(Debug, Clone)]
pub struct WanFiles {
    /// The transformer.
    pub transformer: PathBuf,
    /// The UMT5 encoder.
    pub text_encoder: PathBuf,
    /// The VAE.
    pub vae: PathBuf,
    /// UMT5's `tokenizer.json`, or a folder holding it (directly or in `tokenizer/`).
    pub tokenizer: PathBuf,
    /// Configurations given instead of the folders' `config.json` or the shapes.
    pub configs: WanConfigs,
}

/// Configurations that override what a component's folder or shapes say.
#[derive(Debug, Clone, Default)]
pub struct WanConfigs {
    /// The transformer's.
    pub transformer: Option<WanDitConfig>,
    /// The encoder's.
    pub text_encoder: Option<Umt5Config>,
    /// The VAE's.
    pub vae: Option<WanVaeConfig>,
}

/// How each component is placed and computes.
#[derive(Debug, Clone)]
pub struct WanOptions<B: Backend> {
    /// The transformer's options (block swap, say).
    pub transformer: ComponentOptions<B>,
    /// The encoder's.
    pub text_encoder: ComponentOptions<B>,
    /// The VAE's.
    pub vae: ComponentOptions<B>,
}

impl<B: Backend> WanOptions<B> {
    /// The same options for every component.
    pub fn all(options: ComponentOptions<B>) -> WanOptions<B> {
        WanOptions {
            transformer: options.clone(),
            text_encoder: options.clone(),
            vae: options,
        }
    }
}

/// Where each component went.
#[derive(Debug, Clone)]
pub struct WanPlans {
    /// The transformer's plan.
    pub transformer: Plan,
    /// The encoder's.
    pub text_encoder: Plan,
    /// The VAE's.
    pub vae: Plan,
}

impl WanFiles {
    /// A diffusers Wan folder: `transformer/`, `text_encoder/`, `vae/`, `tokenizer/`.
    pub fn diffusers(folder: impl AsRef<Path>) -> WanFiles {
        let f = folder.as_ref();
        WanFiles {
            transformer: f.join("transformer"),
            text_encoder: f.join("text_encoder"),
            vae: f.join("vae"),
            tokenizer: f.join("tokenizer"),
            configs: WanConfigs::default(),
        }
    }
}

impl<B: Backend> Wan<B> {
    /// Loads every component of `files`, each placed by its options in `options`, the
    /// tokenizer read first (a missing one fails before any weight is read).
    pub fn load(files: &WanFiles, options: &WanOptions<B>) -> Result<(Wan<B>, WanPlans), Error> {
        let tokenizer = match &files.tokenizer {
            p if p.is_dir() => T5Tokenizer::from_folder(p)?,
            p => T5Tokenizer::from_file(p)?,
        };
        let c = &files.configs;
        let text: Loaded<Umt5Encoder<B>> = load_model(
            &files.text_encoder,
            c.text_encoder.clone(),
            &options.text_encoder,
        )?;
        let dit: Loaded<WanTransformer<B>> = load_model(
            &files.transformer,
            c.transformer.clone(),
            &options.transformer,
        )?;
        let vae: Loaded<WanVae<B>> = load_model(&files.vae, c.vae.clone(), &options.vae)?;
        let plans = WanPlans {
            transformer: dit.plan,
            text_encoder: text.plan,
            vae: vae.plan,
        };
        Ok((
            Wan {
                tokenizer,
                text_encoder: text.model,
                transformer: dit.model,
                vae: vae.model,
            },
            plans,
        ))
    }

    /// [`Wan::load`] through `cache`: the pipeline already loaded from the same, unchanged
    /// files with the same options is shared (with its plans); otherwise, with
    /// `eject_models` (DisTorch2's default), every cached model holding weights on a
    /// component's compute device is unloaded first.
    pub fn load_cached(
        cache: &mut Models,
        files: &WanFiles,
        options: &WanOptions<B>,
        eject_models: bool,
    ) -> Result<Arc<(Wan<B>, WanPlans)>, Error>
    where
        Wan<B>: Send + Sync + 'static,
    {
        let c = &files.configs;
        let keys = [
            cache_key::<B, Umt5Encoder<B>>(
                &files.text_encoder,
                c.text_encoder.as_ref(),
                &options.text_encoder,
            ),
            cache_key::<B, WanTransformer<B>>(
                &files.transformer,
                c.transformer.as_ref(),
                &options.transformer,
            ),
            cache_key::<B, WanVae<B>>(&files.vae, c.vae.as_ref(), &options.vae),
            files.tokenizer.display().to_string(),
        ];
        let o = [&options.text_encoder, &options.transformer, &options.vae];
        CachedLoad::new(
            cache,
            "wan",
            &keys,
            o.map(|o| &o.placement.request),
            &options.transformer.graph,
            eject_models,
        )
        .get_or_load(|| {
            let (wan, plans) = Wan::load(files, options)?;
            let list = vec![
                plans.text_encoder.clone(),
                plans.transformer.clone(),
                plans.vae.clone(),
            ];
            Ok(((wan, plans), list))
        })
    }
}

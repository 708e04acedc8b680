//! Stable Diffusion in one call: [`StableDiffusion::load`] takes a single-file checkpoint or a
//! diffusers folder, [`StableDiffusion::load_cached`] shares it across loads with DisTorch2's
//! `eject_models`, and the loaded pipeline owns its tokenizers and scheduler
//! ([`StableDiffusion::request`], [`StableDiffusion::generate`]).

use std::path::Path;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use distorch_core::SafetensorsIndex;
use distorch_lora::{LoraFile, Target};

use crate::error::Error;
use crate::load::discovery::{ModelFolders, ModelKind};
use crate::load::folder::ComponentFiles;
use crate::load::{CachedLoad, Models, cache_key};
use crate::sampling::scheduler::SchedulerConfig;
use crate::sd::checkpoint::{CheckpointOptions, LoraSpec, StableDiffusion};
use crate::sd::pipeline::{Generated, Progress, Txt2Img};
use crate::sd::unet::Unet2dCondition;
use crate::sd::vae::AutoencoderKl;
use crate::text::clip::ClipTextModel;
use crate::text::tokenizer::ClipTokenizer;

/// The diffusers folders of a pipeline's components that hold weights.
const PARTS: [&str; 4] = ["unet", "vae", "text_encoder", "text_encoder_2"];

impl<B: Backend> StableDiffusion<B> {
    /// Loads a single-file checkpoint (SD 1.x/2.x/SDXL) or a diffusers pipeline folder, each
    /// component placed as `options` says (see [`StableDiffusion::load_single_file`] and
    /// [`StableDiffusion::load_diffusers`]).
    pub fn load(
        path: impl AsRef<Path>,
        options: &CheckpointOptions<B>,
    ) -> Result<StableDiffusion<B>, Error> {
        let path = path.as_ref();
        if path.is_dir() {
            StableDiffusion::load_diffusers(path, options)
        } else {
            StableDiffusion::load_single_file(path, options)
        }
    }

    /// [`StableDiffusion::load`] through `cache`: the pipeline already loaded from the same,
    /// unchanged files with the same configurations, placements, dtype and LoRAs is shared.
    /// Otherwise, with `options.eject_models` (DisTorch2's default), every cached model
    /// holding weights on a component's compute device is unloaded first; without it, cached
    /// models stay loaded.
    pub fn load_cached(
        cache: &mut Models,
        path: impl AsRef<Path>,
        options: &CheckpointOptions<B>,
    ) -> Result<Arc<StableDiffusion<B>>, Error>
    where
        StableDiffusion<B>: Send + Sync + 'static,
    {
        let path = path.as_ref();
        let cached = CachedLoad::new(
            cache,
            "sd",
            &pipeline_keys(path, options),
            [&options.unet, &options.clip, &options.vae].map(|p| &p.request),
            &options.graph,
            options.eject_models,
        );
        cached.get_or_load(|| {
            let sd = StableDiffusion::load(path, options)?;
            let plans = sd.loaded.iter().map(|(_, p, _)| p.clone()).collect();
            Ok((sd, plans))
        })
    }

    /// A request for `prompt` with this pipeline's scheduler and the defaults of
    /// [`Txt2Img::new`]; change its fields (steps, size, seed...) before [`generate`].
    ///
    /// [`generate`]: StableDiffusion::generate
    pub fn request(&self, prompt: impl Into<String>) -> Txt2Img<'_, B> {
        Txt2Img {
            scheduler: self.scheduler.clone(),
            ..Txt2Img::new(prompt)
        }
    }

    /// Generates one image with the pipeline's own tokenizers (see
    /// [`StableDiffusion::txt2img`]).
    pub fn generate(
        &self,
        request: &Txt2Img<'_, B>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Generated<B>, Error> {
        self.txt2img(&self.tokenizers, request, progress)
    }
}

/// Every component's cache key (see `load::cache_key`).
fn pipeline_keys<B: Backend>(path: &Path, options: &CheckpointOptions<B>) -> Vec<String> {
    let folder = path.is_dir();
    let part = |name: &str| {
        if folder {
            path.join(name)
        } else {
            path.to_path_buf()
        }
    };
    let unet_path = options.unet_file.clone().unwrap_or_else(|| part("unet"));
    let unet = cache_key::<B, Unet2dCondition<B>>(
        &unet_path,
        options.unet_config.as_ref(),
        &options.with_loras(&options.unet, Target::Unet),
    );
    let clips: Vec<String> = ["text_encoder", "text_encoder_2"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let config = options.clip_configs.as_ref().and_then(|c| c.get(i));
            cache_key::<B, ClipTextModel<B>>(
                &part(name),
                config,
                &options.with_loras(&options.clip, Target::TextEncoder(i)),
            )
        })
        .collect();
    let vae = cache_key::<B, AutoencoderKl<B>>(
        &part("vae"),
        options.vae_config.as_ref(),
        &options.component(&options.vae),
    );
    [vec![unet], clips, vec![vae]].concat()
}

/// Bytes of tensor data in a single-file checkpoint or a diffusers pipeline folder's
/// components (the total a load-progress bar counts to).
pub fn file_bytes(path: impl AsRef<Path>) -> Result<u64, Error> {
    let path = path.as_ref();
    if !path.is_dir() {
        return Ok(crate::load::open_index(path)?.data_bytes());
    }
    let mut total = 0;
    for part in PARTS {
        let dir = path.join(part);
        if dir.is_dir() {
            let files = ComponentFiles::find(&dir)?;
            total += SafetensorsIndex::open(files.weights)?.data_bytes();
        }
    }
    Ok(total)
}

/// One tokenizer per text encoder: the diffusers `folder`'s own when it has them, else the
/// bundled CLIP vocabulary (SDXL's second encoder pads with `!`).
pub(crate) fn tokenizers(
    folder: Option<&Path>,
    encoders: usize,
) -> Result<Vec<ClipTokenizer>, Error> {
    (0..encoders)
        .map(|i| {
            let dir = folder.map(|f| f.join(if i == 0 { "tokenizer" } else { "tokenizer_2" }));
            match dir {
                Some(d) if d.join("vocab.json").is_file() => ClipTokenizer::from_folder(&d),
                _ if i == 1 => ClipTokenizer::bundled()?.with_pad("!"),
                _ => ClipTokenizer::bundled(),
            }
        })
        .collect()
}

/// A diffusers `folder`'s `scheduler/scheduler_config.json`, else SD's default.
pub(crate) fn scheduler(folder: Option<&Path>) -> Result<SchedulerConfig, Error> {
    match folder.map(|f| f.join("scheduler/scheduler_config.json")) {
        Some(file) if file.is_file() => SchedulerConfig::from_file(&file),
        _ => Ok(SchedulerConfig::default()),
    }
}

impl LoraSpec {
    /// A LoRA as the command line gives it: `PATH_OR_NAME[:MODEL_STRENGTH[:CLIP_STRENGTH]]`
    /// (strengths 1 and the model strength by default). Trailing numbers are strengths, the
    /// rest (which may hold `:`, as a Windows path) the name, found in `folders`' `loras`.
    pub fn parse(spec: &str, folders: &ModelFolders) -> Result<LoraSpec, Error> {
        let (name, model, clip) = split_lora_spec(spec)?;
        let path = folders.resolve(ModelKind::Loras, &name)?;
        Ok(LoraSpec {
            file: Arc::new(LoraFile::open(&path)?),
            model,
            clip,
        })
    }
}

/// `PATH_OR_NAME[:MODEL[:CLIP]]` as (name, model strength, CLIP strength): up to two trailing
/// numbers are strengths (finite ones only), the rest the name.
fn split_lora_spec(spec: &str) -> Result<(String, f32, f32), Error> {
    let bad = |reason: String| Error::Input {
        input: "lora",
        reason: format!("`{spec}`: {reason}"),
    };
    let mut parts: Vec<&str> = spec.rsplitn(3, ':').collect();
    parts.reverse();
    let mut numbers: Vec<f32> = parts
        .iter()
        .rev()
        .take(2)
        .map_while(|p| p.parse::<f32>().ok())
        .collect();
    numbers.reverse();
    if let Some(v) = numbers.iter().find(|v| !v.is_finite()) {
        return Err(bad(format!("strength {v} is not a finite number")));
    }
    let name = parts[..parts.len() - numbers.len()].join(":");
    if name.is_empty() {
        return Err(bad("no LoRA name before the strengths".into()));
    }
    let model = numbers.first().copied().unwrap_or(1.0);
    Ok((name, model, numbers.get(1).copied().unwrap_or(model)))
}

/// A ControlNet hint image from `path` (PNG, JPEG or WebP), resized to `width` × `height`
/// (Lanczos), as the pipeline takes it: [1, 3, height, width] in [0, 1].
pub fn hint_image<B: Backend>(
    path: impl AsRef<Path>,
    width: usize,
    height: usize,
    device: &B::Device,
) -> Result<Tensor<B, 4>, Error> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::Input {
        input: "hint",
        reason: format!("{}: {e}", path.display()),
    })?;
    let image = crate::vision::clip_image::decode(&bytes)?;
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

#[cfg(test)]
mod tests {
    use super::split_lora_spec;

    #[test]
    fn lora_specs_split_into_name_and_strengths() {
        let s = |spec: &str| split_lora_spec(spec).map_err(|e| e.to_string());
        assert_eq!(s("detail"), Ok(("detail".into(), 1.0, 1.0)));
        assert_eq!(s("detail:0.5"), Ok(("detail".into(), 0.5, 0.5)));
        assert_eq!(s("detail:0.5:-1"), Ok(("detail".into(), 0.5, -1.0)));
        assert_eq!(
            s(r"C:\loras\x.safetensors:0.8"),
            Ok((r"C:\loras\x.safetensors".into(), 0.8, 0.8))
        );
        assert_eq!(s("a:b:c"), Ok(("a:b:c".into(), 1.0, 1.0)));
        assert!(s(":0.5").unwrap_err().contains("no LoRA name"));
        assert!(s("x:nan").unwrap_err().contains("not a finite number"));
        assert!(s("x:1:inf").unwrap_err().contains("not a finite number"));
    }
}

//! [`Error`]: everything that can go wrong in a model.

use std::path::PathBuf;

/// An error from configuring, loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// From the file index, the loader or the streamer.
    #[error(transparent)]
    Core(#[from] distorch_core::Error),
    /// From a LoRA (its file, or its fit to the model).
    #[error(transparent)]
    Lora(#[from] distorch_lora::Error),
    /// From planning (an allocation that cannot be met, say).
    #[error(transparent)]
    Alloc(#[from] distorch_alloc::Error),
    /// A device a placement names cannot be bound to a Burn device of the backend computing.
    #[error("device `{device}`: {source}")]
    Device {
        /// The device.
        device: distorch_alloc::DeviceId,
        /// Why not (from the binder, `distorch_backends::device`).
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A configuration file that cannot be read or used.
    #[error("{}: {reason}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the field.
        reason: String,
    },
    /// A configuration value the model does not support (it would change the maths).
    #[error("unsupported configuration: `{field}` = {value} ({reason})")]
    Unsupported {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
        /// What is supported.
        reason: &'static str,
    },
    /// A weight the forward pass needs is not in the store, or has another rank.
    #[error("weight `{key}` is missing from the loaded model or is not of rank {rank}")]
    MissingWeight {
        /// The full key.
        key: String,
        /// The rank the model needs.
        rank: usize,
    },
    /// An argument of a call that does not fit the model: a tensor of another shape, token
    /// ids outside the vocabulary, an image size or a step count it cannot take. Errors in
    /// files and configurations have their own variants.
    #[error("invalid input `{input}`: {reason}")]
    Input {
        /// Which argument (the reference implementation's name for it).
        input: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A component whose names or shapes are not those of the model it is loaded as (its
    /// architecture cannot be read from them).
    #[error("not a {model}: {reason}")]
    NotTheModel {
        /// The model it was loaded as.
        model: &'static str,
        /// What is missing or does not fit, naming the tensor.
        reason: String,
    },
    /// A diffusers-layout component given without its `config.json`: its shapes do not say
    /// everything the model needs.
    #[error(
        "a diffusers-layout {model} needs its config.json (load its folder, or give the \
         configuration)"
    )]
    NeedsConfig {
        /// The model.
        model: &'static str,
    },
    /// A single-file component whose configuration its shapes cannot tell (and no released
    /// model's defaults fit): the configuration must be given.
    #[error(
        "{model}: {what} cannot be read from the file's shapes (load its diffusers folder, \
         or give the configuration)"
    )]
    Undetectable {
        /// The model.
        model: &'static str,
        /// What the shapes do not say, and why the released models' values do not apply.
        what: String,
    },
    /// A file that does not hold the component asked for.
    #[error("{}: no {kind} in the file{hint}", file.display())]
    MissingComponent {
        /// The file.
        file: PathBuf,
        /// The component asked for.
        kind: distorch_core::ComponentKind,
        /// What the file was expected to hold (may be empty).
        hint: &'static str,
    },
    /// A file with several text encoders loaded as one.
    #[error(
        "{count} text encoders in the file: pick one with `text_encoders` and `load_component`"
    )]
    SeveralTextEncoders {
        /// How many the file has.
        count: usize,
    },
    /// A ControlNet whose architecture differs from the UNet it is used with.
    #[error(
        "the ControlNet's {what} is {controlnet}, the UNet's is {unet}: they were not made for \
         each other"
    )]
    ControlNetMismatch {
        /// What differs.
        what: &'static str,
        /// The ControlNet's value.
        controlnet: String,
        /// The UNet's value.
        unet: String,
    },
    /// A tokenizer's files (vocabulary, merges, `tokenizer.json`) that cannot be read or
    /// used.
    #[error("invalid input `tokenizer`: {what}: {reason}")]
    Tokenizer {
        /// The file or part (`merges`, `pad token`, `prompt`).
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// A diffusers/transformers component folder without usable weights.
    #[error("invalid input `model folder`: {}: {reason}", path.display())]
    ModelFolder {
        /// The folder.
        path: PathBuf,
        /// What is wrong (no weights, several candidates, unreadable).
        reason: String,
    },
    /// A ComfyUI `models/` folder that is not a folder.
    #[error("invalid input `models-dir`: {} is not a folder", path.display())]
    NotAFolder {
        /// The path given.
        path: PathBuf,
    },
    /// A model name found in none of the searched folders.
    #[error(
        "invalid input `model name`: {name:?} ({kind:?}) not found; searched {}{}",
        searched_list(searched),
        did_you_mean(near)
    )]
    ModelNotFound {
        /// The name asked for.
        name: String,
        /// The kind of model (its folders).
        kind: crate::ModelKind,
        /// The folders searched.
        searched: Vec<PathBuf>,
        /// The closest names found, best first (at most three).
        near: Vec<String>,
    },
    /// A sampler name that is not one of the known ones.
    #[error(
        "invalid input `sampler`: unknown sampler {name:?}; known: euler, euler_a, ddim, \
         dpmpp_2m_karras"
    )]
    UnknownSampler {
        /// The name given.
        name: String,
    },
}

fn searched_list(searched: &[PathBuf]) -> String {
    if searched.is_empty() {
        "no folders (give --models-dir or a path)".to_owned()
    } else {
        let s: Vec<String> = searched.iter().map(|f| f.display().to_string()).collect();
        s.join(", ")
    }
}

fn did_you_mean(near: &[String]) -> String {
    if near.is_empty() {
        String::new()
    } else {
        format!("; did you mean {}?", near.join(", "))
    }
}

/// `Err` of [`Error::Unsupported`]: `field` = `value` is not implemented (`reason` says what
/// is).
pub(crate) fn unsupported<T>(
    field: &'static str,
    value: String,
    reason: &'static str,
) -> Result<T, Error> {
    Err(Error::Unsupported {
        field,
        value,
        reason,
    })
}

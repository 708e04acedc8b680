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
    /// An input that does not fit the model.
    #[error("invalid input `{input}`: {reason}")]
    Input {
        /// Which input.
        input: &'static str,
        /// What is wrong.
        reason: String,
    },
}

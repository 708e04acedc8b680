//! [`Error`]: what can be wrong with a LoRA.

use std::path::PathBuf;

/// An error reading or applying a LoRA.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// From the file index (a truncated or malformed file).
    #[error(transparent)]
    Core(#[from] distorch_core::Error),
    /// A tensor of the file that cannot be used, named.
    #[error("{}: `{key}`: {reason}", path.display())]
    Tensor {
        /// The LoRA file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A LoRA whose update does not fit the model's tensor (another architecture, or an up
    /// and a down of different ranks).
    #[error("{}: `{key}` does not fit `{target}`: {reason}", path.display())]
    Shape {
        /// The LoRA file.
        path: PathBuf,
        /// The LoRA module.
        key: String,
        /// The model tensor it maps to.
        target: String,
        /// What does not fit.
        reason: String,
    },
    /// A LoRA that changes nothing in the component it targets.
    #[error(
        "{}: none of its {modules} modules for the {target} match this model (first: `{first}`): \
         a LoRA for another architecture?",
        path.display()
    )]
    NothingMatched {
        /// The LoRA file.
        path: PathBuf,
        /// Which component.
        target: String,
        /// How many modules it has for it.
        modules: usize,
        /// One of them.
        first: String,
    },
}

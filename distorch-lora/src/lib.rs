//! LoRA support for distorch: file formats (kohya/A1111, diffusers/PEFT, LoCon), key mapping
//! onto the model's own tensor names, and high-precision patching during
//! Load-Patch-Distribute.
//!
//! **Not implemented yet.** This crate is reserved in the workspace so its place in the
//! dependency graph is fixed; it exposes nothing until the LoRA work lands.

#![deny(missing_docs)]

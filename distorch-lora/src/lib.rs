//! LoRA support for distorch: file formats, key mapping onto a model's own tensor names, and
//! high-precision patching during Load-Patch-Distribute.
//!
//! - Formats ([`LoraFile`]): kohya / A1111 (`lora_unet_*`, `lora_te_*`, `lora_te1_*`,
//!   `lora_te2_*` with `.lora_up.weight`, `.lora_down.weight`, `.alpha`), diffusers / PEFT
//!   (`*.lora_A.weight` / `*.lora_B.weight`, with or without `unet.`, `transformer.`,
//!   `text_encoder.`, `text_encoder_2.` or `base_model.model.` prefixes, `.alpha` when
//!   present), LoCon (convolution LoRA: a k×k down and a 1×1 up), full-weight differences
//!   (`.diff`, `.diff_b`), and LyCORIS LoHa (`hada_w1_a/b`, `hada_w2_a/b`) and LoKr
//!   (`lokr_w1` or `lokr_w1_a/b`, `lokr_w2` or `lokr_w2_a/b`). Tucker cores (`hada_t1/t2`,
//!   `lokr_t2`, `lora_mid`) are not supported: those modules are listed in
//!   [`LoraFile::unsupported`] with a warning, not applied.
//! - Mapping ([`LoraPatch::build`]): every LoRA module is matched against the model's module
//!   names in diffusers/transformers naming and in the file's own layout (dots or kohya's
//!   underscores), so the same LoRA applies to a diffusers folder and a single-file
//!   checkpoint; a module may be a row slice of a fused tensor ([`ModelTensor::rows`]:
//!   OpenCLIP's `in_proj` holds q, k and v). What matches nothing is reported, never dropped silently; a LoRA that
//!   matches nothing in a component it targets is an error.
//! - Patching ([`LoraPatch`] is a `WeightPatch`): `W + Σ strength · alpha/rank · up·down`
//!   computed at f32 on the compute device while the weight loads, then rounded to the
//!   storage dtype and sent home (see `distorch_core::runtime::WeightStore::load`); fp8
//!   weights are kept at bf16 or re-quantised by seeded stochastic rounding
//!   (`distorch_core::runtime::PatchPrecision`). Changing LoRAs later re-patches only the
//!   tensors they touch from the file's pristine bytes (`WeightStore::repatch`).

#![deny(missing_docs)]

mod error;
mod file;
mod patch;

pub use error::Error;
pub use file::{KronFactor, LoraFile, LoraModule, Matrix, Target, Update};
pub use patch::{LoraPatch, LoraReport, ModelTensor};

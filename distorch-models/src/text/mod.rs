//! Text encoders and their tokenizers: CLIP (CLIP-L and OpenCLIP layouts, as SD 1.x/2.x/SDXL
//! use them) and UMT5 (Wan).

pub mod clip;
mod clip_config;
pub(crate) mod clip_keys;
pub mod t5_demo;
pub mod t5_tokenizer;
pub mod tokenizer;
pub mod umt5;

pub use clip_keys::text_encoders;

//! Every model against diffusers / transformers (fixtures from `tools/fixtures/gen.py`), in
//! both key layouts, resident and offloaded; one test binary so the wgpu build links once.

mod attention;
mod cache;
mod checkpoint;
mod clip_text;
mod clip_vision;
mod common;
mod controlnet;
mod conventions;
mod flux;
mod flux_files;
mod flux_pipeline;
mod flux_shapes;
mod gguf;
mod half;
mod lora;
mod pipeline;
mod scaled_fp8;
mod schedulers;
mod t5_tokenizer;
mod tokenizer;
mod umt5;
mod unet;
mod unet_ldm;
mod vae;
mod wan;
mod wan_pipeline;
mod wan_vae;

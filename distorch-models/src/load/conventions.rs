//! The weight files distorch's model families come in, as distorch-core's splitter and
//! inventories need to know them: single-file checkpoint prefixes, how a one-component file
//! is recognised, the order layers run in and which units are embedding tables.

use distorch_core::components::{self, Conventions, Split};
use distorch_core::{ComponentKind, SafetensorsIndex, TensorInfo};

/// The conventions of every family distorch-models knows (Stable Diffusion single-file
/// checkpoints and components, CLIP, T5/UMT5, Wan).
pub static CONVENTIONS: Conventions = Conventions {
    prefixes: CHECKPOINT_PREFIXES,
    classify,
    segment_order: SEGMENT_ORDER,
    embeddings: EMBEDDINGS,
};

/// Splits `index` into components by [`CONVENTIONS`]: a file with checkpoint prefixes
/// (`model.diffusion_model.`, `first_stage_model.`, `cond_stage_model.`,
/// `conditioner.embedders.N.`, `control_model.`; ComfyUI's FLUX `text_encoders.clip_l.`,
/// `text_encoders.t5xxl.`, `vae.`) by them, the rest `other`; a file without
/// them is one component, recognised from its keys (diffusers or original names), or
/// [`ComponentKind::Model`].
pub fn split(index: &SafetensorsIndex) -> Split<'_> {
    components::split(index, &CONVENTIONS)
}

/// The planner's inventory for one component of `index` (see
/// [`components::inventory_for`]).
pub fn inventory_for(
    index: &SafetensorsIndex,
    kind: ComponentKind,
) -> Result<distorch_alloc::Inventory, distorch_core::Error> {
    components::inventory_for(index, &CONVENTIONS, kind)
}

/// Prefixes of single-file checkpoints (original Stable Diffusion layout; ComfyUI's all-in-one
/// FLUX checkpoints add `text_encoders.clip_l.transformer.`, `text_encoders.t5xxl.transformer.`
/// and `vae.`), longest first.
const CHECKPOINT_PREFIXES: &[(&str, ComponentKind)] = &[
    ("text_encoders.clip_l.transformer.", ComponentKind::Clip),
    ("text_encoders.t5xxl.transformer.", ComponentKind::Model),
    ("model.diffusion_model.", ComponentKind::Unet),
    ("first_stage_model.", ComponentKind::Vae),
    ("cond_stage_model.", ComponentKind::Clip),
    ("conditioner.embedders.", ComponentKind::Clip),
    ("control_model.", ComponentKind::ControlNet),
    ("vae.", ComponentKind::Vae),
];

/// Recognises a one-component file from its keys.
fn classify(tensors: &[TensorInfo]) -> ComponentKind {
    let has = |needle: &str| tensors.iter().any(|t| t.name.contains(needle));
    let starts = |p: &str| tensors.iter().any(|t| t.name.starts_with(p));
    if has("input_hint_block") || has("controlnet_cond_embedding") {
        ComponentKind::ControlNet
    } else if starts("vision_model.") || starts("visual.") {
        ComponentKind::ClipVision
    } else if starts("text_model.") || starts("transformer.text_model.") || has("token_embedding") {
        ComponentKind::Clip
    } else if starts("encoder.") && starts("decoder.") {
        ComponentKind::Vae
    } else if (starts("input_blocks.") && starts("output_blocks."))
        || (starts("down_blocks.") && starts("up_blocks."))
    {
        ComponentKind::Unet
    } else {
        ComponentKind::Model
    }
}

/// Unit names (last segment) that are embedding tables.
const EMBEDDINGS: &[&str] = &[
    "token_embedding",
    "position_embedding",
    "positional_embedding",
    "embed_tokens",
    "embed_positions",
    "word_embeddings",
    "position_embeddings",
    "shared",
    "class_embedding",
    "relative_attention_bias",
];

/// Key segments in the order their layers run, across the model families distorch knows.
/// Used to approximate execution order where a model declares none (the VAE).
const SEGMENT_ORDER: &[&str] = &[
    "embeddings",
    "time_embed",
    "time_embedding",
    "label_emb",
    "add_embedding",
    "conv_in",
    "input_hint_block",
    "controlnet_cond_embedding",
    "input_blocks",
    "down_blocks",
    "down",
    "zero_convs",
    "controlnet_down_blocks",
    "middle_block",
    "mid_block",
    "mid",
    "middle_block_out",
    "controlnet_mid_block",
    "output_blocks",
    "up_blocks",
    "up",
    "norm_out",
    "conv_norm_out",
    "out",
    "conv_out",
    "encoder",
    "quant_conv",
    "post_quant_conv",
    "decoder",
    "final_layer_norm",
    "text_projection",
    "in_layers",
    "emb_layers",
    "out_layers",
    "skip_connection",
    "norm",
    "proj_in",
    "transformer_blocks",
    "proj_out",
];

//! The two key layouts of a FLUX transformer: diffusers' (`time_text_embed.*`,
//! `transformer_blocks.N.attn.to_q`, `single_transformer_blocks.N.proj_mlp`, `norm_out`) and
//! the original Black Forest Labs one (`time_in`, `double_blocks.N.img_attn.qkv`,
//! `single_blocks.N.linear1`, `final_layer`), as `flux1-dev.safetensors` and ComfyUI's
//! checkpoints keep it. In the BFL layout q, k and v are one fused projection (with the MLP's
//! input in single blocks), q/k norms name their weight `scale`, and the final norm's
//! projection gives shift before scale.

use distorch_alloc::{BlockSwap, DeviceId};
use distorch_core::Component;

/// Which layout a FLUX transformer's weights use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FluxLayout {
    /// diffusers' `FluxTransformer2DModel` names.
    Diffusers,
    /// The original BFL (and ComfyUI) names.
    Bfl,
}

/// Whole-unit renames from diffusers' names to BFL's (outside the blocks).
const TOP: &[(&str, &str)] = &[
    ("x_embedder", "img_in"),
    (
        "time_text_embed.timestep_embedder.linear_1",
        "time_in.in_layer",
    ),
    (
        "time_text_embed.timestep_embedder.linear_2",
        "time_in.out_layer",
    ),
    (
        "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.in_layer",
    ),
    (
        "time_text_embed.guidance_embedder.linear_2",
        "guidance_in.out_layer",
    ),
    (
        "time_text_embed.text_embedder.linear_1",
        "vector_in.in_layer",
    ),
    (
        "time_text_embed.text_embedder.linear_2",
        "vector_in.out_layer",
    ),
    ("context_embedder", "txt_in"),
    ("norm_out.linear", "final_layer.adaLN_modulation.1"),
    ("proj_out", "final_layer.linear"),
];

/// Renames inside a double-stream block (`transformer_blocks.N.` / `double_blocks.N.`).
const DOUBLE: &[(&str, &str)] = &[
    ("norm1.linear", "img_mod.lin"),
    ("norm1_context.linear", "txt_mod.lin"),
    ("attn.norm_q", "img_attn.norm.query_norm"),
    ("attn.norm_k", "img_attn.norm.key_norm"),
    ("attn.norm_added_q", "txt_attn.norm.query_norm"),
    ("attn.norm_added_k", "txt_attn.norm.key_norm"),
    ("attn.to_out.0", "img_attn.proj"),
    ("attn.to_add_out", "txt_attn.proj"),
    ("ff.net.0.proj", "img_mlp.0"),
    ("ff.net.2", "img_mlp.2"),
    ("ff_context.net.0.proj", "txt_mlp.0"),
    ("ff_context.net.2", "txt_mlp.2"),
    // The fused projections stand for diffusers' separate ones.
    ("attn.qkv", "img_attn.qkv"),
    ("attn.add_qkv", "txt_attn.qkv"),
];

/// Renames inside a single-stream block (`single_transformer_blocks.N.` / `single_blocks.N.`).
const SINGLE: &[(&str, &str)] = &[
    ("norm.linear", "modulation.lin"),
    ("attn.norm_q", "norm.query_norm"),
    ("attn.norm_k", "norm.key_norm"),
    ("proj_out", "linear2"),
    // q, k, v and the MLP's input in one projection.
    ("qkv_mlp", "linear1"),
];

impl FluxLayout {
    /// The layout of a component: the BFL one has `double_blocks.`, `single_blocks.` or
    /// `img_in.` keys.
    pub fn of(c: &Component<'_>) -> FluxLayout {
        if c.local_names().any(|n| {
            n.starts_with("double_blocks.")
                || n.starts_with("single_blocks.")
                || n == "img_in.weight"
        }) {
            FluxLayout::Bfl
        } else {
            FluxLayout::Diffusers
        }
    }

    /// A unit's name (diffusers naming; `attn.qkv`, `attn.add_qkv` and `qkv_mlp` for the
    /// fused projections) in this layout.
    pub fn unit(self, ours: &str) -> String {
        if self == FluxLayout::Diffusers {
            return ours.to_owned();
        }
        if let Some((_, o)) = TOP.iter().find(|(d, _)| *d == ours) {
            return (*o).to_owned();
        }
        let renamed = |prefix: &str, to: &str, table: &[(&str, &str)]| {
            let rest = ours.strip_prefix(prefix)?;
            let (n, part) = rest.split_once('.')?;
            let part = table.iter().find(|(d, _)| *d == part).map_or(part, |p| p.1);
            Some(format!("{to}{n}.{part}"))
        };
        renamed("transformer_blocks.", "double_blocks.", DOUBLE)
            .or_else(|| renamed("single_transformer_blocks.", "single_blocks.", SINGLE))
            .unwrap_or_else(|| ours.to_owned())
    }

    /// The parameter name of an RMS norm's weight: `weight` (diffusers) or `scale` (BFL).
    pub fn norm_param(self) -> &'static str {
        match self {
            FluxLayout::Diffusers => "weight",
            FluxLayout::Bfl => "scale",
        }
    }

    /// Block swap for a transformer in this layout: the last `double` double-stream and the
    /// last `single` single-stream blocks on `swap_device`, prefetched in turn.
    pub fn block_swap(
        self,
        compute: DeviceId,
        swap_device: DeviceId,
        double: usize,
        single: usize,
    ) -> BlockSwap {
        BlockSwap::of_lists(
            compute,
            swap_device,
            [
                (self.double_blocks(), double),
                (self.single_blocks(), single),
            ],
        )
    }

    /// The prefix of the double-stream blocks' units, followed by the block number.
    pub fn double_blocks(self) -> &'static str {
        match self {
            FluxLayout::Diffusers => "transformer_blocks.",
            FluxLayout::Bfl => "double_blocks.",
        }
    }

    /// The prefix of the single-stream blocks' units, followed by the block number.
    pub fn single_blocks(self) -> &'static str {
        match self {
            FluxLayout::Diffusers => "single_transformer_blocks.",
            FluxLayout::Bfl => "single_blocks.",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_diffusers_converter() {
        // The pairs diffusers' `convert_flux_transformer_checkpoint_to_diffusers` maps between.
        let b = FluxLayout::Bfl;
        for (ours, theirs) in [
            ("x_embedder", "img_in"),
            (
                "time_text_embed.guidance_embedder.linear_2",
                "guidance_in.out_layer",
            ),
            (
                "transformer_blocks.3.norm1_context.linear",
                "double_blocks.3.txt_mod.lin",
            ),
            (
                "transformer_blocks.0.attn.qkv",
                "double_blocks.0.img_attn.qkv",
            ),
            (
                "transformer_blocks.0.attn.add_qkv",
                "double_blocks.0.txt_attn.qkv",
            ),
            (
                "transformer_blocks.12.attn.norm_added_k",
                "double_blocks.12.txt_attn.norm.key_norm",
            ),
            (
                "transformer_blocks.1.ff_context.net.2",
                "double_blocks.1.txt_mlp.2",
            ),
            (
                "single_transformer_blocks.37.qkv_mlp",
                "single_blocks.37.linear1",
            ),
            (
                "single_transformer_blocks.2.proj_out",
                "single_blocks.2.linear2",
            ),
            (
                "single_transformer_blocks.2.attn.norm_q",
                "single_blocks.2.norm.query_norm",
            ),
            ("norm_out.linear", "final_layer.adaLN_modulation.1"),
            ("proj_out", "final_layer.linear"),
        ] {
            assert_eq!(b.unit(ours), theirs);
            assert_eq!(FluxLayout::Diffusers.unit(ours), ours);
        }
    }
}

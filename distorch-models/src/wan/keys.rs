//! The two key layouts of a Wan transformer: diffusers' (`condition_embedder.*`,
//! `blocks.N.attn1.to_q`, `proj_out`) and the original Wan checkpoints'
//! (`time_embedding.0`, `blocks.N.self_attn.q`, `head.head`), with diffusers' `norm2` (the
//! cross-attention norm) being the original `norm3`.

use distorch_core::Component;

/// Which layout a Wan transformer's weights use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WanLayout {
    /// diffusers' `WanTransformer3DModel` names.
    Diffusers,
    /// The original Wan (and ComfyUI) names.
    Original,
}

impl WanLayout {
    /// The layout of a component: the original one has `head.head.weight`.
    pub fn of(c: &Component<'_>) -> WanLayout {
        if c.local_names().any(|n| n.starts_with("head.head.")) {
            WanLayout::Original
        } else {
            WanLayout::Diffusers
        }
    }

    /// A unit's name (diffusers naming) in this layout.
    pub fn unit(self, ours: &str) -> String {
        if self == WanLayout::Diffusers {
            return ours.to_owned();
        }
        const TOP: &[(&str, &str)] = &[
            (
                "condition_embedder.time_embedder.linear_1",
                "time_embedding.0",
            ),
            (
                "condition_embedder.time_embedder.linear_2",
                "time_embedding.2",
            ),
            (
                "condition_embedder.text_embedder.linear_1",
                "text_embedding.0",
            ),
            (
                "condition_embedder.text_embedder.linear_2",
                "text_embedding.2",
            ),
            ("condition_embedder.time_proj", "time_projection.1"),
            ("scale_shift_table", "head.modulation"),
            ("proj_out", "head.head"),
        ];
        if let Some((_, o)) = TOP.iter().find(|(d, _)| *d == ours) {
            return (*o).to_owned();
        }
        let Some(rest) = ours.strip_prefix("blocks.") else {
            return ours.to_owned();
        };
        let (n, part) = rest.split_once('.').unwrap_or((rest, ""));
        const PARTS: &[(&str, &str)] = &[
            ("scale_shift_table", "modulation"),
            ("norm2", "norm3"),
            ("ffn.net.0.proj", "ffn.0"),
            ("ffn.net.2", "ffn.2"),
        ];
        let part = match PARTS.iter().find(|(d, _)| *d == part) {
            Some((_, o)) => (*o).to_owned(),
            None => {
                let (attn, p) = part.split_once('.').unwrap_or((part, ""));
                let attn = match attn {
                    "attn1" => "self_attn",
                    "attn2" => "cross_attn",
                    other => other,
                };
                let p = match p {
                    "to_q" => "q",
                    "to_k" => "k",
                    "to_v" => "v",
                    "to_out.0" => "o",
                    other => other,
                };
                format!("{attn}.{p}")
            }
        };
        format!("blocks.{n}.{part}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_diffusers_converter() {
        // The pairs diffusers' `convert_wan_transformer_to_diffusers` maps between.
        let o = WanLayout::Original;
        for (ours, theirs) in [
            ("condition_embedder.time_proj", "time_projection.1"),
            ("blocks.3.attn1.to_out.0", "blocks.3.self_attn.o"),
            ("blocks.3.attn2.norm_k", "blocks.3.cross_attn.norm_k"),
            ("blocks.12.norm2", "blocks.12.norm3"),
            ("blocks.0.ffn.net.0.proj", "blocks.0.ffn.0"),
            ("blocks.0.scale_shift_table", "blocks.0.modulation"),
            ("scale_shift_table", "head.modulation"),
            ("patch_embedding", "patch_embedding"),
        ] {
            assert_eq!(o.unit(ours), theirs);
            assert_eq!(WanLayout::Diffusers.unit(ours), ours);
        }
    }
}

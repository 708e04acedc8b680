//! The original (LDM) single-file VAE key layout.

use crate::load::keymap::KeyMap;
use crate::sd::vae::VaeConfig;

/// The original (LDM) single-file VAE layout (`encoder.down.N.block.M`, `mid.attn_1.q` as 1×1
/// convolutions, decoder levels numbered from the bottom), as diffusers' converter reads it.
pub(crate) fn ldm_map(config: &VaeConfig) -> KeyMap {
    const RESNET: &[(&str, &str)] = &[("conv_shortcut", "nin_shortcut")];
    const ATTN: &[(&str, &str)] = &[
        ("group_norm", "norm"),
        ("to_q", "q"),
        ("to_k", "k"),
        ("to_v", "v"),
        ("to_out.0", "proj_out"),
    ];
    let n = config.block_out_channels.len();
    let mut m = KeyMap::default();
    for side in ["encoder", "decoder"] {
        m.prefix(format!("{side}.conv_norm_out"), format!("{side}.norm_out"));
        for r in 0..2 {
            m.rename(
                format!("{side}.mid_block.resnets.{r}"),
                format!("{side}.mid.block_{}", r + 1),
                RESNET,
            );
        }
        m.rename(
            format!("{side}.mid_block.attentions.0"),
            format!("{side}.mid.attn_1"),
            ATTN,
        );
        for p in ["q", "k", "v", "proj_out"] {
            m.conv1x1(format!("{side}.mid.attn_1.{p}"));
        }
    }
    for i in 0..n {
        let level = n - 1 - i;
        m.prefix(
            format!("encoder.down_blocks.{i}.downsamplers.0"),
            format!("encoder.down.{i}.downsample"),
        );
        m.prefix(
            format!("decoder.up_blocks.{i}.upsamplers.0"),
            format!("decoder.up.{level}.upsample"),
        );
        for j in 0..=config.layers_per_block {
            m.rename(
                format!("encoder.down_blocks.{i}.resnets.{j}"),
                format!("encoder.down.{i}.block.{j}"),
                RESNET,
            );
            m.rename(
                format!("decoder.up_blocks.{i}.resnets.{j}"),
                format!("decoder.up.{level}.block.{j}"),
                RESNET,
            );
        }
    }
    m
}

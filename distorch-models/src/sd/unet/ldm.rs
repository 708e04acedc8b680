//! The original (LDM / single-file) UNet layout: `input_blocks`, `middle_block`,
//! `output_blocks`, as in `model.diffusion_model.*` of SD 1.x/2.x and SDXL checkpoints. The
//! UNet reads it through a `KeyMap` from diffusers names (the same mapping as diffusers'
//! single-file converter), and [`detect`] reads the architecture from key names and shapes.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::Error;
use crate::load::keymap::KeyMap;
use crate::sd::SdFamily;
use crate::sd::unet::config::{Blocks, PerBlock, UnetConfig};

/// A ResNet block's module names, diffusers to LDM.
const RESNET: &[(&str, &str)] = &[
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
];

/// The map from diffusers unit names to LDM ones for a UNet of `config`.
pub(crate) fn ldm_map(config: &UnetConfig, blocks: &Blocks) -> Result<KeyMap, Error> {
    let l = blocks.layers[0];
    if blocks.layers.iter().any(|&x| x != l) {
        return Err(Error::Unsupported {
            field: "layers_per_block",
            value: format!("{:?}", blocks.layers),
            reason: "the single-file layout needs the same number in every block",
        });
    }
    let n = config.block_out_channels.len();
    let mut m = KeyMap::default();
    for (from, to) in [
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
        ("conv_in", "input_blocks.0.0"),
        ("conv_norm_out", "out.0"),
        ("conv_out", "out.2"),
    ] {
        m.prefix(from, to);
    }
    for b in 0..n {
        for j in 0..l {
            let idx = 1 + b * (l + 1) + j;
            m.rename(
                format!("down_blocks.{b}.resnets.{j}"),
                format!("input_blocks.{idx}.0"),
                RESNET,
            );
            m.prefix(
                format!("down_blocks.{b}.attentions.{j}"),
                format!("input_blocks.{idx}.1"),
            );
        }
        if b + 1 < n {
            m.prefix(
                format!("down_blocks.{b}.downsamplers.0.conv"),
                format!("input_blocks.{}.0.op", (b + 1) * (l + 1)),
            );
        }
    }
    m.rename("mid_block.resnets.0", "middle_block.0", RESNET);
    m.prefix("mid_block.attentions.0", "middle_block.1");
    m.rename("mid_block.resnets.1", "middle_block.2", RESNET);
    for b in 0..n {
        for j in 0..=l {
            let idx = b * (l + 1) + j;
            m.rename(
                format!("up_blocks.{b}.resnets.{j}"),
                format!("output_blocks.{idx}.0"),
                RESNET,
            );
            m.prefix(
                format!("up_blocks.{b}.attentions.{j}"),
                format!("output_blocks.{idx}.1"),
            );
        }
        if b + 1 < n {
            let slot = if blocks.up_attn[b] { 2 } else { 1 };
            m.prefix(
                format!("up_blocks.{b}.upsamplers.0.conv"),
                format!("output_blocks.{}.{slot}.conv", b * (l + 1) + l),
            );
        }
    }
    Ok(m)
}

/// What [`detect`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectedUnet {
    /// The family its shapes say.
    pub family: SdFamily,
    /// The configuration read from shapes (and, where shapes cannot tell — attention heads,
    /// norm groups, the text-time width — from the family's conventions).
    pub config: UnetConfig,
}

impl DetectedUnet {
    /// What detection assumed because the shapes do not tell and no released family's
    /// conventions apply (a UNet of unknown family: 64-wide attention heads, the norm groups,
    /// the text-time width); empty for the known families. Loading warns with these.
    pub fn assumed(&self) -> Vec<String> {
        if self.family != SdFamily::Unknown {
            return Vec::new();
        }
        let c = &self.config;
        let mut out = vec![format!(
            "attention heads 64 wide ({:?} heads per level)",
            c.attention_head_dim
        )];
        out.push(format!("{} norm groups", c.norm_num_groups));
        if let Some(t) = c.addition_time_embed_dim {
            out.push(format!("a {t}-wide time-id embedding (SDXL's)"));
        }
        out
    }
}

/// Reads a single-file UNet's architecture from its keys (component prefix stripped) and
/// shapes.
pub fn detect<'a>(
    tensors: impl Iterator<Item = (&'a str, &'a [u64])>,
) -> Result<DetectedUnet, Error> {
    let shapes: BTreeMap<&str, &[u64]> = tensors.collect();
    let missing = |key: &str| Error::NotTheModel {
        model: "single-file UNet",
        reason: format!("no `{key}`"),
    };
    let dim = |key: &str, i: usize| -> Result<usize, Error> {
        shapes
            .get(key)
            .and_then(|s| s.get(i))
            .map(|&d| d as usize)
            .ok_or_else(|| missing(key))
    };
    // conv_in's output width is checked against the levels when the UNet loads.
    dim("input_blocks.0.0.weight", 0)?;
    let in_channels = dim("input_blocks.0.0.weight", 1)?;
    // A ControlNet has no decoder half: no `out.*`, no `output_blocks.*`.
    let decoder = shapes.keys().any(|k| k.starts_with("output_blocks."));
    let out_channels = if decoder {
        dim("out.2.weight", 0)?
    } else {
        in_channels
    };
    let Levels {
        channels,
        layers,
        attn,
        depth,
    } = walk_levels(&shapes);
    let n = channels.len();
    if n == 0 || layers.len() != n {
        return Err(missing("input_blocks.1.0.out_layers.3.weight"));
    }
    let l = layers[0];
    let linear = shapes
        .iter()
        .any(|(k, s)| k.ends_with(".proj_in.weight") && s.len() == 2);
    let context = shapes
        .iter()
        .find(|(k, _)| k.ends_with(".attn2.to_k.weight"))
        .and_then(|(_, s)| s.get(1))
        .map_or(768, |&d| d as usize);
    let text_time = shapes
        .get("label_emb.0.0.weight")
        .and_then(|s| s.get(1))
        .map(|&d| d as usize);
    let up_attn: Vec<bool> = if decoder {
        (0..n)
            .map(|b| {
                shapes.contains_key(
                    format!("output_blocks.{}.1.proj_in.weight", b * (l + 1)).as_str(),
                )
            })
            .collect()
    } else {
        attn.iter().rev().copied().collect()
    };
    let (family, heads) = family_heads(context, text_time, &channels);
    let channels_all = channels.clone();
    let config = UnetConfig {
        in_channels,
        out_channels,
        down_block_types: attn.iter().map(|&a| block_type(a, true)).collect(),
        up_block_types: up_attn.iter().map(|&a| block_type(a, false)).collect(),
        block_out_channels: channels,
        layers_per_block: PerBlock::Many(layers),
        cross_attention_dim: PerBlock::One(context),
        transformer_layers_per_block: PerBlock::Many(depth),
        attention_head_dim: PerBlock::Many(heads),
        use_linear_projection: linear,
        addition_embed_type: text_time.map(|_| "text_time".into()),
        addition_time_embed_dim: text_time.map(|_| 256),
        projection_class_embeddings_input_dim: text_time,
        norm_num_groups: guess_groups(&channels_all),
        ..UnetConfig::default()
    };
    config.check()?;
    Ok(DetectedUnet { family, config })
}

/// Per level of a single-file UNet's encoder half: the channels, resnets, whether it has
/// cross-attention and the transformers' depth.
struct Levels {
    channels: Vec<usize>,
    layers: Vec<usize>,
    attn: Vec<bool>,
    depth: Vec<usize>,
}

/// Walks `input_blocks`: resnets until a downsampler closes the level.
fn walk_levels(shapes: &BTreeMap<&str, &[u64]>) -> Levels {
    let depth_of = |prefix: &str| {
        shapes
            .keys()
            .filter_map(|k| k.strip_prefix(prefix))
            .filter_map(|r| r.split('.').next()?.parse::<usize>().ok())
            .collect::<BTreeSet<_>>()
            .len()
    };
    let (mut channels, mut layers, mut attn, mut depth) = (vec![], vec![], vec![], vec![]);
    let (mut count, mut level_attn, mut level_depth) = (0, false, 1);
    for i in 1.. {
        let resnet = format!("input_blocks.{i}.0.out_layers.3.weight");
        let op = format!("input_blocks.{i}.0.op.weight");
        if let Some(s) = shapes.get(resnet.as_str()) {
            count += 1;
            if count == 1 {
                channels.push(s.first().copied().unwrap_or(0) as usize);
            }
            if shapes.contains_key(format!("input_blocks.{i}.1.proj_in.weight").as_str()) {
                level_attn = true;
                level_depth = depth_of(&format!("input_blocks.{i}.1.transformer_blocks."));
            }
        } else if shapes.contains_key(op.as_str()) {
            layers.push(count);
            attn.push(level_attn);
            depth.push(level_depth);
            (count, level_attn, level_depth) = (0, false, 1);
        } else {
            break;
        }
    }
    if count > 0 {
        layers.push(count);
        attn.push(level_attn);
        depth.push(level_depth);
    }
    Levels {
        channels,
        layers,
        attn,
        depth,
    }
}

/// The family the context width and the text-time embedding say, and its attention heads
/// per level (SD 1.x: 8; SD 2.x and SDXL: 64 wide; others guessed 64 wide).
fn family_heads(
    context: usize,
    text_time: Option<usize>,
    channels: &[usize],
) -> (SdFamily, Vec<usize>) {
    let n = channels.len();
    match (context, text_time) {
        (768, None) => (SdFamily::Sd1, vec![8; n]),
        (1024, None) => (SdFamily::Sd2, channels.iter().map(|c| c / 64).collect()),
        (2048, Some(_)) => (SdFamily::Sdxl, channels.iter().map(|c| c / 64).collect()),
        (1280, Some(_)) => (
            SdFamily::SdxlRefiner,
            channels.iter().map(|c| c / 64).collect(),
        ),
        _ => (
            SdFamily::Unknown,
            channels.iter().map(|c| (c / 64).max(1)).collect(),
        ),
    }
}

/// diffusers' block type name of a down (or up) block with or without cross-attention.
fn block_type(attn: bool, down: bool) -> String {
    match (attn, down) {
        (true, true) => "CrossAttnDownBlock2D",
        (false, true) => "DownBlock2D",
        (true, false) => "CrossAttnUpBlock2D",
        (false, false) => "UpBlock2D",
    }
    .to_owned()
}

/// SD's 32 norm groups, or for other widths the largest power of two up to 32 that divides
/// every level (a guess: shapes do not tell).
fn guess_groups(channels: &[usize]) -> usize {
    [32, 16, 8, 4, 2, 1]
        .into_iter()
        .find(|g| channels.iter().all(|c| c % g == 0))
        .unwrap_or(1)
}

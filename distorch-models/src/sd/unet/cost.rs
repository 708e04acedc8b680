//! What each unit of an SD UNet computes in one pass, from the header alone: the
//! floating-point operations of its product at the resolution it runs at (a convolution's
//! weight times its output positions, a linear layer's times its tokens; cross-attention keys
//! and values over the text tokens; the time embedding once per sample), and the attention
//! scores charged to the attention's output projection. Divided by the compute device's rate,
//! these are the compute times `PlacementOrder::Auto` weighs transfers against.
//!
//! Both key layouts: diffusers' (`down_blocks.1.attentions.0...`) and the original
//! (`input_blocks.4.1...`), whose blocks are mapped to resolutions by the configuration's
//! block count and layers per block.

use std::collections::BTreeMap;
use std::time::Duration;

use distorch_core::Component;
use distorch_core::units::unit_name;

use crate::sd::unet::config::UnetConfig;

/// The input a pass is planned for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnetWork {
    /// Latent height and width (the image's / 8).
    pub latent: (usize, usize),
    /// Samples per pass (2 with classifier-free guidance).
    pub batch: usize,
    /// Text tokens the cross-attention reads (77 for CLIP).
    pub text_tokens: usize,
}

/// Where a unit runs: at a resolution level (0 = the latent's), or once per sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Site {
    Level(usize),
    PerSample,
}

/// Floating-point operations of each unit of `c` (names as the inventory's units) in one pass
/// at `work`. Units whose weights are not products (norms, biases) are absent.
pub fn unit_flops(
    c: &Component<'_>,
    config: &UnetConfig,
    work: &UnetWork,
) -> BTreeMap<String, u64> {
    let levels = config.block_out_channels.len().max(1);
    let layers = config
        .layers_per_block
        .expand(levels)
        .and_then(|l| l.first().copied())
        .unwrap_or(2)
        .max(1);
    let mut out = BTreeMap::new();
    for t in &c.tensors {
        let name = c.local(t);
        let Some(param) = name.rsplit('.').next() else {
            continue;
        };
        if param != "weight" || t.shape.len() < 2 {
            continue;
        }
        let unit = unit_name(name);
        let Some(site) = site(unit, levels, layers) else {
            continue;
        };
        let elems: u64 = t.shape.iter().product();
        let (h, w) = work.latent;
        let batch = work.batch as u64;
        let positions = match site {
            Site::PerSample => batch,
            Site::Level(l) => batch * ((h >> l).max(1) * (w >> l).max(1)) as u64,
        };
        let cross_kv = unit.contains("attn2.to_k") || unit.contains("attn2.to_v");
        let rows = if cross_kv {
            batch * work.text_tokens as u64
        } else {
            positions
        };
        // A convolution's weight is [out, in, kh, kw]: every element once per output position.
        let mut flops = 2 * elems * rows;
        if unit.ends_with("attn1.to_out.0") || unit.ends_with("attn2.to_out.0") {
            // Scores and their weighted sum: 2 products of tokens × keys × width.
            let width = t.shape[1];
            let tokens = positions / batch.max(1);
            let keys = if unit.contains("attn1") {
                tokens
            } else {
                work.text_tokens as u64
            };
            flops += 4 * batch * tokens * keys * width;
        }
        *out.entry(unit.to_owned()).or_insert(0) += flops;
    }
    out
}

/// Each unit's compute time at `flops_per_sec`.
pub fn unit_times(flops: &BTreeMap<String, u64>, flops_per_sec: f64) -> BTreeMap<String, Duration> {
    flops
        .iter()
        .map(|(k, &f)| {
            let secs = if flops_per_sec > 0.0 {
                f as f64 / flops_per_sec
            } else {
                0.0
            };
            (k.clone(), Duration::from_secs_f64(secs))
        })
        .collect()
}

/// Where `unit` runs, for a UNet of `levels` resolutions and `layers` layers per block.
fn site(unit: &str, levels: usize, layers: usize) -> Option<Site> {
    let per_sample = [
        "time_embedding",
        "time_embed",
        "add_embedding",
        "label_emb",
        "time_emb_proj",
        "emb_layers",
    ];
    if per_sample.iter().any(|p| unit.contains(p)) {
        return Some(Site::PerSample);
    }
    let last = levels - 1;
    let index = |prefix: &str| -> Option<usize> {
        unit.strip_prefix(prefix)?.split('.').next()?.parse().ok()
    };
    if let Some(i) = index("down_blocks.") {
        let down = usize::from(unit.contains(".downsamplers."));
        return Some(Site::Level((i + down).min(last)));
    }
    if let Some(i) = index("up_blocks.") {
        let level = last.saturating_sub(i);
        let up = usize::from(unit.contains(".upsamplers."));
        return Some(Site::Level(level.saturating_sub(up)));
    }
    if unit.starts_with("mid_block.") || unit.starts_with("middle_block.") {
        return Some(Site::Level(last));
    }
    if let Some(k) = index("input_blocks.") {
        // Entry 0 is the input convolution; then per level `layers` blocks and a downsampler
        // (whose output is the next level).
        return Some(Site::Level((k / (layers + 1)).min(last)));
    }
    if let Some(k) = index("output_blocks.") {
        let level = last.saturating_sub(k / (layers + 1));
        // The upsampler's convolution (`output_blocks.K.M.conv`) runs after upsampling.
        let parts: Vec<&str> = unit.split('.').collect();
        let up = parts.len() == 4 && parts[3] == "conv";
        return Some(Site::Level(level.saturating_sub(usize::from(up))));
    }
    let top = [
        "conv_in",
        "conv_out",
        "conv_norm_out",
        "out.",
        "proj_in",
        "proj_out",
    ];
    top.iter()
        .any(|p| unit.starts_with(p))
        .then_some(Site::Level(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_follow_both_layouts() {
        let s = |u: &str| site(u, 4, 2);
        assert_eq!(s("conv_in"), Some(Site::Level(0)));
        assert_eq!(s("down_blocks.1.resnets.0.conv1"), Some(Site::Level(1)));
        assert_eq!(s("down_blocks.1.downsamplers.0.conv"), Some(Site::Level(2)));
        assert_eq!(s("mid_block.attentions.0.proj_in"), Some(Site::Level(3)));
        assert_eq!(s("up_blocks.0.resnets.0.conv1"), Some(Site::Level(3)));
        assert_eq!(s("up_blocks.0.upsamplers.0.conv"), Some(Site::Level(2)));
        assert_eq!(s("up_blocks.3.attentions.2.proj_out"), Some(Site::Level(0)));
        assert_eq!(s("time_embedding.linear_1"), Some(Site::PerSample));
        assert_eq!(
            s("down_blocks.0.resnets.0.time_emb_proj"),
            Some(Site::PerSample)
        );
        // SD 1.x's original layout: input_blocks 1-2 at the latent's size, 3 downsamples to
        // level 1, 4-5 there...; output_blocks 0-2 at level 3, 2's upsampler to level 2.
        assert_eq!(s("input_blocks.0.0"), Some(Site::Level(0)));
        assert_eq!(s("input_blocks.2.1.proj_in"), Some(Site::Level(0)));
        assert_eq!(s("input_blocks.3.0.op"), Some(Site::Level(1)));
        assert_eq!(s("input_blocks.11.0.in_layers.2"), Some(Site::Level(3)));
        assert_eq!(s("middle_block.1.proj_in"), Some(Site::Level(3)));
        assert_eq!(s("output_blocks.2.0.in_layers.2"), Some(Site::Level(3)));
        assert_eq!(s("output_blocks.2.1.conv"), Some(Site::Level(2)));
        assert_eq!(s("output_blocks.5.2.conv"), Some(Site::Level(1)));
        assert_eq!(
            s("output_blocks.11.1.transformer_blocks.0.attn1.to_q"),
            Some(Site::Level(0))
        );
        assert_eq!(s("out.2"), Some(Site::Level(0)));
        assert_eq!(s("input_blocks.1.0.emb_layers.1"), Some(Site::PerSample));
    }
}

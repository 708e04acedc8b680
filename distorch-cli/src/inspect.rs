//! `distorch inspect`.

use std::collections::BTreeMap;

use distorch::ByteSize;
use distorch::core::{Component, ComponentKind, TensorInfo, units};
use distorch::models::flux::dit::{FluxConfig, FluxLayout};
use distorch::models::text::umt5::{T5Variant, Umt5Config};
use distorch::models::wan::dit::{WanDitConfig, WanLayout};
use distorch::models::wan::vae::{WanVaeConfig, WanVaeLayout};
use distorch::models::{
    ClipLayout, ClipTextConfig, KeyLayout, PerBlock, UnetConfig, VaeConfig, text_encoders,
};
use serde_json::json;

use crate::Failure;
use crate::cli::InspectArgs;

/// What the component's keys and shapes say its architecture is, in a line per model.
fn detected(c: &Component<'_>) -> Vec<String> {
    let unet_ldm = KeyLayout::of_unet(c) == KeyLayout::Ldm;
    let vae_ldm = KeyLayout::of_vae(c) == KeyLayout::Ldm;
    let or_why = |r: Result<String, distorch::models::Error>| {
        r.unwrap_or_else(|e| format!("not recognised: {e}"))
    };
    let has = |p: &str| c.local_names().any(|n| n.starts_with(p));
    if has("patch_embedding.") && has("blocks.0.") {
        return vec![or_why(WanDitConfig::detect(c).map(|d| {
            let cfg = &d.config;
            format!(
                "{} transformer ({:?} layout): width {}, {} blocks, {} heads of {}, ffn {}, text \
                 {}, patch {:?}, {} latent channels",
                d.family,
                WanLayout::of(c),
                cfg.inner_dim(),
                cfg.num_layers,
                cfg.num_attention_heads,
                cfg.attention_head_dim,
                cfg.ffn_dim,
                cfg.text_dim,
                cfg.patch_size,
                cfg.in_channels
            )
        }))];
    }
    if has("double_blocks.") || has("single_blocks.") || has("single_transformer_blocks.") {
        return vec![or_why(FluxConfig::detect(c).map(|d| {
            let cfg = &d.config;
            format!(
                "{} transformer ({:?} layout): width {}, {} double and {} single blocks, {} heads \
                 of {}, text {}, pooled {}, guidance {}, {} packed channels",
                d.variant,
                FluxLayout::of(c),
                cfg.inner_dim(),
                cfg.num_layers,
                cfg.num_single_layers,
                cfg.num_attention_heads,
                cfg.attention_head_dim,
                cfg.joint_attention_dim,
                cfg.pooled_projection_dim,
                if cfg.guidance_embeds {
                    "embedded"
                } else {
                    "none"
                },
                cfg.in_channels
            )
        }))];
    }
    if c.kind == ComponentKind::Vae
        && (has("encoder.downsamples.") || has("encoder.down_blocks.0.residual"))
        || has("encoder.down_blocks.0.norm1.gamma")
    {
        return vec![or_why(WanVaeConfig::detect(c).map(|v| {
            format!(
                "Wan VAE ({:?} layout): base width {}, {} latent channels, levels {:?}, temporal \
                 downsampling {:?}",
                WanVaeLayout::of(c),
                v.base_dim,
                v.z_dim,
                v.dim_mult,
                v.temperal_downsample
            )
        }))];
    }
    if has("encoder.block.0.layer.0.SelfAttention.") {
        return vec![or_why(Umt5Config::detect(c).map(|t| {
            let variant = match t.variant {
                T5Variant::T5 => "T5 v1.1",
                T5Variant::Umt5 => "UMT5",
            };
            let xxl = if t == Umt5Config::t5_xxl() {
                " (T5-XXL, as FLUX uses it)"
            } else {
                ""
            };
            format!(
                "{variant} encoder{xxl}: {} layers, width {}, {} heads of {}, feed-forward {}, \
                 vocabulary {}",
                t.num_layers, t.d_model, t.num_heads, t.d_kv, t.d_ff, t.vocab_size
            )
        }))];
    }
    match c.kind {
        ComponentKind::Unet if unet_ldm => {
            vec![or_why(UnetConfig::detect(c).map(|d| {
                let cfg = &d.config;
                format!(
                    "{} UNet (single-file layout): channels {:?}, {} resnets per level, depth {}, \
                 context {}, {} projection{}",
                    d.family,
                    cfg.block_out_channels,
                    per_block(&cfg.layers_per_block),
                    per_block(&cfg.transformer_layers_per_block),
                    per_block(&cfg.cross_attention_dim),
                    if cfg.use_linear_projection {
                        "linear"
                    } else {
                        "conv"
                    },
                    if cfg.has_text_time() {
                        ", text-time embedding"
                    } else {
                        ""
                    }
                ) + &assumed(&d.assumed())
            }))]
        }
        ComponentKind::Unet => {
            vec!["UNet, diffusers layout (its config.json gives the architecture)".into()]
        }
        ComponentKind::Vae if vae_ldm => {
            vec![or_why(VaeConfig::detect(c, 0.18215).map(|v| {
                let flux = v.latent_channels == 16 && !v.use_quant_conv;
                format!(
                    "VAE (single-file layout): channels {:?}, {} resnets per level, {} latent \
                     channels{}",
                    v.block_out_channels,
                    v.layers_per_block,
                    v.latent_channels,
                    if flux {
                        ", no quant convolutions: assumed FLUX.1's (scaling 0.3611, shift 0.1159)"
                    } else {
                        ""
                    }
                )
            }))]
        }
        ComponentKind::Vae => {
            vec!["VAE, diffusers layout (its config.json gives the architecture)".into()]
        }
        ComponentKind::Clip => text_encoders(c)
            .into_iter()
            .map(|(e, layout)| {
                or_why(ClipTextConfig::detect(&e).map(|cfg| {
                    format!(
                        "{} text encoder: {} layers, width {}, {} heads, {}, projection {}",
                        if layout == ClipLayout::OpenClip {
                            "OpenCLIP"
                        } else {
                            "CLIP (transformers layout)"
                        },
                        cfg.num_hidden_layers,
                        cfg.hidden_size,
                        cfg.num_attention_heads,
                        cfg.hidden_act,
                        cfg.projection_dim
                    ) + &assumed(cfg.assumed().as_slice())
                }))
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// `; assumed: …` for what detection assumed (nothing when it assumed nothing).
fn assumed(what: &[String]) -> String {
    if what.is_empty() {
        String::new()
    } else {
        format!(
            " — assumed: {} (give its config.json if wrong)",
            what.join("; ")
        )
    }
}

fn per_block(v: &PerBlock<usize>) -> String {
    match v {
        PerBlock::One(x) => x.to_string(),
        PerBlock::Many(v) => format!("{v:?}"),
    }
}

fn dtype_counts(tensors: &[&TensorInfo]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for t in tensors {
        *out.entry(t.dtype.to_string()).or_insert(0) += 1;
    }
    out
}

/// Per element type: tensors, elements and bytes (GGUF files mix quantized types).
fn type_bytes(tensors: &[TensorInfo]) -> BTreeMap<String, (usize, u64, u64)> {
    let mut out: BTreeMap<String, (usize, u64, u64)> = BTreeMap::new();
    for t in tensors {
        let e = out.entry(t.dtype.to_string()).or_default();
        e.0 += 1;
        e.1 += t.numel();
        e.2 += t.bytes;
    }
    out
}

pub fn run(args: &InspectArgs) -> Result<(), Failure> {
    let path = args.source.path()?;
    let index = distorch::models::load::open_index(&path)?;
    let split = distorch::models::load::split(&index);
    let mut rows = Vec::new();
    for c in &split.components {
        let inventory = units::inventory(c)?;
        rows.push((c, inventory));
    }
    let other_bytes: u64 = split.other.iter().map(|t| t.bytes).sum();
    if args.json {
        let comps: Vec<_> = rows
            .iter()
            .map(|(c, inv)| {
                json!({
                    "component": c.kind.name(),
                    "prefix": c.prefix,
                    "tensors": c.tensors.len(),
                    "units": inv.len(),
                    "bytes": c.bytes(),
                    "dtypes": dtype_counts(&c.tensors),
                    "detected": detected(c),
                })
            })
            .collect();
        println!(
            "{}",
            json!({
                "file": path.display().to_string(),
                "file_bytes": index.file_len(),
                "format": index.format().name(),
                "types": type_bytes(index.tensors())
                    .into_iter()
                    .map(|(d, (n, e, b))| json!({"dtype": d, "tensors": n, "elements": e, "bytes": b}))
                    .collect::<Vec<_>>(),
                "tensors": index.tensors().len(),
                "data_bytes": index.data_bytes(),
                "components": comps,
                "other": {
                    "tensors": split.other.len(),
                    "bytes": other_bytes,
                    "names": split.other.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
                },
                "metadata": index.metadata(),
            })
        );
        return Ok(());
    }
    println!(
        "{}: {}, {} tensors, {} of tensor data",
        path.display(),
        index.format(),
        index.tensors().len(),
        ByteSize(index.data_bytes())
    );
    println!(
        "  {:<8} {:>8} {:>14} {:>12} {:>10}",
        "type", "tensors", "elements", "bytes", "bits/elem"
    );
    for (d, (n, e, b)) in type_bytes(index.tensors()) {
        let bits = if e == 0 {
            0.0
        } else {
            8.0 * b as f64 / e as f64
        };
        println!(
            "  {d:<8} {n:>8} {e:>14} {:>12} {bits:>10.2}",
            ByteSize(b).to_string()
        );
    }
    println!(
        "  {:<12} {:<24} {:>8} {:>6} {:>12}  dtypes",
        "component", "prefix", "tensors", "units", "bytes"
    );
    for (c, inv) in &rows {
        let dtypes: Vec<String> = dtype_counts(&c.tensors)
            .iter()
            .map(|(d, n)| format!("{d}×{n}"))
            .collect();
        println!(
            "  {:<12} {:<24} {:>8} {:>6} {:>12}  {}",
            c.kind.name(),
            if c.prefix.is_empty() { "-" } else { c.prefix },
            c.tensors.len(),
            inv.len(),
            ByteSize(c.bytes()).to_string(),
            dtypes.join(" ")
        );
        for line in detected(c) {
            println!("    detected: {line}");
        }
    }
    if !split.other.is_empty() {
        let names: Vec<&str> = split
            .other
            .iter()
            .take(5)
            .map(|t| t.name.as_str())
            .collect();
        println!(
            "  other: {} tensor(s), {} ({}{})",
            split.other.len(),
            ByteSize(other_bytes),
            names.join(", "),
            if split.other.len() > 5 { ", ..." } else { "" }
        );
    }
    for (k, v) in index.metadata() {
        println!("  metadata {k}: {v}");
    }
    Ok(())
}

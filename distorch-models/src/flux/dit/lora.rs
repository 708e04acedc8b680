//! The FLUX transformer's tensors as LoRAs name them: diffusers' module names (PEFT and
//! ai-toolkit files, `transformer.transformer_blocks.N.attn.to_q`) and BFL's (kohya's
//! `lora_unet_double_blocks_N_img_attn_qkv`, BFL-key files), whichever layout the weights
//! file has. Where one layout fuses what the other keeps apart, a LoRA lands on rows: a
//! diffusers `to_q` LoRA on the first third of BFL's `img_attn.qkv`, a kohya `qkv` LoRA's
//! update split row-wise over diffusers' `to_q`, `to_k`, `to_v`; the final norm's halves are
//! swapped between the layouts.

use std::ops::Range;

use distorch_lora::ModelTensor;

use crate::flux::dit::{FluxConfig, FluxLayers};
use crate::flux::keys::FluxLayout;

/// A diffusers unit's place in the BFL layout: its module there, and which rows of it.
struct InBfl {
    module: String,
    rows: Option<Range<usize>>,
}

/// Where diffusers' unit `ours` is in the BFL layout.
fn in_bfl(ours: &str, c: &FluxConfig) -> InBfl {
    let d = c.inner_dim();
    let third = |i: usize| Some(i * d..(i + 1) * d);
    let fused = |module: String, rows| InBfl { module, rows };
    if let Some(rest) = ours.strip_prefix("transformer_blocks.")
        && let Some((n, part)) = rest.split_once('.')
    {
        let (side, i) = match part {
            "attn.to_q" => ("img", 0),
            "attn.to_k" => ("img", 1),
            "attn.to_v" => ("img", 2),
            "attn.add_q_proj" => ("txt", 0),
            "attn.add_k_proj" => ("txt", 1),
            "attn.add_v_proj" => ("txt", 2),
            _ => ("", 0),
        };
        if !side.is_empty() {
            return fused(format!("double_blocks.{n}.{side}_attn.qkv"), third(i));
        }
    }
    if let Some(rest) = ours.strip_prefix("single_transformer_blocks.")
        && let Some((n, part)) = rest.split_once('.')
    {
        let rows = match part {
            "attn.to_q" => third(0),
            "attn.to_k" => third(1),
            "attn.to_v" => third(2),
            "proj_mlp" => Some(3 * d..3 * d + c.mlp_dim()),
            _ => None,
        };
        if rows.is_some() {
            return fused(format!("single_blocks.{n}.linear1"), rows);
        }
    }
    InBfl {
        module: FluxLayout::Bfl.unit(ours),
        rows: None,
    }
}

/// The tensors of a transformer of `c` stored in `layout`, with their diffusers and BFL
/// module names (see the module docs).
pub(crate) fn lora_tensors(c: &FluxConfig, layout: FluxLayout) -> Vec<ModelTensor> {
    let d = c.inner_dim();
    let ours = FluxLayers::new(c, FluxLayout::Diffusers).expected;
    let mut out: Vec<ModelTensor> = Vec::new();
    let tensor = |key: String, modules: Vec<String>, shape: Vec<usize>| ModelTensor {
        key,
        modules,
        shape,
        rows: None,
        of_module: None,
    };
    for e in &ours {
        let Some((unit, param)) = e.name.rsplit_once('.') else {
            continue;
        };
        let unit = unit.to_owned();
        let bfl = in_bfl(&unit, c);
        {
            let mut shape = e.shape.clone();
            match (layout, &bfl.rows) {
                // The final norm: diffusers' [scale; shift] is BFL's [shift; scale].
                _ if unit == "norm_out.linear" => {
                    out.extend(final_norm(layout, &unit, &bfl.module, param, shape, d));
                }
                (FluxLayout::Diffusers, Some(r)) => {
                    out.push(tensor(e.name.clone(), vec![unit.clone()], shape.clone()));
                    out.push(ModelTensor {
                        of_module: Some(r.clone()),
                        ..tensor(e.name.clone(), vec![bfl.module.clone()], shape)
                    });
                }
                (FluxLayout::Bfl, Some(r)) => {
                    // The fused tensor itself is listed once, with its first part.
                    let key = format!("{}.{param}", bfl.module);
                    shape[0] = match &bfl.module {
                        m if m.ends_with(".linear1") => 3 * d + c.mlp_dim(),
                        _ => 3 * d,
                    };
                    if r.start == 0 {
                        out.push(tensor(key.clone(), vec![bfl.module.clone()], shape.clone()));
                    }
                    out.push(ModelTensor {
                        rows: Some(r.clone()),
                        ..tensor(key, vec![unit.clone()], shape)
                    });
                }
                (_, None) => {
                    let key = match layout {
                        FluxLayout::Diffusers => e.name.clone(),
                        FluxLayout::Bfl => format!(
                            "{}.{}",
                            bfl.module,
                            if param == "weight" && unit.contains(".norm_") {
                                layout.norm_param()
                            } else {
                                param
                            }
                        ),
                    };
                    let mut modules = vec![unit.clone()];
                    if bfl.module != unit {
                        modules.push(bfl.module.clone());
                    }
                    out.push(tensor(key, modules, shape));
                }
            }
        }
    }
    out
}

/// The final norm's tensor `param` in `layout`: whole under its own module name, and its two
/// halves under the other layout's, swapped (diffusers' [scale; shift] is BFL's [shift;
/// scale]).
fn final_norm(
    layout: FluxLayout,
    ours: &str,
    bfl: &str,
    param: &str,
    shape: Vec<usize>,
    d: usize,
) -> Vec<ModelTensor> {
    let (key, mine, theirs) = match layout {
        FluxLayout::Diffusers => (format!("{ours}.{param}"), ours, bfl),
        FluxLayout::Bfl => (format!("{bfl}.{param}"), bfl, ours),
    };
    let whole = ModelTensor {
        key,
        modules: vec![mine.to_owned()],
        shape,
        rows: None,
        of_module: None,
    };
    let halves = [(0..d, d..2 * d), (d..2 * d, 0..d)].map(|(rows, of)| ModelTensor {
        modules: vec![theirs.to_owned()],
        rows: Some(rows),
        of_module: Some(of),
        ..whole.clone()
    });
    std::iter::once(whole).chain(halves).collect()
}

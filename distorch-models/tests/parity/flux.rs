//! The FLUX transformer against diffusers' `FluxTransformer2DModel` (`tools/fixtures/flux.py`):
//! a FLUX.1-dev-style model (guidance) in diffusers' layout and in BFL's (fused q/k/v, ComfyUI's
//! `model.diffusion_model.` prefix), resident and fully offloaded, bit-identical between
//! placements; a schnell-style model (no guidance); detection and bad inputs.

use crate::common::*;
use burn::tensor::Tensor;
use distorch_core::SafetensorsIndex;
use distorch_models::flux::dit::{FluxConfig, FluxInput, FluxLayout, FluxTransformer};
use distorch_models::{Loaded, load_model};

fn ids(name: &str, key: &str) -> Vec<[f32; 3]> {
    let (shape, v) = read(&fixture(name).join("reference.safetensors"), key);
    assert_eq!(shape[1], 3);
    v.chunks(3)
        .map(|p| [p[0] as f32, p[1] as f32, p[2] as f32])
        .collect()
}

fn values(name: &str, key: &str) -> Vec<f32> {
    let (_, v) = read(&fixture(name).join("reference.safetensors"), key);
    v.iter().map(|&x| x as f32).collect()
}

fn input(name: &str, guidance: bool) -> FluxInput<B> {
    FluxInput {
        hidden_states: tensor(name, "hidden_states"),
        encoder_hidden_states: tensor(name, "encoder_hidden_states"),
        pooled_projections: tensor(name, "pooled_projections"),
        timestep: values(name, "timestep"),
        img_ids: ids(name, "img_ids"),
        txt_ids: ids(name, "txt_ids"),
        guidance: guidance.then(|| values(name, "guidance")),
    }
}

fn bits(t: Tensor<B, 3>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

fn config(name: &str) -> FluxConfig {
    FluxConfig::from_file(fixture(name).join("config.json")).unwrap()
}

#[test]
fn flux_transformer_matches_diffusers_in_both_layouts() {
    let dir = fixture("flux_dit");
    let reference = dir.join("reference.safetensors");
    let mut all = Vec::new();
    for (file, layout) in [
        ("diffusion_pytorch_model.safetensors", FluxLayout::Diffusers),
        ("bfl.safetensors", FluxLayout::Bfl),
    ] {
        for offload in [false, true] {
            let (m, report) =
                load_as::<FluxTransformer<B>>(&dir.join(file), config("flux_dit"), offload)
                    .unwrap();
            assert_eq!(m.layout(), layout);
            assert!(
                report.missing.is_empty() && report.unused.is_empty(),
                "{report:?}"
            );
            let out = m.forward(input("flux_dit", true)).unwrap();
            assert_close(
                &format!("{file}, offload {offload}"),
                out.clone(),
                read(&reference, "sample"),
            );
            all.push((layout, bits(out)));
        }
    }
    // Placements are bit-identical; the layouts differ only in how the fused projection's
    // products are summed.
    assert_eq!(all[0].1, all[1].1, "offloaded differs (diffusers layout)");
    assert_eq!(all[2].1, all[3].1, "offloaded differs (BFL layout)");
}

#[test]
fn schnell_without_guidance_matches_diffusers_and_loads_from_its_folder() {
    let dir = fixture("flux_dit_schnell");
    let m: Loaded<FluxTransformer<B>> = load_model(&dir, None, &component_options(true)).unwrap();
    assert!(!m.model.config().guidance_embeds);
    let out = m.model.forward(input("flux_dit_schnell", false)).unwrap();
    assert_close(
        "schnell",
        out,
        read(&dir.join("reference.safetensors"), "sample"),
    );
}

#[test]
fn bad_inputs_are_typed_errors() {
    let dir = fixture("flux_dit");
    let (m, _) = load_as::<FluxTransformer<B>>(
        &dir.join("diffusion_pytorch_model.safetensors"),
        config("flux_dit"),
        false,
    )
    .unwrap();
    let err = |f: &dyn Fn(&mut FluxInput<B>)| {
        let mut i = input("flux_dit", true);
        f(&mut i);
        m.forward(i).unwrap_err().to_string()
    };
    let e = err(&|i| i.guidance = None);
    assert!(
        e.contains("guidance") && e.contains("give one per batch row"),
        "{e}"
    );
    let e = err(&|i| i.timestep.push(0.5));
    assert!(e.contains("3 values for a batch of 2"), "{e}");
    let e = err(&|i| {
        i.img_ids.pop();
    });
    assert!(e.contains("23 image and 7 text positions"), "{e}");
    let e = err(&|i| i.hidden_states = Tensor::zeros([2, 24, 8], &Default::default()));
    assert!(e.contains("8 channels, the model takes 64"), "{e}");
    let e = err(&|i| i.pooled_projections = Tensor::zeros([2, 7], &Default::default()));
    assert!(e.contains("pooled_projections"), "{e}");
    // A schnell-style model refuses a guidance value.
    let dir = fixture("flux_dit_schnell");
    let (m, _) = load_as::<FluxTransformer<B>>(
        &dir.join("diffusion_pytorch_model.safetensors"),
        config("flux_dit_schnell"),
        false,
    )
    .unwrap();
    let e = m.forward(input("flux_dit", true)).unwrap_err().to_string();
    assert!(e.contains("no guidance embedder"), "{e}");
}

/// Detection reads everything but the rotary sections from the shapes; those are FLUX.1's
/// for 128-wide heads, and a file with other heads asks for its configuration.
#[test]
fn detection_reads_the_shapes_in_both_layouts() {
    let dir = fixture("flux_dit");
    for file in ["diffusion_pytorch_model.safetensors", "bfl.safetensors"] {
        let index = SafetensorsIndex::open(dir.join(file)).unwrap();
        let split = distorch_models::load::split(&index);
        let e = FluxConfig::detect(&split.components[0]).unwrap_err();
        assert!(
            e.to_string().contains("axes_dims_rope") && e.to_string().contains("16 wide"),
            "{e}"
        );
    }
}

/// The last double- and single-stream blocks swapped to host memory (both layouts): outputs
/// bit-identical to the resident model's, each swapped unit streamed once a pass.
#[test]
fn block_swap_gives_bit_identical_outputs() {
    use distorch_alloc::{DeviceGraph, DeviceId, PlanRequest};
    use distorch_models::Placement;
    let dir = fixture("flux_dit");
    for file in ["diffusion_pytorch_model.safetensors", "bfl.safetensors"] {
        let path = dir.join(file);
        let (m, _) = load_as::<FluxTransformer<B>>(&path, config("flux_dit"), false).unwrap();
        let resident = bits(m.forward(input("flux_dit", true)).unwrap());
        for (double, single) in [(1, 2), (2, 3)] {
            let swap = m
                .layout()
                .block_swap(DeviceId::cuda(0), DeviceId::CPU, double, single);
            let mut options = component_options(false);
            options.graph = "cuda:0=1gib,cpu=8gib".parse::<DeviceGraph>().unwrap();
            options.placement = Placement {
                request: PlanRequest::block_swap(swap),
                devices: options.placement.devices.clone(),
            };
            let s: Loaded<FluxTransformer<B>> =
                load_model(&path, Some(config("flux_dit")), &options).unwrap();
            let on_cpu: Vec<&str> = s
                .plan
                .units()
                .iter()
                .filter(|u| u.device == DeviceId::CPU)
                .map(|u| u.name.as_str())
                .collect();
            let blocks = |p: &str| {
                let mut b: Vec<&str> = on_cpu
                    .iter()
                    .filter_map(|u| u.strip_prefix(p)?.split('.').next())
                    .collect();
                b.dedup();
                b.len()
            };
            let l = m.layout();
            assert_eq!(
                (blocks(l.double_blocks()), blocks(l.single_blocks())),
                (double, single),
                "{file}"
            );
            assert_eq!(
                bits(s.model.forward(input("flux_dit", true)).unwrap()),
                resident,
                "{file}: {double} + {single} swapped"
            );
            let stats = s.model.streamer().take_stats();
            assert_eq!(stats.fetches - stats.resident, on_cpu.len());
        }
    }
}

/// FLUX LoRAs against diffusers' `FluxPipeline.load_lora_weights` at strength 0.8
/// (`tools/fixtures/flux.py`): a PEFT file in diffusers' names and a kohya file in BFL's, each
/// on the transformer in both layouts — diffusers' `to_q` on rows of BFL's fused `qkv`,
/// kohya's fused `qkv` and `linear1` split over diffusers' separate projections, the final
/// norm's swapped halves — resident and offloaded.
#[test]
fn flux_loras_match_diffusers_in_both_layouts() {
    use distorch_lora::{LoraFile, Target};
    use distorch_models::ComponentLoras;
    use std::sync::Arc;
    let dir = fixture("flux_dit");
    let loras = fixture("flux_lora");
    let reference = loras.join("reference.safetensors");
    let base = read(&dir.join("reference.safetensors"), "sample").1;
    for tag in ["peft", "kohya"] {
        let file = Arc::new(LoraFile::open(loras.join(format!("{tag}.safetensors"))).unwrap());
        let want = read(&reference, &format!("{tag}.sample"));
        assert!(
            want.1.iter().zip(&base).any(|(a, b)| (a - b).abs() > 1e-2),
            "{tag}: the LoRA changes the output"
        );
        for weights in ["diffusion_pytorch_model.safetensors", "bfl.safetensors"] {
            for offload in [false, true] {
                let mut options = component_options(offload);
                options.loras = Some(ComponentLoras {
                    files: vec![(Arc::clone(&file), 0.8)],
                    target: Target::Unet,
                });
                let m: Loaded<FluxTransformer<B>> =
                    load_model(dir.join(weights), Some(config("flux_dit")), &options).unwrap();
                assert!(
                    m.lora.unmatched.is_empty(),
                    "{tag} on {weights}: {:?}",
                    m.lora.unmatched
                );
                let out = m.model.forward(input("flux_dit", true)).unwrap();
                assert_close(
                    &format!("{tag} on {weights}, offload {offload}"),
                    out,
                    want.clone(),
                );
            }
        }
    }
}

/// The transformer as city96's FLUX GGUFs hold it (BFL names, F32 and every quantized type;
/// `tools/fixtures/flux.py`) against diffusers with gguf-py's dequantized weights, resident
/// and offloaded; its units keep their quantized bytes.
#[test]
fn a_gguf_flux_transformer_matches_diffusers_with_its_dequantized_weights() {
    let dir = fixture("flux_dit");
    let path = dir.join("model.gguf");
    let want = read(&dir.join("gguf_reference.safetensors"), "sample");
    let mut outs = Vec::new();
    for offload in [false, true] {
        let m: Loaded<FluxTransformer<B>> =
            load_model(&path, Some(config("flux_dit")), &component_options(offload)).unwrap();
        assert_eq!(m.model.layout(), FluxLayout::Bfl);
        assert!(
            m.report.missing.is_empty() && m.report.unused.is_empty(),
            "{:?}",
            m.report
        );
        // A unit at home on the host keeps its file's (quantized) bytes.
        let index = distorch_models::load::open_index(&path).unwrap();
        let file_bytes = |unit: &str| -> u64 {
            index
                .tensors()
                .iter()
                .filter(|t| distorch_core::units::unit_name(&t.name) == unit)
                .map(|t| t.bytes)
                .sum()
        };
        let on_host: Vec<_> = m
            .plan
            .units()
            .iter()
            .filter(|u| u.device == distorch_alloc::DeviceId::CPU)
            .collect();
        assert_eq!(on_host.is_empty(), !offload);
        for u in on_host {
            assert_eq!(u.bytes.0, file_bytes(&u.name), "{}", u.name);
        }
        let out = m.model.forward(input("flux_dit", true)).unwrap();
        assert_close(
            &format!("gguf, offload {offload}"),
            out.clone(),
            want.clone(),
        );
        outs.push(bits(out));
    }
    assert_eq!(outs[0], outs[1], "offloaded differs");
}

/// A LoRA in BFL's own dotted keys (`diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight`,
/// as ComfyUI saves them): the kohya fixture's numbers under those names give its reference
/// output on both layouts.
#[test]
fn a_bfl_key_lora_equals_the_kohya_one() {
    use distorch_lora::{LoraFile, Target};
    use distorch_models::ComponentLoras;
    use std::collections::HashMap;
    use std::sync::Arc;
    let dir = fixture("flux_dit");
    let loras = fixture("flux_lora");
    let dotted: HashMap<String, String> =
        FluxTransformer::<B>::expected_in(&config("flux_dit"), FluxLayout::Bfl)
            .into_iter()
            .map(|e| {
                let unit = distorch_core::units::unit_name(&e.name).to_owned();
                (unit.replace('.', "_"), unit)
            })
            .collect();
    let tmp = tempfile::tempdir().unwrap();
    let bfl = tmp.path().join("bfl_keys.safetensors");
    rewrite(&loras.join("kohya.safetensors"), &bfl, |k| {
        let rest = k.strip_prefix("lora_unet_")?;
        let (module, suffix) = rest.split_once('.')?;
        Some(format!("diffusion_model.{}.{suffix}", dotted.get(module)?))
    });
    let file = Arc::new(LoraFile::open(&bfl).unwrap());
    assert_eq!(file.modules().len(), 29);
    let want = read(&loras.join("reference.safetensors"), "kohya.sample");
    for weights in ["diffusion_pytorch_model.safetensors", "bfl.safetensors"] {
        let mut options = component_options(false);
        options.loras = Some(ComponentLoras {
            files: vec![(Arc::clone(&file), 0.8)],
            target: Target::Unet,
        });
        let m: Loaded<FluxTransformer<B>> =
            load_model(dir.join(weights), Some(config("flux_dit")), &options).unwrap();
        assert!(m.lora.unmatched.is_empty(), "{:?}", m.lora.unmatched);
        let out = m.model.forward(input("flux_dit", true)).unwrap();
        assert_close(&format!("BFL keys on {weights}"), out, want.clone());
    }
}

//! The Wan transformer against diffusers' `WanTransformer3DModel` (`tools/fixtures/wan.py`):
//! both key layouts, resident, fully offloaded and with every block swapped to host memory,
//! bit-identical between placements.

use crate::common::*;
use burn::tensor::Tensor;
use distorch_alloc::{BlockSwap, DeviceGraph, DeviceId, PlanRequest};
use distorch_core::SafetensorsIndex;
use distorch_models::wan::dit::{WanDitConfig, WanDitInput, WanLayout, WanTransformer};
use distorch_models::{Loaded, Placement, load_model};

fn input() -> WanDitInput<B> {
    let t: Tensor<B, 1> = tensor("wan_dit", "timestep");
    WanDitInput {
        hidden_states: tensor("wan_dit", "hidden_states"),
        timestep: t.into_data().to_vec::<f32>().unwrap(),
        encoder_hidden_states: tensor("wan_dit", "encoder_hidden_states"),
    }
}

fn bits(t: Tensor<B, 5>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

fn config() -> WanDitConfig {
    WanDitConfig::from_file(fixture("wan_dit").join("config.json")).unwrap()
}

#[test]
fn wan_transformer_matches_diffusers_in_both_layouts() {
    let dir = fixture("wan_dit");
    let reference = dir.join("reference.safetensors");
    let mut all = Vec::new();
    for (file, layout) in [
        ("diffusion_pytorch_model.safetensors", WanLayout::Diffusers),
        ("original.safetensors", WanLayout::Original),
    ] {
        for offload in [false, true] {
            let (m, report) =
                load_as::<WanTransformer<B>>(&dir.join(file), config(), offload).unwrap();
            assert_eq!(m.layout(), layout);
            assert!(
                report.missing.is_empty() && report.unused.is_empty(),
                "{report:?}"
            );
            let out = m.forward(input()).unwrap();
            assert_close(
                &format!("{file}, offload {offload}"),
                out.clone(),
                read(&reference, "sample"),
            );
            all.push(bits(out));
        }
    }
    assert!(
        all.iter().all(|o| *o == all[0]),
        "outputs differ between layouts or placements"
    );
}

#[test]
fn block_swap_gives_bit_identical_outputs() {
    let dir = fixture("wan_dit");
    let graph: DeviceGraph = "cuda:0=1gib,cpu=8gib".parse().unwrap();
    let resident = bits(
        load_model::<B, WanTransformer<B>>(&dir, None, &component_options(false))
            .unwrap()
            .model
            .forward(input())
            .unwrap(),
    );
    for blocks in [1, 3] {
        let swap = BlockSwap::new(DeviceId::cuda(0), DeviceId::CPU, blocks)
            .offloading("condition_embedder.text_embedder");
        let mut options = component_options(false);
        options.graph = graph.clone();
        options.placement = Placement {
            request: PlanRequest::block_swap(swap),
            devices: options.placement.devices.clone(),
        };
        let m: Loaded<WanTransformer<B>> = load_model(&dir, None, &options).unwrap();
        let on_cpu: Vec<&str> = m
            .plan
            .units()
            .iter()
            .filter(|u| u.device == DeviceId::CPU)
            .map(|u| u.name.as_str())
            .collect();
        let swapped_blocks = on_cpu
            .iter()
            .filter(|u| u.ends_with("scale_shift_table"))
            .count();
        assert_eq!(swapped_blocks, blocks);
        assert!(on_cpu.contains(&"condition_embedder.text_embedder.linear_1"));
        assert!(!on_cpu.iter().any(|u| u.starts_with("blocks.0.")) || blocks == 3);
        assert_eq!(
            bits(m.model.forward(input()).unwrap()),
            resident,
            "{blocks} swapped"
        );
        let stats = m.model.streamer().take_stats();
        assert_eq!(
            stats.fetches - stats.resident,
            on_cpu.len(),
            "each swapped unit streamed once"
        );
    }
}

#[test]
fn detection_reads_the_shapes_and_refuses_what_is_not_wan() {
    let dir = fixture("wan_dit");
    let index = SafetensorsIndex::open(dir.join("original.safetensors")).unwrap();
    let split = distorch_models::load::split(&index);
    // 24-wide heads are not the released models' 128: detection says to give the config.
    let e = WanDitConfig::detect(&split.components[0]).unwrap_err();
    assert!(e.to_string().contains("multiple of 128"), "{e}");
    // A 256-wide, two-block model in the original layout: two 128-wide heads.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("wan.safetensors");
    let mut specs: Vec<(String, distorch_core::DType, Vec<u64>)> = vec![
        (
            "patch_embedding.weight".into(),
            distorch_core::DType::BF16,
            vec![256, 4, 1, 2, 2],
        ),
        (
            "text_embedding.0.weight".into(),
            distorch_core::DType::BF16,
            vec![256, 24],
        ),
        (
            "time_embedding.0.weight".into(),
            distorch_core::DType::BF16,
            vec![256, 16],
        ),
        (
            "blocks.0.ffn.0.weight".into(),
            distorch_core::DType::BF16,
            vec![64, 256],
        ),
        (
            "blocks.0.norm3.weight".into(),
            distorch_core::DType::BF16,
            vec![256],
        ),
        (
            "head.head.weight".into(),
            distorch_core::DType::BF16,
            vec![16, 256],
        ),
    ];
    for b in 0..2 {
        specs.push((
            format!("blocks.{b}.self_attn.q.weight"),
            distorch_core::DType::BF16,
            vec![256, 256],
        ));
    }
    let data: Vec<Vec<u8>> = specs
        .iter()
        .map(|(_, _, s)| vec![0u8; 2 * s.iter().product::<u64>() as usize])
        .collect();
    let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    distorch_core::safetensors::write(&path, &specs, &refs, &Default::default()).unwrap();
    let index = SafetensorsIndex::open(&path).unwrap();
    let split = distorch_models::load::split(&index);
    let found = WanDitConfig::detect(&split.components[0]).unwrap();
    assert_eq!(found.family, distorch_models::wan::dit::WanSize::Other);
    let c = found.config;
    assert_eq!(
        (c.num_attention_heads, c.attention_head_dim, c.num_layers),
        (2, 128, 2)
    );
    assert_eq!(
        (
            c.in_channels,
            c.out_channels,
            c.text_dim,
            c.freq_dim,
            c.ffn_dim
        ),
        (4, 4, 24, 16, 64)
    );
    assert!(c.cross_attn_norm);

    let index = SafetensorsIndex::open(fixture("umt5").join("model.safetensors")).unwrap();
    let split = distorch_models::load::split(&index);
    let e = WanDitConfig::detect(&split.components[0]).unwrap_err();
    assert!(e.to_string().contains("not a Wan transformer"), "{e}");
}

#[test]
fn bad_inputs_are_typed_errors() {
    let dir = fixture("wan_dit");
    let (m, _) = load_as::<WanTransformer<B>>(
        &dir.join("diffusion_pytorch_model.safetensors"),
        config(),
        false,
    )
    .unwrap();
    let mut i = input();
    i.hidden_states = i.hidden_states.narrow(4, 0, 5);
    let e = m.forward(i).unwrap_err();
    assert!(
        e.to_string()
            .contains("width 5 is not a positive multiple of the patch size 2"),
        "{e}"
    );
    let mut i = input();
    i.timestep.pop();
    let e = m.forward(i).unwrap_err();
    assert!(e.to_string().contains("1 values for a batch of 2"), "{e}");
}

#[test]
fn loras_in_either_format_patch_either_layout() {
    use distorch_lora::{LoraFile, Target};
    use distorch_models::ComponentLoras;
    use std::sync::Arc;
    let dir = fixture("wan_dit");
    let reference = dir.join("lora_reference.safetensors");
    for lora in ["lora_peft.safetensors", "lora_comfy.safetensors"] {
        let file = Arc::new(LoraFile::open(dir.join(lora)).unwrap());
        for weights in [
            "diffusion_pytorch_model.safetensors",
            "original.safetensors",
        ] {
            let mut outs = Vec::new();
            for offload in [false, true] {
                let mut o = component_options(offload);
                o.loras = Some(ComponentLoras {
                    files: vec![(Arc::clone(&file), 0.8)],
                    target: Target::Unet,
                });
                let m: Loaded<WanTransformer<B>> =
                    load_model(dir.join(weights), Some(config()), &o).unwrap();
                let what = format!("{lora} on {weights}, offload {offload}");
                assert_eq!(m.lora.matched.len(), 30, "{what}");
                assert!(
                    m.lora.unmatched.is_empty(),
                    "{what}: {:?}",
                    m.lora.unmatched
                );
                let out = m.model.forward(input()).unwrap();
                assert_close(&what, out.clone(), read(&reference, "lora_sample"));
                outs.push(bits(out));
            }
            assert_eq!(outs[0], outs[1], "{lora} on {weights}: offloaded differs");
        }
    }
}

//! LoRAs patched during Load-Patch-Distribute against a fused update computed in PyTorch
//! (fixtures from `tools/fixtures/lora.py` on the tiny SD UNet): kohya, diffusers/PEFT and
//! LoCon files, on diffusers- and single-file-layout weights, resident and fully offloaded;
//! strength 0 leaves the weights exactly as they were; bad LoRAs are typed errors naming the
//! key.

#![allow(clippy::clone_on_copy)] // Devices are Copy on ndarray only.

use std::path::PathBuf;
use std::sync::Arc;

use crate::common::*;
use burn::tensor::Tensor;
use distorch_core::DType;
use distorch_core::safetensors::write;
use distorch_lora::{LoraFile, Target};
use distorch_models::{
    ClipTextConfig, ClipTextModel, ComponentLoras, ComponentOptions, Loaded, Unet2dCondition,
    UnetConfig, UnetInput, load_model,
};

fn lora(name: &str) -> Arc<LoraFile> {
    Arc::new(LoraFile::open(fixture("lora").join(name)).unwrap())
}

fn options(offload: bool, loras: &[(Arc<LoraFile>, f32)]) -> ComponentOptions<B> {
    let mut o = component_options(offload);
    if !loras.is_empty() {
        o.loras = Some(ComponentLoras {
            files: loras.to_vec(),
            target: Target::Unet,
        });
    }
    o
}

fn unet(
    path: PathBuf,
    offload: bool,
    loras: &[(Arc<LoraFile>, f32)],
) -> Loaded<Unet2dCondition<B>> {
    let config = UnetConfig::from_file(fixture("unet_sd").join("config.json")).unwrap();
    load_model(path, Some(config), &options(offload, loras)).unwrap()
}

fn run(m: &Unet2dCondition<B>) -> Tensor<B, 4> {
    let t: Tensor<B, 1> = tensor("unet_sd", "timestep");
    m.forward(UnetInput::new(
        tensor("unet_sd", "sample"),
        t.into_data().to_vec::<f32>().unwrap(),
        tensor("unet_sd", "encoder_hidden_states"),
    ))
    .unwrap()
}

fn bits(t: Tensor<B, 4>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

#[test]
fn every_format_matches_the_fused_reference() {
    let reference = fixture("lora").join("reference.safetensors");
    let diffusers = fixture("unet_sd").join("diffusion_pytorch_model.safetensors");
    let ldm = fixture("unet_sd").join("ldm.safetensors");
    for (file, key) in [
        ("kohya.safetensors", "lora_out"),
        ("peft.safetensors", "lora_out"),
        ("locon.safetensors", "locon_out"),
    ] {
        let l = [(lora(file), 0.8f32)];
        for weights in [&diffusers, &ldm] {
            let what = format!("{file} on {}", weights.display());
            let resident = unet(weights.clone(), false, &l);
            assert!(!resident.lora.matched.is_empty(), "{what}");
            let out = run(&resident.model);
            assert_close(&what, out.clone(), read(&reference, key));
            let offloaded = unet(weights.clone(), true, &l);
            assert_eq!(
                bits(out),
                bits(run(&offloaded.model)),
                "{what}: offloaded differs"
            );
            assert!(offloaded.report.patched.len() == resident.report.patched.len());
        }
    }
    // The file's module that the UNet does not have is reported.
    let k = unet(
        diffusers.clone(),
        false,
        &[(lora("kohya.safetensors"), 1.0)],
    );
    assert_eq!(k.lora.unmatched, ["not_a_module"]);
    assert_eq!(k.lora.matched.len(), 40);
}

#[test]
fn strength_zero_leaves_the_weights_exactly() {
    let weights = fixture("unet_sd").join("diffusion_pytorch_model.safetensors");
    let plain = run(&unet(weights.clone(), false, &[]).model);
    let zero = unet(weights, false, &[(lora("kohya.safetensors"), 0.0)]);
    assert_eq!(zero.report.patched.len(), 40);
    assert_eq!(bits(plain), bits(run(&zero.model)));
}

/// Every weight of the model as the streamer hands it to the compute device, by key.
fn all_weights(m: &Unet2dCondition<B>) -> Vec<(String, Vec<f32>)> {
    let s = m.streamer();
    let mut out = Vec::new();
    for u in s.store().units() {
        for (name, _, t) in s.fetch(&u.name).unwrap().tensors() {
            out.push((name.clone(), t.clone().into_data().to_vec::<f32>().unwrap()));
        }
    }
    out
}

#[test]
fn changing_the_strength_repatches_from_pristine_weights() {
    let weights = fixture("unet_sd").join("diffusion_pytorch_model.safetensors");
    let reference = fixture("lora").join("reference.safetensors");
    let kohya = lora("kohya.safetensors");
    let with = |strength: f32| ComponentLoras {
        files: vec![(Arc::clone(&kohya), strength)],
        target: Target::Unet,
    };
    for offload in [false, true] {
        let plain = unet(weights.clone(), offload, &[]);
        let (plain_w, plain_out) = (all_weights(&plain.model), bits(run(&plain.model)));
        let mut m = unet(weights.clone(), offload, &[(Arc::clone(&kohya), 1.0)]);
        assert_ne!(bits(run(&m.model)), plain_out);

        // 1.0 -> 0.0: exactly the original weights, re-reading only the LoRA's 40 tensors.
        let r = m.set_loras(&with(0.0)).unwrap();
        assert_eq!(r.tensors, 40, "offload {offload}");
        assert!(
            all_weights(&m.model) == plain_w,
            "offload {offload}: weights differ"
        );
        assert_eq!(bits(run(&m.model)), plain_out);

        // 0.0 -> 0.8: the fused reference, as if loaded with it.
        m.set_loras(&with(0.8)).unwrap();
        assert_eq!(m.lora.matched.len(), 40);
        assert_close(
            "strength 0.8 after 0.0",
            run(&m.model),
            read(&reference, "lora_out"),
        );

        // Removed: the original weights, borrowed from the mapped file again when offloaded.
        let r = m.set_loras(&with(0.0)).unwrap();
        m.set_loras(&ComponentLoras {
            files: Vec::new(),
            target: Target::Unet,
        })
        .unwrap();
        assert_eq!(r.patched.len(), 40);
        assert!(all_weights(&m.model) == plain_w);
        let mapped = |m: &Unet2dCondition<B>| -> Vec<bool> {
            let store = m.streamer().store();
            let units = store.units();
            units
                .iter()
                .flat_map(|u| u.tensors().iter().map(|t| t.is_mapped()))
                .collect()
        };
        assert_eq!(mapped(&m.model), mapped(&plain.model));
        assert_eq!(mapped(&m.model).contains(&true), offload);

        // A LoRA for another architecture is refused and changes nothing.
        m.set_loras(&with(1.0)).unwrap();
        let patched_w = all_weights(&m.model);
        let tmp = tempfile::tempdir().unwrap();
        let other = Arc::new(LoraFile::open(other_architecture(tmp.path())).unwrap());
        let e = m
            .set_loras(&ComponentLoras {
                files: vec![(other, 1.0)],
                target: Target::Unet,
            })
            .unwrap_err();
        assert!(e.to_string().contains("match"), "{e}");
        assert!(all_weights(&m.model) == patched_w);
        assert_eq!(m.lora.matched.len(), 40);
    }
}

#[test]
fn text_encoder_loras_match_the_fused_reference_in_both_layouts() {
    // SDXL's second encoder (`lora_te2_`) on the CLIP fixture, stored in transformers'
    // layout and in OpenCLIP's (fused q/k/v: the LoRA's q, k and v land on row slices).
    let dir = fixture("clip_text_gelu");
    let config = ClipTextConfig::from_file(dir.join("config.json")).unwrap();
    let (_, ids) = read(&dir.join("reference.safetensors"), "input_ids");
    let ids: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
    let reference = fixture("lora").join("clip_reference.safetensors");
    let l = lora("clip_kohya.safetensors");
    for (weights, patched) in [("model.safetensors", 18), ("open_clip.safetensors", 12)] {
        let mut outs = Vec::new();
        for offload in [false, true] {
            let mut o = component_options(offload);
            o.loras = Some(ComponentLoras {
                files: vec![(Arc::clone(&l), 0.8)],
                target: Target::TextEncoder(1),
            });
            let m: Loaded<ClipTextModel<B>> =
                load_model(dir.join(weights), Some(config.clone()), &o).unwrap();
            assert_eq!(m.lora.matched.len(), 18, "{weights}");
            assert!(
                m.lora.unmatched.is_empty(),
                "{weights}: {:?}",
                m.lora.unmatched
            );
            assert_eq!(m.report.patched.len(), patched, "{weights}");
            let out = m.model.forward(&ids, 2).unwrap();
            let what = format!("{weights}, offload {offload}");
            let last = out.last_hidden_state;
            let embeds = out.text_embeds.unwrap();
            assert_close(&what, last.clone(), read(&reference, "last_hidden_state"));
            assert_close(&what, embeds.clone(), read(&reference, "text_embeds"));
            let mut all = last.into_data().to_vec::<f32>().unwrap();
            all.extend(embeds.into_data().to_vec::<f32>().unwrap());
            outs.push(all);
        }
        assert_eq!(outs[0], outs[1], "{weights}: offloaded differs");
    }
}

/// A kohya LoRA for another architecture (SDXL's 640-wide `down_blocks.2`): modules this
/// UNet does not have.
fn other_architecture(dir: &std::path::Path) -> PathBuf {
    let other = dir.join("sdxl.safetensors");
    let (down, up) = (vec![0u8; 4 * 2 * 640], vec![0u8; 4 * 640 * 2]);
    write(
        &other,
        &[
            (
                "lora_unet_down_blocks_2_attentions_1_proj_in.lora_down.weight".into(),
                DType::F32,
                vec![2, 640],
            ),
            (
                "lora_unet_down_blocks_2_attentions_1_proj_in.lora_up.weight".into(),
                DType::F32,
                vec![640, 2],
            ),
        ],
        &[&down, &up],
        &Default::default(),
    )
    .unwrap();
    other
}

#[test]
fn bad_loras_are_typed_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = fixture("unet_sd").join("diffusion_pytorch_model.safetensors");
    let config = || UnetConfig::from_file(fixture("unet_sd").join("config.json")).unwrap();
    let f32s = |n: usize| vec![0u8; 4 * n];
    let other = other_architecture(tmp.path());
    let o = options(false, &[(Arc::new(LoraFile::open(&other).unwrap()), 1.0)]);
    let e = load_model::<B, Unet2dCondition<B>>(&weights, Some(config()), &o)
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .contains("none of its 1 modules for the denoiser match"),
        "{e}"
    );

    // Up and down of different ranks.
    let ranks = tmp.path().join("ranks.safetensors");
    let (down, up) = (f32s(2 * 16), f32s(16 * 3));
    let m = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    write(
        &ranks,
        &[
            (format!("{m}.lora_down.weight"), DType::F32, vec![2, 16]),
            (format!("{m}.lora_up.weight"), DType::F32, vec![16, 3]),
        ],
        &[&down, &up],
        &Default::default(),
    )
    .unwrap();
    let e = LoraFile::open(&ranks).unwrap_err().to_string();
    assert!(
        e.contains(&format!("`{m}.lora_up.weight`")) && e.contains("rank"),
        "{e}"
    );

    // A right-rank update of the wrong size for the tensor it names.
    let wide = tmp.path().join("wide.safetensors");
    let (down, up) = (f32s(2 * 32), f32s(16 * 2));
    write(
        &wide,
        &[
            (format!("{m}.lora_down.weight"), DType::F32, vec![2, 32]),
            (format!("{m}.lora_up.weight"), DType::F32, vec![16, 2]),
        ],
        &[&down, &up],
        &Default::default(),
    )
    .unwrap();
    let o = options(false, &[(Arc::new(LoraFile::open(&wide).unwrap()), 1.0)]);
    let e = load_model::<B, Unet2dCondition<B>>(&weights, Some(config()), &o)
        .err()
        .unwrap();
    let module = m.strip_prefix("lora_unet_").unwrap();
    assert!(
        e.to_string().contains(&format!("`{module}` does not fit"))
            && e.to_string().contains("is not [16, 16]"),
        "{e}"
    );

    // A truncated file.
    let bytes = std::fs::read(fixture("lora").join("kohya.safetensors")).unwrap();
    let cut = tmp.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert!(LoraFile::open(&cut).is_err());
}

#[test]
fn comfyui_keys_on_the_original_layout_patch_a_diffusers_folder() {
    // The kohya file's modules renamed to ComfyUI's `diffusion_model.<original name>`.
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("lora").join("kohya.safetensors");
    let config = UnetConfig::from_file(fixture("unet_sd").join("config.json")).unwrap();
    let ldm_names: std::collections::HashMap<String, String> =
        Unet2dCondition::<B>::expected_tensors(&config, distorch_models::KeyLayout::Diffusers)
            .unwrap()
            .into_iter()
            .zip(
                Unet2dCondition::<B>::expected_tensors(&config, distorch_models::KeyLayout::Ldm)
                    .unwrap(),
            )
            .map(|(d, l)| {
                let m = |k: &str| k.rsplit_once('.').unwrap().0.to_owned();
                (m(&d.name).replace('.', "_"), m(&l.name))
            })
            .collect();
    let renamed = tmp.path().join("comfy.safetensors");
    rewrite(&src, &renamed, |k| {
        let rest = k.strip_prefix("lora_unet_")?;
        let (module, param) = rest.split_once('.')?;
        let ldm = ldm_names.get(module)?;
        Some(format!("diffusion_model.{ldm}.{param}"))
    });
    let l = [(Arc::new(LoraFile::open(&renamed).unwrap()), 0.8f32)];
    let m = unet(fixture("unet_sd"), false, &l);
    assert_eq!(m.lora.matched.len(), 40);
    assert_close(
        "ComfyUI-keyed LoRA",
        run(&m.model),
        read(&fixture("lora").join("reference.safetensors"), "lora_out"),
    );
}

#[test]
fn loha_and_lokr_match_the_fused_reference() {
    let reference = fixture("lora").join("lycoris_reference.safetensors");
    let diffusers = fixture("unet_sd").join("diffusion_pytorch_model.safetensors");
    let ldm = fixture("unet_sd").join("ldm.safetensors");
    for (file, key) in [
        ("loha.safetensors", "loha_out"),
        ("lokr.safetensors", "lokr_out"),
    ] {
        let l = [(lora(file), 0.8f32)];
        assert!(l[0].0.unsupported().is_empty(), "{file}");
        for weights in [&diffusers, &ldm] {
            let what = format!("{file} on {}", weights.display());
            let resident = unet(weights.clone(), false, &l);
            assert_eq!(resident.lora.matched.len(), 40, "{what}");
            let out = run(&resident.model);
            assert_close(&what, out.clone(), read(&reference, key));
            let offloaded = unet(weights.clone(), true, &l);
            assert_eq!(
                bits(out),
                bits(run(&offloaded.model)),
                "{what}: offloaded differs"
            );
        }
    }
}

#[test]
fn incomplete_lycoris_modules_are_errors_and_tucker_cores_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let m = "lora_unet_down_blocks_0_attentions_0_proj_in";
    let f32s = |n: usize| vec![0u8; 4 * n];
    let missing = tmp.path().join("loha.safetensors");
    let (a, b) = (f32s(32 * 2), f32s(2 * 32));
    write(
        &missing,
        &[
            (format!("{m}.hada_w1_a"), DType::F32, vec![32, 2]),
            (format!("{m}.hada_w1_b"), DType::F32, vec![2, 32]),
            (format!("{m}.hada_w2_a"), DType::F32, vec![32, 2]),
        ],
        &[&a, &b, &a],
        &Default::default(),
    )
    .unwrap();
    let e = LoraFile::open(&missing).unwrap_err();
    assert!(e.to_string().contains(&format!("{m}.hada_w2_b")), "{e}");
    let tucker = tmp.path().join("tucker.safetensors");
    let t = f32s(2 * 2 * 3 * 3);
    write(
        &tucker,
        &[
            (format!("{m}.lokr_w1"), DType::F32, vec![2, 2]),
            (format!("{m}.lokr_w2_a"), DType::F32, vec![16, 2]),
            (format!("{m}.lokr_w2_b"), DType::F32, vec![2, 16]),
            (format!("{m}.lokr_t2"), DType::F32, vec![2, 2, 3, 3]),
        ],
        &[&f32s(4), &f32s(32), &f32s(32), &t],
        &Default::default(),
    )
    .unwrap();
    let f = LoraFile::open(&tucker).unwrap();
    assert!(f.modules().is_empty());
    assert_eq!(f.unsupported().len(), 4, "{:?}", f.unsupported());
}

//! Single-file checkpoints through the checkpoint loader: a tiny SD-style checkpoint made of
//! the parity fixtures (original layouts under their checkpoint prefixes) reproduces the
//! reference outputs with each component placed on its own; an SD 1.5-shaped checkpoint is
//! detected and planned with DisTorch2's defaults.

#![allow(clippy::clone_on_copy)] // Devices are Copy on ndarray only.

use std::collections::BTreeMap;

use crate::common::*;
use burn::tensor::Tensor;
use distorch_alloc::{DeviceGraph, DeviceId};
use distorch_core::SafetensorsIndex;
use distorch_core::safetensors::write;
use distorch_models::sd::demo::DemoModel;
use distorch_models::{
    CheckpointOptions, ClipTextConfig, Placement, StableDiffusion, UnetConfig, UnetInput, VaeConfig,
};

/// Writes one file holding the tiny UNet, VAE and CLIP fixtures under SD 1.x's prefixes.
fn tiny_checkpoint(path: &std::path::Path) {
    let mut specs = Vec::new();
    let mut blobs = Vec::new();
    let mut add = |file: std::path::PathBuf, rename: &dyn Fn(&str) -> Option<String>| {
        let index = SafetensorsIndex::open(&file).unwrap();
        let bytes = std::fs::read(&file).unwrap();
        for t in index.tensors() {
            if let Some(name) = rename(&t.name) {
                specs.push((name, t.dtype, t.shape.clone()));
                blobs.push(
                    bytes[t.file_offset as usize..(t.file_offset + t.bytes) as usize].to_vec(),
                );
            }
        }
    };
    add(fixture("unet_sd").join("ldm.safetensors"), &|k| {
        Some(k.to_owned())
    });
    add(fixture("vae").join("ldm.safetensors"), &|k| {
        Some(k.to_owned())
    });
    add(
        fixture("clip_text_quick_gelu").join("model.safetensors"),
        &|k| {
            k.starts_with("text_model.")
                .then(|| format!("cond_stage_model.transformer.{k}"))
        },
    );
    let refs: Vec<&[u8]> = blobs.iter().map(Vec::as_slice).collect();
    write(path, &specs, &refs, &BTreeMap::new()).unwrap();
}

#[test]
fn a_tiny_checkpoint_reproduces_every_reference_with_its_own_placements() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.safetensors");
    tiny_checkpoint(&path);
    let graph: DeviceGraph = "cuda:0=1gib,cpu=8gib".parse().unwrap();
    let device: burn::tensor::Device<B> = Default::default();
    let mut options =
        CheckpointOptions::<B>::new(graph, DeviceId::cuda(0), device.clone(), device.clone())
            .unwrap();
    // Half of the UNet on the donor (its 4 GiB default would move all of a tiny model).
    options.unet = Placement::virtual_vram(
        DeviceId::cuda(0),
        device.clone(),
        0.0005,
        vec![DeviceId::CPU],
    )
    .unwrap();
    options.unet_config =
        Some(UnetConfig::from_file(fixture("unet_sd").join("config.json")).unwrap());
    options.vae_config = Some(VaeConfig::from_file(fixture("vae").join("config.json")).unwrap());
    options.clip_configs = Some(vec![
        ClipTextConfig::from_file(fixture("clip_text_quick_gelu").join("config.json")).unwrap(),
    ]);
    let sd = StableDiffusion::<B>::load_single_file(&path, &options).unwrap();
    let names: Vec<&str> = sd.loaded.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, ["unet", "clip.0", "vae"]);
    for (name, plan, report) in &sd.loaded {
        assert!(
            report.missing.is_empty() && report.unused.is_empty(),
            "{name}: {report:?}"
        );
        let expect = match name.as_str() {
            "clip.0" => DeviceId::CPU,
            _ => DeviceId::cuda(0),
        };
        assert_eq!(plan.compute(), expect, "{name}");
    }
    let unet_plan = &sd.loaded[0].1;
    let on_cpu = unet_plan
        .units()
        .iter()
        .filter(|u| u.device == DeviceId::CPU)
        .count();
    assert!(
        on_cpu > 0 && on_cpu < unet_plan.units().len(),
        "part of the UNet offloaded"
    );

    let t: Tensor<B, 1> = tensor("unet_sd", "timestep");
    let out = sd
        .unet
        .forward(UnetInput::new(
            tensor("unet_sd", "sample"),
            t.into_data().to_vec::<f32>().unwrap(),
            tensor("unet_sd", "encoder_hidden_states"),
        ))
        .unwrap();
    assert_close(
        "unet",
        out,
        read(&fixture("unet_sd").join("reference.safetensors"), "out"),
    );
    let decoded = sd.vae.decode(tensor("vae", "z")).unwrap();
    assert_close(
        "vae",
        decoded,
        read(&fixture("vae").join("reference.safetensors"), "decoded"),
    );
    let (shape, ids) = read(
        &fixture("clip_text_quick_gelu").join("reference.safetensors"),
        "input_ids",
    );
    let ids: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
    let enc = sd.text_encoders[0].forward(&ids, shape[0]).unwrap();
    assert_close(
        "clip",
        enc.last_hidden_state,
        read(
            &fixture("clip_text_quick_gelu").join("reference.safetensors"),
            "last_hidden_state",
        ),
    );

    // A LoRA through the checkpoint loader: patched while the half-offloaded UNet loads.
    let kohya = distorch_lora::LoraFile::open(fixture("lora").join("kohya.safetensors")).unwrap();
    options.loras = vec![distorch_models::LoraSpec {
        file: std::sync::Arc::new(kohya),
        model: 0.8,
        clip: 1.0,
    }];
    let mut sd = StableDiffusion::<B>::load_single_file(&path, &options).unwrap();
    assert_eq!(sd.loras.len(), 1, "only the UNet has LoRA modules");
    assert_eq!(sd.loras[0].0, "unet");
    assert_eq!(sd.loras[0].1.matched.len(), 40);
    let unet = |sd: &StableDiffusion<B>| {
        sd.unet
            .forward(UnetInput::new(
                tensor("unet_sd", "sample"),
                tensor::<1>("unet_sd", "timestep")
                    .into_data()
                    .to_vec::<f32>()
                    .unwrap(),
                tensor("unet_sd", "encoder_hidden_states"),
            ))
            .unwrap()
    };
    let lora_out = read(&fixture("lora").join("reference.safetensors"), "lora_out");
    assert_close("unet with LoRA", unet(&sd), lora_out.clone());

    // Strength 0 without a reload: exactly the checkpoint loaded without the LoRA; back to
    // 0.8: the reference again.
    let mut zero = options.loras.clone();
    zero[0].model = 0.0;
    sd.set_loras(&zero).unwrap();
    let plain = {
        let mut o = options.clone();
        o.loras.clear();
        StableDiffusion::<B>::load_single_file(&path, &o).unwrap()
    };
    let bits = |t: burn::tensor::Tensor<B, 4>| t.into_data().to_vec::<f32>().unwrap();
    assert_eq!(bits(unet(&sd)), bits(unet(&plain)));
    sd.set_loras(&options.loras).unwrap();
    assert_close("unet with LoRA again", unet(&sd), lora_out);
    assert_eq!(sd.loras[0].1.matched.len(), 40);
    sd.set_loras(&[]).unwrap();
    assert!(sd.loras.is_empty());
    assert_eq!(bits(unet(&sd)), bits(unet(&plain)));
}

#[test]
fn sd15_is_detected_and_planned_with_distorch2_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = DemoModel::Sd15.ensure_in(dir.path()).unwrap();
    let graph: DeviceGraph = "cuda:0=8gib,cpu=32gib".parse().unwrap();
    let device: burn::tensor::Device<B> = Default::default();
    let mut options =
        CheckpointOptions::<B>::new(graph, DeviceId::cuda(0), device.clone(), device.clone())
            .unwrap();
    // Zero weights: skip the finiteness scan of 2 GB to keep the test quick.
    options.check_finite = false;
    let sd = StableDiffusion::<B>::load_single_file(&path, &options).unwrap();
    assert_eq!(sd.family, distorch_models::sd::SdFamily::Sd1);
    assert_eq!(sd.text_encoders.len(), 1);
    assert_eq!(sd.text_encoders[0].config().hidden_size, 768);
    assert_eq!(sd.text_encoders[0].config().hidden_act, "quick_gelu");
    assert_eq!(sd.vae.config().block_out_channels, [128, 256, 512, 512]);
    for (name, _, report) in &sd.loaded {
        assert!(
            report.missing.is_empty() && report.unused.is_empty(),
            "{name}: {report:?}"
        );
    }
    // 4 GiB of virtual VRAM is more than the f16 UNet: every unit that is not pinned (norms,
    // biases, tiny ones) is on the host, borrowed from the file.
    let (_, unet_plan, unet_report) = &sd.loaded[0];
    for u in unet_plan.units() {
        assert_eq!(u.device == DeviceId::CPU, !u.pinned, "{}", u.name);
    }
    assert!(
        unet_report.host_mapped.bytes() > 1_500_000_000,
        "{unet_report:?}"
    );
}

#[test]
fn a_diffusers_folder_loads_every_component_with_its_placement() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for (sub, src, weights) in [
        ("unet", "unet_sdxl", "diffusion_pytorch_model.safetensors"),
        ("vae", "vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "clip_text_quick_gelu", "model.safetensors"),
        ("text_encoder_2", "clip_text_gelu", "model.safetensors"),
    ] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
        std::fs::copy(
            fixture(src).join("config.json"),
            root.join(sub).join("config.json"),
        )
        .unwrap();
        std::fs::copy(fixture(src).join(weights), root.join(sub).join(weights)).unwrap();
    }
    let graph: DeviceGraph = "cuda:0=1gib,cpu=8gib".parse().unwrap();
    let device: burn::tensor::Device<B> = Default::default();
    let mut options =
        CheckpointOptions::<B>::new(graph, DeviceId::cuda(0), device.clone(), device.clone())
            .unwrap();
    options.unet =
        Placement::virtual_vram(DeviceId::cuda(0), device, 1.0, vec![DeviceId::CPU]).unwrap();
    let sd = StableDiffusion::<B>::load_diffusers(root, &options).unwrap();
    assert_eq!(sd.family, distorch_models::sd::SdFamily::Sdxl);
    assert_eq!(sd.text_encoders.len(), 2);
    let names: Vec<&str> = sd.loaded.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, ["unet", "clip.0", "clip.1", "vae"]);
    let t: Tensor<B, 1> = tensor("unet_sdxl", "timestep");
    let out = sd
        .unet
        .forward(
            UnetInput::new(
                tensor("unet_sdxl", "sample"),
                t.into_data().to_vec::<f32>().unwrap(),
                tensor("unet_sdxl", "encoder_hidden_states"),
            )
            .with_text_time(
                tensor("unet_sdxl", "text_embeds"),
                tensor("unet_sdxl", "time_ids"),
            ),
        )
        .unwrap();
    assert_close(
        "unet",
        out,
        read(&fixture("unet_sdxl").join("reference.safetensors"), "out"),
    );
    let stats = sd.unet.streamer().take_stats();
    assert!(
        stats.prefetched + stats.on_demand > 0,
        "streamed from the host: {stats:?}"
    );

    // A sharded component (the standard index name wins over the single file) loads the same.
    let vae_tensors = sd.loaded[3].2.tensors;
    drop(sd);
    let vae = root.join("vae");
    shard("vae", "diffusion_pytorch_model.safetensors", &vae, 2);
    let sd = StableDiffusion::<B>::load_diffusers(root, &options).unwrap();
    assert_eq!(sd.loaded[3].2.tensors, vae_tensors);
    let image = sd.vae.decode(tensor("vae", "z")).unwrap();
    assert_close(
        "sharded vae",
        image,
        read(&fixture("vae").join("reference.safetensors"), "decoded"),
    );
    // A shard index naming a missing shard is an error naming it.
    std::fs::write(
        vae.join("diffusion_pytorch_model.safetensors.index.json"),
        r#"{"weight_map": {"decoder.conv_in.weight": "gone.safetensors"}}"#,
    )
    .unwrap();
    let e = StableDiffusion::<B>::load_diffusers(root, &options)
        .err()
        .unwrap();
    assert!(e.to_string().contains("gone.safetensors"), "{e}");
}

/// ComfyUI's UnetLoaderGGUF beside a checkpoint's CLIP and VAE: the UNet from a GGUF file,
/// the rest from the checkpoint.
#[test]
fn a_gguf_unet_file_replaces_the_checkpoints_unet() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.safetensors");
    tiny_checkpoint(&path);
    let graph: DeviceGraph = "cuda:0=1gib,cpu=8gib".parse().unwrap();
    let device: burn::tensor::Device<B> = Default::default();
    let mut options =
        CheckpointOptions::<B>::new(graph, DeviceId::cuda(0), device.clone(), device.clone())
            .unwrap();
    options.unet_file = Some(fixture("unet_sd").join("unet.gguf"));
    options.unet_config =
        Some(UnetConfig::from_file(fixture("unet_sd").join("config.json")).unwrap());
    options.vae_config = Some(VaeConfig::from_file(fixture("vae").join("config.json")).unwrap());
    options.clip_configs = Some(vec![
        ClipTextConfig::from_file(fixture("clip_text_quick_gelu").join("config.json")).unwrap(),
    ]);
    let sd = StableDiffusion::<B>::load_single_file(&path, &options).unwrap();
    let t: Tensor<B, 1> = tensor("unet_sd", "timestep");
    let out = sd
        .unet
        .forward(UnetInput::new(
            tensor("unet_sd", "sample"),
            t.into_data().to_vec::<f32>().unwrap(),
            tensor("unet_sd", "encoder_hidden_states"),
        ))
        .unwrap();
    assert_close(
        "gguf unet in a checkpoint",
        out,
        read(
            &fixture("unet_sd").join("gguf_reference.safetensors"),
            "out",
        ),
    );
}

//! Text to image end to end against diffusers' `StableDiffusionPipeline` (fixture from
//! `tools/fixtures/pipeline.py`: a tiny pipeline folder, Euler, 2 steps, guidance 7.5, the
//! same initial latents): the final latents and the decoded image match, the UNet fully
//! offloaded gives the same bits, and the PNG written reads back as the same pixels.

#![allow(clippy::clone_on_copy)] // Devices are Copy on ndarray only.

use crate::common::*;
use burn::tensor::Tensor;
use distorch_alloc::{DeviceGraph, DeviceId};
use distorch_models::sd::pipeline::to_rgb8;
use distorch_models::{
    CheckpointOptions, ClipTokenizer, Placement, Progress, SamplerKind, SchedulerConfig,
    StableDiffusion, Txt2Img,
};

fn generate(offload: bool) -> (Tensor<B, 4>, Tensor<B, 4>, usize) {
    let graph: DeviceGraph = "cuda:0=1gib,cpu=8gib".parse().unwrap();
    let device: burn::tensor::Device<B> = Default::default();
    let mut options =
        CheckpointOptions::<B>::new(graph, DeviceId::cuda(0), device.clone(), Default::default())
            .unwrap();
    options.unet = if offload {
        Placement::virtual_vram(DeviceId::cuda(0), device.clone(), 1.0, vec![DeviceId::CPU])
            .unwrap()
    } else {
        Placement::on(DeviceId::cuda(0), device)
    };
    let sd = StableDiffusion::<B>::load_diffusers(fixture("pipeline_sd"), &options).unwrap();
    let scheduler =
        SchedulerConfig::from_file(fixture("pipeline_sd").join("scheduler/scheduler_config.json"))
            .unwrap();
    let request = Txt2Img {
        negative: "blurry".into(),
        steps: 2,
        cfg: 7.5,
        sampler: SamplerKind::Euler,
        scheduler,
        width: 16,
        height: 16,
        latents: Some(tensor("pipeline_sd", "latents")),
        ..Txt2Img::new("a photo of a cat")
    };
    let mut steps = 0;
    let out = sd
        .txt2img(&[ClipTokenizer::bundled().unwrap()], &request, &mut |p| {
            if let Progress::Step { .. } = p {
                steps += 1;
            }
        })
        .unwrap();
    (out.latents, out.image, steps)
}

#[test]
fn matches_the_diffusers_pipeline() {
    let reference = fixture("pipeline_sd").join("reference.safetensors");
    let (latents, image, steps) = generate(false);
    assert_eq!(steps, 2);
    assert_close(
        "final latents",
        latents.clone(),
        read(&reference, "final_latents"),
    );
    // diffusers returns [1, h, w, 3].
    assert_close(
        "image",
        image.clone().permute([0, 2, 3, 1]),
        read(&reference, "image"),
    );

    let (off_latents, off_image, _) = generate(true);
    let bits = |t: Tensor<B, 4>| t.into_data().to_vec::<f32>().unwrap();
    assert_eq!(bits(latents), bits(off_latents), "offloaded UNet differs");
    assert_eq!(bits(image.clone()), bits(off_image));

    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("out.png");
    to_rgb8(image).unwrap().save(&png).unwrap();
    let back = image::open(&png).unwrap().to_rgb8();
    let (_, want) = read(&reference, "image");
    assert_eq!(back.dimensions(), (16, 16));
    for (i, (got, w)) in back.as_raw().iter().zip(&want).enumerate() {
        let w = (w * 255.0).round();
        assert!(
            (f64::from(*got) - w).abs() <= 1.0,
            "pixel byte {i}: {got} vs {w}"
        );
    }
}

/// The pipeline in one call (`StableDiffusion::load`, its own tokenizers and scheduler,
/// `request`, `generate`) equals the hand-built one above bit for bit.
#[test]
fn one_call_pipeline_equals_the_hand_built_one() {
    let (latents, image, _) = generate(false);
    let graph: DeviceGraph = "cuda:0=1gib,cpu=8gib".parse().unwrap();
    let device: burn::tensor::Device<B> = Default::default();
    let mut options =
        CheckpointOptions::<B>::new(graph, DeviceId::cuda(0), device.clone(), Default::default())
            .unwrap();
    options.unet = Placement::on(DeviceId::cuda(0), device);
    let sd = StableDiffusion::<B>::load(fixture("pipeline_sd"), &options).unwrap();
    assert_eq!(sd.tokenizers.len(), 1);
    let mut request = sd.request("a photo of a cat");
    request.negative = "blurry".into();
    (request.steps, request.width, request.height) = (2, 16, 16);
    request.latents = Some(tensor("pipeline_sd", "latents"));
    let out = sd.generate(&request, &mut |_| {}).unwrap();
    let bits = |t: Tensor<B, 4>| t.into_data().to_vec::<f32>().unwrap();
    assert_eq!(bits(latents), bits(out.latents));
    assert_eq!(bits(image), bits(out.image));
}

/// `load_cached`: the same files and options share one pipeline; other options load another
/// after unloading what is on the device (`eject_models`), or beside it without.
#[test]
fn cached_pipelines_share_and_eject() {
    let graph: DeviceGraph = "cuda:0=1gib,cpu=8gib".parse().unwrap();
    let device: burn::tensor::Device<B> = Default::default();
    let options =
        CheckpointOptions::<B>::new(graph, DeviceId::cuda(0), device.clone(), Default::default())
            .unwrap();
    let mut offloaded = options.clone();
    offloaded.unet =
        Placement::virtual_vram(DeviceId::cuda(0), device, 1.0, vec![DeviceId::CPU]).unwrap();
    let mut cache = distorch_models::load::Models::new();
    let path = fixture("pipeline_sd");
    let a = StableDiffusion::<B>::load_cached(&mut cache, &path, &options).unwrap();
    let again = StableDiffusion::<B>::load_cached(&mut cache, &path, &options).unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&a, &again),
        "same files and options: one pipeline"
    );
    assert_eq!(cache.ids().len(), 1);
    let b = StableDiffusion::<B>::load_cached(&mut cache, &path, &offloaded).unwrap();
    assert!(
        !std::sync::Arc::ptr_eq(&a, &b),
        "another placement is another pipeline"
    );
    assert_eq!(
        cache.ids().len(),
        1,
        "eject_models unloads the first from cuda:0"
    );
    let mut keep = options.clone();
    keep.eject_models = false;
    StableDiffusion::<B>::load_cached(&mut cache, &path, &keep).unwrap();
    assert_eq!(
        cache.ids().len(),
        2,
        "eject_models = false keeps the loaded one"
    );
}

/// A text encoder computing on a second wgpu device (another logical device on the same
/// adapter under lavapipe: its own queue and memory) gives the same image as on the first:
/// its output moves to the UNet's device.
#[cfg(all(feature = "test-wgpu", not(feature = "test-cuda")))]
#[test]
fn text_encoder_on_a_second_device_gives_the_same_image() {
    use burn::backend::wgpu::WgpuDevice;
    let graph: DeviceGraph = "cuda:0=1gib,wgpu:1=1gib,cpu=8gib".parse().unwrap();
    let first = WgpuDevice::DefaultDevice;
    let run = |clip: Placement<B>| {
        let mut options = CheckpointOptions::<B>::new(
            graph.clone(),
            DeviceId::cuda(0),
            first.clone(),
            first.clone(),
        )
        .unwrap();
        options.unet = Placement::on(DeviceId::cuda(0), first.clone());
        options.clip = clip;
        let sd = StableDiffusion::<B>::load(fixture("pipeline_sd"), &options).unwrap();
        let mut request = sd.request("a photo of a cat");
        (request.steps, request.width, request.height) = (2, 16, 16);
        request.latents = Some(tensor("pipeline_sd", "latents"));
        let clip_device = sd.text_encoders[0].streamer().store().compute().clone();
        let out = sd.generate(&request, &mut |_| {}).unwrap();
        (clip_device, out.image.into_data().to_vec::<f32>().unwrap())
    };
    let (d1, on_first) = run(Placement::on(DeviceId::cuda(0), first.clone()));
    let (d2, on_second) = run(Placement::on("wgpu:1".parse().unwrap(), WgpuDevice::Cpu));
    assert_eq!(d1, first);
    assert_eq!(
        d2,
        WgpuDevice::Cpu,
        "the text encoder computes on the second device"
    );
    assert_eq!(on_first, on_second);
}

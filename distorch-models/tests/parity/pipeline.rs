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

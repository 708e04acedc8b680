//! Text to image against diffusers' `FluxPipeline` on the tiny fixtures
//! (`tools/fixtures/flux.py`): CLIP's pooled output, T5 v1.1 without a mask, the FLUX.1-dev-style
//! transformer with its embedded guidance and dynamic shift, true classifier-free guidance with
//! a negative prompt, and the schnell-style transformer with its static shift; same initial
//! packed latents, two steps — final latents and image, resident and with the transformer fully
//! offloaded (bit-identical).

use distorch_models::flux::dit::FluxTransformer;
use distorch_models::flux::pipeline::{Flux, FluxTxt2Img};
use distorch_models::sampling::flow_match::FlowMatchConfig;
use distorch_models::text::t5_tokenizer::T5Tokenizer;
use distorch_models::{ClipTokenizer, load_model};

use crate::common::*;

fn flux(dit: &str, scheduler: FlowMatchConfig, offload: bool) -> Flux<B> {
    let transformer: FluxTransformer<B> =
        load_model(fixture(dit), None, &component_options(offload))
            .unwrap()
            .model;
    Flux {
        clip_tokenizer: ClipTokenizer::bundled().unwrap(),
        clip: load_model(
            fixture("pipeline_sd").join("text_encoder"),
            None,
            &component_options(false),
        )
        .unwrap()
        .model,
        t5_tokenizer: T5Tokenizer::from_folder(fixture("t5_tokenizer")).unwrap(),
        t5: load_model(fixture("t5"), None, &component_options(false))
            .unwrap()
            .model,
        transformer,
        vae: load_model(fixture("flux_vae"), None, &component_options(false))
            .unwrap()
            .model,
        scheduler,
    }
}

fn request() -> FluxTxt2Img<B> {
    let args: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("flux_pipeline").join("args.json")).unwrap(),
    )
    .unwrap();
    let n = |k: &str| args[k].as_u64().unwrap() as usize;
    let mut req = FluxTxt2Img::<B>::new(args["prompt"].as_str().unwrap());
    req.width = n("width");
    req.height = n("height");
    req.steps = n("num_inference_steps");
    req.max_sequence_length = n("max_sequence_length");
    req.latents = Some(tensor("flux_pipeline", "noise"));
    req
}

#[test]
fn txt2img_matches_diffusers_dev_and_schnell() {
    let reference = fixture("flux_pipeline").join("reference.safetensors");
    for (variant, dit, scheduler) in [
        ("dev", "flux_dit", FlowMatchConfig::flux_dev()),
        ("schnell", "flux_dit_schnell", FlowMatchConfig::default()),
    ] {
        let mut outs = Vec::new();
        for offload in [false, true] {
            let mut req = request();
            req.guidance = 3.5;
            let mut steps = 0;
            let out = flux(dit, scheduler.clone(), offload)
                .txt2img(&req, &mut |p| {
                    if let distorch_models::Progress::Step { .. } = p {
                        steps += 1;
                    }
                })
                .unwrap();
            assert_eq!(steps, 2);
            let key = |k: &str| read(&reference, &format!("{variant}.{k}"));
            assert_close(&format!("{variant} latents"), out.latents, key("latents"));
            assert_close(&format!("{variant} image"), out.image.clone(), key("image"));
            outs.push(out.image.into_data().to_vec::<f32>().unwrap());
        }
        assert_eq!(outs[0], outs[1], "{variant}: offloading changed the image");
    }
}

#[test]
fn true_cfg_with_a_negative_prompt_matches_diffusers() {
    let reference = fixture("flux_pipeline").join("reference.safetensors");
    let mut req = request();
    req.negative_prompt = Some("blurry, low quality".into());
    req.true_cfg_scale = 4.0;
    let out = flux("flux_dit", FlowMatchConfig::flux_dev(), false)
        .txt2img(&req, &mut |_| {})
        .unwrap();
    assert_close(
        "dev_cfg latents",
        out.latents,
        read(&reference, "dev_cfg.latents"),
    );
}

#[test]
fn bad_requests_are_typed_errors() {
    let f = flux("flux_dit", FlowMatchConfig::flux_dev(), false);
    let mut req = request();
    req.width = 18;
    let e = f.txt2img(&req, &mut |_| {}).err().unwrap();
    assert!(e.to_string().contains("multiples of 4"), "{e}");
    let mut req = request();
    req.width = 32;
    let e = f.txt2img(&req, &mut |_| {}).err().unwrap();
    assert!(
        e.to_string().contains("the request needs [1, 32, 64]"),
        "{e}"
    );
    let mut req = request();
    req.max_sequence_length = 513;
    let e = f.txt2img(&req, &mut |_| {}).err().unwrap();
    assert!(e.to_string().contains("FLUX takes 1 to 512"), "{e}");
    let mut req = request();
    req.steps = 0;
    let e = f.txt2img(&req, &mut |_| {}).err().unwrap();
    assert!(e.to_string().contains("at least one step"), "{e}");
}

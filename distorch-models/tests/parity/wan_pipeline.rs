//! Text to video against diffusers' `WanPipeline` on the tiny fixtures (its tokenizer, UMT5,
//! transformer and VAE; `tools/fixtures/wan.py`): same initial latents, flow-matching Euler
//! (shift 3), two steps with guidance 5 — final latents and frames, resident and with every
//! transformer block swapped to host memory (bit-identical).

use burn::tensor::Tensor;
use distorch_alloc::{BlockSwap, DeviceGraph, DeviceId, PlanRequest};
use distorch_models::text::t5_tokenizer::T5Tokenizer;
use distorch_models::wan::dit::{WanDitConfig, WanTransformer};
use distorch_models::wan::pipeline::{Txt2Video, Wan};
use distorch_models::{Placement, load_model};

use crate::common::*;

fn wan(swap: bool) -> Wan<B> {
    let mut dit = component_options(false);
    if swap {
        dit.graph = "cuda:0=1gib,cpu=8gib".parse::<DeviceGraph>().unwrap();
        dit.placement = Placement {
            request: PlanRequest::block_swap(BlockSwap::new(DeviceId::cuda(0), DeviceId::CPU, 3)),
            devices: dit.placement.devices.clone(),
        };
    }
    let config = WanDitConfig::from_file(fixture("wan_dit").join("config.json")).unwrap();
    let transformer: WanTransformer<B> = load_model(fixture("wan_dit"), Some(config), &dit)
        .unwrap()
        .model;
    Wan {
        tokenizer: T5Tokenizer::from_folder(fixture("t5_tokenizer")).unwrap(),
        text_encoder: load_model(fixture("umt5"), None, &component_options(false))
            .unwrap()
            .model,
        transformer,
        vae: load_model(fixture("wan_vae"), None, &component_options(true))
            .unwrap()
            .model,
    }
}

#[test]
fn txt2video_matches_diffusers() {
    let dir = fixture("wan_pipeline");
    let reference = dir.join("reference.safetensors");
    let args: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("args.json")).unwrap()).unwrap();
    let n = |k: &str| args[k].as_u64().unwrap() as usize;
    let mut outs = Vec::new();
    for swap in [false, true] {
        let mut req = Txt2Video::<B>::new(args["prompt"].as_str().unwrap());
        req.negative_prompt = args["negative_prompt"].as_str().unwrap().into();
        req.frames = n("num_frames");
        req.width = n("width");
        req.height = n("height");
        req.steps = n("num_inference_steps");
        req.guidance = args["guidance_scale"].as_f64().unwrap();
        req.shift = 3.0;
        req.max_sequence_length = n("max_sequence_length");
        req.latents = Some(tensor("wan_pipeline", "noise"));
        let mut steps = 0;
        let out = wan(swap)
            .txt2video(&req, &mut |p| {
                if let distorch_models::Progress::Step { .. } = p {
                    steps += 1;
                }
            })
            .unwrap();
        assert_eq!(steps, 2);
        assert_close("latents", out.latents.clone(), read(&reference, "latents"));
        // diffusers' frames are [batch, frames, channels, h, w].
        let video: Tensor<B, 5> = out.video.clone().swap_dims(1, 2);
        assert_close("video", video, read(&reference, "video"));
        outs.push(out.video.into_data().to_vec::<f32>().unwrap());
    }
    assert_eq!(outs[0], outs[1], "block swap changed the video");
}

#[test]
fn bad_requests_are_typed_errors() {
    let w = wan(false);
    let mut req = Txt2Video::<B>::new("x");
    req.frames = 6;
    req.width = 32;
    req.height = 32;
    let e = w.txt2video(&req, &mut |_| {}).err().unwrap();
    assert!(e.to_string().contains("1 + 4k"), "{e}");
    req.frames = 5;
    req.width = 40;
    let e = w.txt2video(&req, &mut |_| {}).err().unwrap();
    assert!(e.to_string().contains("multiples of 16"), "{e}");
}

/// The pipeline built in one call (`Wan::load` on the fixtures' components, each with its own
/// placement) makes the same video, bit for bit, as the hand-built one.
#[test]
fn a_pipeline_loaded_in_one_call_equals_the_hand_built_one() {
    use distorch_models::wan::load::{WanConfigs, WanFiles, WanOptions};
    let config = WanDitConfig::from_file(fixture("wan_dit").join("config.json")).unwrap();
    let files = WanFiles {
        transformer: fixture("wan_dit"),
        text_encoder: fixture("umt5"),
        vae: fixture("wan_vae"),
        tokenizer: fixture("t5_tokenizer"),
        configs: WanConfigs {
            transformer: Some(config),
            ..WanConfigs::default()
        },
    };
    let mut options = WanOptions::all(component_options(false));
    options.vae = component_options(true);
    let (loaded, plans): (Wan<B>, _) = Wan::load(&files, &options).unwrap();
    assert!(plans.vae.units().iter().any(|u| u.device == DeviceId::CPU));
    let mut req = Txt2Video::<B>::new("a red fox in the snow");
    (req.frames, req.width, req.height, req.steps) = (5, 32, 32, 2);
    req.max_sequence_length = 16;
    req.latents = Some(tensor("wan_pipeline", "noise"));
    let one = loaded.txt2video(&req, &mut |_| {}).unwrap();
    let hand = wan(false).txt2video(&req, &mut |_| {}).unwrap();
    assert_eq!(
        one.video.into_data().to_vec::<f32>().unwrap(),
        hand.video.into_data().to_vec::<f32>().unwrap()
    );
    // A missing tokenizer fails before any weight is read.
    let missing = WanFiles {
        tokenizer: "/nonexistent/tokenizer.json".into(),
        ..WanFiles::diffusers("/nonexistent")
    };
    let e = match Wan::<B>::load(&missing, &options) {
        Ok(_) => panic!("loaded without files"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("/nonexistent/tokenizer.json"), "{e}");

    // Through the cache: the same files and options share one pipeline; another placement
    // is another, loaded after eject_models unloaded the first from the compute device.
    let mut cache = distorch_models::load::Models::new();
    let a = Wan::<B>::load_cached(&mut cache, &files, &options, true).unwrap();
    let again = Wan::<B>::load_cached(&mut cache, &files, &options, true).unwrap();
    assert!(std::sync::Arc::ptr_eq(&a, &again));
    let resident = WanOptions::all(component_options(false));
    let b = Wan::<B>::load_cached(&mut cache, &files, &resident, true).unwrap();
    assert!(!std::sync::Arc::ptr_eq(&a, &b));
    assert_eq!(cache.ids().len(), 1, "eject_models unloads the first");
    Wan::<B>::load_cached(&mut cache, &files, &options, false).unwrap();
    assert_eq!(cache.ids().len(), 2, "eject_models = false keeps it");
}

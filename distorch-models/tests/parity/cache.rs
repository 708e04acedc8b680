//! The loaders through the shared model cache: a model loaded twice with the same allocation
//! is shared; `eject_models = true` unloads what holds the compute device before the next
//! load; least-recently-used eviction keeps what fits; a model that cannot fit is refused.

use std::sync::Arc;

use crate::common::*;
use distorch_alloc::{DeviceGraph, DeviceId};
use distorch_core::runtime::EjectPolicy;
use distorch_models::{
    AutoencoderKl, ClipVisionModel, ComponentOptions, ControlNetModel, Models, Placement,
    load_cached,
};

fn options(graph: &str) -> ComponentOptions<B> {
    let graph: DeviceGraph = graph.parse().unwrap();
    ComponentOptions::new(graph, Placement::on(DeviceId::cuda(0), Default::default()))
}

#[test]
fn eject_models_semantics() {
    let roomy = options("cuda:0=1gib,cpu=8gib");
    let mut cache = Models::new();
    let vae: Arc<AutoencoderKl<B>> = load_cached(
        &mut cache,
        fixture("vae"),
        None,
        &roomy,
        EjectPolicy::EjectAll,
    )
    .unwrap();
    let again: Arc<AutoencoderKl<B>> = load_cached(
        &mut cache,
        fixture("vae"),
        None,
        &roomy,
        EjectPolicy::EjectAll,
    )
    .unwrap();
    assert!(Arc::ptr_eq(&vae, &again), "the cached model is shared");
    assert_eq!(cache.ids().len(), 1);

    // eject_models = false: both fit, both stay.
    let _: Arc<ClipVisionModel<B>> = load_cached(
        &mut cache,
        fixture("clip_vision"),
        None,
        &roomy,
        EjectPolicy::EvictLeastRecentlyUsed,
    )
    .unwrap();
    assert_eq!(cache.ids().len(), 2);

    // eject_models = true: everything on the compute device goes first.
    let _: Arc<ControlNetModel<B>> = load_cached(
        &mut cache,
        fixture("controlnet_sd"),
        None,
        &roomy,
        EjectPolicy::EjectAll,
    )
    .unwrap();
    assert_eq!(cache.ids().len(), 1);
    assert!(
        cache.ids()[0].starts_with("controlnet:"),
        "{:?}",
        cache.ids()
    );

    // A device too small for the model: refused before loading, with the numbers.
    let tiny = options("cuda:0=64kib,cpu=8gib");
    let e = load_cached::<B, AutoencoderKl<B>>(
        &mut cache,
        fixture("vae"),
        None,
        &tiny,
        EjectPolicy::EvictLeastRecentlyUsed,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("cuda:0"), "{e}");
}

/// The cache keys on what changes the weights: the same model with other LoRAs (or other
/// strengths) is a miss, the same LoRAs a hit, and a weights file changed on disk a miss.
#[test]
fn a_cache_hit_needs_the_same_loras_and_the_same_file() {
    use distorch_lora::{LoraFile, Target};
    use distorch_models::{ComponentLoras, Unet2dCondition};
    let roomy = options("cuda:0=1gib,cpu=8gib");
    let lora = Arc::new(LoraFile::open(fixture("lora").join("peft.safetensors")).unwrap());
    let with = |strength: f32| {
        let mut o = roomy.clone();
        o.loras = Some(ComponentLoras {
            files: vec![(Arc::clone(&lora), strength)],
            target: Target::Unet,
        });
        o
    };
    let mut cache = Models::new();
    let load = |cache: &mut Models, path: &std::path::Path, o: &ComponentOptions<B>| {
        load_cached::<B, Unet2dCondition<B>>(
            cache,
            path,
            None,
            o,
            EjectPolicy::EvictLeastRecentlyUsed,
        )
        .unwrap()
    };
    let dir = fixture("unet_sd");
    let plain = load(&mut cache, &dir, &roomy);
    let patched = load(&mut cache, &dir, &with(0.8));
    assert!(!Arc::ptr_eq(&plain, &patched), "other LoRAs: another model");
    let again = load(&mut cache, &dir, &with(0.8));
    assert!(Arc::ptr_eq(&patched, &again), "the same LoRAs: shared");
    let other = load(&mut cache, &dir, &with(0.5));
    assert!(
        !Arc::ptr_eq(&patched, &other),
        "another strength: another model"
    );
    assert_eq!(cache.ids().len(), 3);

    // The same path with other contents (a copy rewritten) is a miss.
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("unet.safetensors");
    let src = dir.join("diffusion_pytorch_model.safetensors");
    std::fs::copy(&src, &file).unwrap();
    let config = distorch_models::UnetConfig::from_file(dir.join("config.json")).unwrap();
    let first: Arc<Unet2dCondition<B>> = load_cached(
        &mut cache,
        &file,
        Some(config.clone()),
        &roomy,
        EjectPolicy::EvictLeastRecentlyUsed,
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    rewrite(&src, &file, |k| Some(k.to_owned()));
    let second: Arc<Unet2dCondition<B>> = load_cached(
        &mut cache,
        &file,
        Some(config),
        &roomy,
        EjectPolicy::EvictLeastRecentlyUsed,
    )
    .unwrap();
    assert!(!Arc::ptr_eq(&first, &second), "a changed file is reloaded");
}

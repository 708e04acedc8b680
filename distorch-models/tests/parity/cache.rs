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

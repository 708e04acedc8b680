//! Model cache: eject-all and least-recently-used eviction, and typed errors instead of OOM.

#![cfg(feature = "runtime")]

use std::sync::Arc;

use distorch_alloc::{ByteSize, DeviceId};
use distorch_core::Error;
use distorch_core::runtime::{EjectPolicy, ModelCache};

const HOST: DeviceId = DeviceId::CPU;
fn gpu() -> DeviceId {
    DeviceId::cuda(0)
}

fn cache() -> ModelCache<&'static str> {
    let mut c = ModelCache::new();
    c.insert(
        "unet",
        Arc::new("unet"),
        &[(gpu(), ByteSize::gib(3)), (HOST, ByteSize::gib(2))],
    );
    c.insert("clip", Arc::new("clip"), &[(gpu(), ByteSize::gib(1))]);
    c.insert(
        "vae",
        Arc::new("vae"),
        &[(DeviceId::cuda(1), ByteSize::gib(1))],
    );
    c
}

#[test]
fn eject_all_unloads_every_model_on_the_device() {
    let mut c = cache();
    let gone = c
        .make_room(
            gpu(),
            ByteSize::gib(1),
            ByteSize::gib(8),
            EjectPolicy::EjectAll,
        )
        .unwrap();
    assert_eq!(gone, ["unet", "clip"]);
    assert_eq!(c.ids(), ["vae"]);
    assert_eq!(c.bytes_on(gpu()), ByteSize::ZERO);
}

#[test]
fn lru_evicts_only_what_is_needed() {
    let mut c = cache();
    c.get("unet"); // unet becomes most recently used; clip is the LRU on cuda:0
    // 4 GiB held + 5 needed > 8: evicting clip (1 GiB) is enough.
    let gone = c
        .make_room(
            gpu(),
            ByteSize::gib(5),
            ByteSize::gib(8),
            EjectPolicy::EvictLeastRecentlyUsed,
        )
        .unwrap();
    assert_eq!(gone, ["clip"]);
    assert_eq!(c.bytes_on(gpu()), ByteSize::gib(3));
    let none = c
        .make_room(
            gpu(),
            ByteSize::gib(5),
            ByteSize::gib(8),
            EjectPolicy::EvictLeastRecentlyUsed,
        )
        .unwrap();
    assert!(none.is_empty());
}

#[test]
fn too_big_is_a_typed_error_naming_the_device() {
    let mut c = cache();
    let e = c
        .make_room(
            gpu(),
            ByteSize::gib(9),
            ByteSize::gib(8),
            EjectPolicy::EvictLeastRecentlyUsed,
        )
        .unwrap_err();
    assert!(matches!(e, Error::WontFit { .. }));
    assert_eq!(
        e.to_string(),
        "the model needs 9.00 GiB on `cuda:0` but only 8.00 GiB is available"
    );
    // Everything on cuda:0 was evicted trying; the other device's model stays.
    assert_eq!(c.ids(), ["vae"]);
}

#[test]
fn handles_outlive_the_cache_entry() {
    let mut c = cache();
    let unet = c.get("unet").unwrap();
    assert!(c.remove("unet"));
    assert!(!c.remove("unet"));
    assert_eq!(*unet, "unet");
    assert_eq!(c.get("unet"), None);
}

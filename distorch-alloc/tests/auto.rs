//! `PlacementOrder::Auto` with measured transfer times (`Unit::transfer`).

use std::time::Duration;

use distorch_alloc::{
    ByteSize, DeviceGraph, DeviceId, Inventory, PlacementOrder, PlanRequest, Unit, UnitKind,
    VirtualVram, plan,
};

/// Four 50 MiB units of 10 ms compute; from host memory w0 and w2 take 200 ms to bring in
/// (measured), w1 and w3 10 ms; over the declared 1 GiB/s link each would take 48.8 ms.
fn measured_model() -> Inventory {
    let ms = Duration::from_millis;
    let units = (0..4)
        .map(|i| {
            Unit::new(format!("w{i}"), ByteSize::mib(50), i, UnitKind::Weight).with_compute(ms(10))
        })
        .collect();
    let transfers = [("w0", 200), ("w1", 10), ("w2", 200), ("w3", 10)]
        .map(|(n, t)| (n.to_owned(), ms(t)))
        .into();
    Inventory::new("unet", units)
        .unwrap()
        .with_transfer(&transfers)
}

fn streamed(p: &distorch_alloc::Plan, donor: DeviceId) -> Vec<String> {
    p.units()
        .iter()
        .filter(|u| u.device == donor)
        .map(|u| u.name.clone())
        .collect()
}

#[test]
fn auto_streams_the_units_measured_cheapest_to_bring_in() {
    let g: DeviceGraph = "cuda:0=8gib,cpu=32gib@1gb/s".parse().unwrap();
    let vv = VirtualVram::new(DeviceId::cuda(0), ByteSize::mib(100), vec![DeviceId::CPU]).unwrap();
    let step = |order: PlacementOrder| {
        let mut req = PlanRequest::virtual_vram(vv.clone()).with_order(order);
        // Transfers on the compute thread: each adds its time to the pass.
        req.staging.overlapped = false;
        plan(&req, &measured_model(), &g).unwrap()
    };
    let auto = step(PlacementOrder::Auto);
    assert_eq!(streamed(&auto, DeviceId::CPU), ["w1", "w3"]);
    let predicted = auto.prediction().unwrap();
    assert_eq!(predicted.step, Duration::from_millis(60));
    // Measured times replace bytes over the link: no link is assumed for them.
    assert!(auto.warnings().is_empty(), "{:?}", auto.warnings());
    for order in [PlacementOrder::Interleave, PlacementOrder::Tail] {
        let other = step(order).prediction().unwrap();
        assert!(
            auto.prediction().unwrap().step < other.step,
            "{order}: {other:?}"
        );
    }
}

#[test]
fn measured_times_are_from_host_memory_only() {
    // A GPU donor's link is its own: the units' host measurements do not apply to it.
    let g: DeviceGraph = "cuda:0=8gib,cuda:1=8gib@1gb/s,cpu=32gib".parse().unwrap();
    let vv = VirtualVram::new(
        DeviceId::cuda(0),
        ByteSize::mib(100),
        vec![DeviceId::cuda(1)],
    )
    .unwrap();
    let mut req = PlanRequest::virtual_vram(vv).with_order(PlacementOrder::Interleave);
    req.staging.overlapped = false;
    let p = plan(&req, &measured_model(), &g).unwrap();
    assert_eq!(streamed(&p, DeviceId::cuda(1)).len(), 2);
    // 50 MiB over 1 GiB/s (sizes in declarations are binary: `1gb` is 1 GiB).
    let over_link = Duration::from_nanos(50 * 1_000_000_000 / 1024);
    assert_eq!(p.prediction().unwrap().transfer, 2 * over_link);
}

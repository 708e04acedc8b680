//! Parse + plan of a synthetic 10,000-unit inventory (the target: under 5 ms).
//!
//! Run: `cargo bench --bench plan`

#![allow(missing_docs)] // criterion_group! generates undocumented items

use criterion::{Criterion, criterion_group, criterion_main};
use distorch::alloc::{ByteSize, DeviceGraph, Inventory, PlacementOrder, Unit, UnitKind};
use distorch::{AllocSpec, DeviceId, PlanRequest, VirtualVram};

/// 10,000 units shaped like a large DiT: mostly 1–40 MiB weights (about 160 GiB in all), every fifth unit a norm.
fn inventory() -> Inventory {
    let units = (0..10_000u32)
        .map(|i| {
            let (bytes, kind) = if i % 5 == 4 {
                (ByteSize::kib(12), UnitKind::Norm)
            } else {
                (
                    ByteSize::mib(1 + u64::from(i * 7919 % 40)),
                    UnitKind::Weight,
                )
            };
            Unit::new(format!("blocks.{}.unit.{}", i / 25, i % 25), bytes, i, kind)
        })
        .collect();
    Inventory::new("dit", units).unwrap()
}

fn bench(c: &mut Criterion) {
    let inv = inventory();
    let graph: DeviceGraph = "cuda:0=24gib,cuda:1=24gib,cpu=256gib".parse().unwrap();
    for order in [PlacementOrder::Interleave, PlacementOrder::Tail] {
        c.bench_function(&format!("parse+plan expert 10k units ({order})"), |b| {
            b.iter(|| {
                let spec: AllocSpec = std::hint::black_box("cuda:0,20gb;cuda:1,20gb;cpu,*")
                    .parse()
                    .unwrap();
                let req = PlanRequest::expert(spec).with_order(order);
                distorch::plan(&req, &inv, &graph).unwrap()
            })
        });
    }
    c.bench_function("plan virtual vram 10k units (interleave)", |b| {
        let vv = VirtualVram::from_gib(DeviceId::cuda(0), 150.0, vec![DeviceId::CPU]).unwrap();
        let req = PlanRequest::virtual_vram(vv);
        b.iter(|| distorch::plan(&req, &inv, &graph).unwrap())
    });
    c.bench_function("plan strings 10k units", |b| {
        let spec: AllocSpec = "cuda:0,20gb;cuda:1,20gb;cpu,*".parse().unwrap();
        let p = distorch::plan(&PlanRequest::expert(spec), &inv, &graph).unwrap();
        b.iter(|| (p.bytes_string(), p.fraction_string()))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

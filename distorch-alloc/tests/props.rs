//! Property tests: display/parse round trips of specs, plan invariants, and the two
//! plan-reproducing strings.

use distorch_alloc::{
    AllocSpec, ByteSize, DeviceGraph, DeviceId, DeviceInfo, Error, Inventory, PinPolicy,
    PlacementOrder, Plan, PlanRequest, Quota, Staging, Unit, UnitKind, VirtualVram, plan,
};
use proptest::prelude::*;

const DEVICES: [&str; 5] = ["cuda:0", "cuda:1", "wgpu:0", "vulkan:2", "cpu"];

fn device(i: usize) -> DeviceId {
    DEVICES[i].parse().unwrap()
}

/// A random valid spec: distinct devices, one mode, maybe one star.
fn spec_strategy() -> impl Strategy<Value = String> {
    (
        proptest::sample::subsequence((0..DEVICES.len()).collect::<Vec<_>>(), 1..=4).prop_shuffle(),
        0..3u8,
        proptest::option::of(0..4usize),
        proptest::collection::vec((1u64..5000, 0..3u32), 4),
    )
        .prop_map(|(devs, mode, star, nums)| {
            let star = star.filter(|s| *s < devs.len());
            let n = devs.len();
            devs.iter()
                .enumerate()
                .map(|(i, &d)| {
                    let (num, unit) = nums[i];
                    let value = if Some(i) == star {
                        "*".to_owned()
                    } else {
                        match mode {
                            0 => format!("{}{}", num, ["mb", "gb", "kib"][unit as usize]),
                            // Positive ratios below 100/n each, so the sum is never 0
                            // and a star always has room.
                            1 => format!("{}.{}%", 1 + num % (100 / n as u64 - 1), unit),
                            _ => format!("0.{:04}", num),
                        }
                    };
                    format!("{},{value}", DEVICES[d])
                })
                .collect::<Vec<_>>()
                .join(";")
        })
}

fn inventory_strategy() -> impl Strategy<Value = Inventory> {
    proptest::collection::vec((1u64..(256 << 20), 0..4u8, 0..3usize), 1..200).prop_map(|units| {
        let units = units
            .into_iter()
            .enumerate()
            .map(|(i, (bytes, kind, widen))| {
                let kind = UnitKind::ALL[kind as usize % 4];
                // Mostly weights, as in real models.
                let kind = if i % 5 == 0 { kind } else { UnitKind::Weight };
                // At a device home: the file's size (f32, or a GPU backend), twice it (f16 on
                // a backend that widens to f32) or four times (fp8 widened).
                let device = ByteSize(bytes * [1, 2, 4][widen]);
                Unit::new(format!("u{i}"), ByteSize(bytes), i as u32, kind)
                    .with_device_bytes(device)
            })
            .collect();
        Inventory::new("model", units).unwrap()
    })
}

fn graph_strategy() -> impl Strategy<Value = DeviceGraph> {
    proptest::collection::vec((1u64..64, 50u64..=100), DEVICES.len()).prop_map(|caps| {
        let devices = caps
            .into_iter()
            .enumerate()
            .map(|(i, (gib, free_pct))| {
                let total = ByteSize::gib(gib);
                DeviceInfo::new(device(i), total).with_free(ByteSize(total.0 / 100 * free_pct))
            })
            .collect();
        DeviceGraph::new(devices).unwrap()
    })
}

fn order_strategy() -> impl Strategy<Value = PlacementOrder> {
    prop_oneof![
        Just(PlacementOrder::Interleave),
        Just(PlacementOrder::Tail),
        Just(PlacementOrder::Auto)
    ]
}

fn placement(p: &Plan) -> Vec<(String, DeviceId)> {
    p.units()
        .iter()
        .map(|u| (u.name.clone(), u.device))
        .collect()
}

/// The invariants every plan keeps.
fn check_invariants(p: &Plan, inv: &Inventory, pin: &PinPolicy) {
    let placed: u64 = p.devices().iter().map(|r| r.model_bytes.0).sum();
    // Every unit counts at its size where it is placed: host bytes on `cpu` as a donor,
    // device bytes anywhere else.
    let at_home: u64 = p
        .units()
        .iter()
        .zip(inv.units())
        .map(|(placed, u)| {
            assert_eq!(placed.name, u.name);
            assert_eq!(placed.bytes, u.bytes_on(placed.device, p.compute()));
            placed.bytes.0
        })
        .sum();
    assert_eq!(
        placed, at_home,
        "sum of placed bytes == units at their homes"
    );
    assert_eq!(placed, p.total_bytes().0);
    assert_eq!(p.units().len(), inv.len());
    for r in p.devices() {
        assert!(r.model_bytes <= r.free, "{} over capacity", r.device);
        if let Quota::Bytes(q) = r.quota {
            let allowed = if r.device == p.compute() {
                q.max(r.pinned_bytes)
            } else {
                q
            };
            assert!(r.model_bytes <= allowed, "{} over quota", r.device);
        }
    }
    for u in p.units() {
        let must_pin = matches!(
            u.kind,
            UnitKind::Norm | UnitKind::Bias | UnitKind::Embedding
        ) || inv
            .units()
            .iter()
            .find(|i| i.name == u.name)
            .is_some_and(|i| i.device_bytes < pin.tiny_threshold);
        assert_eq!(u.pinned, must_pin, "{}", u.name);
        if u.pinned {
            assert_eq!(u.device, p.compute(), "pinned {} off compute", u.name);
        }
    }
}

/// Feeds both strings back and expects the same placement.
fn check_round_trips(p: &Plan, inv: &Inventory, g: &DeviceGraph, order: PlacementOrder) {
    for s in [p.bytes_string(), p.fraction_string()] {
        let spec: AllocSpec = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
        let req = PlanRequest::expert_with_compute(spec, p.compute()).with_order(order);
        let again = plan(&req, inv, g).unwrap_or_else(|e| panic!("replan {s}: {e}"));
        assert_eq!(placement(&again), placement(p), "string {s}");
        assert_eq!(again.bytes_string(), p.bytes_string());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn display_parse_round_trip(s in spec_strategy()) {
        let spec: AllocSpec = s.parse().unwrap();
        let shown = spec.to_string();
        prop_assert_eq!(shown.parse::<AllocSpec>().unwrap(), spec.clone());
        prop_assert_eq!(shown.parse::<AllocSpec>().unwrap().to_string(), shown);
    }

    #[test]
    fn parser_never_panics(s in "\\PC{0,40}") {
        let _ = AllocSpec::parse(&s).map(|spec| spec.to_string());
        let _ = DeviceGraph::declare(&s);
        let _ = distorch_alloc::parse_device_list(&s);
    }

    #[test]
    fn parser_never_panics_on_near_misses(s in "[cpudagwkvlmtro:0-9,;%*. bgkmtiBGKMT-]{0,30}") {
        if let Ok(spec) = AllocSpec::parse(&s) {
            prop_assert_eq!(spec.to_string().parse::<AllocSpec>().unwrap(), spec);
        }
    }

    #[test]
    fn expert_plans_keep_invariants_and_reproduce(
        s in spec_strategy(),
        inv in inventory_strategy(),
        g in graph_strategy(),
        order in order_strategy(),
    ) {
        let spec: AllocSpec = s.parse().unwrap();
        let req = PlanRequest::expert(spec).with_order(order);
        match plan(&req, &inv, &g) {
            Ok(p) => {
                check_invariants(&p, &inv, &req.pin);
                // Deterministic.
                prop_assert_eq!(plan(&req, &inv, &g).unwrap(), p.clone());
                check_round_trips(&p, &inv, &g, order);
            }
            Err(Error::DeviceOverCapacity { .. } | Error::Unplaced { .. }) => {}
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }

    #[test]
    fn virtual_vram_plans_keep_invariants_and_reproduce(
        inv in inventory_strategy(),
        g in graph_strategy(),
        order in order_strategy(),
        gib in 0.0f64..40.0,
        compute in 0..4usize,
        donors in proptest::sample::subsequence((0..DEVICES.len() - 1).collect::<Vec<_>>(), 1..=3),
    ) {
        // Donor indices skip the compute device.
        let donors: Vec<DeviceId> = donors
            .into_iter()
            .map(|d| device(if d < compute { d } else { d + 1 }))
            .collect();
        let vv = VirtualVram::from_gib(device(compute), gib, donors).unwrap();
        let req = PlanRequest::virtual_vram(vv.clone()).with_order(order);
        match plan(&req, &inv, &g) {
            Ok(p) => {
                check_invariants(&p, &inv, &req.pin);
                let moved: u64 = p.devices().iter().filter(|r| r.device != p.compute())
                    .map(|r| r.model_bytes.0).sum();
                prop_assert!(moved <= vv.amount().0);
                check_round_trips(&p, &inv, &g, order);
            }
            Err(Error::DeviceOverCapacity { .. } | Error::DonorsTooSmall { .. }) => {}
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }
}

/// An inventory with compute times: `(bytes, compute µs, measured transfer µs)` per unit,
/// all weights; about half the units carry a measured transfer time.
fn timed_inventory_strategy() -> impl Strategy<Value = Inventory> {
    let unit = (
        1u64..(64 << 20),
        0u64..20_000,
        proptest::option::of(0u64..100_000),
    );
    proptest::collection::vec(unit, 1..60).prop_map(|units| {
        let us = std::time::Duration::from_micros;
        let transfers = units
            .iter()
            .enumerate()
            .filter_map(|(i, (_, _, t))| t.map(|t| (format!("u{i}"), us(t))))
            .collect();
        let units = units
            .into_iter()
            .enumerate()
            .map(|(i, (bytes, micros, _))| {
                Unit::new(format!("u{i}"), ByteSize(bytes), i as u32, UnitKind::Weight)
                    .with_compute(us(micros))
            })
            .collect();
        Inventory::new("model", units)
            .unwrap()
            .with_transfer(&transfers)
    })
}

fn timed_graph() -> DeviceGraph {
    "cuda:0=64gib,cpu=256gib@1gb/s".parse().unwrap()
}

/// The streamer's limits as loads set them: look-ahead, byte bound, whether transfers
/// overlap compute, and the contention they cause there (0 to 200 ms per GiB).
fn staging_strategy() -> impl Strategy<Value = Staging> {
    (1usize..4, 1u64..64, any::<bool>(), 0u64..200).prop_map(|(units, mib, overlapped, ms)| {
        Staging {
            units,
            bytes: ByteSize::mib(mib),
            overlapped,
            contention: std::time::Duration::from_millis(ms),
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Auto under a growing compute budget (expert strings): every plan within its budget,
    /// all resident once the model fits, and the predicted pass never slower for more room.
    #[test]
    fn auto_plans_get_no_slower_with_more_budget(
        inv in timed_inventory_strategy(),
        fractions in proptest::collection::vec(0u64..=1000, 2..6),
        staging in staging_strategy(),
    ) {
        let g = timed_graph();
        let total = inv.total_bytes().0;
        let mut budgets: Vec<u64> = fractions.iter().map(|f| total / 1000 * f).collect();
        budgets.push(total);
        budgets.sort_unstable();
        let mut last: Option<std::time::Duration> = None;
        for b in budgets {
            let spec: AllocSpec = format!("cuda:0,{b}b;cpu,*").parse().unwrap();
            let mut req = PlanRequest::expert(spec).with_order(PlacementOrder::Auto);
            req.staging = staging;
            let p = plan(&req, &inv, &g).unwrap();
            check_invariants(&p, &inv, &req.pin);
            let compute = &p.devices()[0];
            prop_assert!(compute.model_bytes.0 <= b.max(compute.pinned_bytes.0));
            let step = p.prediction().expect("timed units give a prediction").step;
            if b >= total {
                prop_assert!(p.units().iter().all(|u| u.device == p.compute()));
                prop_assert_eq!(p.prediction().unwrap().stall, std::time::Duration::ZERO);
            }
            if let Some(prev) = last {
                prop_assert!(step <= prev, "budget {}: {:?} after {:?}", b, step, prev);
            }
            last = Some(step);
        }
    }

    /// The same with virtual VRAM: less to move, never slower; nothing to move, all resident.
    #[test]
    fn auto_virtual_vram_gets_no_slower_with_less_moved(
        inv in timed_inventory_strategy(),
        fractions in proptest::collection::vec(0u64..=1000, 2..6),
        staging in staging_strategy(),
    ) {
        let g = timed_graph();
        let total = inv.total_bytes().0;
        let mut amounts: Vec<u64> = fractions.iter().map(|f| total / 1000 * f).collect();
        amounts.push(0);
        amounts.sort_unstable_by(|a, b| b.cmp(a));
        let mut last: Option<std::time::Duration> = None;
        for a in amounts {
            let vv = VirtualVram::new(device(0), ByteSize(a), vec![DeviceId::CPU]).unwrap();
            let mut req = PlanRequest::virtual_vram(vv).with_order(PlacementOrder::Auto);
            req.staging = staging;
            let p = plan(&req, &inv, &g).unwrap();
            check_invariants(&p, &inv, &req.pin);
            let moved: u64 = p.devices()[1..].iter().map(|r| r.model_bytes.0).sum();
            prop_assert!(moved <= a, "moved {} of {}", moved, a);
            if a == 0 {
                prop_assert_eq!(moved, 0);
            }
            let step = p.prediction().unwrap().step;
            if let Some(prev) = last {
                prop_assert!(step <= prev, "amount {}: {:?} after {:?}", a, step, prev);
            }
            last = Some(step);
        }
    }
}

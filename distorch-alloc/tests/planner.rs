//! Table tests for the planner's rules (see the crate docs, "Planning rules").

use distorch_alloc::{
    AllocSpec, ByteSize, DeviceGraph, DeviceId, EmbeddingPolicy, Error, Inventory, PinPolicy,
    PlacementOrder, Plan, PlanRequest, Quota, Role, Unit, UnitKind, VirtualVram, Warning, plan,
};

const MIB: u64 = 1 << 20;

/// `n` movable 100 MiB weights plus one 4 KiB norm between each pair.
fn model(n: u32) -> Inventory {
    let mut units = Vec::new();
    for i in 0..n {
        units.push(Unit::new(
            format!("w{i}"),
            ByteSize::mib(100),
            2 * i,
            UnitKind::Weight,
        ));
        units.push(Unit::new(
            format!("n{i}"),
            ByteSize::kib(4),
            2 * i + 1,
            UnitKind::Norm,
        ));
    }
    Inventory::new("unet", units).unwrap()
}

fn graph() -> DeviceGraph {
    "cuda:0=8gib,cuda:1=2gib,cpu=32gib".parse().unwrap()
}

fn expert(s: &str) -> PlanRequest {
    PlanRequest::expert(s.parse::<AllocSpec>().unwrap())
}

fn bytes_on(p: &Plan, d: &str) -> u64 {
    let d: DeviceId = d.parse().unwrap();
    p.devices()
        .iter()
        .find(|r| r.device == d)
        .map_or(0, |r| r.model_bytes.bytes())
}

fn weights_on(p: &Plan, d: &str) -> Vec<String> {
    let d: DeviceId = d.parse().unwrap();
    p.units()
        .iter()
        .filter(|u| u.device == d && u.kind == UnitKind::Weight)
        .map(|u| u.name.clone())
        .collect()
}

#[test]
fn byte_quotas_are_exact_upper_bounds() {
    let p = plan(&expert("cuda:0,250mb;cpu,*"), &model(8), &graph()).unwrap();
    // 8 norms (32 KiB) are pinned and count first; two 100 MiB weights fit in the rest.
    assert_eq!(bytes_on(&p, "cuda:0"), 200 * MIB + 32 * 1024);
    assert_eq!(bytes_on(&p, "cpu"), 600 * MIB);
    assert!(p.devices().iter().all(|r| match r.quota {
        Quota::Bytes(q) => r.model_bytes <= q,
        Quota::Rest => true,
    }));
    assert_eq!(p.devices()[0].role, Role::Compute);
    assert_eq!(p.devices()[1].role, Role::Donor);
    assert!(p.warnings().is_empty(), "{:?}", p.warnings());
}

#[test]
fn remainder_goes_to_cpu_when_no_star_and_is_reported() {
    let p = plan(&expert("cuda:0,300mb"), &model(4), &graph()).unwrap();
    assert_eq!(bytes_on(&p, "cpu"), 200 * MIB);
    assert_eq!(p.bytes_string(), "cuda:0,204816kib;cpu,*");
    assert_eq!(
        p.warnings(),
        &[Warning::RemainderToCpu {
            bytes: ByteSize::mib(200)
        }]
    );
    assert_eq!(
        p.warnings()[0].to_string(),
        "no `*` entry: the remaining 200.00 MiB went to cpu (write `cpu,*` to say so)"
    );
}

#[test]
fn named_cpu_quota_is_never_exceeded() {
    let e = plan(&expert("cuda:0,300mb;cpu,100mb"), &model(8), &graph()).unwrap_err();
    // cuda:0 takes the norms and two weights, cpu one weight: five weights are left.
    assert!(matches!(e, Error::Unplaced { units: 5, .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "the allocation's quotas hold only 300.03 MiB of the model's 800.03 MiB: 500.00 MiB in \
         5 unit(s) has no device; add a `*` entry (e.g. `cpu,*`) or raise a quota"
    );
}

#[test]
fn pinned_units_stay_on_compute_even_over_quota() {
    let req = PlanRequest::expert_with_compute("cpu,*".parse().unwrap(), DeviceId::cuda(0));
    let p = plan(&req, &model(4), &graph()).unwrap();
    assert_eq!(bytes_on(&p, "cuda:0"), 16 * 1024);
    assert_eq!(p.devices()[0].device, DeviceId::cuda(0));
    assert_eq!(p.devices()[0].pinned_bytes, ByteSize::kib(16));
    assert_eq!(
        p.warnings()[0].to_string(),
        "the units pinned to compute device cuda:0 (norms, biases, embeddings, tiny units: \
         16.00 KiB) exceed its quota of 0 B; they stay there anyway"
    );
    // The strings name the compute device first, so they reproduce the plan on their own.
    assert_eq!(p.bytes_string(), "cuda:0,16kib;cpu,*");
}

#[test]
fn tiny_threshold_and_embedding_policy() {
    let units = vec![
        Unit::new("tok", ByteSize::mib(150), 0, UnitKind::Embedding),
        Unit::new("small", ByteSize::kib(63), 1, UnitKind::Weight),
        Unit::new("big", ByteSize::mib(1), 2, UnitKind::Weight),
        Unit::new("b", ByteSize::kib(200), 3, UnitKind::Bias),
    ];
    let inv = Inventory::new("clip", units).unwrap();
    let req = PlanRequest::expert_with_compute("cpu,*".parse().unwrap(), DeviceId::cuda(0));
    let p = plan(&req, &inv, &graph()).unwrap();
    let on_gpu: Vec<_> = p
        .units()
        .iter()
        .filter(|u| u.pinned)
        .map(|u| u.name.as_str())
        .collect();
    assert_eq!(on_gpu, ["tok", "small", "b"]);

    let movable = PinPolicy {
        tiny_threshold: ByteSize::kib(1),
        embeddings: EmbeddingPolicy::Movable,
    };
    let p = plan(&req.with_pin(movable), &inv, &graph()).unwrap();
    let pinned: Vec<_> = p
        .units()
        .iter()
        .filter(|u| u.pinned)
        .map(|u| &u.name)
        .collect();
    assert_eq!(pinned, ["b"]);
}

#[test]
fn ratios_are_normalised_without_star() {
    let p = plan(&expert("cuda:0,1%;cpu,3%"), &model(8), &graph()).unwrap();
    // 25% of 800 MiB = 200 MiB target; cpu (last entry) takes the rest.
    assert_eq!(bytes_on(&p, "cuda:0"), 100 * MIB + 32 * 1024);
    assert_eq!(bytes_on(&p, "cpu"), 700 * MIB);
    let p = plan(&expert("cuda:0,50%;cpu,*"), &model(8), &graph()).unwrap();
    assert_eq!(bytes_on(&p, "cuda:0"), 300 * MIB + 32 * 1024);
}

#[test]
fn fractions_are_of_total_memory() {
    let g: DeviceGraph = "cuda:0=1gib/512mib,cpu=32gib".parse().unwrap();
    let p = plan(&expert("cuda:0,0.25;cpu,*"), &model(8), &g).unwrap();
    // 0.25 of the 1 GiB total = 256 MiB, less 32 KiB of norms: two weights.
    assert_eq!(bytes_on(&p, "cuda:0"), 200 * MIB + 32 * 1024);
    // A quota above free memory is capped and reported.
    let p = plan(&expert("cuda:0,0.75;cpu,*"), &model(8), &g).unwrap();
    assert_eq!(bytes_on(&p, "cuda:0"), 500 * MIB + 32 * 1024);
    assert_eq!(
        p.warnings()[0].to_string(),
        "cuda:0's quota of 768.00 MiB is more than its 512.00 MiB free; capped to 512.00 MiB"
    );
}

#[test]
fn interleave_spreads_offloaded_units_and_tail_is_contiguous() {
    let vv = VirtualVram::new(DeviceId::cuda(0), ByteSize::mib(400), vec![DeviceId::CPU]).unwrap();
    let req = PlanRequest::virtual_vram(vv);
    let p = plan(&req, &model(8), &graph()).unwrap();
    assert_eq!(weights_on(&p, "cpu"), ["w0", "w2", "w4", "w6"]);
    assert_eq!(p.bytes_string(), "cuda:0,*;cpu,400mib");

    let p = plan(&req.with_order(PlacementOrder::Tail), &model(8), &graph()).unwrap();
    assert_eq!(weights_on(&p, "cpu"), ["w0", "w1", "w2", "w3"]);
}

#[test]
fn virtual_vram_fills_donors_in_order() {
    let donors = vec![DeviceId::cuda(1), DeviceId::CPU];
    let g: DeviceGraph = "cuda:0=8gib,cuda:1=250mib,cpu=32gib".parse().unwrap();
    let vv = VirtualVram::from_gib(DeviceId::cuda(0), 0.5, donors).unwrap();
    let p = plan(&PlanRequest::virtual_vram(vv), &model(8), &g).unwrap();
    assert_eq!(bytes_on(&p, "cuda:1"), 200 * MIB);
    assert_eq!(bytes_on(&p, "cpu"), 300 * MIB);
    assert_eq!(bytes_on(&p, "cuda:0"), 300 * MIB + 32 * 1024);
    assert_eq!(p.bytes_string(), "cuda:0,*;cuda:1,200mib;cpu,300mib");
}

#[test]
fn virtual_vram_above_the_model_offloads_everything_movable() {
    let vv = VirtualVram::from_gib(DeviceId::cuda(0), 24.0, vec![DeviceId::CPU]).unwrap();
    let p = plan(&PlanRequest::virtual_vram(vv), &model(4), &graph()).unwrap();
    assert_eq!(bytes_on(&p, "cuda:0"), 16 * 1024);
    assert!(matches!(
        p.warnings()[0],
        Warning::VirtualVramAboveModel { .. }
    ));
}

#[test]
fn virtual_vram_errors_say_what_is_missing() {
    let g: DeviceGraph = "cuda:0=300mib,cuda:1=100mib,cpu=200mib".parse().unwrap();
    let vv = VirtualVram::new(
        DeviceId::cuda(0),
        ByteSize::mib(500),
        vec![DeviceId::cuda(1), DeviceId::CPU],
    )
    .unwrap();
    let e = plan(&PlanRequest::virtual_vram(vv), &model(8), &g).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the donors (`cuda:1`, `cpu`) have 300.00 MiB free but virtual VRAM asks them to hold \
         500.00 MiB: 200.00 MiB missing"
    );

    let vv = VirtualVram::new(DeviceId::cuda(0), ByteSize::mib(100), vec![DeviceId::CPU]).unwrap();
    let e = plan(&PlanRequest::virtual_vram(vv), &model(8), &g).unwrap_err();
    assert_eq!(
        e.to_string(),
        "`cuda:0` cannot hold its share of the model: it needs 700.03 MiB but has 300.00 MiB \
         free (400.03 MiB short); raise virtual VRAM by at least 400.03 MiB"
    );

    let e = VirtualVram::new(DeviceId::CPU, ByteSize::gib(1), vec![DeviceId::CPU]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "donor `cpu` is the compute device: a donor must be another device"
    );
    let e = VirtualVram::new(DeviceId::cuda(0), ByteSize::gib(1), vec![]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "virtual VRAM of 1.00 GiB needs at least one donor device"
    );
    let e = VirtualVram::from_gib(DeviceId::cuda(0), 2000.0, vec![DeviceId::CPU]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "virtual VRAM must be a finite number of GiB between 0 and 1024, got 2000"
    );
    let e = VirtualVram::new(
        DeviceId::cuda(0),
        ByteSize::gib(1),
        vec![DeviceId::CPU, DeviceId::CPU],
    )
    .unwrap_err();
    assert_eq!(e.to_string(), "donor `cpu` appears twice in the donor list");
}

#[test]
fn unknown_devices_list_the_graph() {
    let e = plan(&expert("cuda:3,1gb;cpu,*"), &model(2), &graph()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown device `cuda:3` in the compute device: the device graph has `cuda:0`, \
         `cuda:1`, `cpu`"
    );
    let e = plan(&expert("cuda:0,1gb;rocm,*"), &model(2), &graph()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown device `rocm:0` in the allocation: the device graph has `cuda:0`, `cuda:1`, \
         `cpu`"
    );
}

#[test]
fn sink_over_capacity_is_an_error() {
    let g: DeviceGraph = "cuda:0=8gib,cpu=300mib".parse().unwrap();
    let e = plan(&expert("cuda:0,150mb;cpu,*"), &model(8), &g).unwrap_err();
    assert_eq!(
        e.to_string(),
        "`cpu` cannot hold its share of the model: it needs 700.00 MiB but has 300.00 MiB free \
         (400.00 MiB short)"
    );
}

#[test]
fn empty_allocation_is_an_error_for_the_planner() {
    let e = plan(&expert(""), &model(2), &graph()).unwrap_err();
    assert_eq!(e, Error::EmptyAllocation);
}

#[test]
fn report_has_table_kinds_strings_and_warnings() {
    let p = plan(&expert("cuda:0,300mb"), &model(4), &graph()).unwrap();
    let text = p.to_string();
    for needle in [
        "plan for unet: 400.02 MiB in 8 units, compute on cuda:0, order interleave",
        "device",
        "% of device",
        "layer kind",
        "bytes string:    cuda:0,204816kib;cpu,*",
        "fraction string: cuda:0,0.0244159699;cpu,*",
        "warning: no `*` entry",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    let kinds = p.kind_distribution();
    assert_eq!(kinds.len(), 2);
    assert_eq!(kinds[1].0, UnitKind::Norm);
    assert_eq!(kinds[1].1, vec![ByteSize::kib(16), ByteSize::ZERO]);
}

#[test]
fn an_inventory_takes_a_models_execution_order() {
    use distorch_alloc::{ByteSize, Inventory, Unit, UnitKind};
    let inv = Inventory::new(
        "unet",
        ["a", "b", "c", "d"]
            .iter()
            .enumerate()
            .map(|(i, n)| Unit::new(*n, ByteSize::mib(1), i as u32, UnitKind::Weight))
            .collect(),
    )
    .unwrap();
    let ordered = inv.in_order(&["c", "zzz", "a"]);
    let names: Vec<&str> = ordered.units().iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["c", "a", "b", "d"]);
    assert_eq!(ordered.total_bytes(), inv.total_bytes());
    let orders: Vec<u32> = ordered.units().iter().map(|u| u.order).collect();
    assert_eq!(orders, [0, 1, 2, 3]);
}

/// A DiT: embedders, `blocks.0..n` of three units each (a norm among them), a head.
fn dit(n: usize) -> Inventory {
    let mut units = vec![
        Unit::new("patch_embedding", ByteSize::mib(10), 0, UnitKind::Weight),
        Unit::new(
            "condition_embedder.text_embedder.linear_1",
            ByteSize::mib(50),
            1,
            UnitKind::Weight,
        ),
    ];
    for b in 0..n {
        for (i, (part, kind)) in [
            ("attn1.to_q", UnitKind::Weight),
            ("attn1.norm_q", UnitKind::Norm),
            ("ffn.net.2", UnitKind::Weight),
        ]
        .into_iter()
        .enumerate()
        {
            units.push(Unit::new(
                format!("blocks.{b}.{part}"),
                ByteSize::mib(100),
                (2 + 3 * b + i) as u32,
                kind,
            ));
        }
    }
    units.push(Unit::new(
        "proj_out",
        ByteSize::mib(1),
        999,
        UnitKind::Weight,
    ));
    Inventory::new("transformer", units).unwrap()
}

#[test]
fn block_swap_moves_the_last_blocks_whole_and_named_embedders() {
    use distorch_alloc::BlockSwap;
    let swap = BlockSwap::new(DeviceId::cuda(0), DeviceId::CPU, 2)
        .offloading("condition_embedder.text_embedder");
    let p = plan(&PlanRequest::block_swap(swap), &dit(5), &graph()).unwrap();
    let on_cpu: Vec<&str> = p
        .units()
        .iter()
        .filter(|u| u.device == DeviceId::CPU)
        .map(|u| u.name.as_str())
        .collect();
    assert_eq!(
        on_cpu,
        [
            "condition_embedder.text_embedder.linear_1",
            "blocks.3.attn1.to_q",
            "blocks.3.attn1.norm_q",
            "blocks.3.ffn.net.2",
            "blocks.4.attn1.to_q",
            "blocks.4.attn1.norm_q",
            "blocks.4.ffn.net.2",
        ]
    );
    assert_eq!(bytes_on(&p, "cpu"), 650 * MIB);
    assert_eq!(bytes_on(&p, "cuda:0"), (10 + 900 + 1) * MIB);
    assert_eq!(p.devices()[0].role, Role::Compute);
    // No block swapped: everything on the compute device; all of them: every block moves.
    let none = BlockSwap::new(DeviceId::cuda(0), DeviceId::CPU, 0);
    assert_eq!(
        bytes_on(
            &plan(&PlanRequest::block_swap(none), &dit(5), &graph()).unwrap(),
            "cpu"
        ),
        0
    );
    // Seven blocks of 300 MiB do not fit in cuda:1's 2 GiB.
    let all = BlockSwap::new(DeviceId::cuda(0), DeviceId::cuda(1), 7);
    let e = plan(&PlanRequest::block_swap(all), &dit(7), &graph()).unwrap_err();
    assert!(matches!(e, Error::DeviceOverCapacity { .. }), "{e}");
}

/// FLUX's two block lists, each with its own count.
#[test]
fn block_swap_takes_the_last_blocks_of_each_list() {
    use distorch_alloc::BlockSwap;
    let mut units = Vec::new();
    for (list, n) in [("double_blocks", 3), ("single_blocks", 4)] {
        for b in 0..n {
            let order = units.len() as u32;
            units.push(Unit::new(
                format!("{list}.{b}.lin"),
                ByteSize::mib(100),
                order,
                UnitKind::Weight,
            ));
        }
    }
    let inv = Inventory::new("transformer", units).unwrap();
    let swap = BlockSwap::of_lists(
        DeviceId::cuda(0),
        DeviceId::CPU,
        [("double_blocks.", 1), ("single_blocks.", 2)],
    );
    let p = plan(&PlanRequest::block_swap(swap), &inv, &graph()).unwrap();
    let on_cpu: Vec<&str> = p
        .units()
        .iter()
        .filter(|u| u.device == DeviceId::CPU)
        .map(|u| u.name.as_str())
        .collect();
    assert_eq!(
        on_cpu,
        [
            "double_blocks.2.lin",
            "single_blocks.2.lin",
            "single_blocks.3.lin"
        ]
    );
    let too_many = BlockSwap::of_lists(
        DeviceId::cuda(0),
        DeviceId::CPU,
        [("double_blocks.", 1), ("single_blocks.", 5)],
    );
    let e = plan(&PlanRequest::block_swap(too_many), &inv, &graph()).unwrap_err();
    assert!(e.to_string().contains("under `single_blocks.N.`"), "{e}");
}

#[test]
fn block_swap_errors_name_what_is_wrong() {
    use distorch_alloc::BlockSwap;
    let cases = [
        (
            BlockSwap::new(DeviceId::cuda(0), DeviceId::CPU, 6),
            dit(5),
            "has 5 blocks",
        ),
        (
            BlockSwap::new(DeviceId::cuda(0), DeviceId::cuda(0), 1),
            dit(5),
            "is the compute device",
        ),
        (
            BlockSwap::new(DeviceId::cuda(0), DeviceId::CPU, 1),
            model(3),
            "no units under `blocks.N.`",
        ),
    ];
    for (swap, inv, want) in cases {
        let e = plan(&PlanRequest::block_swap(swap), &inv, &graph()).unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
    }
    let unknown = BlockSwap::new(DeviceId::cuda(0), DeviceId::cuda(3), 1);
    let e = plan(&PlanRequest::block_swap(unknown), &dit(2), &graph()).unwrap_err();
    assert!(matches!(e, Error::UnknownDevice { .. }), "{e}");
}

/// A model whose weights a backend holds at twice their file size on devices (f16 files on a
/// backend that computes from f32 copies).
fn widened(n: u32) -> Inventory {
    let units = (0..n)
        .map(|i| {
            Unit::new(format!("w{i}"), ByteSize::mib(100), i, UnitKind::Weight)
                .with_device_bytes(ByteSize::mib(200))
        })
        .collect();
    Inventory::new("unet", units).unwrap()
}

#[test]
fn units_count_at_their_size_where_they_are_placed() {
    // 450 MiB on cuda:0 holds two widened weights (400 MiB), not four file-sized ones.
    let p = plan(&expert("cuda:0,450mib;cpu,*"), &widened(6), &graph()).unwrap();
    assert_eq!(bytes_on(&p, "cuda:0"), 400 * MIB);
    assert_eq!(weights_on(&p, "cuda:0").len(), 2);
    // On cpu as a donor they keep their file size.
    assert_eq!(bytes_on(&p, "cpu"), 400 * MIB);
    assert_eq!(p.total_bytes().bytes(), 800 * MIB);
    // A GPU donor holds device copies too.
    let p = plan(
        &expert("cuda:0,0b;cuda:1,400mib;cpu,*"),
        &widened(6),
        &graph(),
    )
    .unwrap();
    assert_eq!(weights_on(&p, "cuda:1").len(), 2);
    assert_eq!(bytes_on(&p, "cpu"), 400 * MIB);
    // With cpu as the compute device, weights are device copies there.
    let p = plan(&expert("cpu,*"), &widened(3), &graph()).unwrap();
    assert_eq!(bytes_on(&p, "cpu"), 600 * MIB);
    // Ratios are shares of the model at the device's size for it.
    let p = plan(&expert("cuda:0,50%;cpu,*"), &widened(4), &graph()).unwrap();
    assert_eq!(bytes_on(&p, "cuda:0"), 400 * MIB);
    assert_eq!(bytes_on(&p, "cpu"), 200 * MIB);
    // The reproducing strings give the same placement back.
    let again = plan(&expert(&p.bytes_string()), &widened(4), &graph()).unwrap();
    assert_eq!(again.units(), p.units());
}

#[test]
fn plan_reports_name_their_dtypes() {
    let inv = widened(2).with_dtypes(distorch_alloc::DtypeLabels {
        storage: "F16".into(),
        held: Some("f32 at device homes".into()),
        compute: "f32".into(),
    });
    let p = plan(&expert("cuda:0,200mib;cpu,*"), &inv, &graph()).unwrap();
    let report = p.to_string();
    assert!(
        report.contains("dtypes: storage F16, compute f32 (f32 at device homes)"),
        "{report}"
    );
}

/// Six 50 MiB weights, the second and fourth computing for 100 ms, the others 1 ms; the
/// host link moves 50 MiB in about 52 ms.
fn timed_model() -> Inventory {
    let units = (0..6)
        .map(|i| {
            let ms = if i == 1 || i == 3 { 100 } else { 1 };
            Unit::new(format!("w{i}"), ByteSize::mib(50), i, UnitKind::Weight)
                .with_compute(std::time::Duration::from_millis(ms))
        })
        .collect();
    Inventory::new("unet", units).unwrap()
}

#[test]
fn auto_streams_what_compute_can_hide() {
    let g: DeviceGraph = "cuda:0=8gib,cpu=32gib@1gb/s".parse().unwrap();
    let vv = VirtualVram::new(DeviceId::cuda(0), ByteSize::mib(100), vec![DeviceId::CPU]).unwrap();
    // One unit staged ahead: each transfer starts when the streamed unit before it is
    // fetched, so streamed units must be far apart in compute.
    let step = |order: PlacementOrder| {
        let mut req = PlanRequest::virtual_vram(vv.clone()).with_order(order);
        req.staging.units = 1;
        let p = plan(&req, &timed_model(), &g).unwrap();
        let streamed: Vec<String> = p
            .units()
            .iter()
            .filter(|u| u.device == DeviceId::CPU)
            .map(|u| u.name.clone())
            .collect();
        (p.prediction().unwrap(), streamed, p)
    };
    let (auto, streamed, p) = step(PlacementOrder::Auto);
    // w0 and w2: a 100 ms unit lies between each fetch and the next streamed unit.
    assert_eq!(streamed, ["w0", "w2"]);
    assert_eq!(auto.stall, std::time::Duration::ZERO);
    assert_eq!(auto.step, auto.compute);
    assert!(p.to_string().contains("predicted pass:"), "{p}");
    for order in [PlacementOrder::Interleave, PlacementOrder::Tail] {
        let (other, s, _) = step(order);
        assert!(
            auto.step < other.step,
            "{order}: {other:?} streaming {s:?} vs auto {auto:?}"
        );
    }
    // Without a declared link, a default is assumed and said.
    let g: DeviceGraph = "cuda:0=8gib,cpu=32gib".parse().unwrap();
    let req = PlanRequest::virtual_vram(vv).with_order(PlacementOrder::Auto);
    let p = plan(&req, &timed_model(), &g).unwrap();
    assert!(
        p.warnings()
            .iter()
            .any(|w| matches!(w, Warning::AssumedLink { .. })),
        "{:?}",
        p.warnings()
    );
    // Without compute times there is nothing to predict.
    let p = plan(&expert("cuda:0,1gb;cpu,*"), &model(4), &graph()).unwrap();
    assert!(p.prediction().is_none());
}

//! `distorch plan` and `distorch devices`.

use distorch::AllocSpec;
use distorch::alloc::{
    DeviceGraph, DeviceId, Inventory, PinPolicy, PlacementOrder, Plan, PlanRequest, Quota,
    VirtualVram, parse_byte_size, parse_device_list,
};
use distorch::backends::BackendKind;
use distorch::core::{ComponentKind, units};
use serde_json::json;

use crate::Failure;
use crate::cli::{ComponentArg, DevicesArgs, OrderArg, PlanArgs};

pub fn run(args: &PlanArgs) -> Result<(), Failure> {
    // Every string is checked before any file is read.
    let (graph, notes) = match &args.devices {
        Some(d) => (DeviceGraph::declare(d)?, None),
        None => {
            let found = distorch::backends::detect();
            for note in &found.notes {
                tracing::info!("device detection: {note}");
            }
            (found.graph, Some(found.notes))
        }
    };
    let hint = |f: Failure| with_detection_hint(f, notes.as_deref());
    let request = request(args, &graph).map_err(hint)?;
    let path = args.source.path()?;
    let index = distorch::models::load::open_index(&path)?;
    let split = distorch::models::load::split(&index);
    let wanted: Vec<_> = split
        .components
        .iter()
        .filter(|c| kind_of(args.component).is_none_or(|k| k == c.kind))
        .collect();
    if wanted.is_empty() {
        let found: Vec<_> = split.components.iter().map(|c| c.kind.name()).collect();
        return Err(Failure::Other(format!(
            "{}: no {} component to plan (found: {})",
            path.display(),
            kind_of(args.component).map_or("model", ComponentKind::name),
            if found.is_empty() {
                "none".to_owned()
            } else {
                found.join(", ")
            }
        )));
    }
    let mut first = true;
    for component in wanted {
        let inventory = units::inventory(component)?;
        let compute = request.compute().unwrap_or(DeviceId::CPU);
        let inventory = with_compute_times(args, component, inventory, compute)?;
        let plan = distorch::plan(&request, &inventory, &graph).map_err(|e| hint(e.into()))?;
        tracing::debug!(component = %component.kind, bytes = %plan.bytes_string(), "planned");
        if args.json {
            println!("{}", plan_json(&plan, &inventory));
        } else {
            if !first {
                println!();
            }
            println!("{plan}");
        }
        first = false;
    }
    Ok(())
}

fn request(args: &PlanArgs, graph: &DeviceGraph) -> Result<PlanRequest, Failure> {
    let compute = args
        .compute
        .as_deref()
        .map(str::parse::<DeviceId>)
        .transpose()?;
    let pin = PinPolicy {
        tiny_threshold: parse_byte_size(&args.tiny_threshold)?,
        ..PinPolicy::default()
    };
    let order = match args.order {
        OrderArg::Interleave => PlacementOrder::Interleave,
        OrderArg::Tail => PlacementOrder::Tail,
        OrderArg::Auto => PlacementOrder::Auto,
    };
    let expert = args.expert.as_deref().map(AllocSpec::parse).transpose()?;
    let request = match (expert, args.virtual_vram) {
        (Some(spec), _) if !spec.is_empty() => match compute {
            Some(c) => PlanRequest::expert_with_compute(spec, c),
            None => PlanRequest::expert(spec),
        },
        (Some(_), _) => {
            return Err(Failure::Other(
                "the expert allocation is empty: give `DEVICE,VALUE` entries or use \
                 --virtual-vram GB"
                    .into(),
            ));
        }
        (None, Some(gib)) => {
            let donors = parse_device_list(&args.donor)?;
            let compute = compute
                .or_else(|| graph.default_compute())
                .ok_or_else(|| Failure::Other("the device graph has no devices".into()))?;
            PlanRequest::virtual_vram(VirtualVram::from_gib(compute, gib, donors)?)
        }
        (None, None) => {
            return Err(Failure::Other(
                "say how to split the model: --expert STR or --virtual-vram GB".into(),
            ));
        }
    };
    let mut request = request.with_order(order).with_pin(pin);
    request.staging.units = args.prefetch_units.max(1);
    // Uploads overlap compute on CUDA (a prefetch thread); wgpu uploads on the compute
    // thread and the CPU backend widens weights on the cores it computes with.
    request.staging.overlapped = request
        .compute()
        .is_some_and(|c| c.kind() == distorch::alloc::DeviceKind::Cuda);
    Ok(request)
}

/// Assumed effective rates (TFLOP/s) when --tflops is not given: a recent datacenter GPU
/// through Burn's CUDA backend, a desktop GPU through wgpu, a few CPU cores.
fn assumed_tflops(compute: DeviceId) -> f64 {
    match compute.kind() {
        distorch::alloc::DeviceKind::Cuda => 60.0,
        distorch::alloc::DeviceKind::Cpu => 0.2,
        _ => 10.0,
    }
}

/// The UNet's units with compute times for `--latent`, when asked for and the component is
/// a UNet (other components are planned without a prediction).
fn with_compute_times(
    args: &PlanArgs,
    component: &distorch::core::Component<'_>,
    inventory: Inventory,
    compute: DeviceId,
) -> Result<Inventory, Failure> {
    use distorch::models::sd::unet::cost::{UnetWork, unit_flops, unit_times};
    let Some(latent) = args.latent else {
        return Ok(inventory);
    };
    if component.kind != ComponentKind::Unet {
        return Ok(inventory);
    }
    let detected = distorch::models::UnetConfig::detect(component)
        .map_err(|e| Failure::Other(e.to_string()))?;
    let work = UnetWork {
        latent,
        batch: args.batch.max(1),
        text_tokens: 77,
    };
    let tflops = match args.tflops {
        Some(t) if t > 0.0 && t.is_finite() => t,
        Some(t) => {
            return Err(Failure::Other(format!(
                "--tflops {t}: give a positive rate"
            )));
        }
        None => {
            let t = assumed_tflops(compute);
            eprintln!(
                "note: predictions assume {t} TFLOP/s on {compute}; give --tflops for your device"
            );
            t
        }
    };
    let flops = unit_flops(component, &detected.config, &work);
    Ok(inventory.with_compute(&unit_times(&flops, tflops * 1e12)))
}

/// Adds what detection saw (when the devices were detected) to an unknown-device error.
fn with_detection_hint(f: Failure, notes: Option<&[String]>) -> Failure {
    match (f, notes) {
        (Failure::Other(msg), Some(notes)) if msg.starts_with("unknown device") => {
            let compiled = distorch::backends::compiled();
            let gpu = compiled.iter().any(|b| *b != BackendKind::NdArray);
            let backends: Vec<String> = compiled.iter().map(|b| b.to_string()).collect();
            let detected = if gpu {
                format!(
                    "detected with the backends compiled in: {}",
                    backends.join(", ")
                )
            } else {
                "this build detects host memory only; build with --features cuda or wgpu to \
                 detect GPUs"
                    .to_owned()
            };
            let mut out = format!(
                "{msg}\n  ({detected}; or declare devices with --devices, e.g. \
                 --devices cuda:0=24gib,cpu=64gib)"
            );
            for n in notes {
                out.push_str("\n  note: ");
                out.push_str(n);
            }
            Failure::Other(out)
        }
        (other, _) => other,
    }
}

/// The component an argument names; `None` for `all`.
fn kind_of(arg: ComponentArg) -> Option<ComponentKind> {
    match arg {
        ComponentArg::All => None,
        ComponentArg::Unet => Some(ComponentKind::Unet),
        ComponentArg::Clip => Some(ComponentKind::Clip),
        ComponentArg::Vae => Some(ComponentKind::Vae),
        ComponentArg::Controlnet => Some(ComponentKind::ControlNet),
        ComponentArg::ClipVision => Some(ComponentKind::ClipVision),
        ComponentArg::Model => Some(ComponentKind::Model),
    }
}

/// The plan as the documented JSON object.
fn plan_json(plan: &Plan, inventory: &Inventory) -> serde_json::Value {
    let devices: Vec<_> = plan
        .devices()
        .iter()
        .map(|r| {
            json!({
                "device": r.device.to_string(),
                "role": r.role.name(),
                "capacity_bytes": r.total.bytes(),
                "free_bytes": r.free.bytes(),
                "quota_bytes": match r.quota { Quota::Bytes(b) => json!(b.bytes()), Quota::Rest => json!("*") },
                "model_bytes": r.model_bytes.bytes(),
                "pinned_bytes": r.pinned_bytes.bytes(),
                "units": r.units,
            })
        })
        .collect();
    let units: Vec<_> = plan
        .units()
        .iter()
        .map(|u| {
            json!({
                "name": u.name,
                "bytes": u.bytes.bytes(),
                "device": u.device.to_string(),
                "kind": u.kind.name(),
                "pinned": u.pinned,
            })
        })
        .collect();
    json!({
        "component": inventory.component(),
        "total_bytes": plan.total_bytes().bytes(),
        "compute": plan.compute().to_string(),
        "order": plan.order().name(),
        "devices": devices,
        "units": units,
        "bytes_string": plan.bytes_string(),
        "fraction_string": plan.fraction_string(),
        "warnings": plan.warnings().iter().map(|w| w.to_string()).collect::<Vec<_>>(),
        "predicted": plan.prediction().map(|p| json!({
            "step_ms": p.step.as_secs_f64() * 1e3,
            "compute_ms": p.compute.as_secs_f64() * 1e3,
            "transfer_ms": p.transfer.as_secs_f64() * 1e3,
            "stall_ms": p.stall.as_secs_f64() * 1e3,
        })),
    })
}

pub fn devices(args: &DevicesArgs) -> Result<(), Failure> {
    let found = distorch::backends::detect();
    let graph = &found.graph;
    let backends: Vec<String> = distorch::backends::compiled()
        .iter()
        .map(|b| b.to_string())
        .collect();
    if args.json {
        let devices: Vec<_> = found
            .devices
            .iter()
            .map(|d| {
                json!({
                    "device": d.id.to_string(),
                    "name": d.name,
                    "total_bytes": d.total.map(|b| b.bytes()),
                    "free_bytes": d.free.map(|b| b.bytes()),
                    "pinned_host": d.pinned_host,
                })
            })
            .collect();
        println!(
            "{}",
            json!({"backends": backends, "devices": devices, "declaration": graph.to_string(),
                   "notes": found.notes})
        );
        return Ok(());
    }
    println!("backends compiled in: {}", backends.join(", "));
    let unknown = || "unknown".to_owned();
    for d in &found.devices {
        println!(
            "  {:<8} {} total, {} free  {}",
            d.id.to_string(),
            d.total.map_or_else(unknown, |b| b.to_string()),
            d.free.map_or_else(unknown, |b| b.to_string()),
            d.name
        );
    }
    println!("as a declaration: {graph}");
    for n in &found.notes {
        println!("note: {n}");
    }
    Ok(())
}

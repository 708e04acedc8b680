//! Placement that knows the clock, measured: the SD 1.5 UNet (the demo checkpoint's shapes,
//! random fp16 weights) at three compute budgets, each planned in interleave, tail and auto
//! order, every plan's predicted pass beside its measured one.
//!
//! ```text
//! cargo run --release --example auto_bench -- [--backend ndarray|wgpu|cuda] [--latent 16]
//!     [--budgets 25,50,75] [--passes 3] [--orders interleave,tail,auto]
//! ```
//!
//! Calibration first, on the backend measured, once per device (cached in
//! `$DISTORCH_CACHE_DIR/calibration.json`, `CalibrationCache`): one resident pass profiled
//! unit by unit (`profile_units`, the device synchronized at every fetch) gives each unit's
//! compute time; one pass with every unit streamed gives the link's bandwidth: bytes moved
//! over the time staging them on demand where transfers overlap compute (CUDA), over what
//! streaming adds to the pass where they do not (wgpu, ndarray). Then one line per (budget,
//! order): the predicted and measured pass (median of `--passes`, after a warm-up pass),
//! their ratio, and the measured stall.

#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use distorch::alloc::DeviceInfo;
use distorch::core::SafetensorsIndex;
use distorch::core::runtime::{DeviceMap, Lookahead};
use distorch::models::load::calibration::{Calibration, CalibrationCache, profile_units};
use distorch::models::load::{load_component, open_index, split};
use distorch::models::sd::demo::DemoModel;
use distorch::models::{ComponentOptions, Placement, Unet2dCondition, UnetConfig, UnetInput};
use distorch::{ByteSize, ComponentKind, DeviceGraph, DeviceId, PlacementOrder, PlanRequest};

#[path = "common/malloc.rs"]
mod malloc;
#[path = "common/random.rs"]
mod random;

type Failure = Box<dyn std::error::Error>;

fn arg(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

fn main() -> Result<(), Failure> {
    malloc::keep_freed_memory();
    match arg("--backend").as_deref().unwrap_or("ndarray") {
        "ndarray" => bench::<distorch::backends::NdArray>(Default::default()),
        #[cfg(feature = "wgpu")]
        "wgpu" => bench::<distorch::backends::Wgpu>(Default::default()),
        #[cfg(feature = "cuda")]
        "cuda" => bench::<distorch::backends::Cuda>(Default::default()),
        other => {
            Err(format!("--backend {other}: ndarray, or wgpu in a --features wgpu build").into())
        }
    }
}

/// What every configuration shares.
struct Setup<B: Backend> {
    index: SafetensorsIndex,
    config: UnetConfig,
    device: B::Device,
    latent: usize,
}

impl<B: Backend> Setup<B> {
    /// The UNet under `request`, with `lookahead`, `link` on the host's side and, when given,
    /// the units' compute times.
    fn load(
        &self,
        request: PlanRequest,
        lookahead: Lookahead,
        link: Option<u64>,
        times: Option<&Arc<BTreeMap<String, Duration>>>,
    ) -> Result<distorch::models::Loaded<Unet2dCondition<B>>, Failure> {
        let mut cpu = DeviceInfo::new(DeviceId::CPU, ByteSize::gib(64));
        if let Some(l) = link {
            cpu = cpu.with_link(ByteSize(l));
        }
        let graph = DeviceGraph::new(vec![
            DeviceInfo::new(DeviceId::cuda(0), ByteSize::gib(64)),
            cpu,
        ])?;
        let placement = Placement {
            request,
            devices: DeviceMap::new(self.device.clone()),
        };
        let mut options = ComponentOptions::new(graph, placement);
        options.lookahead = lookahead;
        options.compute_times = times.cloned();
        let parts = split(&self.index);
        let c = parts
            .components
            .iter()
            .find(|c| c.kind == ComponentKind::Unet)
            .ok_or("no UNet in the demo checkpoint")?;
        Ok(load_component(
            &self.index,
            c,
            self.config.clone(),
            &options,
        )?)
    }

    /// One pass on fixed inputs (batch 2, 77 text tokens), waited for.
    fn pass(&self, unet: &Unet2dCondition<B>) -> Result<Duration, Failure> {
        let n = self.latent;
        let sample = random::values(1, 2 * 4 * n * n, 2.0);
        let context = random::values(2, 2 * 77 * 768, 2.0);
        let input = UnetInput::new(
            Tensor::from_data(TensorData::new(sample, [2, 4, n, n]), &self.device),
            vec![500.0; 2],
            Tensor::from_data(TensorData::new(context, [2, 77, 768]), &self.device),
        );
        let start = Instant::now();
        let out = unet.forward(input)?;
        let _ = out.into_data();
        Ok(start.elapsed())
    }
}

/// Measures the UNet's units (a resident pass, profiled) and the link (a fully streamed
/// pass). Where transfers overlap compute (CUDA) a streamed byte costs the time staging it on
/// demand (no look-ahead); where they do not (wgpu uploads on the compute thread, ndarray
/// widens on the compute cores), what streaming it adds to a prefetched pass. Streaming that
/// adds nothing measurable (lavapipe: copies within host memory, next to seconds of shader
/// time) is taken as 1 ms a pass.
fn calibrate<B: Backend>(
    setup: &Setup<B>,
    expert: &dyn Fn(String, PlacementOrder) -> Result<PlanRequest, Failure>,
) -> Result<Calibration, Failure> {
    let resident = setup.load(
        expert("cuda:0,*".into(), PlacementOrder::Interleave)?,
        Lookahead::default(),
        None,
        None,
    )?;
    let compute = profile_units(resident.model.streamer(), || {
        setup
            .pass(&resident.model)
            .map(|_| ())
            .map_err(|e| distorch::models::Error::Input {
                input: "pass",
                reason: e.to_string(),
            })
    })?;
    let plain = setup.pass(&resident.model)?;
    drop(resident);
    let overlap = distorch::core::runtime::Capabilities::of::<B>(&setup.device).transfers_overlap;
    let lookahead = if overlap {
        Lookahead {
            units: 0,
            ..Lookahead::default()
        }
    } else {
        Lookahead::default()
    };
    let streamed = setup.load(
        expert("cuda:0,0b;cpu,*".into(), PlacementOrder::Interleave)?,
        lookahead,
        None,
        None,
    )?;
    setup.pass(&streamed.model)?;
    let _ = streamed.model.streamer().take_stats();
    let full = setup.pass(&streamed.model)?;
    let stats = streamed.model.streamer().take_stats();
    let moved: u64 = stats.bytes_moved.values().map(|b| b.bytes()).sum();
    let cost = if overlap {
        stats.stall
    } else {
        full.saturating_sub(plain)
    }
    .max(Duration::from_millis(1));
    let link = (moved as f64 / cost.as_secs_f64()) as u64;
    println!(
        "calibration: backend={} resident_pass_ms={:.1} streamed_pass_ms={:.1} units_timed={} \
         overlap={overlap} link_gb_s={:.2}",
        B::name(&setup.device),
        plain.as_secs_f64() * 1e3,
        full.as_secs_f64() * 1e3,
        compute.len(),
        link as f64 / 1e9
    );
    Ok(Calibration {
        compute,
        link_bytes_per_sec: link,
    })
}

fn bench<B: Backend>(device: B::Device) -> Result<(), Failure> {
    let latent: usize = arg("--latent").map_or(Ok(16), |s| s.parse())?;
    let passes: usize = arg("--passes").map_or(Ok(3), |s| s.parse())?;
    let budgets: Vec<u64> = arg("--budgets")
        .unwrap_or_else(|| "25,50,75".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    // The orders, in the sequence measured (`--orders auto,tail,interleave` to check that
    // the sequence does not decide the result).
    let orders: Vec<PlacementOrder> = arg("--orders")
        .unwrap_or_else(|| "interleave,tail,auto".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let cache_dir = std::env::var_os("DISTORCH_CACHE_DIR")
        .map_or_else(|| std::env::temp_dir().join("distorch"), PathBuf::from);
    let ckpt = DemoModel::Sd15.ensure_random_in(&cache_dir)?;
    let index = open_index(&ckpt)?;
    let config = {
        let parts = split(&index);
        let c = parts
            .components
            .iter()
            .find(|c| c.kind == ComponentKind::Unet)
            .ok_or("no UNet")?;
        UnetConfig::detect(c)?.config
    };
    // The UNet's bytes as this backend holds them resident (the plans' total).
    let total = {
        let parts = split(&index);
        let c = parts
            .components
            .iter()
            .find(|c| c.kind == ComponentKind::Unet)
            .ok_or("no UNet")?;
        let homes = distorch::core::Homes::new(distorch::core::runtime::device_rule::<B>(&device));
        distorch::core::units::inventory_with(c, &homes)?
            .bytes_on(DeviceId::cuda(0), DeviceId::cuda(0))
    };
    let setup = Setup::<B> {
        index,
        config,
        device,
        latent,
    };
    let compute = DeviceId::cuda(0);
    let expert = |s: String, order| -> Result<PlanRequest, Failure> {
        Ok(PlanRequest::expert_with_compute(s.parse()?, compute).with_order(order))
    };

    let key =
        CalibrationCache::key::<B>(&setup.device, &ckpt, &format!("unet {latent}x{latent}x2"));
    let mut cache = CalibrationCache::open(cache_dir.join("calibration.json"))?;
    let calibration = match cache.get(&key) {
        Some(c) => {
            println!(
                "calibration: cached ({})",
                cache_dir.join("calibration.json").display()
            );
            c.clone()
        }
        None => {
            let c = calibrate(&setup, &expert)?;
            cache.insert(key, c.clone())?;
            c
        }
    };
    let (times, link) = (calibration.compute, calibration.link_bytes_per_sec);
    println!(
        "backend={} latent={latent}x{latent} batch=2 model={total} units_timed={} link_gb_s={:.2}",
        B::name(&setup.device),
        times.len(),
        link as f64 / 1e9
    );
    let times = Arc::new(times);
    for pct in budgets {
        let budget = total.0 / 100 * pct;
        for &order in &orders {
            let request = expert(format!("cuda:0,{budget}b;cpu,*"), order)?;
            let loaded = setup.load(request, Lookahead::default(), Some(link), Some(&times))?;
            let predicted = loaded.plan.prediction().ok_or("no prediction")?;
            setup.pass(&loaded.model)?;
            let _ = loaded.model.streamer().take_stats();
            let mut measured: Vec<Duration> = (0..passes)
                .map(|_| setup.pass(&loaded.model))
                .collect::<Result<_, _>>()?;
            let stats = loaded.model.streamer().take_stats();
            measured.sort();
            let median = measured[measured.len() / 2];
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            println!(
                "budget={pct}% order={order} resident={} predicted_ms={:.1} measured_ms={:.1} \
                 measured/predicted={:.3} predicted_stall_ms={:.1} measured_stall_ms={:.1}",
                loaded.plan.devices()[0].model_bytes,
                ms(predicted.step),
                ms(median),
                median.as_secs_f64() / predicted.step.as_secs_f64().max(1e-9),
                ms(predicted.stall),
                ms(stats.stall) / passes.max(1) as f64,
            );
        }
    }
    Ok(())
}

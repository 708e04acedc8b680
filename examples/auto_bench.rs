//! Placement that knows the clock, measured: a model at three compute budgets, each planned
//! in interleave, tail and auto order, every plan's predicted pass beside its measured one.
//! Models: the SD 1.5 UNet (the demo checkpoint's shapes, random fp16 weights; `--model
//! unet`, the default) or the offload benchmark's 24-layer stack (`--model stack`, fp16).
//!
//! ```text
//! cargo run --release --example auto_bench -- [--backend ndarray|wgpu|cuda] [--model unet|stack]
//!     [--latent 16] [--budgets 25,50,75] [--passes 3] [--orders interleave,tail,auto]
//! ```
//!
//! Calibration first, on the backend measured, once per device (cached in
//! `$DISTORCH_CACHE_DIR/calibration.json`, `CalibrationCache`): one resident pass profiled
//! unit by unit (`profile_units`, the device synchronized at every fetch) gives each unit's
//! compute time; the link depends on how transfers meet compute:
//! - a GPU uploading from the prefetch thread (CUDA): a timed upload of 256 MiB;
//! - ndarray with a core left to staging (`RAYON_NUM_THREADS` below the cores): one fully
//!   streamed, prefetched pass gives the prefetch thread's rate while compute runs (bytes it
//!   staged over the time it was busy) and the contention (what the pass lost beyond its
//!   stall, per GiB moved: staging shares memory and caches with the kernels);
//! - where transfers cannot overlap (wgpu uploads on the compute thread, ndarray on every
//!   core): what streaming adds to that pass, per byte. Streaming that adds nothing
//!   measurable (lavapipe) is taken as 1 ms a pass.
//!
//! Then per budget the three plans are loaded side by side and measured in rounds, each
//! round one pass of every plan in a rotated sequence (so that a drifting machine favours
//! none), after a warm-up pass each: one line per (budget, order) with the predicted pass,
//! the measured median, their ratio and the stalls.

#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use distorch::alloc::{DeviceInfo, PinPolicy, Plan};
use distorch::core::SafetensorsIndex;
use distorch::core::runtime::{Capabilities, DeviceMap, Lookahead, Streamer, WeightStore};
use distorch::models::load::calibration::{
    Calibration, CalibrationCache, calibrate_streamed, profile_units,
};
use distorch::models::load::{load_component, open_index, split};
use distorch::models::sd::demo::DemoModel;
use distorch::models::{ComponentOptions, Placement, Unet2dCondition, UnetConfig, UnetInput};
use distorch::{
    ByteSize, ComponentKind, DType, DeviceGraph, DeviceId, PlacementOrder, PlanRequest,
};

#[path = "common/blocks.rs"]
mod blocks;
#[path = "common/malloc.rs"]
mod malloc;
#[path = "common/random.rs"]
mod random;
#[path = "common/stack.rs"]
mod stack;

type Failure = Box<dyn std::error::Error>;

/// An environment variable's value, or "unset" (the benchmark's header records them).
fn env_or_unset(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| "unset".into())
}

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

/// What a calibration gives a load.
type Costs = Arc<Calibration>;

/// A model measured.
trait Subject<B: Backend> {
    /// Its file (fingerprinted in the calibration's key) and input (described there).
    fn key(&self) -> (&Path, String);
    /// Its bytes as the compute device holds them resident (the budgets' base).
    fn total(&self) -> Result<ByteSize, Failure>;
    /// Loaded under `request` with `lookahead` and, when calibrated, the costs.
    fn load<'a>(
        &'a self,
        request: PlanRequest,
        lookahead: Lookahead,
        costs: Option<&Costs>,
    ) -> Result<Box<dyn Run<B> + 'a>, Failure>;
}

/// One loaded model.
trait Run<B: Backend> {
    fn plan(&self) -> &Plan;
    fn streamer(&self) -> &Streamer<B>;
    /// One pass on fixed inputs, waited for.
    fn pass(&self) -> Result<Duration, Failure>;
}

/// The device graph the plans are made on: the compute device and the host, with the
/// calibrated link when there is one.
fn graph(costs: Option<&Costs>) -> Result<DeviceGraph, Failure> {
    let mut cpu = DeviceInfo::new(DeviceId::CPU, ByteSize::gib(64));
    if let Some(c) = costs {
        cpu = cpu.with_link(ByteSize(c.link_bytes_per_sec));
    }
    Ok(DeviceGraph::new(vec![
        DeviceInfo::new(DeviceId::cuda(0), ByteSize::gib(64)),
        cpu,
    ])?)
}

/// The SD 1.5 UNet at `latent`×`latent`, batch 2, 77 text tokens.
struct Unet<B: Backend> {
    path: PathBuf,
    index: SafetensorsIndex,
    config: UnetConfig,
    device: B::Device,
    latent: usize,
}

struct UnetRun<'a, B: Backend> {
    subject: &'a Unet<B>,
    loaded: distorch::models::Loaded<Unet2dCondition<B>>,
}

impl<B: Backend> Unet<B> {
    fn component(&self) -> Result<distorch::core::Component<'_>, Failure> {
        let parts = split(&self.index);
        Ok(parts
            .components
            .into_iter()
            .find(|c| c.kind == ComponentKind::Unet)
            .ok_or("no UNet in the demo checkpoint")?)
    }
}

impl<B: Backend> Subject<B> for Unet<B> {
    fn key(&self) -> (&Path, String) {
        let n = self.latent;
        (&self.path, format!("unet {n}x{n}x2"))
    }

    fn total(&self) -> Result<ByteSize, Failure> {
        let homes =
            distorch::core::Homes::new(distorch::core::runtime::device_rule::<B>(&self.device));
        Ok(
            distorch::core::units::inventory_with(&self.component()?, &homes)?
                .bytes_on(DeviceId::cuda(0), DeviceId::cuda(0)),
        )
    }

    fn load<'a>(
        &'a self,
        request: PlanRequest,
        lookahead: Lookahead,
        costs: Option<&Costs>,
    ) -> Result<Box<dyn Run<B> + 'a>, Failure> {
        let placement = Placement {
            request,
            devices: DeviceMap::new(self.device.clone()),
        };
        let mut options = ComponentOptions::new(graph(costs)?, placement);
        options.lookahead = lookahead;
        options.calibration = costs.cloned();
        let loaded = load_component(
            &self.index,
            &self.component()?,
            self.config.clone(),
            &options,
        )?;
        Ok(Box::new(UnetRun {
            subject: self,
            loaded,
        }))
    }
}

impl<B: Backend> Run<B> for UnetRun<'_, B> {
    fn plan(&self) -> &Plan {
        &self.loaded.plan
    }

    fn streamer(&self) -> &Streamer<B> {
        self.loaded.model.streamer()
    }

    fn pass(&self) -> Result<Duration, Failure> {
        let (n, device) = (self.subject.latent, &self.subject.device);
        let sample = random::values(1, 2 * 4 * n * n, 2.0);
        let context = random::values(2, 2 * 77 * 768, 2.0);
        let input = UnetInput::new(
            Tensor::from_data(TensorData::new(sample, [2, 4, n, n]), device),
            vec![500.0; 2],
            Tensor::from_data(TensorData::new(context, [2, 77, 768]), device),
        );
        let start = Instant::now();
        let out = self.loaded.model.forward(input)?;
        let _ = out.into_data();
        Ok(start.elapsed())
    }
}

/// The offload benchmark's 24 layers in fp16: convolutions at `latent`×`latent`, projections
/// on `latent`²/4 tokens, batch 2.
struct Stack<B: Backend> {
    path: PathBuf,
    index: SafetensorsIndex,
    device: B::Device,
    latent: usize,
}

struct StackRun<'a, B: Backend> {
    subject: &'a Stack<B>,
    plan: Plan,
    streamer: Streamer<B>,
}

impl<B: Backend> Stack<B> {
    fn inventory(&self) -> Result<distorch::alloc::Inventory, Failure> {
        let parts = split(&self.index);
        let homes =
            distorch::core::Homes::new(distorch::core::runtime::device_rule::<B>(&self.device));
        Ok(distorch::core::units::inventory_with(
            &parts.components[0],
            &homes,
        )?)
    }
}

impl<B: Backend> Subject<B> for Stack<B> {
    fn key(&self) -> (&Path, String) {
        let n = self.latent;
        (&self.path, format!("stack {n}x{n}x2"))
    }

    fn total(&self) -> Result<ByteSize, Failure> {
        Ok(self
            .inventory()?
            .bytes_on(DeviceId::cuda(0), DeviceId::cuda(0)))
    }

    fn load<'a>(
        &'a self,
        request: PlanRequest,
        lookahead: Lookahead,
        costs: Option<&Costs>,
    ) -> Result<Box<dyn Run<B> + 'a>, Failure> {
        let mut inventory = self.inventory()?;
        let mut request = request.with_pin(PinPolicy {
            tiny_threshold: ByteSize(0),
            ..PinPolicy::default()
        });
        let contention = costs.map_or(Duration::ZERO, |c| c.contention);
        request.staging = lookahead.staging::<B>(&self.device, contention);
        if let Some(c) = costs {
            inventory = c.timed(inventory);
        }
        let plan = distorch::plan(&request, &inventory, &graph(costs)?)?;
        let parts = split(&self.index);
        let devices = DeviceMap::new(self.device.clone());
        let (store, _) = WeightStore::<B>::load(
            &self.index,
            &parts.components[0],
            &plan,
            &devices,
            &Default::default(),
        )?;
        Ok(Box::new(StackRun {
            subject: self,
            plan,
            streamer: Streamer::new(Arc::new(store), lookahead),
        }))
    }
}

impl<B: Backend> Run<B> for StackRun<'_, B> {
    fn plan(&self) -> &Plan {
        &self.plan
    }

    fn streamer(&self) -> &Streamer<B> {
        &self.streamer
    }

    fn pass(&self) -> Result<Duration, Failure> {
        let (n, device) = (self.subject.latent, &self.subject.device);
        let tokens = (n * n / 4).max(1);
        let c = stack::CONV;
        let x = Tensor::<B, 1>::from_data(
            TensorData::new(random::values(7, 2 * c * n * n, 1.0), [2 * c * n * n]),
            device,
        )
        .reshape([2, c, n, n]);
        let d = stack::DIM;
        let y = Tensor::<B, 1>::from_data(
            TensorData::new(random::values(8, 2 * tokens * d, 1.0), [2 * tokens * d]),
            device,
        )
        .reshape([2 * tokens, d]);
        let start = Instant::now();
        let (x, y) = stack::forward(&self.streamer, x, y);
        let _ = (x.sum() + y.sum()).into_data();
        Ok(start.elapsed())
    }
}

fn expert(s: String, order: PlacementOrder) -> Result<PlanRequest, Failure> {
    Ok(PlanRequest::expert_with_compute(s.parse()?, DeviceId::cuda(0)).with_order(order))
}

/// Measures the units (a resident pass, profiled) and the link (module docs).
fn calibrate<B: Backend>(
    subject: &dyn Subject<B>,
    device: &B::Device,
) -> Result<Calibration, Failure> {
    let as_input = |e: Failure| distorch::models::Error::Input {
        input: "pass",
        reason: e.to_string(),
    };
    let resident = subject.load(
        expert("cuda:0,*".into(), PlacementOrder::Interleave)?,
        Lookahead::default(),
        None,
    )?;
    let compute = profile_units(resident.streamer(), || {
        resident.pass().map(|_| ()).map_err(as_input)
    })?;
    drop(resident);
    let streamed = subject.load(
        expert("cuda:0,0b;cpu,*".into(), PlacementOrder::Interleave)?,
        Lookahead::default(),
        None,
    )?;
    let (c, full) = calibrate_streamed(device, compute, streamed.streamer(), || {
        streamed.pass().map(|_| ()).map_err(as_input)
    })?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "calibration: backend={} resident_pass_ms={:.1} streamed_pass_ms={:.1} units_timed={} \
         overlap={} link_gb_s={:.2} contention_ms_per_gib={:.1} streamed_stall_ms={:.1} \
         staging_busy_ms={:.1}",
        B::name(device),
        ms(c.compute.values().sum()),
        ms(full.time),
        c.compute.len(),
        Capabilities::of::<B>(device).transfers_overlap,
        c.link_bytes_per_sec as f64 / 1e9,
        ms(c.contention),
        ms(full.stats.stall),
        ms(full.stats.staging_busy),
    );
    Ok(c)
}

fn bench<B: Backend>(device: B::Device) -> Result<(), Failure> {
    let latent: usize = arg("--latent").map_or(Ok(16), |s| s.parse())?;
    let passes: usize = arg("--passes").map_or(Ok(3), |s| s.parse())?;
    let budgets: Vec<u64> = arg("--budgets")
        .unwrap_or_else(|| "25,50,75".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let orders: Vec<PlacementOrder> = arg("--orders")
        .unwrap_or_else(|| "interleave,tail,auto".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let cache_dir = std::env::var_os("DISTORCH_CACHE_DIR")
        .map_or_else(|| std::env::temp_dir().join("distorch"), PathBuf::from);
    let subject: Box<dyn Subject<B>> = match arg("--model").as_deref().unwrap_or("unet") {
        "unet" => {
            let path = DemoModel::Sd15.ensure_random_in(&cache_dir)?;
            let index = open_index(&path)?;
            let parts = split(&index);
            let c = parts
                .components
                .iter()
                .find(|c| c.kind == ComponentKind::Unet)
                .ok_or("no UNet")?;
            let config = UnetConfig::detect(c)?.config;
            Box::new(Unet::<B> {
                path: path.clone(),
                index,
                config,
                device: device.clone(),
                latent,
            })
        }
        "stack" => {
            std::fs::create_dir_all(&cache_dir)?;
            let path = cache_dir.join("auto-bench-stack-f16.safetensors");
            stack::write_model(&path, DType::F16)?;
            let index = SafetensorsIndex::open(&path)?;
            Box::new(Stack::<B> {
                path,
                index,
                device: device.clone(),
                latent,
            })
        }
        other => return Err(format!("--model {other}: unet or stack").into()),
    };
    let total = subject.total()?;

    let (file, input) = subject.key();
    let key = CalibrationCache::key::<B>(&device, file, &input);
    let mut cache = CalibrationCache::open(cache_dir.join("calibration.json"))?;
    let calibration = match cache.get(&key) {
        Some(c) => {
            println!("calibration: cached ({key})");
            c.clone()
        }
        None => {
            let c = calibrate(subject.as_ref(), &device)?;
            cache.insert(key, c.clone())?;
            c
        }
    };
    let costs: Costs = Arc::new(calibration);
    println!(
        "backend={} model={input} bytes={total} units_timed={} transfers_timed={} \
         link_gb_s={:.2} contention_ms_per_gib={:.1} RAYON_NUM_THREADS={} LP_NUM_THREADS={}",
        B::name(&device),
        costs.compute.len(),
        costs.transfer.len(),
        costs.link_bytes_per_sec as f64 / 1e9,
        costs.contention.as_secs_f64() * 1e3,
        env_or_unset("RAYON_NUM_THREADS"),
        env_or_unset("LP_NUM_THREADS"),
    );
    for pct in budgets {
        let budget = total.0 / 100 * pct;
        let runs: Vec<Box<dyn Run<B> + '_>> = orders
            .iter()
            .map(|&o| {
                let request = expert(format!("cuda:0,{budget}b;cpu,*"), o)?;
                subject.load(request, Lookahead::default(), Some(&costs))
            })
            .collect::<Result<_, _>>()?;
        measure(pct, &orders, &runs, passes)?;
    }
    Ok(())
}

/// Measures `runs` (one per order) in rounds and prints a line per order.
fn measure<B: Backend>(
    pct: u64,
    orders: &[PlacementOrder],
    runs: &[Box<dyn Run<B> + '_>],
    passes: usize,
) -> Result<(), Failure> {
    for r in runs {
        r.pass()?;
        let _ = r.streamer().take_stats();
    }
    let mut times = vec![Vec::new(); runs.len()];
    let mut stalls = vec![Duration::ZERO; runs.len()];
    let mut busy = vec![Duration::ZERO; runs.len()];
    for round in 0..passes {
        for k in 0..runs.len() {
            let i = (k + round) % runs.len();
            times[i].push(runs[i].pass()?);
            let stats = runs[i].streamer().take_stats();
            stalls[i] += stats.stall;
            busy[i] += stats.staging_busy;
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for (i, r) in runs.iter().enumerate() {
        let predicted = r.plan().prediction().ok_or("no prediction")?;
        times[i].sort();
        let median = times[i][times[i].len() / 2];
        let per = passes.max(1) as f64;
        println!(
            "budget={pct}% order={} resident={} predicted_ms={:.1} measured_ms={:.1} \
             measured/predicted={:.3} predicted_stall_ms={:.1} measured_stall_ms={:.1} \
             staging_busy_ms={:.1} spread_ms={:.1}..{:.1}",
            orders[i],
            r.plan().devices()[0].model_bytes,
            ms(predicted.step),
            ms(median),
            median.as_secs_f64() / predicted.step.as_secs_f64().max(1e-9),
            ms(predicted.stall),
            ms(stalls[i]) / per,
            ms(busy[i]) / per,
            ms(times[i][0]),
            ms(times[i][times[i].len() - 1]),
        );
    }
    Ok(())
}

//! Loading one model, planned and placed: the [`Model`] trait every model implements, and
//! [`load_model`] / [`load_component`], the loaders of one component (a file, a diffusers
//! folder or one component of a checkpoint), and [`load_cached`], the same through the
//! shared model cache with `eject_models` semantics.

pub mod calibration;
pub(crate) mod config;
mod context;
mod conventions;
pub mod discovery;
pub(crate) mod folder;
pub mod gguf;
pub(crate) mod keymap;
mod pipelines;
mod placement;
pub(crate) mod shapes;

pub use context::LoadContext;
pub use conventions::{CONVENTIONS, inventory_for, split};
pub use gguf::open_index;
pub(crate) use pipelines::CachedLoad;
pub use placement::{BindDevice, Placement, PlacementSpec};
pub(crate) use shapes::{
    both_names, needs_config, own_modules, shape_map, to_usize, units_in_order,
};

use std::any::Any;
use std::path::Path;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use distorch_alloc::{ByteSize, DeviceGraph, Plan};
use distorch_core::runtime::{
    EjectPolicy, LoadOptions, LoadReport, Lookahead, ModelCache, PatchPrecision, Streamer,
    device_rule, supports_compute,
};
use distorch_core::{Component, ComponentKind, ComputeDtype, Homes, SafetensorsIndex, units};

use distorch_core::runtime::WeightPatch;
use distorch_lora::{LoraFile, LoraPatch, LoraReport, ModelTensor, Target};

use crate::error::Error;
use crate::load::folder::ComponentFiles;

/// A model the loaders can plan and place.
pub trait Model<B: Backend>: Sized {
    /// Its configuration.
    type Config: Clone + std::fmt::Debug;
    /// The component of a checkpoint it is.
    const KIND: ComponentKind;
    /// The configuration in a diffusers/transformers `config.json`.
    fn config_from_file(path: &Path) -> Result<Self::Config, Error>;
    /// The configuration read from the component's keys and shapes (single-file layouts).
    fn detect_config(component: &Component<'_>) -> Result<Self::Config, Error>;
    /// Its units in the order a forward pass uses them, for the planner and the streamer.
    fn execution_order(
        config: &Self::Config,
        component: &Component<'_>,
    ) -> Result<Vec<String>, Error>;
    /// The component's tensors with the module names LoRAs may use for them: by default
    /// each tensor's own module (the file's layout); models whose file layout differs from
    /// their own naming add the latter.
    fn lora_tensors(
        config: &Self::Config,
        component: &Component<'_>,
    ) -> Result<Vec<ModelTensor>, Error> {
        let _ = config;
        Ok(own_modules(component))
    }
    /// The streamer its weights are fetched through (re-patched by
    /// [`Loaded::set_loras`]).
    fn streamer(&self) -> &Streamer<B>;
    /// Loads the component's weights where the context's plan puts them, every key and
    /// shape checked against `config` first.
    fn load(ctx: &LoadContext<'_, B>, config: Self::Config) -> Result<(Self, LoadReport), Error>;
}

/// A model with the plan it was placed by and its load report.
pub struct Loaded<M> {
    /// The model.
    pub model: M,
    /// Where its units went.
    pub plan: Plan,
    /// What loading found and did.
    pub report: LoadReport,
    /// What the LoRAs matched (empty without LoRAs).
    pub lora: LoraReport,
    /// The tensors as LoRAs name them and the keys patched now, for [`Loaded::set_loras`].
    pub(crate) lora_state: LoraState,
}

impl<M> Loaded<M> {
    /// Replaces the model's LoRAs (other strengths, other files, or none: an empty
    /// `loras.files`) without reloading it: only the tensors the old or the new LoRAs touch
    /// are read again from the weights file — pristine — patched and put back at their
    /// homes ([`Streamer::repatch`]); every other tensor stays where it is. Setting the
    /// strengths back to 0 or removing the LoRAs restores the original weights exactly.
    /// The new LoRAs are mapped and checked before anything changes; on error the model
    /// keeps its current weights. Returns what re-patching read and patched.
    pub fn set_loras<B: Backend>(&mut self, loras: &ComponentLoras) -> Result<LoadReport, Error>
    where
        M: Model<B>,
    {
        let (report, load) = self.lora_state.set(self.model.streamer(), loras)?;
        self.lora = report;
        Ok(load)
    }
}

/// What a loaded component needs to change its LoRAs later.
#[derive(Debug, Clone, Default)]
pub(crate) struct LoraState {
    /// Its tensors with the module names LoRAs use.
    tensors: Vec<ModelTensor>,
    /// The keys the current LoRAs patch.
    patched: Vec<String>,
}

/// LoRAs mapped onto a component and checked, not applied yet.
pub(crate) struct PreparedLoras {
    patch: LoraPatch,
    report: LoraReport,
    keys: Vec<String>,
}

impl LoraState {
    /// Maps `loras` and re-patches what the old and the new LoRAs touch.
    pub(crate) fn set<B: Backend>(
        &mut self,
        streamer: &Streamer<B>,
        loras: &ComponentLoras,
    ) -> Result<(LoraReport, LoadReport), Error> {
        let prepared = self.prepare(loras)?;
        self.apply(streamer, prepared)
    }

    /// Maps and checks `loras` against the component, changing nothing.
    pub(crate) fn prepare(&self, loras: &ComponentLoras) -> Result<PreparedLoras, Error> {
        let files: Vec<(&LoraFile, f32)> = loras.files.iter().map(|(f, s)| (&**f, *s)).collect();
        let (patch, report) = LoraPatch::build(&files, loras.target, &self.tensors)?;
        let mut keys: Vec<String> = self.patched.clone();
        keys.extend(patch.keys().map(str::to_owned));
        keys.sort();
        keys.dedup();
        Ok(PreparedLoras {
            patch,
            report,
            keys,
        })
    }

    /// Re-patches the tensors `prepared` touches.
    pub(crate) fn apply<B: Backend>(
        &mut self,
        streamer: &Streamer<B>,
        prepared: PreparedLoras,
    ) -> Result<(LoraReport, LoadReport), Error> {
        let PreparedLoras {
            patch,
            report,
            keys,
        } = prepared;
        let load = streamer.repatch(
            (!patch.is_empty()).then_some(&patch as &dyn WeightPatch<B>),
            &keys,
        )?;
        self.patched = patch.keys().map(str::to_owned).collect();
        tracing::info!(tensors = keys.len(), "LoRAs changed");
        Ok((report, load))
    }
}

/// LoRAs for one component: files with their strengths, and which component of theirs
/// applies (the denoiser, or text encoder N).
#[derive(Debug, Clone)]
pub struct ComponentLoras {
    /// The LoRAs and their strengths, applied in order.
    pub files: Vec<(Arc<LoraFile>, f32)>,
    /// Their modules for this component.
    pub target: Target,
}

/// A load-progress callback: called with the file bytes of each tensor as it is placed.
#[derive(Clone)]
pub struct LoadProgress(pub Arc<dyn Fn(u64) + Send + Sync>);

impl std::fmt::Debug for LoadProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoadProgress(..)")
    }
}

/// How one component is loaded.
#[derive(Debug, Clone)]
pub struct ComponentOptions<B: Backend> {
    /// The devices plans may use.
    pub graph: DeviceGraph,
    /// The allocation and the Burn devices.
    pub placement: Placement<B>,
    /// Staging look-ahead of the streamer.
    pub lookahead: Lookahead,
    /// Check weights for NaN/inf while loading.
    pub check_finite: bool,
    /// Told the bytes of each tensor placed.
    pub progress: Option<LoadProgress>,
    /// LoRAs patched into the weights while they load (Load-Patch-Distribute).
    pub loras: Option<ComponentLoras>,
    /// How LoRA-patched tensors of fp8 models are stored: bf16 (`PatchPrecision::High`, the
    /// default: DisTorch2's `high_precision_loras = true`) or fp8 again by seeded stochastic
    /// rounding.
    pub precision: PatchPrecision,
    /// The dtype the forward pass computes in: `Some` of f32 (the default), f16 or bf16, or
    /// `None` for the component's own half type ([`ComputeDtype::half_of`] its storage
    /// dtype) where the compute device computes in it, else f32. A dtype the device cannot
    /// compute in is refused before any weight is read
    /// ([`distorch_core::Error::UnsupportedComputeDtype`]).
    pub dtype: Option<ComputeDtype>,
    /// What this device computes and moves for this model at the input size planned for,
    /// measured ([`calibration::Calibration`]: each unit's compute time, each streamed unit's
    /// transfer where staging is host work, the contention staging causes): the plan then
    /// predicts the pass and `PlacementOrder::Auto` can weigh transfers against compute.
    /// Declare the calibration's link on the donor in the device graph (`cpu=64gib@2.2gb/s`);
    /// units without a measured transfer take their bytes over it.
    pub calibration: Option<Arc<calibration::Calibration>>,
}

impl<B: Backend> ComponentOptions<B> {
    /// `placement` on `graph`, default look-ahead, finite checks on, computing in f32.
    pub fn new(graph: DeviceGraph, placement: Placement<B>) -> ComponentOptions<B> {
        ComponentOptions {
            graph,
            placement,
            lookahead: Lookahead::default(),
            check_finite: true,
            progress: None,
            loras: None,
            precision: PatchPrecision::High,
            dtype: Some(ComputeDtype::F32),
            calibration: None,
        }
    }
}

/// The dtype `component` computes in under `options` (see [`ComponentOptions::dtype`]).
pub fn compute_dtype<B: Backend>(
    component: &Component<'_>,
    options: &ComponentOptions<B>,
) -> ComputeDtype {
    if let Some(d) = options.dtype {
        return d;
    }
    let storage = component.storage_dtype();
    let own = ComputeDtype::half_of(storage);
    // Stable Diffusion VAEs overflow in f16; diffusers upcasts them (`force_upcast`).
    let own = if component.kind == ComponentKind::Vae && own == ComputeDtype::F16 {
        ComputeDtype::F32
    } else {
        own
    };
    let device = options.placement.devices.compute();
    let chosen = if supports_compute::<B>(device, own) {
        own
    } else {
        ComputeDtype::F32
    };
    tracing::info!(
        component = component.kind.name(),
        storage = %storage,
        compute = %chosen,
        "compute dtype (the component's own half type where the device computes in it; \
         set ComponentOptions::dtype to choose)"
    );
    chosen
}

/// Loads one model of kind `M` from `path`: a diffusers/transformers component folder
/// (weights and `config.json`, sharded or not), a one-component `.safetensors` file or shard
/// index, or a checkpoint holding one such component. `config` overrides what the folder's
/// `config.json` or the file's shapes say.
pub fn load_model<B: Backend, M: Model<B>>(
    path: impl AsRef<Path>,
    config: Option<M::Config>,
    options: &ComponentOptions<B>,
) -> Result<Loaded<M>, Error> {
    let (index, config_file) = open(path.as_ref())?;
    let c = pick::<B, M>(&index)?;
    let config = resolve::<B, M>(&c, config, config_file)?;
    load_component(&index, &c, config, options)
}

/// The weights index of a folder or file, and the folder's `config.json`.
fn open(path: &Path) -> Result<(SafetensorsIndex, Option<std::path::PathBuf>), Error> {
    let (weights, config_file) = if path.is_dir() {
        let files = ComponentFiles::find(path)?;
        (files.weights, Some(files.config))
    } else {
        (path.to_path_buf(), None)
    };
    Ok((gguf::open_index(&weights)?, config_file))
}

/// The component of kind `M::KIND` in the file (or its only, unrecognised one).
fn pick<'a, B: Backend, M: Model<B>>(index: &'a SafetensorsIndex) -> Result<Component<'a>, Error> {
    let split = crate::load::split(index);
    match (
        split.components.iter().find(|c| c.kind == M::KIND),
        split.components.as_slice(),
    ) {
        (Some(c), _) => Ok(c.clone()),
        (None, [only]) if only.kind == ComponentKind::Model => Ok(only.clone()),
        _ => Err(Error::MissingComponent {
            file: index.path().to_path_buf(),
            kind: M::KIND,
            hint: "",
        }),
    }
}

/// The configuration given, else the folder's `config.json`, else detected from shapes.
fn resolve<B: Backend, M: Model<B>>(
    c: &Component<'_>,
    config: Option<M::Config>,
    config_file: Option<std::path::PathBuf>,
) -> Result<M::Config, Error> {
    match (config, config_file) {
        (Some(c), _) => Ok(c),
        (None, Some(f)) if f.is_file() => M::config_from_file(&f),
        (None, _) => M::detect_config(c),
    }
}

/// Models of every kind the loaders keep loaded, with DisTorch2's `eject_models` semantics
/// (see [`ModelCache`]).
pub type Models = ModelCache<dyn Any + Send + Sync>;

/// [`load_model`] through `cache`: the model already loaded from the same, unchanged file
/// with the same configuration, allocation, compute dtype and LoRAs is shared (see
/// `cache_key`); otherwise, before anything is read, `eject` makes room on the
/// compute device — `EjectAll` (the loaders' `eject_models = true`) unloads every cached model
/// holding weights there, `EvictLeastRecentlyUsed` only as many as the new model's resident
/// bytes need — against the compute device's free memory in `options.graph` (cached models
/// included). A model that cannot fit even then is an error and nothing is loaded.
pub fn load_cached<B, M>(
    cache: &mut Models,
    path: impl AsRef<Path>,
    config: Option<M::Config>,
    options: &ComponentOptions<B>,
    eject: EjectPolicy,
) -> Result<Arc<M>, Error>
where
    B: Backend,
    M: Model<B> + Send + Sync + 'static,
{
    let path = path.as_ref();
    let id = cache_key::<B, M>(path, config.as_ref(), options);
    if let Some(hit) = cache.get(&id).and_then(|m| m.downcast::<M>().ok()) {
        tracing::debug!(model = id.as_str(), "cached");
        return Ok(hit);
    }
    let (index, config_file) = open(path)?;
    let c = pick::<B, M>(&index)?;
    let config = resolve::<B, M>(&c, config, config_file)?;
    let lora = component_patch::<B, M>(&config, &c, options)?;
    let dtype = compute_dtype(&c, options);
    let plan = plan::<B, M>(&c, &config, options, &lora.0, dtype)?;
    let compute = plan.compute();
    let needed = plan
        .devices()
        .iter()
        .find(|r| r.device == compute)
        .map_or(ByteSize(0), |r| r.model_bytes);
    let capacity = options.graph.get(compute).map_or(ByteSize(0), |d| d.free);
    cache.make_room(compute, needed, capacity, eject)?;
    let loaded = place::<B, M>(&index, &c, plan, dtype, config, options, lora)?;
    let model = Arc::new(loaded.model);
    cache.insert(id, model.clone(), &loaded.report.bytes_per_device);
    Ok(model)
}

/// `path` with its size and modification time (`path@len+mtime`, or `path@missing`): what a
/// cache key holds of a file so that a changed file is another entry.
pub(crate) fn file_stamp(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) => {
            let modified = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            format!("{}@{}+{modified}", path.display(), m.len())
        }
        Err(_) => format!("{}@missing", path.display()),
    }
}

/// The cache's key for model `M` from `path` under `options`: everything that changes the
/// weights or where they are — the component, the file and its fingerprint (size and
/// modification time, the folder's `config.json` too), the configuration given, the
/// placement, the compute dtype, the LoRAs with their files' fingerprints, strengths and
/// target, and how patched fp8 weights are kept. The same model loaded with other LoRAs is
/// another entry.
pub(crate) fn cache_key<B: Backend, M: Model<B>>(
    path: &Path,
    config: Option<&M::Config>,
    options: &ComponentOptions<B>,
) -> String {
    let mut key = format!("{}:{}", M::KIND, file_stamp(path));
    if path.is_dir() {
        let files = ComponentFiles::find(path)
            .map(|f| format!("{}|{}", file_stamp(&f.weights), file_stamp(&f.config)))
            .unwrap_or_default();
        key.push_str(&format!("|{files}"));
    }
    let loras: Vec<String> = options
        .loras
        .iter()
        .flat_map(|l| {
            l.files
                .iter()
                .map(move |(f, s)| format!("{}*{s}@{}", file_stamp(f.path()), l.target))
        })
        .collect();
    // A calibration changes where `PlacementOrder::Auto` puts units: a fingerprint of it.
    let times = options.calibration.as_ref().map(|c| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&**c, &mut h);
        std::hash::Hasher::finish(&h)
    });
    format!(
        "{key}:config={config:?}:{:?}:{:?}:loras=[{}]:{:?}:calibration={times:?}:{:?}",
        options.placement.request,
        options.dtype,
        loras.join(","),
        options.precision,
        options.lookahead,
    )
}

/// Plans and loads one component of an opened file with a known configuration (the step
/// every loader ends with; pick the component with `distorch_core::components::split` or
/// [`crate::text_encoders`]).
pub fn load_component<B: Backend, M: Model<B>>(
    index: &SafetensorsIndex,
    component: &Component<'_>,
    config: M::Config,
    options: &ComponentOptions<B>,
) -> Result<Loaded<M>, Error> {
    let lora = component_patch::<B, M>(&config, component, options)?;
    let dtype = compute_dtype(component, options);
    let plan = plan::<B, M>(component, &config, options, &lora.0, dtype)?;
    place(index, component, plan, dtype, config, options, lora)
}

/// The component's LoRA patch (empty without LoRAs), what it matched, and the tensors as
/// LoRAs name them: built before planning, since patched fp8 tensors change size.
fn component_patch<B: Backend, M: Model<B>>(
    config: &M::Config,
    component: &Component<'_>,
    options: &ComponentOptions<B>,
) -> Result<(LoraPatch, LoraReport, Vec<ModelTensor>), Error> {
    let tensors = M::lora_tensors(config, component)?;
    let (patch, report) = match &options.loras {
        Some(l) => {
            let files: Vec<(&LoraFile, f32)> = l.files.iter().map(|(f, s)| (&**f, *s)).collect();
            LoraPatch::build(&files, l.target, &tensors)?
        }
        None => (LoraPatch::default(), LoraReport::default()),
    };
    Ok((patch, report, tensors))
}

/// The component's plan: its inventory as this backend will hold it (the compute device's
/// [`device_rule`](distorch_core::runtime::device_rule), the tensors the LoRAs change) in the
/// model's execution order, then the placement's request.
fn plan<B: Backend, M: Model<B>>(
    component: &Component<'_>,
    config: &M::Config,
    options: &ComponentOptions<B>,
    patch: &LoraPatch,
    dtype: ComputeDtype,
) -> Result<Plan, Error> {
    let order = M::execution_order(config, component)?;
    // The same predicate loading checks the plan with.
    let changed = |key: &str| WeightPatch::<B>::applies_to(patch, key);
    let homes = Homes {
        device: device_rule::<B>(options.placement.devices.compute()),
        compute: dtype,
        changed: Some(&changed),
        fp8_changed: options.precision.fp8_changed(),
    };
    let mut inventory = units::inventory_with(component, &homes)?.in_order(&order);
    if let Some(c) = &options.calibration {
        inventory = c.timed(inventory);
    }
    // Predictions and `PlacementOrder::Auto` see the streamer this component will have.
    let mut request = options.placement.request.clone();
    let device = options.placement.devices.compute();
    let contention = options
        .calibration
        .as_ref()
        .map_or(std::time::Duration::ZERO, |c| c.contention);
    request.staging = options.lookahead.staging::<B>(device, contention);
    Ok(distorch_alloc::plan(&request, &inventory, &options.graph)?)
}

/// Loads the component where `plan` puts it, computing in `dtype`, with its LoRA patch.
fn place<B: Backend, M: Model<B>>(
    index: &SafetensorsIndex,
    component: &Component<'_>,
    plan: Plan,
    dtype: ComputeDtype,
    config: M::Config,
    options: &ComponentOptions<B>,
    (patch, lora, tensors): (LoraPatch, LoraReport, Vec<ModelTensor>),
) -> Result<Loaded<M>, Error> {
    let progress = options.progress.as_ref().map(|p| Arc::clone(&p.0));
    let tick = |bytes: u64| {
        if let Some(p) = &progress {
            p(bytes);
        }
    };
    let load = LoadOptions {
        check_finite: options.check_finite,
        progress: Some(&tick),
        patch: (!patch.is_empty()).then_some(&patch as &dyn WeightPatch<B>),
        precision: options.precision,
        compute: dtype,
        ..LoadOptions::default()
    };
    let ctx = LoadContext {
        index,
        component,
        plan: &plan,
        devices: &options.placement.devices,
        options: &load,
        lookahead: options.lookahead,
    };
    let (model, report) = M::load(&ctx, config)?;
    let lora_state = LoraState {
        tensors,
        patched: patch.keys().map(str::to_owned).collect(),
    };
    Ok(Loaded {
        model,
        plan,
        report,
        lora,
        lora_state,
    })
}

/// Maps `loras` (each with its strength) onto `component` as model `M` of `config` sees
/// it: the patch and what matched. The loaders do this for [`ComponentOptions::loras`].
pub fn lora_patch<B: Backend, M: Model<B>>(
    component: &Component<'_>,
    config: &M::Config,
    loras: &[(&LoraFile, f32)],
    target: Target,
) -> Result<(LoraPatch, LoraReport), Error> {
    let tensors = M::lora_tensors(config, component)?;
    Ok(LoraPatch::build(loras, target, &tensors)?)
}

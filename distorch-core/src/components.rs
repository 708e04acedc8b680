//! Splitting a weights file into model components (UNet, CLIP, VAE, ...) by key prefix.

use std::fmt;
use std::str::FromStr;

use crate::safetensors::{SafetensorsIndex, TensorInfo};

/// A model component, as a loader sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum ComponentKind {
    /// The denoiser (UNet or DiT).
    Unet,
    /// The text encoder(s): CLIP-L, OpenCLIP-G (both, for SDXL).
    Clip,
    /// The autoencoder.
    Vae,
    /// A ControlNet.
    ControlNet,
    /// A CLIP vision encoder.
    ClipVision,
    /// A file of one component that matches none of the above (e.g. a DiT or T5 file).
    Model,
}

impl ComponentKind {
    /// Every kind.
    pub const ALL: [ComponentKind; 6] = [
        ComponentKind::Unet,
        ComponentKind::Clip,
        ComponentKind::Vae,
        ComponentKind::ControlNet,
        ComponentKind::ClipVision,
        ComponentKind::Model,
    ];

    /// Lower-case name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ComponentKind::Unet => "unet",
            ComponentKind::Clip => "clip",
            ComponentKind::Vae => "vae",
            ComponentKind::ControlNet => "controlnet",
            ComponentKind::ClipVision => "clip-vision",
            ComponentKind::Model => "model",
        }
    }
}

impl fmt::Display for ComponentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ComponentKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        ComponentKind::ALL
            .into_iter()
            .find(|k| k.name() == lower)
            .ok_or_else(|| crate::Error::UnknownComponent { name: s.to_owned() })
    }
}

/// What a family of weight files looks like, for splitting a file into components and
/// approximating execution order before a model declares its own. distorch-core knows no
/// model: the model crate gives these (`distorch_models::load::CONVENTIONS` for the families
/// it knows); [`Conventions::NONE`] knows nothing — a file is one [`ComponentKind::Model`],
/// units run in natural name order and none is an embedding table.
#[derive(Debug, Clone, Copy)]
pub struct Conventions {
    /// Key prefixes of multi-component (single-file checkpoint) layouts and the component
    /// each starts, longest first.
    pub prefixes: &'static [(&'static str, ComponentKind)],
    /// The component a file without those prefixes is, from its tensors.
    pub classify: fn(&[TensorInfo]) -> ComponentKind,
    /// Key segments in the order their layers run (others sort after them, by name).
    pub segment_order: &'static [&'static str],
    /// Last segments of unit names that are embedding tables.
    pub embeddings: &'static [&'static str],
}

impl Conventions {
    /// No knowledge of any model.
    pub const NONE: Conventions = Conventions {
        prefixes: &[],
        classify: |_| ComponentKind::Model,
        segment_order: &[],
        embeddings: &[],
    };
}

impl PartialEq for Conventions {
    /// Equal when they hold the same tables (the classifier is not compared).
    fn eq(&self, other: &Conventions) -> bool {
        self.prefixes == other.prefixes
            && self.segment_order == other.segment_order
            && self.embeddings == other.embeddings
    }
}

impl Eq for Conventions {}

/// The tensors of one component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component<'a> {
    /// Which component.
    pub kind: ComponentKind,
    /// The key prefix stripped from its tensors' names (empty for a one-component file).
    pub prefix: &'static str,
    /// Its tensors, in file order.
    pub tensors: Vec<&'a TensorInfo>,
    /// The conventions it was split by (its units' order and kinds follow them).
    pub conventions: &'static Conventions,
}

impl Component<'_> {
    /// A tensor's key within the component: its name without the component's prefix.
    pub fn local<'t>(&self, tensor: &'t TensorInfo) -> &'t str {
        tensor
            .name
            .strip_prefix(self.prefix)
            .unwrap_or(&tensor.name)
    }

    /// The keys of its tensors within the component, in file order.
    pub fn local_names(&self) -> impl Iterator<Item = &str> + Clone + '_ {
        self.tensors.iter().map(|t| self.local(t))
    }

    /// Bytes of its tensors.
    pub fn bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes).sum()
    }

    /// The float dtype holding most of its bytes (its storage dtype; f32 when it has no
    /// float tensors).
    pub fn storage_dtype(&self) -> crate::DType {
        let mut bytes: Vec<(crate::DType, u64)> = Vec::new();
        for t in self.tensors.iter().filter(|t| t.dtype.is_float()) {
            match bytes.iter_mut().find(|(d, _)| *d == t.dtype) {
                Some((_, b)) => *b += t.bytes,
                None => bytes.push((t.dtype, t.bytes)),
            }
        }
        bytes
            .into_iter()
            .max_by_key(|&(_, b)| b)
            .map_or(crate::DType::F32, |(d, _)| d)
    }
}

/// A file split into components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split<'a> {
    /// Components found, in [`ComponentKind`] order.
    pub components: Vec<Component<'a>>,
    /// Tensors that belong to no component (e.g. `alphas_cumprod`, `model_ema.*`).
    pub other: Vec<&'a TensorInfo>,
}

/// Splits a file's tensors into components by `conventions`.
///
/// A file with any of the conventions' prefixes is split by them and the rest is `other`. A
/// file without them is one component, of the kind the conventions' classifier says.
pub fn split<'a>(index: &'a SafetensorsIndex, conventions: &'static Conventions) -> Split<'a> {
    let tensors = index.tensors();
    let prefix_of = |name: &str| {
        conventions
            .prefixes
            .iter()
            .find(|(p, _)| name.starts_with(p))
            .copied()
    };
    let prefixed = tensors.iter().any(|t| prefix_of(&t.name).is_some());
    if !prefixed {
        let kind = (conventions.classify)(tensors);
        let components = if tensors.is_empty() {
            Vec::new()
        } else {
            vec![Component {
                kind,
                prefix: "",
                tensors: tensors.iter().collect(),
                conventions,
            }]
        };
        return Split {
            components,
            other: Vec::new(),
        };
    }
    let mut components: Vec<Component<'_>> = Vec::new();
    let mut other = Vec::new();
    for t in tensors {
        match prefix_of(&t.name) {
            Some((prefix, kind)) => match components.iter_mut().find(|c| c.kind == kind) {
                Some(c) => c.tensors.push(t),
                None => components.push(Component {
                    kind,
                    prefix,
                    tensors: vec![t],
                    conventions,
                }),
            },
            None => other.push(t),
        }
    }
    components.sort_by_key(|c| c.kind);
    Split { components, other }
}

/// The planner's inventory for one component of a file, or
/// [`Error::ComponentNotFound`](crate::Error::ComponentNotFound) listing the components that
/// are there.
pub fn inventory_for(
    index: &SafetensorsIndex,
    conventions: &'static Conventions,
    kind: ComponentKind,
) -> Result<distorch_alloc::Inventory, crate::Error> {
    let split = split(index, conventions);
    match split.components.iter().find(|c| c.kind == kind) {
        Some(c) => crate::units::inventory(c),
        None => Err(crate::Error::ComponentNotFound {
            path: index.path().to_path_buf(),
            component: kind.name().to_owned(),
            found: split
                .components
                .iter()
                .map(|c| c.kind.name().to_owned())
                .collect(),
        }),
    }
}

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

/// Prefixes of single-file checkpoints (original Stable Diffusion layout), longest first.
const CHECKPOINT_PREFIXES: &[(&str, ComponentKind)] = &[
    ("model.diffusion_model.", ComponentKind::Unet),
    ("first_stage_model.", ComponentKind::Vae),
    ("cond_stage_model.", ComponentKind::Clip),
    ("conditioner.embedders.", ComponentKind::Clip),
    ("control_model.", ComponentKind::ControlNet),
];

/// The tensors of one component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component<'a> {
    /// Which component.
    pub kind: ComponentKind,
    /// The key prefix stripped from its tensors' names (empty for a one-component file).
    pub prefix: &'static str,
    /// Its tensors, in file order.
    pub tensors: Vec<&'a TensorInfo>,
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

/// Splits a file's tensors into components.
///
/// A file with checkpoint prefixes (`model.diffusion_model.`, `first_stage_model.`,
/// `cond_stage_model.`, `conditioner.embedders.N.`, `control_model.`) is split by them and the
/// rest is `other`. A file without them is one component, recognised from its keys (diffusers
/// or original names), or [`ComponentKind::Model`].
pub fn split(index: &SafetensorsIndex) -> Split<'_> {
    let tensors = index.tensors();
    let prefixed = tensors.iter().any(|t| prefix_of(&t.name).is_some());
    if !prefixed {
        let kind = guess_single(tensors);
        let components = if tensors.is_empty() {
            Vec::new()
        } else {
            vec![Component {
                kind,
                prefix: "",
                tensors: tensors.iter().collect(),
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
                }),
            },
            None => other.push(t),
        }
    }
    components.sort_by_key(|c| c.kind);
    Split { components, other }
}

fn prefix_of(name: &str) -> Option<(&'static str, ComponentKind)> {
    CHECKPOINT_PREFIXES
        .iter()
        .find(|(p, _)| name.starts_with(p))
        .copied()
}

/// Recognises a one-component file from its keys.
fn guess_single(tensors: &[TensorInfo]) -> ComponentKind {
    let has = |needle: &str| tensors.iter().any(|t| t.name.contains(needle));
    let starts = |p: &str| tensors.iter().any(|t| t.name.starts_with(p));
    if has("input_hint_block") || has("controlnet_cond_embedding") {
        ComponentKind::ControlNet
    } else if starts("vision_model.") || starts("visual.") {
        ComponentKind::ClipVision
    } else if starts("text_model.") || starts("transformer.text_model.") || has("token_embedding") {
        ComponentKind::Clip
    } else if starts("encoder.") && starts("decoder.") {
        ComponentKind::Vae
    } else if (starts("input_blocks.") && starts("output_blocks."))
        || (starts("down_blocks.") && starts("up_blocks."))
    {
        ComponentKind::Unet
    } else {
        ComponentKind::Model
    }
}

/// The planner's inventory for one component of a file, or
/// [`Error::ComponentNotFound`](crate::Error::ComponentNotFound) listing the components that
/// are there.
pub fn inventory_for(
    index: &SafetensorsIndex,
    kind: ComponentKind,
) -> Result<distorch_alloc::Inventory, crate::Error> {
    let split = split(index);
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

//! What the loaders read off a component's names and shapes: shape maps, module names for
//! LoRAs, units in execution order, renamed layouts.

use std::collections::HashMap;

use distorch_core::runtime::ExpectedTensor;
use distorch_core::{Component, units};
use distorch_lora::ModelTensor;

use crate::error::Error;

/// Tensor shapes of a component by local key (component prefix stripped).
pub(crate) fn shape_map(c: &Component<'_>) -> HashMap<String, Vec<u64>> {
    c.tensors
        .iter()
        .map(|t| (c.local(t).to_owned(), t.shape.clone()))
        .collect()
}

/// A shape as `usize`s.
pub(crate) fn to_usize(s: &[u64]) -> Vec<usize> {
    s.iter().map(|&d| d as usize).collect()
}

/// Each tensor of the component with its own module name.
pub(crate) fn own_modules(component: &Component<'_>) -> Vec<ModelTensor> {
    component
        .tensors
        .iter()
        .map(|t| {
            let key = component.local(t).to_owned();
            let module = key
                .rsplit_once('.')
                .map_or(key.as_str(), |(m, _)| m)
                .to_owned();
            ModelTensor {
                key,
                modules: vec![module],
                shape: t.shape.iter().map(|&d| d as usize).collect(),
                rows: None,
                of_module: None,
            }
        })
        .collect()
}

/// The units of `expected` tensors, in their order, each once: a model's execution order
/// when its expected tensors are listed as its forward pass uses them.
pub(crate) fn units_in_order(expected: &[ExpectedTensor]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    expected
        .iter()
        .map(|e| units::unit_name(&e.name).to_owned())
        .filter(|u| seen.insert(u.clone()))
        .collect()
}

/// The error for a diffusers-layout file given without its `config.json`.
pub(crate) fn needs_config(model: &'static str) -> Error {
    Error::NeedsConfig { model }
}

/// Tensors with their module names in two layouts (expected tensors listed in the same
/// order), for LoRA mapping.
pub(crate) fn both_names(ours: Vec<ExpectedTensor>, file: Vec<ExpectedTensor>) -> Vec<ModelTensor> {
    let module = |k: &str| k.rsplit_once('.').map_or(k, |(m, _)| m).to_owned();
    ours.into_iter()
        .zip(file)
        .map(|(o, f)| {
            let mut modules = vec![module(&o.name)];
            if module(&f.name) != modules[0] {
                modules.push(module(&f.name));
            }
            ModelTensor {
                key: f.name,
                modules,
                shape: f.shape,
                rows: None,
                of_module: None,
            }
        })
        .collect()
}

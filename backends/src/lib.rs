//! Per-backend glue for distorch: which Burn backends this build has, and what the host's
//! memory looks like. No planning logic lives here.
//!
//! Backends are Cargo features: `ndarray` (default, CPU), `wgpu`, `cuda`. GPU enumeration
//! (device count, total and free memory per GPU) arrives with the runtime; until then
//! [`detect`] reports host memory only and GPUs are declared by the user
//! (`--devices cuda:0=24gib,...` on the command line).
//!
//! ```
//! let graph = distorch_backends::detect();
//! assert!(graph.get(distorch_alloc::DeviceId::CPU).is_some());
//! ```

#![deny(missing_docs)]

use std::fmt;

use distorch_alloc::{ByteSize, DeviceGraph, DeviceId, DeviceInfo};

/// The Burn CPU backend (ndarray).
#[cfg(feature = "ndarray")]
pub type NdArray = burn::backend::NdArray;

/// The Burn wgpu backend (Vulkan, Metal, DX12 through wgpu).
#[cfg(feature = "wgpu")]
pub type Wgpu = burn::backend::Wgpu;

/// The Burn CUDA backend (loads `libcuda` at first use, not at build time).
#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda;

/// A Burn backend compiled into this build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendKind {
    /// `burn-ndarray`, CPU.
    NdArray,
    /// `burn-wgpu`.
    Wgpu,
    /// `burn-cuda`.
    Cuda,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::NdArray => "ndarray",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cuda => "cuda",
        })
    }
}

/// The backends enabled by this build's Cargo features.
pub fn compiled() -> Vec<BackendKind> {
    let mut out = Vec::new();
    if cfg!(feature = "ndarray") {
        out.push(BackendKind::NdArray);
    }
    if cfg!(feature = "wgpu") {
        out.push(BackendKind::Wgpu);
    }
    if cfg!(feature = "cuda") {
        out.push(BackendKind::Cuda);
    }
    out
}

/// Host memory as the `cpu` device: total RAM (or the cgroup limit, if lower) and the memory
/// the OS reports available.
pub fn host_memory() -> DeviceInfo {
    use sysinfo::{MemoryRefreshKind, RefreshKind, System};
    let sys = System::new_with_specifics(
        RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_ram()),
    );
    let mut total = sys.total_memory();
    let mut free = sys.available_memory();
    if let Some(limits) = sys.cgroup_limits() {
        total = total.min(limits.total_memory);
        free = free.min(limits.free_memory);
    }
    let free = free.min(total);
    tracing::debug!(total, free, "host memory");
    DeviceInfo::new(DeviceId::CPU, ByteSize(total)).with_free(ByteSize(free))
}

/// The devices this machine has, as far as this build can tell: host memory now; GPUs of the
/// compiled backends once the runtime lands.
pub fn detect() -> DeviceGraph {
    DeviceGraph::new(vec![host_memory()]).expect("one device cannot be duplicated")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_memory_is_plausible() {
        let cpu = host_memory();
        assert!(cpu.total.bytes() > 64 << 20, "{cpu:?}");
        assert!(cpu.free <= cpu.total);
    }

    #[test]
    #[cfg(feature = "ndarray")]
    fn default_build_has_ndarray() {
        assert_eq!(compiled().first(), Some(&BackendKind::NdArray));
    }
}

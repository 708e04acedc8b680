//! Per-backend glue for distorch: which Burn backends this build has, and what the host's
//! memory looks like. No planning logic lives here.
//!
//! Backends are Cargo features: `ndarray` (default, CPU), `wgpu`, `cuda`. [`detect`] probes
//! host memory and the GPUs of the compiled GPU backends: CUDA reports total and free memory
//! per GPU; wgpu lists its adapters but cannot tell their memory, so those must be declared
//! (`--devices wgpu:0=8gib,...` on the command line). [`on_device`] runs a backend-generic
//! computation on the backend a device id names.
//!
//! ```
//! let found = distorch_backends::detect();
//! assert!(found.graph.get(distorch_alloc::DeviceId::CPU).is_some());
//! ```

#![deny(missing_docs)]

use std::fmt;

use distorch_alloc::{DeviceId, DeviceInfo};
pub use distorch_core::memory::{Detection, DeviceMemory, MemoryProbe, ProbeError};

mod dispatch;
mod probe;

pub use dispatch::{Error, OnBackend, device, on_device};

#[cfg(feature = "cuda")]
pub use probe::CudaProbe;
pub use probe::HostProbe;
#[cfg(feature = "wgpu")]
pub use probe::WgpuProbe;

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

/// Host memory as the `cpu` device (see [`HostProbe`]).
pub fn host_memory() -> Option<DeviceInfo> {
    detect_with(&[&HostProbe]).graph.get(DeviceId::CPU).copied()
}

/// Runs the given probes (see [`distorch_core::memory::detect`]).
pub fn detect_with(probes: &[&dyn MemoryProbe]) -> Detection {
    distorch_core::memory::detect(probes)
}

/// The devices this machine has, as far as this build can tell: host memory, then the GPUs
/// of each compiled GPU backend (CUDA, wgpu). Devices whose memory is unknown (wgpu adapters)
/// and backends that found nothing are listed in [`Detection::notes`].
pub fn detect() -> Detection {
    detect_with(&[
        &HostProbe,
        #[cfg(feature = "cuda")]
        &CudaProbe,
        #[cfg(feature = "wgpu")]
        &WgpuProbe,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_memory_is_plausible() {
        let cpu = host_memory().unwrap();
        assert!(cpu.total.bytes() > 64 << 20, "{cpu:?}");
        assert!(cpu.free <= cpu.total);
    }

    #[test]
    #[cfg(feature = "ndarray")]
    fn default_build_has_ndarray() {
        assert_eq!(compiled().first(), Some(&BackendKind::NdArray));
    }
}

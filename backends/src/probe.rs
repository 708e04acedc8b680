//! [`MemoryProbe`] implementations: host RAM (always), CUDA and wgpu (with their features).

use distorch_alloc::{ByteSize, DeviceId};
use distorch_core::memory::{DeviceMemory, MemoryProbe, ProbeError};

/// Host memory as `cpu`: total RAM (or the cgroup limit, if lower) and the memory the OS
/// reports available.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostProbe;

impl MemoryProbe for HostProbe {
    fn source(&self) -> &'static str {
        "host"
    }

    fn devices(&self) -> Result<Vec<DeviceMemory>, ProbeError> {
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
        if total == 0 {
            return Err(ProbeError {
                source: "host",
                reason: "the OS reported no memory".into(),
            });
        }
        tracing::debug!(total, free, "host memory");
        Ok(vec![DeviceMemory {
            id: DeviceId::CPU,
            name: "host memory".into(),
            total: Some(ByteSize(total)),
            free: Some(ByteSize(free.min(total))),
            pinned_host: false,
        }])
    }
}

/// NVIDIA GPUs through the CUDA driver (loaded at run time: without `libcuda` the probe
/// reports that, it does not fail the build or panic). Free memory needs a context on each
/// device: the primary context, which Burn's CUDA backend shares later.
#[cfg(feature = "cuda")]
#[derive(Debug, Clone, Copy, Default)]
pub struct CudaProbe;

#[cfg(feature = "cuda")]
impl MemoryProbe for CudaProbe {
    fn source(&self) -> &'static str {
        "cuda"
    }

    fn devices(&self) -> Result<Vec<DeviceMemory>, ProbeError> {
        use cudarc::driver::{CudaContext, result, sys};
        let err = |reason: String| ProbeError {
            source: "cuda",
            reason,
        };
        // SAFETY: only tries to open the driver library.
        if !unsafe { sys::is_culib_present() } {
            return Err(err("the CUDA driver library (libcuda) was not found".into()));
        }
        result::init().map_err(|e| err(format!("cuInit failed: {e}")))?;
        let count = result::device::get_count().map_err(|e| err(format!("{e}")))?;
        let mut out = Vec::new();
        for i in 0..count.max(0) {
            let dev = result::device::get(i).map_err(|e| err(format!("device {i}: {e}")))?;
            let name = result::device::get_name(dev).unwrap_or_else(|_| "unknown GPU".into());
            // SAFETY: `dev` is a valid device handle from cuDeviceGet.
            let total = unsafe { result::device::total_mem(dev) }.ok();
            let free = CudaContext::new(i as usize)
                .and_then(|ctx| ctx.mem_get_info())
                .map(|(free, _)| free)
                .ok();
            out.push(DeviceMemory {
                id: DeviceId::cuda(i as u32),
                name,
                total: total.map(|t| ByteSize(t as u64)),
                free: free.map(|f| ByteSize(f as u64)),
                pinned_host: true,
            });
        }
        Ok(out)
    }
}

/// GPUs through wgpu: every adapter of the graphics API Burn computes with (Vulkan on Linux
/// and Windows, Metal on macOS), as `wgpu:N` in enumeration order — the order
/// [`crate::device`] binds them in. wgpu does not expose how much memory an adapter has, so
/// totals are reported unknown (declare them).
#[cfg(feature = "wgpu")]
#[derive(Debug, Clone, Copy, Default)]
pub struct WgpuProbe;

#[cfg(feature = "wgpu")]
impl MemoryProbe for WgpuProbe {
    fn source(&self) -> &'static str {
        "wgpu"
    }

    fn devices(&self) -> Result<Vec<DeviceMemory>, ProbeError> {
        let adapters = wgpu_adapters();
        if adapters.is_empty() {
            return Err(ProbeError {
                source: "wgpu",
                reason: "no adapter found".into(),
            });
        }
        let mut out = Vec::new();
        for (i, a) in adapters.iter().enumerate() {
            let info = a.get_info();
            let Some(id) = DeviceId::new(distorch_alloc::DeviceKind::Wgpu, i as u32) else {
                continue;
            };
            out.push(DeviceMemory {
                id,
                name: format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type),
                total: None,
                free: None,
                pinned_host: false,
            });
        }
        Ok(out)
    }
}

/// The adapters of the graphics API Burn's wgpu backend uses, in enumeration order.
#[cfg(feature = "wgpu")]
fn wgpu_adapters() -> Vec<wgpu::Adapter> {
    use burn::backend::wgpu::graphics::{AutoGraphicsApi, GraphicsApi};
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
    block_on(instance.enumerate_adapters(AutoGraphicsApi::backend().into()))
}

/// The device type of each adapter `wgpu:N` names.
#[cfg(feature = "wgpu")]
pub(crate) fn wgpu_adapter_types() -> Vec<wgpu::DeviceType> {
    wgpu_adapters()
        .iter()
        .map(|a| a.get_info().device_type)
        .collect()
}

/// Drives a future that native wgpu resolves without waiting on anything.
#[cfg(feature = "wgpu")]
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    use std::task::{Context, Poll, Waker};
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

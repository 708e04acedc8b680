//! From a device id to the compiled Burn backend that computes there: [`on_device`] runs a
//! backend-generic computation ([`OnBackend`]) on it, and [`device`] binds another device id
//! of the same backend (a text encoder on `cuda:1` beside a UNet on `cuda:0`). The one place
//! where `cpu`, `wgpu:N` and `cuda:N` become Burn types and devices.

use std::any::Any;

use burn::tensor::backend::Backend;
use distorch_alloc::{DeviceId, DeviceKind};

use crate::{BackendKind, compiled};

/// A computation written once for every Burn backend (Rust has no generic closures: a type
/// with a generic method stands in for one).
pub trait OnBackend {
    /// What it returns.
    type Output;
    /// Runs on backend `B`, computing on `device` (the Burn device of `id`).
    fn run<B: Backend>(self, id: DeviceId, device: B::Device) -> Self::Output;
}

/// Why a device cannot compute in this build.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No compiled backend computes on the device (its backend's Cargo feature is off, or
    /// the kind has no Burn backend here).
    #[error(
        "`{device}`: this build cannot compute there (backends compiled in: {}; build with \
         --features wgpu or --features cuda for GPUs)",
        compiled.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    )]
    NotCompiled {
        /// The device asked for.
        device: DeviceId,
        /// The backends this build has.
        compiled: Vec<BackendKind>,
    },
    /// A `wgpu:N` past the adapters wgpu lists (`distorch devices` shows them).
    #[error("`{device}`: wgpu lists {adapters} adapter(s) (wgpu:0 to wgpu:{}); see `distorch devices`", adapters.saturating_sub(1))]
    NoAdapter {
        /// The device asked for.
        device: DeviceId,
        /// How many adapters there are.
        adapters: usize,
    },
    /// A device of another backend than the one computing: one pipeline computes on one
    /// backend (`cpu` is host memory for every backend, not a device to bind).
    #[error(
        "`{device}` is not a {backend} device: every component of one run computes on the same backend"
    )]
    OtherBackend {
        /// The device asked for.
        device: DeviceId,
        /// The backend computing.
        backend: &'static str,
    },
}

/// Runs `f` on the backend that computes on `id`: `cpu` on ndarray, `wgpu:N` on wgpu (see
/// [`device`] for which adapter), `cuda:N` on CUDA device N (each when its feature is
/// compiled in).
///
/// ```
/// use distorch_backends::{OnBackend, on_device};
/// struct Name;
/// impl OnBackend for Name {
///     type Output = String;
///     fn run<B: burn::tensor::backend::Backend>(self, _: distorch_alloc::DeviceId, _: B::Device) -> String {
///         B::name(&Default::default())
///     }
/// }
/// assert!(on_device("cpu".parse().unwrap(), Name).is_ok());
/// ```
pub fn on_device<F: OnBackend>(id: DeviceId, f: F) -> Result<F::Output, Error> {
    match id.kind() {
        DeviceKind::Cpu => {
            #[cfg(feature = "ndarray")]
            return Ok(f.run::<crate::NdArray>(id, Default::default()));
        }
        DeviceKind::Wgpu => {
            #[cfg(feature = "wgpu")]
            return Ok(f.run::<crate::Wgpu>(id, wgpu_device(id)?));
        }
        DeviceKind::Cuda => {
            #[cfg(feature = "cuda")]
            return Ok(f.run::<crate::Cuda>(
                id,
                burn::backend::cuda::CudaDevice::new(id.index() as usize),
            ));
        }
        _ => {}
    }
    drop(f);
    Err(Error::NotCompiled {
        device: id,
        compiled: compiled(),
    })
}

/// The Burn device of backend `B` that `id` names: `cpu` for ndarray; `cuda:N` for CUDA;
/// for wgpu, `wgpu:0` is the default adapter (Burn's choice, `CUBECL_WGPU_DEFAULT_DEVICE`
/// overrides it) and `wgpu:N` the adapter `distorch devices` lists as `wgpu:N` (the graphics
/// API Burn uses, in wgpu's enumeration order). An id of another backend is
/// [`Error::OtherBackend`]; a kind not compiled in, [`Error::NotCompiled`].
///
/// ```
/// # #[cfg(feature = "ndarray")] {
/// let cpu = distorch_backends::device::<distorch_backends::NdArray>("cpu".parse().unwrap());
/// assert!(cpu.is_ok());
/// # }
/// ```
pub fn device<B: Backend>(id: DeviceId) -> Result<B::Device, Error> {
    let bound: Box<dyn Any> = match id.kind() {
        #[cfg(feature = "ndarray")]
        DeviceKind::Cpu => Box::new(burn::backend::ndarray::NdArrayDevice::Cpu),
        #[cfg(feature = "wgpu")]
        DeviceKind::Wgpu => Box::new(wgpu_device(id)?),
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => Box::new(burn::backend::cuda::CudaDevice::new(id.index() as usize)),
        _ => {
            return Err(Error::NotCompiled {
                device: id,
                compiled: compiled(),
            });
        }
    };
    bound
        .downcast::<B::Device>()
        .map(|d| *d)
        .map_err(|_| Error::OtherBackend {
            device: id,
            backend: std::any::type_name::<B>()
                .rsplit("::")
                .next()
                .unwrap_or("this"),
        })
}

/// `wgpu:0`: the default adapter; `wgpu:N`: the Nth adapter of Burn's graphics API, as the
/// Burn device that selects it (its type and rank among adapters of that type).
#[cfg(feature = "wgpu")]
fn wgpu_device(id: DeviceId) -> Result<burn::backend::wgpu::WgpuDevice, Error> {
    use burn::backend::wgpu::WgpuDevice;
    if id.index() == 0 {
        return Ok(WgpuDevice::DefaultDevice);
    }
    let types = crate::probe::wgpu_adapter_types();
    let n = id.index() as usize;
    let Some(&wanted) = types.get(n) else {
        return Err(Error::NoAdapter {
            device: id,
            adapters: types.len(),
        });
    };
    let rank = types[..n].iter().filter(|&&t| t == wanted).count();
    Ok(match wanted {
        wgpu::DeviceType::DiscreteGpu => WgpuDevice::DiscreteGpu(rank),
        wgpu::DeviceType::IntegratedGpu => WgpuDevice::IntegratedGpu(rank),
        wgpu::DeviceType::VirtualGpu => WgpuDevice::VirtualGpu(rank),
        wgpu::DeviceType::Cpu if rank == 0 => WgpuDevice::Cpu,
        // Burn selects these by position among "other" adapters only when no typed one
        // matches: not addressable reliably.
        _ => {
            return Err(Error::NoAdapter {
                device: id,
                adapters: n,
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Index;
    impl OnBackend for Index {
        type Output = u32;
        fn run<B: Backend>(self, id: DeviceId, _: B::Device) -> u32 {
            id.index()
        }
    }

    #[test]
    fn devices_reach_their_backend_or_say_why_not() {
        #[cfg(feature = "ndarray")]
        assert_eq!(on_device("cpu".parse().unwrap(), Index).unwrap(), 0);
        #[cfg(not(feature = "wgpu"))]
        assert!(matches!(
            on_device("wgpu:1".parse().unwrap(), Index),
            Err(Error::NotCompiled { .. })
        ));
        #[cfg(feature = "wgpu")]
        assert!(matches!(
            on_device("wgpu:99".parse().unwrap(), Index),
            Err(Error::NoAdapter { .. })
        ));
        let e = on_device("rocm:0".parse().unwrap(), Index).unwrap_err();
        assert!(
            matches!(e, Error::NotCompiled { .. }) && e.to_string().contains("compiled in"),
            "{e}"
        );
    }

    #[cfg(feature = "ndarray")]
    #[test]
    fn devices_bind_within_their_backend_only() {
        type N = crate::NdArray;
        assert!(device::<N>(DeviceId::CPU).is_ok());
        let e = device::<N>("cuda:1".parse().unwrap()).unwrap_err();
        assert!(
            matches!(e, Error::NotCompiled { .. } | Error::OtherBackend { .. }),
            "{e}"
        );
        #[cfg(feature = "wgpu")]
        {
            let e = device::<N>("wgpu:0".parse().unwrap()).unwrap_err();
            assert!(matches!(e, Error::OtherBackend { .. }), "{e}");
            assert!(device::<crate::Wgpu>("wgpu:0".parse().unwrap()).is_ok());
        }
    }
}

//! From a device id to the compiled Burn backend that computes there: [`on_device`] runs a
//! backend-generic computation ([`OnBackend`]) on it. The one place where `cpu`, `wgpu:0`
//! and `cuda:N` become Burn types and devices.

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
    /// A wgpu device other than the default adapter.
    #[error("`{device}`: wgpu computes on its default adapter only: use wgpu:0")]
    WgpuAdapter {
        /// The device asked for.
        device: DeviceId,
    },
}

/// Runs `f` on the backend that computes on `id`: `cpu` on ndarray, `wgpu:0` on wgpu's
/// default adapter, `cuda:N` on CUDA device N (each when its feature is compiled in).
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
        DeviceKind::Wgpu if id.index() != 0 => return Err(Error::WgpuAdapter { device: id }),
        DeviceKind::Wgpu => {
            #[cfg(feature = "wgpu")]
            return Ok(f.run::<crate::Wgpu>(id, Default::default()));
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
        let e = on_device("wgpu:1".parse().unwrap(), Index).unwrap_err();
        assert!(e.to_string().contains("use wgpu:0"), "{e}");
        let e = on_device("rocm:0".parse().unwrap(), Index).unwrap_err();
        assert!(
            matches!(e, Error::NotCompiled { .. }) && e.to_string().contains("compiled in"),
            "{e}"
        );
    }
}

//! [`Placement`]: where one component goes.

use burn::tensor::backend::Backend;
use distorch_alloc::{DeviceId, PlanRequest, VirtualVram};
use distorch_core::runtime::DeviceMap;

use crate::error::Error;

/// Where one component goes: what to ask the planner, and the Burn devices its plan's
/// device ids stand for.
#[derive(Debug, Clone)]
pub struct Placement<B: Backend> {
    /// The allocation (virtual VRAM, an expert string, or all on one device).
    pub request: PlanRequest,
    /// The compute device and any GPU donors.
    pub devices: DeviceMap<B>,
}

impl<B: Backend> Placement<B> {
    /// `gib` of the model moved off `compute` (bound to `device`) onto `donors`, as the
    /// DisTorch2 loaders' `virtual_vram_gb` and `donor_device`.
    pub fn virtual_vram(
        compute: DeviceId,
        device: B::Device,
        gib: f64,
        donors: Vec<DeviceId>,
    ) -> Result<Placement<B>, Error> {
        let vv = VirtualVram::from_gib(compute, gib, donors)?;
        Ok(Placement {
            request: PlanRequest::virtual_vram(vv),
            devices: DeviceMap::new(device),
        })
    }

    /// Everything on `compute` (bound to `device`).
    pub fn on(compute: DeviceId, device: B::Device) -> Placement<B> {
        Placement {
            request: PlanRequest::virtual_vram(VirtualVram::none(compute)),
            devices: DeviceMap::new(device),
        }
    }
}

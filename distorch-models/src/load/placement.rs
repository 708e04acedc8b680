//! [`Placement`]: where one component goes.

use burn::tensor::backend::Backend;
use distorch_alloc::{AllocSpec, ByteSize, DeviceId, PlanRequest, VirtualVram};
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

/// Binds a device id to a Burn device of the backend computing (`distorch_backends::device`
/// is the one such function; the models crate takes it as an argument).
pub type BindDevice<'a, B> =
    &'a dyn Fn(
        DeviceId,
    ) -> Result<burn::tensor::Device<B>, Box<dyn std::error::Error + Send + Sync>>;

/// One component's placement as DisTorch2's loaders take it: `compute_device`,
/// `virtual_vram_gb` moved onto `donor_device`, or `expert_mode_allocations` instead (an
/// allocation string; its devices other than the compute device are the donors).
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementSpec {
    /// Where the component computes (`cuda:1` for a text encoder beside a UNet on `cuda:0`).
    /// `cpu` in a run computing on a GPU keeps the weights in host memory and streams them to
    /// the run's compute device: one run computes on one backend.
    pub compute_device: DeviceId,
    /// GiB of the component moved off the compute device.
    pub virtual_vram_gb: f64,
    /// Where the moved weights live, in order of preference.
    pub donor_device: Vec<DeviceId>,
    /// An allocation string used instead of the virtual VRAM (`cuda:0,2.5gb;cpu,*`).
    pub expert_mode_allocations: Option<AllocSpec>,
}

impl PlacementSpec {
    /// Everything on `compute_device`.
    pub fn on(compute_device: DeviceId) -> PlacementSpec {
        PlacementSpec {
            compute_device,
            virtual_vram_gb: 0.0,
            donor_device: vec![DeviceId::CPU],
            expert_mode_allocations: None,
        }
    }

    /// The loader inputs as strings (a command line's, a node's widgets): a device, GiB, a
    /// donor list (`cuda:1,cpu`) and an optional allocation string (empty: none). A string
    /// that does not parse is [`distorch_alloc::Error::Parse`], with the caret message; an
    /// amount out of range is refused here too, before anything is read.
    pub fn parse(
        compute_device: &str,
        virtual_vram_gb: f64,
        donor_device: &str,
        expert_mode_allocations: Option<&str>,
    ) -> Result<PlacementSpec, distorch_alloc::Error> {
        let compute_device: DeviceId = compute_device.parse()?;
        let donor_device = distorch_alloc::parse_device_list(donor_device)?;
        let expert_mode_allocations = match expert_mode_allocations {
            Some(s) if !s.trim().is_empty() => Some(s.parse::<AllocSpec>()?),
            _ => None,
        };
        if expert_mode_allocations.is_none() && virtual_vram_gb != 0.0 {
            VirtualVram::from_gib(compute_device, virtual_vram_gb, donor_device.clone())?;
        }
        Ok(PlacementSpec {
            compute_device,
            virtual_vram_gb,
            donor_device,
            expert_mode_allocations,
        })
    }

    /// The placement in a run computing on `compute` (bound to `device`): the component's
    /// own compute device and any GPU donors bound by `bind`. Strings and amounts are checked
    /// here, before anything is read.
    pub fn placement<B: Backend>(
        &self,
        compute: DeviceId,
        device: &B::Device,
        bind: BindDevice<'_, B>,
    ) -> Result<Placement<B>, Error> {
        let own = self.compute_device;
        if own == DeviceId::CPU && compute != DeviceId::CPU {
            // Host homes for everything, streamed to the run's compute device.
            let all = VirtualVram::new(compute, ByteSize(1 << 50), vec![DeviceId::CPU])?;
            return Ok(Placement {
                request: PlanRequest::virtual_vram(all),
                devices: DeviceMap::new(device.clone()),
            });
        }
        let bound = |id: DeviceId| bind(id).map_err(|source| Error::Device { device: id, source });
        let own_device = if own == compute {
            device.clone()
        } else {
            bound(own)?
        };
        let (request, donors) = match &self.expert_mode_allocations {
            Some(spec) => (
                PlanRequest::expert_with_compute(spec.clone(), own),
                spec.entries().iter().map(|e| e.device).collect(),
            ),
            None if self.virtual_vram_gb == 0.0 => (
                PlanRequest::virtual_vram(VirtualVram::none(own)),
                Vec::new(),
            ),
            None => {
                let donors = self.donor_device.clone();
                let vv = VirtualVram::from_gib(own, self.virtual_vram_gb, donors.clone())?;
                (PlanRequest::virtual_vram(vv), donors)
            }
        };
        let mut devices = DeviceMap::new(own_device);
        for d in donors {
            if d != own && d != DeviceId::CPU {
                devices = devices.with_donor(d, bound(d)?);
            }
        }
        Ok(Placement { request, devices })
    }
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use super::*;
    use distorch_alloc::Allocation;

    type B = burn::backend::NdArray;

    /// Binds `cpu` only, as an ndarray build does.
    fn bind(
        id: DeviceId,
    ) -> Result<burn::tensor::Device<B>, Box<dyn std::error::Error + Send + Sync>> {
        if id == DeviceId::CPU {
            Ok(Default::default())
        } else {
            Err(format!("{id} is not an ndarray device").into())
        }
    }

    #[test]
    fn loader_inputs_become_requests_or_typed_errors() {
        let cpu = DeviceId::CPU;
        let on = PlacementSpec::parse("cpu", 0.0, "cpu", None).unwrap();
        let p = on.placement::<B>(cpu, &Default::default(), &bind).unwrap();
        assert_eq!(p.request.compute(), Some(cpu));
        assert!(
            matches!(p.request.allocation, Allocation::VirtualVram(ref v) if v.amount().0 == 0)
        );

        let expert = PlacementSpec::parse("cuda:0", 0.0, "cpu", Some("cuda:0,1gb;cpu,*")).unwrap();
        assert!(expert.expert_mode_allocations.is_some());
        // A GPU run whose text encoders say `cpu`: every weight in host memory, streamed.
        let gpu: DeviceId = "cuda:0".parse().unwrap();
        let host = on.placement::<B>(gpu, &Default::default(), &bind).unwrap();
        assert_eq!(host.request.compute(), Some(gpu));
        // A device the backend cannot bind is a typed error naming it.
        let other = PlacementSpec::parse("cuda:1", 0.0, "cpu", None).unwrap();
        let e = other
            .placement::<B>(cpu, &Default::default(), &bind)
            .unwrap_err();
        assert!(
            matches!(e, Error::Device { device, .. } if device.to_string() == "cuda:1"),
            "{e}"
        );

        // Strings and amounts are refused when parsed.
        assert!(matches!(
            PlacementSpec::parse("cdua:0", 0.0, "cpu", None),
            Err(distorch_alloc::Error::Parse(_))
        ));
        assert!(PlacementSpec::parse("cuda:0", 0.0, "cpu", Some("cuda:0,1tx")).is_err());
        assert!(PlacementSpec::parse("cuda:0", -1.0, "cpu", None).is_err());
        assert!(PlacementSpec::parse("cuda:0", 2.0, "cuda:0", None).is_err());
    }
}

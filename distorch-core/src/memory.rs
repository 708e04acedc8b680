//! [`MemoryProbe`]: what the planner needs from hardware — the devices, their total and free
//! memory, and whether pinned host memory can be used — and [`detect`], which turns probes
//! into a [`DeviceGraph`].
//!
//! Implementations live with the backends (`distorch-backends`: host RAM, CUDA, wgpu). A probe
//! reports what it does not know as `None` rather than guessing; such devices stay out of the
//! graph, with a note saying how to declare them.

use std::fmt;

use distorch_alloc::{ByteSize, DeviceGraph, DeviceId, DeviceInfo};

/// One device as a probe sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Its id (`cpu`, `cuda:0`, `wgpu:1`).
    pub id: DeviceId,
    /// A human-readable name (the GPU's model, say).
    pub name: String,
    /// Total memory, when the backend can tell.
    pub total: Option<ByteSize>,
    /// Memory free now, when the backend can tell.
    pub free: Option<ByteSize>,
    /// Whether uploads from this device's backend can use page-locked host memory.
    pub pinned_host: bool,
}

/// Why a probe saw nothing (no driver, no adapter): reported, never fatal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeError {
    /// The probe's source.
    pub source: &'static str,
    /// What went wrong.
    pub reason: String,
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.source, self.reason)
    }
}

impl std::error::Error for ProbeError {}

/// A source of devices: host memory, or one GPU backend.
pub trait MemoryProbe {
    /// The source's name (`host`, `cuda`, `wgpu`).
    fn source(&self) -> &'static str;

    /// The devices it sees, with their memory.
    fn devices(&self) -> Result<Vec<DeviceMemory>, ProbeError>;
}

/// What detection found.
#[derive(Debug, Clone, Default)]
pub struct Detection {
    /// The devices whose memory is known, ready for the planner.
    pub graph: DeviceGraph,
    /// Every device seen, known memory or not.
    pub devices: Vec<DeviceMemory>,
    /// Sources that saw nothing, and devices left out of the graph, with the reason.
    pub notes: Vec<String>,
}

/// Runs the probes in order. A device whose total memory is unknown, or that an earlier probe
/// already reported, stays out of the graph (with a note); free memory defaults to total when
/// unknown.
pub fn detect(probes: &[&dyn MemoryProbe]) -> Detection {
    let mut out = Detection::default();
    for probe in probes {
        let devices = match probe.devices() {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(%e, "probe saw nothing");
                out.notes.push(e.to_string());
                continue;
            }
        };
        for d in devices {
            match d.total {
                Some(total) => {
                    let free = d.free.unwrap_or(total).min(total);
                    let info = DeviceInfo::new(d.id, total).with_free(free);
                    if out.graph.push(info).is_err() {
                        out.notes.push(format!(
                            "{} ({}): reported twice; kept the first",
                            d.id, d.name
                        ));
                    }
                }
                None => out.notes.push(format!(
                    "{} ({}): {} does not report its memory; declare it, e.g. --devices {}=8gib",
                    d.id,
                    d.name,
                    probe.source(),
                    d.id
                )),
            }
            out.devices.push(d);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(&'static str, Result<Vec<DeviceMemory>, ProbeError>);

    impl MemoryProbe for Fixed {
        fn source(&self) -> &'static str {
            self.0
        }
        fn devices(&self) -> Result<Vec<DeviceMemory>, ProbeError> {
            self.1.clone()
        }
    }

    fn dev(id: &str, total: Option<u64>, free: Option<u64>) -> DeviceMemory {
        DeviceMemory {
            id: id.parse().unwrap(),
            name: "test".into(),
            total: total.map(ByteSize),
            free: free.map(ByteSize),
            pinned_host: false,
        }
    }

    #[test]
    fn unknown_memory_and_failed_probes_become_notes() {
        let host = Fixed("host", Ok(vec![dev("cpu", Some(100), Some(40))]));
        let cuda = Fixed(
            "cuda",
            Err(ProbeError {
                source: "cuda",
                reason: "libcuda not found".into(),
            }),
        );
        let wgpu = Fixed(
            "wgpu",
            Ok(vec![
                dev("wgpu:0", None, None),
                dev("wgpu:1", Some(8), None),
            ]),
        );
        let d = detect(&[&host, &cuda, &wgpu]);
        assert_eq!(d.graph.to_string(), "cpu=100b/40b,wgpu:1=8b");
        assert_eq!(d.devices.len(), 3);
        assert_eq!(
            d.notes,
            [
                "cuda: libcuda not found",
                "wgpu:0 (test): wgpu does not report its memory; declare it, e.g. --devices \
                 wgpu:0=8gib"
            ]
        );
    }
}

//! [`DeviceGraph`]: the devices a plan may use, with their memory and links.

use std::fmt;
use std::str::FromStr;

use crate::bytesize::ByteSize;
use crate::device::DeviceId;
use crate::error::{Error, Grammar, ParseError, ParseErrorKind};
use crate::syntax::{parse_bytes_at, split_spans, trim_span};

/// One device of a [`DeviceGraph`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Which device.
    pub id: DeviceId,
    /// Total memory. Fractions in allocation strings are fractions of this.
    pub total: ByteSize,
    /// Memory free for model weights. Quotas are capped by this.
    pub free: ByteSize,
    /// Bandwidth of the link between this device and the compute device, in bytes per
    /// second, when known. Reported only; placement does not depend on it yet.
    pub link_bytes_per_sec: Option<ByteSize>,
}

impl DeviceInfo {
    /// A device whose memory is all free.
    pub fn new(id: DeviceId, total: ByteSize) -> DeviceInfo {
        DeviceInfo {
            id,
            total,
            free: total,
            link_bytes_per_sec: None,
        }
    }

    /// Sets the free memory.
    pub fn with_free(mut self, free: ByteSize) -> DeviceInfo {
        self.free = free;
        self
    }

    /// Sets the link bandwidth to the compute device.
    pub fn with_link(mut self, bytes_per_sec: ByteSize) -> DeviceInfo {
        self.link_bytes_per_sec = Some(bytes_per_sec);
        self
    }
}

/// The devices a plan may use: detected (by the `distorch-backends` crate) or declared for a
/// what-if plan.
///
/// Declaration syntax: `DEVICE=TOTAL[/FREE][@LINK]` entries separated by `,`, sizes in the
/// allocation grammar's byte units, `LINK` in bytes per second with an optional `/s`:
///
/// ```
/// use distorch_alloc::{ByteSize, DeviceGraph, DeviceId};
/// let g: DeviceGraph = "cuda:0=24gib/20gib,cuda:1=24gib@25gib/s,cpu=64gib".parse().unwrap();
/// assert_eq!(g.get(DeviceId::cuda(0)).unwrap().free, ByteSize::gib(20));
/// assert_eq!(g.get(DeviceId::CPU).unwrap().total, ByteSize::gib(64));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceGraph {
    devices: Vec<DeviceInfo>,
}

impl DeviceGraph {
    /// A graph of the given devices. Errors on a duplicate device or free > total.
    pub fn new(devices: Vec<DeviceInfo>) -> Result<DeviceGraph, Error> {
        let mut graph = DeviceGraph {
            devices: Vec::with_capacity(devices.len()),
        };
        for d in devices {
            graph.push(d)?;
        }
        Ok(graph)
    }

    /// Parses a declaration such as `cuda:0=24gib,cpu=64gib`.
    pub fn declare(input: &str) -> Result<DeviceGraph, ParseError> {
        let g = Grammar::DeviceDeclaration;
        let err = |span: std::ops::Range<usize>, kind| ParseError::new(g, input, span, kind);
        let mut devices: Vec<(DeviceInfo, std::ops::Range<usize>)> = Vec::new();
        for piece in split_spans(input, 0..input.len(), ',') {
            let (s, e) = trim_span(input, piece.clone());
            if s == e {
                return Err(err(piece.start..piece.start, ParseErrorKind::EmptyEntry));
            }
            let Some(eq) = input[s..e].find('=').map(|i| s + i) else {
                return Err(err(s..e, ParseErrorKind::MissingValue));
            };
            let (ds, de) = trim_span(input, s..eq);
            if ds == de {
                return Err(err(eq..eq + 1, ParseErrorKind::EmptyDevice));
            }
            let id = DeviceId::parse_at(g, input, ds..de)?;
            if let Some((_, first)) = devices.iter().find(|(d, _)| d.id == id) {
                return Err(err(ds..de, ParseErrorKind::DuplicateDevice(first.clone())));
            }
            let rest = eq + 1..e;
            let (sizes, link) = match input[rest.clone()].find('@') {
                Some(at) => (rest.start..rest.start + at, Some(rest.start + at + 1..e)),
                None => (rest.clone(), None),
            };
            let (total, free) = match input[sizes.clone()].find('/') {
                Some(sl) => {
                    let t = size_at(input, sizes.start..sizes.start + sl)?;
                    let f = size_at(input, sizes.start + sl + 1..sizes.end)?;
                    (t, Some((f, sizes.start + sl + 1..sizes.end)))
                }
                None => (size_at(input, sizes.clone())?, None),
            };
            if total == ByteSize::ZERO {
                return Err(err(sizes, ParseErrorKind::ZeroCapacity));
            }
            let mut info = DeviceInfo::new(id, total);
            if let Some((f, span)) = free {
                if f > total {
                    return Err(err(span, ParseErrorKind::FreeAboveTotal));
                }
                info = info.with_free(f);
            }
            if let Some(link) = link {
                let (ls, le) = trim_span(input, link);
                let le = if input[ls..le].to_ascii_lowercase().ends_with("/s") {
                    le - 2
                } else {
                    le
                };
                info = info.with_link(size_at(input, ls..le)?);
            }
            devices.push((info, ds..de));
        }
        Ok(DeviceGraph {
            devices: devices.into_iter().map(|(d, _)| d).collect(),
        })
    }

    /// The devices, in declaration (or detection) order.
    pub fn devices(&self) -> &[DeviceInfo] {
        &self.devices
    }

    /// The ids, in order.
    pub fn ids(&self) -> Vec<DeviceId> {
        self.devices.iter().map(|d| d.id).collect()
    }

    /// The device with this id.
    pub fn get(&self, id: DeviceId) -> Option<&DeviceInfo> {
        self.devices.iter().find(|d| d.id == id)
    }

    /// The device with this id, or [`Error::UnknownDevice`] naming `role`.
    pub fn require(&self, id: DeviceId, role: &'static str) -> Result<&DeviceInfo, Error> {
        self.get(id).ok_or_else(|| Error::UnknownDevice {
            device: id,
            role,
            known: self.ids(),
        })
    }

    /// Adds a device, replacing none: errors if it is already there.
    pub fn push(&mut self, info: DeviceInfo) -> Result<(), Error> {
        if self.get(info.id).is_some() {
            return Err(Error::DuplicateDevice { device: info.id });
        }
        if info.free > info.total {
            return Err(Error::FreeAboveTotal {
                device: info.id,
                free: info.free,
                total: info.total,
            });
        }
        self.devices.push(info);
        Ok(())
    }

    /// The first GPU, else `cpu` if present: the default compute device.
    pub fn default_compute(&self) -> Option<DeviceId> {
        self.devices
            .iter()
            .find(|d| d.id.kind().is_gpu())
            .or_else(|| self.devices.first())
            .map(|d| d.id)
    }
}

/// A size with a mandatory unit at `span`, in the device declaration grammar.
fn size_at(input: &str, span: std::ops::Range<usize>) -> Result<ByteSize, ParseError> {
    parse_bytes_at(Grammar::DeviceDeclaration, input, span)
}

impl FromStr for DeviceGraph {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DeviceGraph::declare(s)
    }
}

impl fmt::Display for DeviceGraph {
    /// The declaration that rebuilds this graph.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.devices.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}={}", d.id, d.total.to_spec_string())?;
            if d.free != d.total {
                write!(f, "/{}", d.free.to_spec_string())?;
            }
            if let Some(l) = d.link_bytes_per_sec {
                write!(f, "@{}/s", l.to_spec_string())?;
            }
        }
        Ok(())
    }
}

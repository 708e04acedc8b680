//! [`DeviceId`]: which device, parsed without touching any hardware.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use crate::error::{Grammar, ParseError, ParseErrorKind};

/// The kind of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum DeviceKind {
    /// Host memory (system RAM). As a donor it works with every backend.
    Cpu,
    /// An NVIDIA GPU through CUDA.
    Cuda,
    /// A GPU through wgpu (any of its native APIs).
    Wgpu,
    /// A GPU through Vulkan.
    Vulkan,
    /// An Apple GPU through Metal.
    Metal,
    /// An AMD GPU through ROCm/HIP.
    Rocm,
}

impl DeviceKind {
    /// Every kind, in display order.
    pub const ALL: [DeviceKind; 6] = [
        DeviceKind::Cpu,
        DeviceKind::Cuda,
        DeviceKind::Wgpu,
        DeviceKind::Vulkan,
        DeviceKind::Metal,
        DeviceKind::Rocm,
    ];

    /// The canonical lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
            DeviceKind::Wgpu => "wgpu",
            DeviceKind::Vulkan => "vulkan",
            DeviceKind::Metal => "metal",
            DeviceKind::Rocm => "rocm",
        }
    }

    /// True for every kind but [`DeviceKind::Cpu`].
    pub fn is_gpu(self) -> bool {
        self != DeviceKind::Cpu
    }
}

/// A device: a kind and an index. `cpu` has only index 0.
///
/// Parsed case-insensitively (`CUDA:1`), displayed in lower case (`cuda:1`); a GPU without an
/// index means index 0 (`cuda` = `cuda:0`).
///
/// ```
/// use distorch_alloc::DeviceId;
/// let d: DeviceId = "CUDA".parse().unwrap();
/// assert_eq!(d.to_string(), "cuda:0");
/// assert_eq!("cpu".parse::<DeviceId>().unwrap(), DeviceId::CPU);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId {
    kind: DeviceKind,
    index: u32,
}

impl DeviceId {
    /// Host memory.
    pub const CPU: DeviceId = DeviceId {
        kind: DeviceKind::Cpu,
        index: 0,
    };

    /// A GPU of `kind` at `index`. Returns `None` for `Cpu` with an index other than 0.
    pub fn new(kind: DeviceKind, index: u32) -> Option<DeviceId> {
        (kind != DeviceKind::Cpu || index == 0).then_some(DeviceId { kind, index })
    }

    /// `cuda:index`.
    pub fn cuda(index: u32) -> DeviceId {
        DeviceId {
            kind: DeviceKind::Cuda,
            index,
        }
    }

    /// The kind.
    pub fn kind(self) -> DeviceKind {
        self.kind
    }

    /// The index (0 for `cpu`).
    pub fn index(self) -> u32 {
        self.index
    }

    /// Parses the device text at `span` of `input` (used by the grammars, which report the
    /// error against the whole input).
    pub(crate) fn parse_at(
        grammar: Grammar,
        input: &str,
        span: Range<usize>,
    ) -> Result<DeviceId, ParseError> {
        let text = &input[span.clone()];
        let err = |sub: Range<usize>, kind| {
            ParseError::new(
                grammar,
                input,
                span.start + sub.start..span.start + sub.end,
                kind,
            )
        };
        let (kind_text, index_text) = match text.split_once(':') {
            Some((k, i)) => (k, Some(i)),
            None => (text, None),
        };
        let lower = kind_text.to_ascii_lowercase();
        let kind = DeviceKind::ALL
            .into_iter()
            .find(|k| k.name() == lower)
            .ok_or_else(|| {
                err(
                    0..kind_text.len(),
                    ParseErrorKind::UnknownDeviceKind(kind_text.to_owned()),
                )
            })?;
        let index = match index_text {
            None => 0,
            Some(i) => {
                let sub = kind_text.len() + 1..text.len();
                let bad = || err(sub.clone(), ParseErrorKind::BadDeviceIndex(i.to_owned()));
                if i.is_empty() || !i.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                i.parse::<u32>().map_err(|_| bad())?
            }
        };
        DeviceId::new(kind, index).ok_or_else(|| {
            err(
                kind_text.len() + 1..text.len(),
                ParseErrorKind::BadDeviceIndex(format!("{index} (cpu has only index 0)")),
            )
        })
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            DeviceKind::Cpu => f.write_str("cpu"),
            k => write!(f, "{}:{}", k.name(), self.index),
        }
    }
}

impl FromStr for DeviceId {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (start, end) = crate::syntax::trim_span(s, 0..s.len());
        if start == end {
            return Err(ParseError::new(
                Grammar::Device,
                s,
                start..end,
                ParseErrorKind::EmptyDevice,
            ));
        }
        DeviceId::parse_at(Grammar::Device, s, start..end)
    }
}

/// Parses a comma-separated device list such as a donor list: `cuda:1,cpu`.
///
/// Order is kept; an empty list is allowed (empty string); duplicates are errors.
pub fn parse_device_list(input: &str) -> Result<Vec<DeviceId>, ParseError> {
    let mut out: Vec<(DeviceId, Range<usize>)> = Vec::new();
    if input.trim().is_empty() {
        return Ok(Vec::new());
    }
    for piece in crate::syntax::split_spans(input, 0..input.len(), ',') {
        let (start, end) = crate::syntax::trim_span(input, piece);
        if start == end {
            return Err(ParseError::new(
                Grammar::DeviceList,
                input,
                start..end,
                ParseErrorKind::EmptyDevice,
            ));
        }
        let id = DeviceId::parse_at(Grammar::DeviceList, input, start..end)?;
        if let Some((_, first)) = out.iter().find(|(d, _)| *d == id) {
            return Err(ParseError::new(
                Grammar::DeviceList,
                input,
                start..end,
                ParseErrorKind::DuplicateDevice(first.clone()),
            ));
        }
        out.push((id, start..end));
    }
    Ok(out.into_iter().map(|(d, _)| d).collect())
}

//! The crate's error type, and parse errors that point at the offending text.

use std::fmt;
use std::ops::Range;

use crate::bytesize::ByteSize;
use crate::device::DeviceId;

/// Everything that can go wrong in this crate.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A string (allocation, device declaration, donor list) did not parse; renders the input
    /// with a caret under the fault.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// A device named by the request is not in the device graph.
    #[error(
        "unknown device `{device}` in the {role}: the device graph has {}",
        list(known)
    )]
    UnknownDevice {
        /// The device that was named.
        device: DeviceId,
        /// Where it was named: "allocation", "compute device" or "donor list".
        role: &'static str,
        /// The devices the graph does have.
        known: Vec<DeviceId>,
    },
    /// An expert allocation with no entries was given to the planner.
    #[error("the expert allocation is empty: give at least one `device,value` entry")]
    EmptyAllocation,
    /// Virtual VRAM outside 0–1024 GiB, or not a finite number.
    #[error("virtual VRAM must be a finite number of GiB between 0 and 1024, got {gib}")]
    VirtualVramOutOfRange {
        /// The value given.
        gib: f64,
    },
    /// Virtual VRAM was requested with an empty donor list.
    #[error("virtual VRAM of {amount} needs at least one donor device")]
    NoDonors {
        /// The virtual VRAM requested.
        amount: ByteSize,
    },
    /// A block-swap request that cannot apply to the model.
    #[error("block swap: {reason}")]
    BlockSwap {
        /// What is wrong.
        reason: String,
    },
    /// A donor is the compute device itself.
    #[error("donor `{device}` is the compute device: a donor must be another device")]
    DonorIsCompute {
        /// The device.
        device: DeviceId,
    },
    /// A donor appears twice in the donor list.
    #[error("donor `{device}` appears twice in the donor list")]
    DuplicateDonor {
        /// The device.
        device: DeviceId,
    },
    /// The donors' free memory cannot absorb the bytes virtual VRAM asks to move.
    #[error(
        "the donors ({}) have {available} free but virtual VRAM asks them to hold {needed}: \
         {missing} missing",
        list(donors)
    )]
    DonorsTooSmall {
        /// The donors, in order.
        donors: Vec<DeviceId>,
        /// Bytes to move off the compute device.
        needed: ByteSize,
        /// Free bytes on all donors together.
        available: ByteSize,
        /// `needed - available`.
        missing: ByteSize,
    },
    /// A device would receive more bytes than it has free.
    #[error(
        "`{device}` cannot hold its share of the model: it needs {needed} but has {free} free \
         ({} short){hint}",
        needed.saturating_sub(*free)
    )]
    DeviceOverCapacity {
        /// The device.
        device: DeviceId,
        /// Bytes the plan puts there.
        needed: ByteSize,
        /// Its free bytes.
        free: ByteSize,
        /// Extra advice, e.g. "; raise virtual VRAM by at least 1.20 GiB" (may be empty).
        hint: String,
    },
    /// The explicit quotas leave part of the model without a device and there is no `*`.
    #[error(
        "the allocation's quotas hold only {placed} of the model's {total}: {unplaced} in \
         {units} unit(s) has no device; add a `*` entry (e.g. `cpu,*`) or raise a quota"
    )]
    Unplaced {
        /// Bytes placed.
        placed: ByteSize,
        /// Model bytes.
        total: ByteSize,
        /// Bytes left without a device.
        unplaced: ByteSize,
        /// Units left without a device.
        units: usize,
    },
    /// A fraction was given for a device whose total memory is unknown or zero.
    #[error("`{device}` has no known total memory, so a fraction of it is meaningless")]
    FractionOfUnknownTotal {
        /// The device.
        device: DeviceId,
    },
    /// Two devices in a device graph have the same id.
    #[error("device `{device}` appears twice in the device graph")]
    DuplicateDevice {
        /// The device.
        device: DeviceId,
    },
    /// A device's free memory exceeds its total.
    #[error("device `{device}` declares {free} free out of {total} total")]
    FreeAboveTotal {
        /// The device.
        device: DeviceId,
        /// Declared free bytes.
        free: ByteSize,
        /// Declared total bytes.
        total: ByteSize,
    },
    /// Two placement units in an inventory have the same name.
    #[error("inventory `{component}` has two units named `{name}`")]
    DuplicateUnit {
        /// The inventory's component.
        component: String,
        /// The unit name.
        name: String,
    },
    /// An inventory's bytes add up past `u64::MAX`.
    #[error("inventory `{component}` is larger than 2^64 bytes")]
    InventoryTooLarge {
        /// The inventory's component.
        component: String,
    },
}

fn list(devices: &[DeviceId]) -> String {
    if devices.is_empty() {
        return "no devices".to_owned();
    }
    devices
        .iter()
        .map(|d| format!("`{d}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Which grammar a [`ParseError`] comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Grammar {
    /// An allocation string (`cuda:0,2.5gb;cpu,*`).
    Allocation,
    /// A device graph declaration (`cuda:0=24gib,cpu=64gib`).
    DeviceDeclaration,
    /// A device list (`cuda:1,cpu`).
    DeviceList,
    /// A single device (`cuda:0`).
    Device,
    /// A byte size (`2.5gib`).
    ByteSize,
}

impl Grammar {
    fn noun(self) -> &'static str {
        match self {
            Grammar::Allocation => "allocation",
            Grammar::DeviceDeclaration => "device declaration",
            Grammar::DeviceList => "device list",
            Grammar::Device => "device",
            Grammar::ByteSize => "byte size",
        }
    }
}

/// What was wrong in a string, see [`ParseError`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParseErrorKind {
    /// An entry with nothing before its `,`.
    EmptyDevice,
    /// `;;` or an entry that is only whitespace (a single trailing `;` is allowed).
    EmptyEntry,
    /// A device with no `,VALUE` after it.
    MissingValue,
    /// A device kind that is not `cpu`, `cuda`, `wgpu`, `vulkan`, `metal` or `rocm`.
    UnknownDeviceKind(String),
    /// A device index that is not a number (or `cpu` with an index other than 0).
    BadDeviceIndex(String),
    /// A number that does not parse (`1.2.3`, `..`, a missing number before a unit).
    MalformedNumber,
    /// A number with more than [`crate::number::MAX_DIGITS`] digits, or too big for its unit.
    NumberTooLarge,
    /// A negative number.
    Negative,
    /// `nan` or `inf`.
    NotFinite,
    /// A unit that is not a byte unit or `%` (e.g. `1tx`).
    UnknownUnit(String),
    /// A device named twice; carries the first one's span.
    DuplicateDevice(Range<usize>),
    /// A second `*`; carries the first one's span.
    MultipleStars(Range<usize>),
    /// Ratios that add up to 0 with no `*`.
    RatioSumZero,
    /// Ratios that already reach 100 % although a `*` should take what is left.
    RatioNoRoomForStar(String),
    /// A fraction of device memory above 1.
    FractionAboveOne,
    /// A value of another mode than the first one; carries the first mode and its span.
    MixedModes {
        /// The mode set by the first value.
        first: &'static str,
        /// This value's mode.
        this: &'static str,
        /// Where the first value is.
        first_span: Range<usize>,
    },
    /// A character that does not belong there (a second `,`, a stray `=`).
    Unexpected(char),
    /// A declared device capacity of zero.
    ZeroCapacity,
    /// A declared free size larger than the declared total.
    FreeAboveTotal,
}

/// A string that did not parse, with the position of the fault.
///
/// `Display` renders the message, the input and a caret line under the offending span:
///
/// ```text
/// invalid allocation: unknown unit `tx` (expected one of b, k, kb, kib, m, mb, mib, g, gb, gib, t, tb, tib or %)
///   cuda:0,1tx;cpu,*
///           ^^
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ParseError {
    /// The whole input.
    pub input: String,
    /// Byte range of the offending text in `input` (may be empty: the caret then points
    /// between two characters).
    pub span: Range<usize>,
    /// What was wrong.
    pub kind: ParseErrorKind,
    /// Which grammar was being parsed.
    pub grammar: Grammar,
}

impl ParseError {
    pub(crate) fn new(
        grammar: Grammar,
        input: &str,
        span: Range<usize>,
        kind: ParseErrorKind,
    ) -> Self {
        ParseError {
            input: input.to_owned(),
            span,
            kind,
            grammar,
        }
    }

    /// The one-line message, without the input and caret.
    pub fn message(&self) -> String {
        use ParseErrorKind::*;
        let at = |r: &Range<usize>| self.input.get(r.clone()).unwrap_or("").to_owned();
        match &self.kind {
            EmptyDevice => "missing device before `,`".to_owned(),
            EmptyEntry => "empty entry: remove the extra `;`".to_owned(),
            MissingValue if self.grammar == Grammar::DeviceDeclaration => format!(
                "`{}` has no size: write `DEVICE=TOTAL[/FREE][@LINK]` (e.g. cuda:0=24gib)",
                at(&self.span)
            ),
            MissingValue => format!(
                "`{}` has no value: write `DEVICE,VALUE` (bytes such as 2.5gb, a ratio such as \
                 25%, a fraction such as 0.25, or *)",
                at(&self.span)
            ),
            UnknownUnit(u) if u.is_empty() => format!(
                "missing unit after `{}` (expected one of b, k, kb, kib, m, mb, mib, g, gb, gib, \
                 t, tb, tib)",
                self.input.get(..self.span.start).map_or("", |p| p
                    .rsplit(|c: char| !(c.is_ascii_digit() || c == '.'))
                    .next()
                    .unwrap_or(""))
            ),
            UnknownDeviceKind(k) => format!(
                "unknown device kind `{k}` (expected cpu, cuda, wgpu, vulkan, metal or rocm)"
            ),
            BadDeviceIndex(i) => format!("invalid device index `{i}`"),
            MalformedNumber => format!("malformed number `{}`", at(&self.span)),
            NumberTooLarge => format!("number `{}` is too large or too long", at(&self.span)),
            Negative => format!("negative value `{}`", at(&self.span)),
            NotFinite => format!("value `{}` is not a finite number", at(&self.span)),
            UnknownUnit(u) => format!(
                "unknown unit `{u}` (expected one of b, k, kb, kib, m, mb, mib, g, gb, gib, t, \
                 tb, tib{})",
                if self.grammar == Grammar::Allocation {
                    " or %"
                } else {
                    ""
                }
            ),
            DuplicateDevice(first) => format!(
                "device `{}` is already given at position {}",
                at(&self.span),
                first.start + 1
            ),
            MultipleStars(first) => format!(
                "only one `*` is allowed; the first is at position {}",
                first.start + 1
            ),
            RatioSumZero => "the ratios add up to 0%".to_owned(),
            RatioNoRoomForStar(sum) => {
                format!("the ratios already add up to {sum}%, leaving nothing for `*`")
            }
            FractionAboveOne => format!(
                "fraction `{}` is above 1 (a fraction is a share of the device's total memory; \
                 write a unit for bytes or % for a ratio)",
                at(&self.span)
            ),
            MixedModes {
                first,
                this,
                first_span,
            } => format!(
                "`{}` is {this} but `{}` at position {} set the mode to {first}: one string uses \
                 one mode (plus at most one `*`)",
                at(&self.span),
                at(first_span),
                first_span.start + 1
            ),
            Unexpected(c) => format!("unexpected `{c}`"),
            ZeroCapacity => "a device's capacity must be more than 0 bytes".to_owned(),
            FreeAboveTotal => format!("free size `{}` is larger than the total", at(&self.span)),
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid {}: {}", self.grammar.noun(), self.message())?;
        writeln!(f, "  {}", self.input)?;
        let col = |byte: usize| {
            let byte = byte.min(self.input.len());
            self.input
                .get(..byte)
                .map_or(byte, |prefix| prefix.chars().count())
        };
        let start = col(self.span.start);
        let width = col(self.span.end).saturating_sub(start).max(1);
        write!(f, "  {}{}", " ".repeat(start), "^".repeat(width))
    }
}

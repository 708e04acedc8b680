//! Stage two of parsing: syntax tree → [`AllocSpec`], the meaning of an allocation string.

use std::fmt;
use std::str::FromStr;

use crate::bytesize::ByteSize;
use crate::device::DeviceId;
use crate::error::{Grammar, ParseError, ParseErrorKind};
use crate::number::Decimal;
use crate::syntax::{AllocAst, ValueAst, parse_ast};

/// How the explicit values of an allocation string are read. One string uses one mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Byte quotas (`2.5gb`): a device receives at most that many bytes.
    Bytes,
    /// Ratios (`25%`): shares of the model, normalised by their sum.
    Ratio,
    /// Fractions (`0.2126`): a device receives at most that share of its total memory.
    Fraction,
}

impl Mode {
    fn of(value: &Value) -> Option<Mode> {
        match value {
            Value::Bytes(_) => Some(Mode::Bytes),
            Value::Ratio(_) => Some(Mode::Ratio),
            Value::Fraction(_) => Some(Mode::Fraction),
            Value::Star => None,
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Mode::Bytes => "a byte size",
            Mode::Ratio => "a ratio",
            Mode::Fraction => "a fraction of device memory",
        }
    }
}

/// The value of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Value {
    /// At most this many bytes.
    Bytes(ByteSize),
    /// This percentage of the model (before normalisation).
    Ratio(Decimal),
    /// At most this fraction (0–1) of the device's total memory.
    Fraction(Decimal),
    /// Whatever the other entries leave.
    Star,
}

/// One device and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Entry {
    /// The device.
    pub device: DeviceId,
    /// Its value.
    pub value: Value,
}

/// A validated allocation string: entries in order, one mode, at most one `*`, no device
/// twice. See the crate docs for the rules.
///
/// `Display` gives the canonical form, and `parse(display(spec)) == spec`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct AllocSpec {
    entries: Vec<Entry>,
    mode: Option<Mode>,
}

impl AllocSpec {
    /// Parses and validates an allocation string.
    pub fn parse(input: &str) -> Result<AllocSpec, ParseError> {
        AllocSpec::from_ast(&parse_ast(input)?)
    }

    /// Validates a syntax tree (duplicates, stars, modes, sums).
    pub fn from_ast(ast: &AllocAst) -> Result<AllocSpec, ParseError> {
        let input = ast.input.as_str();
        let err = |span, kind| ParseError::new(Grammar::Allocation, input, span, kind);
        let mut mode: Option<(Mode, std::ops::Range<usize>)> = None;
        let mut star: Option<std::ops::Range<usize>> = None;
        let mut entries = Vec::with_capacity(ast.entries.len());
        for (i, e) in ast.entries.iter().enumerate() {
            if let Some(first) = ast.entries[..i].iter().find(|p| p.device == e.device) {
                return Err(err(
                    e.device_span.clone(),
                    ParseErrorKind::DuplicateDevice(first.device_span.clone()),
                ));
            }
            let value = match e.value {
                ValueAst::Bytes(b) => Value::Bytes(b),
                ValueAst::Ratio(r) => Value::Ratio(r),
                ValueAst::Fraction(f) => {
                    if f.cmp_value(Decimal::from_int(1)).is_gt() {
                        return Err(err(e.value_span.clone(), ParseErrorKind::FractionAboveOne));
                    }
                    Value::Fraction(f)
                }
                ValueAst::Star => {
                    if let Some(first) = &star {
                        return Err(err(
                            e.value_span.clone(),
                            ParseErrorKind::MultipleStars(first.clone()),
                        ));
                    }
                    star = Some(e.value_span.clone());
                    Value::Star
                }
            };
            if let Some(m) = Mode::of(&value) {
                match &mode {
                    None => mode = Some((m, e.value_span.clone())),
                    Some((first, first_span)) if *first != m => {
                        return Err(err(
                            e.value_span.clone(),
                            ParseErrorKind::MixedModes {
                                first: first.noun(),
                                this: m.noun(),
                                first_span: first_span.clone(),
                            },
                        ));
                    }
                    Some(_) => {}
                }
            }
            entries.push(Entry {
                device: e.device,
                value,
            });
        }
        let spec = AllocSpec {
            entries,
            mode: mode.map(|(m, _)| m),
        };
        if spec.mode == Some(Mode::Ratio) {
            let Some(sum) = spec.ratio_sum() else {
                return Err(err(0..input.len(), ParseErrorKind::NumberTooLarge));
            };
            match &star {
                None if sum.is_zero() => {
                    return Err(err(0..input.len(), ParseErrorKind::RatioSumZero));
                }
                Some(span) if sum.cmp_value(Decimal::from_int(100)).is_ge() => {
                    return Err(err(
                        span.clone(),
                        ParseErrorKind::RatioNoRoomForStar(sum.to_string()),
                    ));
                }
                _ => {}
            }
        }
        Ok(spec)
    }

    /// Builds a spec from entries, checking the same rules as parsing (errors then point into
    /// the canonical rendering of the entries).
    pub fn from_entries(entries: Vec<Entry>) -> Result<AllocSpec, ParseError> {
        let text = render(&entries);
        AllocSpec::parse(&text)
    }

    /// A spec from parts the caller has already validated (used for the plan's strings).
    pub(crate) fn from_parts(entries: Vec<Entry>, mode: Option<Mode>) -> AllocSpec {
        AllocSpec { entries, mode }
    }

    /// The entries, in the order given.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// True for the empty string: no expert allocation.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The mode of the explicit values; `None` when every value is `*` (or there are none).
    pub fn mode(&self) -> Option<Mode> {
        self.mode
    }

    /// The entry whose value is `*`, if any.
    pub fn star(&self) -> Option<DeviceId> {
        self.entries
            .iter()
            .find(|e| e.value == Value::Star)
            .map(|e| e.device)
    }

    /// Whether `device` has an entry.
    pub fn contains(&self, device: DeviceId) -> bool {
        self.entries.iter().any(|e| e.device == device)
    }

    /// The explicit ratios as integers at one common scale, with their sum; `None` if they
    /// do not fit (parsing rejects such strings, so a parsed spec always has them).
    pub(crate) fn ratio_weights(&self) -> Option<(Vec<Option<u128>>, u128, u32)> {
        let scale = self
            .entries
            .iter()
            .filter_map(|e| match e.value {
                Value::Ratio(r) => Some(r.scale()),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let mut sum: u128 = 0;
        let mut weights = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            let w = match e.value {
                Value::Ratio(r) => Some(r.mantissa_at(scale)?),
                _ => None,
            };
            sum = sum.checked_add(w.unwrap_or(0))?;
            weights.push(w);
        }
        Some((weights, sum, scale))
    }

    fn ratio_sum(&self) -> Option<Decimal> {
        self.ratio_weights()
            .map(|(_, sum, scale)| Decimal::new(sum, scale))
    }
}

fn render(entries: &[Entry]) -> String {
    let parts: Vec<String> = entries
        .iter()
        .map(|e| {
            let v = match e.value {
                Value::Bytes(b) => b.to_spec_string(),
                Value::Ratio(r) => format!("{r}%"),
                Value::Fraction(f) => f.to_string(),
                Value::Star => "*".to_owned(),
            };
            format!("{},{v}", e.device)
        })
        .collect();
    parts.join(";")
}

impl fmt::Display for AllocSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&render(&self.entries))
    }
}

impl FromStr for AllocSpec {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AllocSpec::parse(s)
    }
}

/// Parses a byte size such as `2.5gb`, `512 MiB` or `1073741824b` (a unit is required).
pub fn parse_byte_size(input: &str) -> Result<ByteSize, ParseError> {
    crate::syntax::parse_bytes_at(Grammar::ByteSize, input, 0..input.len())
}

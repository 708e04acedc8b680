//! Stage one of parsing: text → syntax tree with spans.
//!
//! The tree records each entry's device and value with their byte spans in the input. It
//! checks the shape of each token (device kind, number, unit) but not the relations between
//! entries (duplicates, modes, stars): that is the `spec` module's job.

use std::ops::Range;

use crate::bytesize::ByteSize;
use crate::device::DeviceId;
use crate::error::{Grammar, ParseError, ParseErrorKind};
use crate::number::{Decimal, NumberError};

/// A value as written: one of the four value kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueAst {
    /// A number with a byte unit, already multiplied out and rounded down.
    Bytes(ByteSize),
    /// A number followed by `%`.
    Ratio(Decimal),
    /// A bare number: a fraction of the device's total memory.
    Fraction(Decimal),
    /// `*`: whatever remains.
    Star,
}

/// One `DEVICE,VALUE` entry with the spans of its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryAst {
    /// The device.
    pub device: DeviceId,
    /// Byte span of the device text.
    pub device_span: Range<usize>,
    /// The value.
    pub value: ValueAst,
    /// Byte span of the value text.
    pub value_span: Range<usize>,
}

/// The syntax tree of an allocation string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocAst {
    /// The input it was parsed from.
    pub input: String,
    /// Entries in input order.
    pub entries: Vec<EntryAst>,
}

/// Parses the shape of an allocation string (see the crate docs for the grammar).
pub fn parse_ast(input: &str) -> Result<AllocAst, ParseError> {
    let g = Grammar::Allocation;
    let err = |span: Range<usize>, kind| ParseError::new(g, input, span, kind);
    let mut entries = Vec::new();
    let pieces: Vec<Range<usize>> = split_spans(input, 0..input.len(), ';').collect();
    let last = pieces.len() - 1;
    for (i, piece) in pieces.into_iter().enumerate() {
        let (start, end) = trim_span(input, piece.clone());
        if start == end {
            // "" alone and one trailing ';' are fine; any other empty entry is a mistake.
            if i == last && (i > 0 || input.trim().is_empty()) {
                continue;
            }
            return Err(err(piece.start..piece.start, ParseErrorKind::EmptyEntry));
        }
        let Some(comma) = input[start..end].find(',').map(|c| start + c) else {
            return Err(err(start..end, ParseErrorKind::MissingValue));
        };
        let (ds, de) = trim_span(input, start..comma);
        if ds == de {
            return Err(err(comma..comma + 1, ParseErrorKind::EmptyDevice));
        }
        let device = DeviceId::parse_at(g, input, ds..de)?;
        let (vs, ve) = trim_span(input, comma + 1..end);
        if vs == ve {
            return Err(err(ds..comma + 1, ParseErrorKind::MissingValue));
        }
        if let Some(extra) = input[vs..ve].find([',', '=', ':']) {
            let c = input[vs + extra..].chars().next().unwrap_or(',');
            return Err(err(
                vs + extra..vs + extra + c.len_utf8(),
                ParseErrorKind::Unexpected(c),
            ));
        }
        let value = parse_value(g, input, vs..ve, true)?;
        entries.push(EntryAst {
            device,
            device_span: ds..de,
            value,
            value_span: vs..ve,
        });
    }
    Ok(AllocAst {
        input: input.to_owned(),
        entries,
    })
}

/// Parses one value token at `span`. With `allow_modes` false only bytes are accepted (for
/// device declarations and byte sizes).
pub(crate) fn parse_value(
    g: Grammar,
    input: &str,
    span: Range<usize>,
    allow_modes: bool,
) -> Result<ValueAst, ParseError> {
    let text = &input[span.clone()];
    let err = |sub: Range<usize>, kind| {
        ParseError::new(g, input, span.start + sub.start..span.start + sub.end, kind)
    };
    if allow_modes && text == "*" {
        return Ok(ValueAst::Star);
    }
    if text.starts_with('-') {
        return Err(err(0..text.len(), ParseErrorKind::Negative));
    }
    let lower = text.trim_start_matches('+').to_ascii_lowercase();
    if lower.starts_with("nan") || lower.starts_with("inf") {
        return Err(err(0..text.len(), ParseErrorKind::NotFinite));
    }
    let num_len = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let number = match Decimal::parse(&text[..num_len]) {
        Ok(n) => n,
        Err(NumberError::TooManyDigits) => {
            return Err(err(0..num_len, ParseErrorKind::NumberTooLarge));
        }
        Err(NumberError::Malformed) => {
            let end = if num_len == 0 { text.len() } else { num_len };
            return Err(err(0..end, ParseErrorKind::MalformedNumber));
        }
    };
    let (us, ue) = trim_span(text, num_len..text.len());
    let unit = &text[us..ue];
    if unit.is_empty() && allow_modes {
        return Ok(ValueAst::Fraction(number));
    }
    if unit == "%" && allow_modes {
        return Ok(ValueAst::Ratio(number));
    }
    let unit_span = if unit.is_empty() {
        num_len..num_len
    } else {
        us..ue
    };
    let multiple = ByteSize::unit_multiple(unit)
        .ok_or_else(|| err(unit_span, ParseErrorKind::UnknownUnit(unit.to_owned())))?;
    ByteSize::from_decimal(number, multiple)
        .map(ValueAst::Bytes)
        .ok_or_else(|| err(0..text.len(), ParseErrorKind::NumberTooLarge))
}

/// Parses a byte size (a unit is required) at `span`, surrounding whitespace allowed.
pub(crate) fn parse_bytes_at(
    g: Grammar,
    input: &str,
    span: Range<usize>,
) -> Result<ByteSize, ParseError> {
    let (s, e) = trim_span(input, span);
    if s == e {
        return Err(ParseError::new(
            g,
            input,
            s..e,
            ParseErrorKind::MalformedNumber,
        ));
    }
    match parse_value(g, input, s..e, false)? {
        ValueAst::Bytes(b) => Ok(b),
        _ => unreachable!("parse_value without modes returns bytes or an error"),
    }
}

/// Splits `input[range]` at every `sep`, yielding the byte ranges between separators.
pub(crate) fn split_spans(
    input: &str,
    range: Range<usize>,
    sep: char,
) -> impl Iterator<Item = Range<usize>> + '_ {
    let base = range.start;
    let text = &input[range.clone()];
    let mut starts = vec![0];
    starts.extend(text.match_indices(sep).map(|(i, _)| i + sep.len_utf8()));
    let mut ends: Vec<usize> = text.match_indices(sep).map(|(i, _)| i).collect();
    ends.push(text.len());
    starts
        .into_iter()
        .zip(ends)
        .map(move |(s, e)| base + s..base + e)
}

/// The span with surrounding whitespace removed, as `(start, end)`.
pub(crate) fn trim_span(input: &str, range: Range<usize>) -> (usize, usize) {
    let text = &input[range.clone()];
    let start = range.start + (text.len() - text.trim_start().len());
    let end = range.end - (text.len() - text.trim_end().len());
    (start, end.max(start))
}

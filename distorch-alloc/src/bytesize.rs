//! [`ByteSize`]: a number of bytes, with the unit grammar of allocation strings.

use std::fmt;
use std::ops::{Add, AddAssign};

use crate::number::Decimal;

/// A number of bytes.
///
/// Parsing follows the allocation grammar: a decimal number and a unit from
/// `b k kb kib m mb mib g gb gib t tb tib` (case-insensitive). Multiples are binary, as in
/// DisTorch2: `1gb` = `1gib` = 2^30 bytes. Fractional byte counts are rounded down.
///
/// `Display` is human-oriented (`2.50 GiB`); [`ByteSize::to_spec_string`] is the exact,
/// re-parseable form used in allocation strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

/// Byte units accepted in allocation strings, lower-case, with their multiple.
pub const UNITS: &[(&str, u64)] = &[
    ("b", 1),
    ("k", KIB),
    ("kb", KIB),
    ("kib", KIB),
    ("m", MIB),
    ("mb", MIB),
    ("mib", MIB),
    ("g", GIB),
    ("gb", GIB),
    ("gib", GIB),
    ("t", TIB),
    ("tb", TIB),
    ("tib", TIB),
];

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

impl ByteSize {
    /// Zero bytes.
    pub const ZERO: ByteSize = ByteSize(0);

    /// `n` kibibytes.
    pub const fn kib(n: u64) -> ByteSize {
        ByteSize(n * KIB)
    }

    /// `n` mebibytes.
    pub const fn mib(n: u64) -> ByteSize {
        ByteSize(n * MIB)
    }

    /// `n` gibibytes.
    pub const fn gib(n: u64) -> ByteSize {
        ByteSize(n * GIB)
    }

    /// The number of bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }

    /// Looks up a unit (case-insensitive) and returns its multiple.
    pub fn unit_multiple(unit: &str) -> Option<u64> {
        let lower = unit.to_ascii_lowercase();
        UNITS.iter().find(|(u, _)| *u == lower).map(|&(_, m)| m)
    }

    /// `floor(number * multiple)`, or `None` if it exceeds `u64`.
    pub(crate) fn from_decimal(number: Decimal, multiple: u64) -> Option<ByteSize> {
        let v = number.mul_floor(u128::from(multiple))?;
        u64::try_from(v).ok().map(ByteSize)
    }

    /// Saturating subtraction.
    pub fn saturating_sub(self, other: ByteSize) -> ByteSize {
        ByteSize(self.0.saturating_sub(other.0))
    }

    /// Saturating addition.
    pub fn saturating_add(self, other: ByteSize) -> ByteSize {
        ByteSize(self.0.saturating_add(other.0))
    }

    /// Checked addition.
    pub fn checked_add(self, other: ByteSize) -> Option<ByteSize> {
        self.0.checked_add(other.0).map(ByteSize)
    }

    /// The shortest exact spelling in the allocation grammar: `2.5gib`, `512kib`, `1234b`.
    /// Parsing it gives back exactly `self`.
    pub fn to_spec_string(self) -> String {
        const NAMED: [(&str, u64); 4] = [("tib", TIB), ("gib", GIB), ("mib", MIB), ("kib", KIB)];
        for (name, unit) in NAMED {
            if self.0 < unit {
                continue;
            }
            for decimals in 0..=3u32 {
                let scaled = u128::from(self.0) * 10u128.pow(decimals);
                if scaled % u128::from(unit) == 0 {
                    let mantissa = scaled / u128::from(unit);
                    return format!("{}{name}", Decimal::new(mantissa, decimals));
                }
            }
        }
        format!("{}b", self.0)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMED: [(&str, u64); 4] = [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)];
        for (name, unit) in NAMED {
            if self.0 >= unit {
                return write!(f, "{:.2} {name}", self.0 as f64 / unit as f64);
            }
        }
        write!(f, "{} B", self.0)
    }
}

impl Add for ByteSize {
    type Output = ByteSize;
    /// Panics on overflow, like integer addition in debug builds; sums of real tensor sizes
    /// stay far below `u64::MAX` (inventories check their totals when built).
    fn add(self, rhs: ByteSize) -> ByteSize {
        ByteSize(self.0.checked_add(rhs.0).expect("ByteSize overflow"))
    }
}

impl AddAssign for ByteSize {
    fn add_assign(&mut self, rhs: ByteSize) {
        *self = *self + rhs;
    }
}

impl std::iter::Sum for ByteSize {
    fn sum<I: Iterator<Item = ByteSize>>(iter: I) -> ByteSize {
        iter.fold(ByteSize::ZERO, |a, b| a + b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_strings_are_short_and_exact() {
        assert_eq!(ByteSize(0).to_spec_string(), "0b");
        assert_eq!(ByteSize(1000).to_spec_string(), "1000b");
        assert_eq!(ByteSize(1024).to_spec_string(), "1kib");
        assert_eq!(ByteSize(GIB * 5 / 2).to_spec_string(), "2.5gib");
        assert_eq!(ByteSize(GIB + 1).to_spec_string(), "1073741825b");
        assert_eq!(ByteSize(MIB * 1536).to_spec_string(), "1.5gib");
        assert_eq!(ByteSize(KIB * 3 / 2).to_spec_string(), "1.5kib");
    }

    #[test]
    fn display_is_human() {
        assert_eq!(ByteSize(512).to_string(), "512 B");
        assert_eq!(ByteSize(GIB * 5 / 2).to_string(), "2.50 GiB");
    }

    #[test]
    fn units_are_binary_and_case_insensitive() {
        assert_eq!(ByteSize::unit_multiple("GB"), Some(GIB));
        assert_eq!(ByteSize::unit_multiple("Tb"), Some(TIB));
        assert_eq!(ByteSize::unit_multiple("k"), Some(KIB));
        assert_eq!(ByteSize::unit_multiple("xb"), None);
    }
}

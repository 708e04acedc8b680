//! Exact decimal numbers and the integer arithmetic the planner needs.
//!
//! Allocation strings hold decimals (`2.5gb`, `0.2126`, `12.5%`). They are kept as an exact
//! mantissa and scale, never as floats, so quotas are computed without rounding surprises and
//! the plan's strings reproduce it byte for byte.

use std::fmt;

/// Most significant digits a number in an allocation string may have.
pub const MAX_DIGITS: usize = 24;

/// An exact, non-negative decimal: `mantissa / 10^scale`, normalised (no trailing zero in the
/// fractional part) so that derived equality is equality of value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Decimal {
    mantissa: u128,
    scale: u32,
}

/// Why a piece of text is not a decimal number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NumberError {
    /// No digit at all, or more than one `.`.
    Malformed,
    /// More than [`MAX_DIGITS`] digits.
    TooManyDigits,
}

impl Decimal {
    /// Zero.
    pub const ZERO: Decimal = Decimal {
        mantissa: 0,
        scale: 0,
    };

    /// A whole number.
    pub fn from_int(value: u64) -> Decimal {
        Decimal {
            mantissa: value as u128,
            scale: 0,
        }
    }

    /// `mantissa / 10^scale`, normalised. `scale` must be at most 38.
    pub fn new(mantissa: u128, scale: u32) -> Decimal {
        let mut d = Decimal { mantissa, scale };
        while d.scale > 0 && d.mantissa.is_multiple_of(10) {
            d.mantissa /= 10;
            d.scale -= 1;
        }
        if d.mantissa == 0 {
            d.scale = 0;
        }
        d
    }

    /// Parses `digits[.digits]` or `.digits` (no sign, no exponent).
    pub(crate) fn parse(text: &str) -> Result<Decimal, NumberError> {
        let (int, frac) = match text.split_once('.') {
            Some((i, f)) => (i, f),
            None => (text, ""),
        };
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if (int.is_empty() && frac.is_empty()) || !all_digits(int) || !all_digits(frac) {
            return Err(NumberError::Malformed);
        }
        let significant = int.trim_start_matches('0').len() + frac.len();
        if significant > MAX_DIGITS {
            return Err(NumberError::TooManyDigits);
        }
        let mut mantissa: u128 = 0;
        for b in int.bytes().chain(frac.bytes()) {
            mantissa = mantissa * 10 + u128::from(b - b'0');
        }
        Ok(Decimal::new(mantissa, frac.len() as u32))
    }

    /// The mantissa (`value * 10^scale`).
    pub fn mantissa(self) -> u128 {
        self.mantissa
    }

    /// Number of digits after the decimal point.
    pub fn scale(self) -> u32 {
        self.scale
    }

    /// True for zero.
    pub fn is_zero(self) -> bool {
        self.mantissa == 0
    }

    /// `floor(self * factor)`, or `None` if it does not fit a `u128`.
    pub fn mul_floor(self, factor: u128) -> Option<u128> {
        mul_div_floor(self.mantissa, factor, 10u128.pow(self.scale))
    }

    /// The value with its mantissa rescaled to `scale` digits (which must be ≥ its own).
    pub(crate) fn mantissa_at(self, scale: u32) -> Option<u128> {
        self.mantissa
            .checked_mul(10u128.checked_pow(scale.checked_sub(self.scale)?)?)
    }

    /// Compares values exactly.
    pub fn cmp_value(self, other: Decimal) -> std::cmp::Ordering {
        let split = |d: Decimal| {
            let unit = 10u128.pow(d.scale);
            (d.mantissa / unit, d.mantissa % unit)
        };
        let (ia, fa) = split(self);
        let (ib, fb) = split(other);
        let s = self.scale.max(other.scale);
        // Fractional parts are below 10^scale ≤ 10^MAX_DIGITS, so rescaling them fits.
        let fa = fa * 10u128.pow(s - self.scale);
        let fb = fb * 10u128.pow(s - other.scale);
        ia.cmp(&ib).then(fa.cmp(&fb))
    }

    /// Lossy conversion for display and statistics only.
    pub fn to_f64(self) -> f64 {
        self.mantissa as f64 / 10f64.powi(self.scale as i32)
    }
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = self.mantissa.to_string();
        let scale = self.scale as usize;
        if scale == 0 {
            return f.write_str(&digits);
        }
        if digits.len() <= scale {
            write!(f, "0.{}{}", "0".repeat(scale - digits.len()), digits)
        } else {
            let (i, frac) = digits.split_at(digits.len() - scale);
            write!(f, "{i}.{frac}")
        }
    }
}

/// `floor(a * b / c)` computed exactly with a 256-bit intermediate; `None` when `c == 0` or
/// the result does not fit a `u128`.
pub fn mul_div_floor(a: u128, b: u128, c: u128) -> Option<u128> {
    if c == 0 {
        return None;
    }
    if let Some(p) = a.checked_mul(b) {
        return Some(p / c);
    }
    let (hi, lo) = mul_wide(a, b);
    if hi >= c {
        return None; // quotient would need more than 128 bits
    }
    // Long division of the 256-bit (hi, lo) by c, one bit at a time.
    let mut rem = hi;
    let mut quot: u128 = 0;
    for i in (0..128).rev() {
        let carry = rem >> 127;
        rem = (rem << 1) | ((lo >> i) & 1);
        quot <<= 1;
        if carry == 1 || rem >= c {
            rem = rem.wrapping_sub(c);
            quot |= 1;
        }
    }
    Some(quot)
}

/// Full 256-bit product of two u128 as (high, low).
fn mul_wide(a: u128, b: u128) -> (u128, u128) {
    const MASK: u128 = u64::MAX as u128;
    let (a_hi, a_lo) = (a >> 64, a & MASK);
    let (b_hi, b_lo) = (b >> 64, b & MASK);
    let ll = a_lo * b_lo;
    let lh = a_lo * b_hi;
    let hl = a_hi * b_lo;
    let hh = a_hi * b_hi;
    let mid = (ll >> 64) + (lh & MASK) + (hl & MASK);
    let lo = (ll & MASK) | (mid << 64);
    let hi = hh + (lh >> 64) + (hl >> 64) + (mid >> 64);
    (hi, lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_normalises() {
        assert_eq!(Decimal::parse("2.50"), Ok(Decimal::new(25, 1)));
        assert_eq!(Decimal::parse(".5"), Ok(Decimal::new(5, 1)));
        assert_eq!(Decimal::parse("5."), Ok(Decimal::from_int(5)));
        assert_eq!(Decimal::parse("007"), Ok(Decimal::from_int(7)));
        assert_eq!(Decimal::parse("0.000"), Ok(Decimal::ZERO));
        assert_eq!(Decimal::parse("."), Err(NumberError::Malformed));
        assert_eq!(Decimal::parse("1.2.3"), Err(NumberError::Malformed));
        assert_eq!(Decimal::parse("1x"), Err(NumberError::Malformed));
        assert_eq!(
            Decimal::parse("1234567890123456789012345"),
            Err(NumberError::TooManyDigits)
        );
    }

    #[test]
    fn displays_exactly() {
        for s in ["0", "1", "0.2126", "12.5", "0.0001", "1000"] {
            assert_eq!(Decimal::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn wide_mul_div_matches_narrow() {
        let cases = [
            (u128::MAX, 3, 7),
            (u128::MAX / 3, u128::MAX / 5, u128::MAX / 2),
            (1 << 100, 1 << 100, 1 << 90),
            (123_456_789, 987_654_321, 1000),
        ];
        for (a, b, c) in cases {
            let got = mul_div_floor(a, b, c);
            if let Some(p) = a.checked_mul(b) {
                assert_eq!(got, Some(p / c));
            }
        }
        assert_eq!(mul_div_floor(1 << 100, 1 << 100, 1 << 90), Some(1 << 110));
        assert_eq!(
            mul_div_floor(u128::MAX, u128::MAX, u128::MAX),
            Some(u128::MAX)
        );
        assert_eq!(mul_div_floor(u128::MAX, 2, 1), None);
        assert_eq!(mul_div_floor(1, 1, 0), None);
    }
}

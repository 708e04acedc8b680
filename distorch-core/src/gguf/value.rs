//! GGUF metadata values ([`Value`]) and the bounded little-endian reader they are parsed with.
//!
//! Every read is checked against the bytes left in the file before anything is allocated, so
//! a hostile count or length is an error, never an allocation larger than the file.

use std::io::Read;

/// A metadata value of a GGUF file.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Value {
    /// `UINT8`.
    U8(u8),
    /// `INT8`.
    I8(i8),
    /// `UINT16`.
    U16(u16),
    /// `INT16`.
    I16(i16),
    /// `UINT32`.
    U32(u32),
    /// `INT32`.
    I32(i32),
    /// `UINT64`.
    U64(u64),
    /// `INT64`.
    I64(i64),
    /// `FLOAT32`.
    F32(f32),
    /// `FLOAT64`.
    F64(f64),
    /// `BOOL`.
    Bool(bool),
    /// `STRING` (UTF-8).
    String(String),
    /// `ARRAY`, its elements stored as compactly as in the file.
    Array(Array),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer scalar.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// A scalar as text (arrays give `None`): how it appears in the index's metadata map.
    pub fn scalar_text(&self) -> Option<String> {
        Some(match self {
            Value::U8(v) => v.to_string(),
            Value::I8(v) => v.to_string(),
            Value::U16(v) => v.to_string(),
            Value::I16(v) => v.to_string(),
            Value::U32(v) => v.to_string(),
            Value::I32(v) => v.to_string(),
            Value::U64(v) => v.to_string(),
            Value::I64(v) => v.to_string(),
            Value::F32(v) => v.to_string(),
            Value::F64(v) => v.to_string(),
            Value::Bool(v) => v.to_string(),
            Value::String(s) => s.clone(),
            _ => return None,
        })
    }
}

/// Why reading stopped, before the file and field are attached.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The file ends before the field does.
    Truncated,
    /// A length or count is past a cap.
    Limit { count: u64, max: u64 },
    /// A field holds an impossible value.
    Invalid(String),
    /// The operating system failed the read.
    Io(std::io::Error),
}

/// Caps on what one file may declare.
pub(crate) struct Caps {
    pub(crate) string: u64,
    pub(crate) array_depth: usize,
}

/// A reader that knows how many bytes of the file are left.
pub(crate) struct Bounded<R> {
    inner: R,
    pub(crate) pos: u64,
    pub(crate) len: u64,
}

impl<R: Read> Bounded<R> {
    pub(crate) fn new(inner: R, len: u64) -> Bounded<R> {
        Bounded { inner, pos: 0, len }
    }

    pub(crate) fn left(&self) -> u64 {
        self.len - self.pos
    }

    /// Fails unless `n` more bytes exist.
    pub(crate) fn need(&self, n: u64) -> Result<(), ReadError> {
        if n > self.left() {
            Err(ReadError::Truncated)
        } else {
            Ok(())
        }
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<(), ReadError> {
        self.need(buf.len() as u64)?;
        self.inner.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                ReadError::Truncated
            } else {
                ReadError::Io(e)
            }
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], ReadError> {
        let mut b = [0u8; N];
        self.fill(&mut b)?;
        Ok(b)
    }

    pub(crate) fn u32(&mut self) -> Result<u32, ReadError> {
        self.array().map(u32::from_le_bytes)
    }

    pub(crate) fn u64(&mut self) -> Result<u64, ReadError> {
        self.array().map(u64::from_le_bytes)
    }

    /// A length-prefixed UTF-8 string of at most `max` bytes.
    pub(crate) fn string(&mut self, max: u64) -> Result<String, ReadError> {
        let n = self.u64()?;
        if n > max {
            return Err(ReadError::Limit { count: n, max });
        }
        self.need(n)?;
        let mut b = vec![0u8; n as usize]; // bounded by the file and the cap
        self.fill(&mut b)?;
        String::from_utf8(b).map_err(|e| ReadError::Invalid(format!("not UTF-8 ({e})")))
    }

    /// A value of GGUF value type `kind`.
    pub(crate) fn value(
        &mut self,
        kind: u32,
        caps: &Caps,
        depth: usize,
    ) -> Result<Value, ReadError> {
        Ok(match kind {
            0 => Value::U8(u8::from_le_bytes(self.array()?)),
            1 => Value::I8(i8::from_le_bytes(self.array()?)),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => Value::Bool(self.bool()?),
            8 => Value::String(self.string(caps.string)?),
            9 => Value::Array(self.read_array(caps, depth)?),
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(ReadError::Invalid(format!("unknown value type {other}"))),
        })
    }

    fn bool(&mut self) -> Result<bool, ReadError> {
        match self.array::<1>()?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(ReadError::Invalid(format!("bool byte {b} is not 0 or 1"))),
        }
    }

    fn read_array(&mut self, caps: &Caps, depth: usize) -> Result<Array, ReadError> {
        if depth >= caps.array_depth {
            return Err(ReadError::Limit {
                count: depth as u64 + 1,
                max: caps.array_depth as u64,
            });
        }
        let kind = self.u32()?;
        let count = self.u64()?;
        // Each element's bytes in the file bound what it takes in memory (a string's length
        // prefix is eight bytes, one `u32` end here; a nested array's header twelve), so a
        // count the rest of the file cannot hold is refused before anything is allocated.
        let min = match kind {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            9 => std::mem::size_of::<Array>() as u64,
            other => {
                return Err(ReadError::Invalid(format!(
                    "unknown array element type {other}"
                )));
            }
        };
        if count > self.left() / min {
            return Err(ReadError::Truncated);
        }
        let n = count as usize;
        macro_rules! prim {
            ($variant:ident, $t:ty) => {{
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(<$t>::from_le_bytes(self.array()?));
                }
                Array::$variant(v)
            }};
        }
        let array = match kind {
            0 => prim!(U8, u8),
            1 => prim!(I8, i8),
            2 => prim!(U16, u16),
            3 => prim!(I16, i16),
            4 => prim!(U32, u32),
            5 => prim!(I32, i32),
            6 => prim!(F32, f32),
            10 => prim!(U64, u64),
            11 => prim!(I64, i64),
            12 => prim!(F64, f64),
            7 => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.bool()?);
                }
                Array::Bool(v)
            }
            8 => {
                let mut strings = StringArray::default();
                strings.ends.reserve(n);
                for _ in 0..n {
                    let s = self.string(caps.string)?;
                    strings.push(&s).ok_or(ReadError::Limit {
                        count: strings.text.len() as u64 + s.len() as u64,
                        max: u64::from(u32::MAX),
                    })?;
                }
                Array::Strings(strings)
            }
            _ => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.read_array(caps, depth + 1)?);
                }
                Array::Arrays(v)
            }
        };
        Ok(array)
    }
}

/// The elements of a GGUF array, each kind in its own vector.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Array {
    /// `UINT8` elements.
    U8(Vec<u8>),
    /// `INT8` elements.
    I8(Vec<i8>),
    /// `UINT16` elements.
    U16(Vec<u16>),
    /// `INT16` elements.
    I16(Vec<i16>),
    /// `UINT32` elements.
    U32(Vec<u32>),
    /// `INT32` elements.
    I32(Vec<i32>),
    /// `UINT64` elements.
    U64(Vec<u64>),
    /// `INT64` elements.
    I64(Vec<i64>),
    /// `FLOAT32` elements.
    F32(Vec<f32>),
    /// `FLOAT64` elements.
    F64(Vec<f64>),
    /// `BOOL` elements.
    Bool(Vec<bool>),
    /// `STRING` elements.
    Strings(StringArray),
    /// Nested arrays.
    Arrays(Vec<Array>),
}

impl Array {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::F64(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::Strings(v) => v.len(),
            Array::Arrays(v) => v.len(),
        }
    }

    /// True when it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as unsigned integers, if it is an array of non-negative integers.
    pub fn to_u64s(&self) -> Option<Vec<u64>> {
        fn all<T: Copy>(v: &[T], f: impl Fn(T) -> Option<u64>) -> Option<Vec<u64>> {
            v.iter().map(|&x| f(x)).collect()
        }
        match self {
            Array::U8(v) => all(v, |x| Some(x.into())),
            Array::U16(v) => all(v, |x| Some(x.into())),
            Array::U32(v) => all(v, |x| Some(x.into())),
            Array::U64(v) => all(v, Some),
            Array::I8(v) => all(v, |x| u64::try_from(x).ok()),
            Array::I16(v) => all(v, |x| u64::try_from(x).ok()),
            Array::I32(v) => all(v, |x| u64::try_from(x).ok()),
            Array::I64(v) => all(v, |x| u64::try_from(x).ok()),
            _ => None,
        }
    }
}

/// An array of strings kept as one text and the end of each string in it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StringArray {
    text: String,
    ends: Vec<u32>,
}

impl StringArray {
    /// Number of strings.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// True when it holds no strings.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The `i`th string.
    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)? as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        self.text.get(start..end)
    }

    /// The strings in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        (0..self.len()).filter_map(|i| self.get(i))
    }

    fn push(&mut self, s: &str) -> Option<()> {
        let end = u32::try_from(self.text.len() + s.len()).ok()?;
        self.text.push_str(s);
        self.ends.push(end);
        Some(())
    }
}

//! [`DType`]: the element types a weights file may hold, plain (safetensors and GGUF) and
//! block-quantized (GGUF's GGML types).

use std::fmt;

/// An element type as stored in a weights file: the safetensors dtypes, and the GGML
/// block-quantized types GGUF files hold (elements stored in blocks of 32 or 256 with their
/// scales, see [`DType::block_elems`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum DType {
    /// Boolean, one byte.
    Bool,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
    /// 8-bit float, 4 exponent and 3 mantissa bits, finite-only (`float8_e4m3fn`).
    F8E4M3,
    /// 8-bit float, 5 exponent and 2 mantissa bits (`float8_e5m2`).
    F8E5M2,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE single precision.
    F32,
    /// IEEE double precision.
    F64,
    /// GGML `Q4_0`: blocks of 32, an f16 scale and 4-bit values (18 bytes).
    Q4_0,
    /// GGML `Q4_1`: blocks of 32, f16 scale and minimum, 4-bit values (20 bytes).
    Q4_1,
    /// GGML `Q5_0`: blocks of 32, an f16 scale and 5-bit values (22 bytes).
    Q5_0,
    /// GGML `Q5_1`: blocks of 32, f16 scale and minimum, 5-bit values (24 bytes).
    Q5_1,
    /// GGML `Q8_0`: blocks of 32, an f16 scale and 8-bit values (34 bytes).
    Q8_0,
    /// GGML `Q2_K`: super-blocks of 256, 16 sub-blocks with 4-bit scales and mins (84 bytes).
    Q2K,
    /// GGML `Q3_K`: super-blocks of 256, 16 sub-blocks with 6-bit scales (110 bytes).
    Q3K,
    /// GGML `Q4_K`: super-blocks of 256, 8 sub-blocks with 6-bit scales and mins (144 bytes).
    Q4K,
    /// GGML `Q5_K`: super-blocks of 256, 8 sub-blocks with 6-bit scales and mins (176 bytes).
    Q5K,
    /// GGML `Q6_K`: super-blocks of 256, 16 sub-blocks with 8-bit scales (210 bytes).
    Q6K,
}

impl DType {
    /// Every dtype, in size order.
    pub const ALL: [DType; 15] = [
        DType::Bool,
        DType::U8,
        DType::I8,
        DType::F8E4M3,
        DType::F8E5M2,
        DType::I16,
        DType::U16,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::U32,
        DType::F32,
        DType::I64,
        DType::U64,
        DType::F64,
    ];

    /// The GGML block-quantized types, in GGML's numbering order.
    pub const QUANTIZED: [DType; 10] = [
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q8_0,
        DType::Q2K,
        DType::Q3K,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
    ];

    /// Bytes per element; for a block-quantized type, bytes per block of
    /// [`DType::block_elems`] elements. [`DType::bytes_for`] gives a tensor's bytes for both.
    pub fn size(self) -> u64 {
        match self {
            DType::Bool | DType::U8 | DType::I8 | DType::F8E4M3 | DType::F8E5M2 => 1,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 => 8,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
            DType::Q5_0 => 22,
            DType::Q5_1 => 24,
            DType::Q8_0 => 34,
            DType::Q2K => 84,
            DType::Q3K => 110,
            DType::Q4K => 144,
            DType::Q5K => 176,
            DType::Q6K => 210,
        }
    }

    /// Elements per block: 1 for the plain types, 32 or 256 for the block-quantized ones.
    pub fn block_elems(self) -> u64 {
        match self {
            DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 => 32,
            DType::Q2K | DType::Q3K | DType::Q4K | DType::Q5K | DType::Q6K => 256,
            _ => 1,
        }
    }

    /// True for the GGML block-quantized types.
    pub fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }

    /// Bytes of `numel` elements: `None` when `numel` is not a whole number of blocks or the
    /// size overflows 64 bits.
    pub fn bytes_for(self, numel: u64) -> Option<u64> {
        let block = self.block_elems();
        if !numel.is_multiple_of(block) {
            return None;
        }
        (numel / block).checked_mul(self.size())
    }

    /// The type's name: safetensors' for the plain types (`F16`, `F8_E4M3`), GGML's for the
    /// quantized ones (`Q4_K`).
    pub fn name(self) -> &'static str {
        match self {
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
            DType::Q5_0 => "Q5_0",
            DType::Q5_1 => "Q5_1",
            DType::Q8_0 => "Q8_0",
            DType::Q2K => "Q2_K",
            DType::Q3K => "Q3_K",
            DType::Q4K => "Q4_K",
            DType::Q5K => "Q5_K",
            DType::Q6K => "Q6_K",
            plain => plain.safetensors_name(),
        }
    }

    /// The name used in safetensors headers (`F16`, `BF16`, `F8_E4M3`, ...); GGML's name for
    /// a quantized type, which safetensors cannot hold.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::I64 => "I64",
            DType::U64 => "U64",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
            DType::F64 => "F64",
            quantized => quantized.name(),
        }
    }

    /// Parses a safetensors dtype name.
    pub fn from_safetensors(name: &str) -> Option<DType> {
        DType::ALL
            .into_iter()
            .find(|d| d.safetensors_name() == name)
    }

    /// True for the floating-point types, the block-quantized ones included (they
    /// dequantize to floats).
    pub fn is_float(self) -> bool {
        self.is_quantized()
            || matches!(
                self,
                DType::F8E4M3 | DType::F8E5M2 | DType::F16 | DType::BF16 | DType::F32 | DType::F64
            )
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

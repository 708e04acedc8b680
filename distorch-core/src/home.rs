//! How weights are held at each kind of home, so that a plan's bytes are the bytes the loaded
//! weights occupy: [`DeviceRule`] (device homes) and [`Homes`] (the inventory's view of both).
//!
//! A tensor has one dtype at each home and its bytes there follow from it:
//!
//! | home | dtype |
//! |---|---|
//! | `cpu` as a donor, unchanged by loading | the file's (borrowed from the memory map) |
//! | `cpu` as a donor, changed by loading (a LoRA) | [`changed_dtype`]: the file's, fp8 → bf16 unless re-quantised, f64 → f32, GGUF blocks → the compute dtype |
//! | a device (the compute device, a GPU donor) | the host dtype as [`DeviceRule`] says: kept, widened to f32, or fp8 / GGUF blocks packed four bytes to a 32-bit word |
//!
//! [`DeviceRule::NATIVE`] is what CubeCL's backends (wgpu, CUDA) hold when they have the half
//! types; [`DeviceRule::WIDENED`] is ndarray's (no f16, bf16 or fp8: every weight as f32).

use crate::dtype::DType;

/// How a device home holds a float tensor of some dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceForm {
    /// In that dtype.
    Native,
    /// Widened to f32.
    F32,
    /// The file's bytes (fp8: one per element; GGUF: its blocks), packed four to a 32-bit
    /// integer word and decoded on the device when fetched: `4 * ceil(bytes / 4)` bytes.
    PackedBytes,
}

/// How a backend holds each float dtype at device homes (the compute device and GPU donors).
/// f32 is always native; f64 is always held as f32 (no diffusion kernel computes in f64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceRule {
    /// f16 tensors.
    pub f16: DeviceForm,
    /// bf16 tensors.
    pub bf16: DeviceForm,
    /// f8_e4m3fn and f8_e5m2 tensors.
    pub fp8: DeviceForm,
    /// GGUF block-quantized tensors (`Q4_K`, ...): packed (dequantized on the device when
    /// fetched) or dequantized to f32 when placed.
    pub quantized: DeviceForm,
}

impl Default for DeviceRule {
    fn default() -> Self {
        DeviceRule::NATIVE
    }
}

impl DeviceRule {
    /// Every weight in its own dtype (fp8 and GGUF blocks as packed bytes): a GPU backend with
    /// f16 and bf16.
    pub const NATIVE: DeviceRule = DeviceRule {
        f16: DeviceForm::Native,
        bf16: DeviceForm::Native,
        fp8: DeviceForm::PackedBytes,
        quantized: DeviceForm::PackedBytes,
    };

    /// Every weight widened to f32: a backend without half types (ndarray).
    pub const WIDENED: DeviceRule = DeviceRule {
        f16: DeviceForm::F32,
        bf16: DeviceForm::F32,
        fp8: DeviceForm::F32,
        quantized: DeviceForm::F32,
    };

    /// How a tensor of `dtype` is held.
    pub fn form(&self, dtype: DType) -> DeviceForm {
        match dtype {
            DType::F16 => self.f16,
            DType::BF16 => self.bf16,
            DType::F8E4M3 | DType::F8E5M2 => self.fp8,
            DType::F64 => DeviceForm::F32,
            q if q.is_quantized() => self.quantized,
            _ => DeviceForm::Native,
        }
    }

    /// Bytes a tensor of `numel` elements of `dtype` occupies at a device home.
    pub fn device_bytes(&self, dtype: DType, numel: u64) -> u64 {
        match self.form(dtype) {
            DeviceForm::Native => numel.saturating_mul(dtype.size()),
            DeviceForm::F32 => numel.saturating_mul(4),
            DeviceForm::PackedBytes => stored_bytes(dtype, numel).div_ceil(4).saturating_mul(4),
        }
    }

    /// A short description when the rule changes any of `dtypes` (for plan reports), e.g.
    /// `F16 as f32 at device homes`.
    pub fn describe(&self, dtypes: &[DType]) -> Option<String> {
        let changed: Vec<String> = dtypes
            .iter()
            .filter_map(|&d| match self.form(d) {
                DeviceForm::F32 if d != DType::F32 => Some(format!("{d} as F32")),
                DeviceForm::PackedBytes => Some(format!("{d} packed")),
                _ => None,
            })
            .collect();
        (!changed.is_empty()).then(|| format!("{} at device homes", changed.join(", ")))
    }
}

/// Bytes of `numel` elements of `dtype` as a file stores them (whole blocks for the
/// quantized types; saturating).
fn stored_bytes(dtype: DType, numel: u64) -> u64 {
    dtype.bytes_for(numel).unwrap_or_else(|| {
        numel
            .div_ceil(dtype.block_elems())
            .saturating_mul(dtype.size())
    })
}

/// What the fp8 tensors that loading changes (LoRA-patched) are stored as: bf16 by default
/// (`high_precision_loras`), or fp8 again when re-quantised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Fp8Changed {
    /// Kept at bf16.
    #[default]
    Bf16,
    /// Re-quantised to the file's fp8 dtype.
    Fp8,
}

/// The dtype a tensor of a file of dtype `file` is stored in after loading changed its values:
/// the file's, except fp8 (bf16 unless re-quantised), f64 (f32) and GGUF's block-quantized
/// types (the compute dtype: a patched weight is not re-quantized).
pub fn changed_dtype(file: DType, fp8: Fp8Changed, compute: ComputeDtype) -> DType {
    if file.is_quantized() {
        return compute.dtype();
    }
    match (file, fp8) {
        (DType::F8E4M3 | DType::F8E5M2, Fp8Changed::Fp8) => file,
        (DType::F8E4M3 | DType::F8E5M2, Fp8Changed::Bf16) => DType::BF16,
        (DType::F64, _) => DType::F32,
        (other, _) => other,
    }
}

/// The dtype a forward pass computes in. Weights are cast to it on the compute device when
/// fetched; statistics the references keep in f32 (norms, softmax, position tables) stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ComputeDtype {
    /// Single precision (every backend).
    #[default]
    F32,
    /// Half precision (GPU backends whose device has f16 arithmetic).
    F16,
    /// bfloat16 (CUDA).
    BF16,
}

impl ComputeDtype {
    /// The dtype as a [`DType`].
    pub fn dtype(self) -> DType {
        match self {
            ComputeDtype::F32 => DType::F32,
            ComputeDtype::F16 => DType::F16,
            ComputeDtype::BF16 => DType::BF16,
        }
    }

    /// The half type a model stored in `storage` runs in as its authors ship it: f16 for f16
    /// weights, bf16 for bf16 and fp8 weights, f32 for anything else (f32, f64).
    pub fn half_of(storage: DType) -> ComputeDtype {
        match storage {
            DType::F16 => ComputeDtype::F16,
            DType::BF16 | DType::F8E4M3 | DType::F8E5M2 => ComputeDtype::BF16,
            _ => ComputeDtype::F32,
        }
    }

    /// Lower-case name (`f32`, `f16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            ComputeDtype::F32 => "f32",
            ComputeDtype::F16 => "f16",
            ComputeDtype::BF16 => "bf16",
        }
    }
}

impl ComputeDtype {
    /// A dtype name, or `auto` (any case) for `None`: the `--dtype` arguments' grammar.
    pub fn parse_or_auto(s: &str) -> Result<Option<ComputeDtype>, crate::Error> {
        if s.eq_ignore_ascii_case("auto") {
            Ok(None)
        } else {
            s.parse().map(Some)
        }
    }
}

impl std::fmt::Display for ComputeDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ComputeDtype {
    type Err = crate::Error;

    /// `f32`, `f16`/`fp16`/`half`, `bf16` (any case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(ComputeDtype::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(ComputeDtype::F16),
            "bf16" | "bfloat16" => Ok(ComputeDtype::BF16),
            _ => Err(crate::Error::UnknownComputeDtype { name: s.to_owned() }),
        }
    }
}

/// Everything the inventory needs to know to count each unit at each home.
#[derive(Clone, Copy, Default)]
pub struct Homes<'a> {
    /// How the backend holds weights at device homes.
    pub device: DeviceRule,
    /// The dtype the forward pass computes in (shown in plan reports).
    pub compute: ComputeDtype,
    /// Tensor keys (component prefix stripped) that loading will change, e.g. a LoRA's.
    pub changed: Option<&'a (dyn Fn(&str) -> bool + Sync)>,
    /// What changed fp8 tensors become.
    pub fp8_changed: Fp8Changed,
}

impl std::fmt::Debug for Homes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Homes")
            .field("device", &self.device)
            .field("compute", &self.compute)
            .field("changed", &self.changed.map(|_| ".."))
            .field("fp8_changed", &self.fp8_changed)
            .finish()
    }
}

impl Homes<'_> {
    /// Homes on a backend that holds weights as `device` says, nothing changed by loading.
    pub fn new(device: DeviceRule) -> Homes<'static> {
        Homes {
            device,
            compute: ComputeDtype::F32,
            changed: None,
            fp8_changed: Fp8Changed::Bf16,
        }
    }

    /// The dtype the tensor `key` of file dtype `file` has in host memory.
    pub fn host_dtype(&self, key: &str, file: DType) -> DType {
        match self.changed {
            Some(changed) if changed(key) => changed_dtype(file, self.fp8_changed, self.compute),
            _ => file,
        }
    }

    /// The tensor's bytes (`numel` elements, `file_bytes` in the file) in host memory and at
    /// a device home.
    pub fn bytes(&self, key: &str, file: DType, numel: u64, file_bytes: u64) -> (u64, u64) {
        let host = self.host_dtype(key, file);
        let host_bytes = if host == file {
            file_bytes
        } else {
            numel.saturating_mul(host.size())
        };
        (host_bytes, self.device.device_bytes(host, numel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_files_half_type_is_its_authors_compute_dtype() {
        assert_eq!(ComputeDtype::half_of(DType::F16), ComputeDtype::F16);
        assert_eq!(ComputeDtype::half_of(DType::BF16), ComputeDtype::BF16);
        assert_eq!(ComputeDtype::half_of(DType::F8E4M3), ComputeDtype::BF16);
        assert_eq!(ComputeDtype::half_of(DType::F8E5M2), ComputeDtype::BF16);
        assert_eq!(ComputeDtype::half_of(DType::F32), ComputeDtype::F32);
        assert_eq!(ComputeDtype::half_of(DType::F64), ComputeDtype::F32);
    }

    #[test]
    fn device_bytes_follow_the_rule() {
        let n = 10;
        assert_eq!(DeviceRule::NATIVE.device_bytes(DType::F16, n), 20);
        assert_eq!(DeviceRule::NATIVE.device_bytes(DType::BF16, n), 20);
        assert_eq!(DeviceRule::NATIVE.device_bytes(DType::F32, n), 40);
        assert_eq!(DeviceRule::NATIVE.device_bytes(DType::F8E4M3, n), 12);
        assert_eq!(DeviceRule::NATIVE.device_bytes(DType::F64, n), 40);
        for d in [
            DType::F16,
            DType::BF16,
            DType::F8E5M2,
            DType::F32,
            DType::F64,
        ] {
            assert_eq!(DeviceRule::WIDENED.device_bytes(d, n), 40, "{d}");
        }
        assert_eq!(DeviceRule::WIDENED.describe(&[DType::F32]), None);
        assert_eq!(
            DeviceRule::WIDENED
                .describe(&[DType::F16, DType::F32])
                .as_deref(),
            Some("F16 as F32 at device homes")
        );
    }

    #[test]
    fn compute_dtypes_parse_and_refuse_by_name() {
        assert_eq!("BF16".parse::<ComputeDtype>().unwrap(), ComputeDtype::BF16);
        assert_eq!("half".parse::<ComputeDtype>().unwrap(), ComputeDtype::F16);
        assert_eq!(ComputeDtype::parse_or_auto("Auto").unwrap(), None);
        assert_eq!(
            ComputeDtype::parse_or_auto("f16").unwrap(),
            Some(ComputeDtype::F16)
        );
        let e = "f8".parse::<ComputeDtype>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown compute dtype `f8` (expected f32, f16 or bf16)"
        );
    }

    #[test]
    fn changed_tensors_take_their_stored_dtype() {
        let lora = |k: &str| k == "a";
        let homes = Homes {
            changed: Some(&lora),
            ..Homes::new(DeviceRule::NATIVE)
        };
        assert_eq!(homes.bytes("a", DType::F8E4M3, 8, 8), (16, 16));
        assert_eq!(homes.bytes("b", DType::F8E4M3, 8, 8), (8, 8));
        let requant = Homes {
            fp8_changed: Fp8Changed::Fp8,
            ..homes
        };
        assert_eq!(requant.bytes("a", DType::F8E4M3, 8, 8), (8, 8));
    }
}

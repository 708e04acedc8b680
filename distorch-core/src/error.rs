//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong in this crate. Every variant names the file (and tensor)
/// at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is shorter than a safetensors header length prefix.
    #[error("{}: {len} bytes is too short for a safetensors file (needs at least 8)", path.display())]
    FileTooSmall {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// The header length prefix is larger than the cap or than the file.
    #[error("{}: header length {size} is invalid (cap {max}, file is {file_len} bytes)", path.display())]
    HeaderTooLarge {
        /// The file.
        path: PathBuf,
        /// The declared header length.
        size: u64,
        /// The cap.
        max: u64,
        /// The file's length.
        file_len: u64,
    },
    /// The header is not a JSON object of tensor entries.
    #[error("{}: invalid safetensors header: {reason}", path.display())]
    InvalidHeader {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The file is not of the format expected: names what it looks like instead.
    #[error("{}: expected {expected}, found {found}", path.display())]
    WrongFormat {
        /// The file.
        path: PathBuf,
        /// The format(s) expected.
        expected: &'static str,
        /// What the file's first bytes look like.
        found: &'static str,
    },
    /// A GGUF file's version is not 2 or 3.
    #[error("{}: GGUF version {version} is not supported (versions 2 and 3 are)", path.display())]
    GgufVersion {
        /// The file.
        path: PathBuf,
        /// The version as written.
        version: u32,
    },
    /// A GGUF file ends inside its header.
    #[error("{}: the file ends inside {what} (at byte {offset})", path.display())]
    GgufTruncated {
        /// The file.
        path: PathBuf,
        /// The field being read.
        what: String,
        /// Where reading stopped.
        offset: u64,
    },
    /// A GGUF count or length is past this crate's cap.
    #[error("{}: {what} is {count}, past the cap of {max}", path.display())]
    GgufLimit {
        /// The file.
        path: PathBuf,
        /// The field.
        what: String,
        /// Its value.
        count: u64,
        /// The cap.
        max: u64,
    },
    /// A GGUF header field holds an impossible value.
    #[error("{}: {what}: {reason}", path.display())]
    GgufInvalid {
        /// The file.
        path: PathBuf,
        /// The field.
        what: String,
        /// What was wrong.
        reason: String,
    },
    /// A GGUF tensor's info is inconsistent (shape, offsets, alignment, overlap).
    #[error("{}: tensor `{name}`: {reason}", path.display())]
    GgufTensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// What was wrong.
        reason: String,
    },
    /// A GGUF tensor's GGML type is not one this crate dequantizes.
    #[error(
        "{}: tensor `{name}` has GGML type {ggml_type} ({type_name}), which is not supported \
         (F32, F16, BF16, F64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K are)",
        path.display()
    )]
    UnsupportedGgmlType {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// The type id as written.
        ggml_type: u32,
        /// Its GGML name.
        type_name: &'static str,
    },
    /// The header names the same tensor twice.
    #[error("{}: tensor `{name}` appears twice in the header", path.display())]
    DuplicateTensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
    },
    /// One tensor entry of the header is malformed.
    #[error("{}: tensor `{name}`: {reason}", path.display())]
    InvalidTensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// What was wrong.
        reason: String,
    },
    /// A tensor's dtype is not one this crate knows.
    #[error("{}: tensor `{name}` has unknown dtype `{dtype}`", path.display())]
    UnknownDtype {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// The dtype as written.
        dtype: String,
    },
    /// A tensor's byte range does not match its shape and dtype.
    #[error(
        "{}: tensor `{name}` is {dtype} {shape:?} = {expected} bytes but its data_offsets span {got}",
        path.display()
    )]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: crate::DType,
        /// Its shape.
        shape: Vec<u64>,
        /// Bytes the shape and dtype need (`None` shows as overflow).
        expected: u64,
        /// Bytes its offsets span.
        got: u64,
    },
    /// Tensor data ranges overlap or leave a gap.
    #[error(
        "{}: tensor `{name}` starts at data offset {begin} but the previous tensor ends at {expected}",
        path.display()
    )]
    InvalidOffsets {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Its begin offset.
        begin: u64,
        /// Where it should begin.
        expected: u64,
    },
    /// The file's length does not match the header.
    #[error(
        "{}: the header describes {expected} bytes of tensor data but the file holds {actual} (truncated or padded file)",
        path.display()
    )]
    DataLengthMismatch {
        /// The file.
        path: PathBuf,
        /// Bytes of data the header describes.
        expected: u64,
        /// Bytes of data in the file.
        actual: u64,
    },
    /// The requested component is not in the file.
    #[error("{}: no `{component}` component (found: {})", path.display(), found.join(", "))]
    ComponentNotFound {
        /// The file.
        path: PathBuf,
        /// The component asked for.
        component: String,
        /// The components that are there.
        found: Vec<String>,
    },
    /// A component name that is not one of [`crate::ComponentKind`]'s.
    #[error(
        "unknown component `{name}` (expected unet, clip, vae, controlnet, clip-vision or model)"
    )]
    UnknownComponent {
        /// The name given.
        name: String,
    },
    /// A plan puts a unit on a device that no Burn device is bound to.
    #[error(
        "unit `{unit}` is planned on `{device}`, but no device of the compute backend is bound \
         to it (bind GPU donors with `DeviceMap::with_donor`; `cpu` means host memory)"
    )]
    UnsupportedHome {
        /// The unit.
        unit: String,
        /// The device.
        device: distorch_alloc::DeviceId,
    },
    /// The compute device cannot compute in the requested dtype (bf16 on wgpu, f16 on an
    /// adapter without shader-f16, anything but f32 on ndarray). Found before any weight is
    /// read.
    #[error(
        "`{device}` ({backend}) cannot compute in {dtype}; choose a dtype it supports (f32 \
         always works)"
    )]
    UnsupportedComputeDtype {
        /// The compute device.
        device: distorch_alloc::DeviceId,
        /// The backend's name for it.
        backend: String,
        /// The dtype asked for.
        dtype: crate::home::ComputeDtype,
    },
    /// A compute dtype name that is not one of f32, f16, bf16.
    #[error("unknown compute dtype `{name}` (expected f32, f16 or bf16)")]
    UnknownComputeDtype {
        /// The name given.
        name: String,
    },
    /// A unit occupies other bytes at its home than its plan says: the plan was made from an
    /// inventory that does not describe how this backend holds weights (plan with
    /// `units::inventory_with` and the backend's `runtime::device_rule`).
    #[error(
        "unit `{unit}` is planned at {planned} on `{device}` but occupies {held} there; plan \
         with the inventory for this backend's homes (units::inventory_with, \
         runtime::device_rule)"
    )]
    PlanMismatch {
        /// The unit.
        unit: String,
        /// Its home.
        device: distorch_alloc::DeviceId,
        /// Bytes the plan counts.
        planned: distorch_alloc::ByteSize,
        /// Bytes it holds there.
        held: distorch_alloc::ByteSize,
    },
    /// A planned unit has no tensors in the file.
    #[error("{}: planned unit `{unit}` has no tensors in the file", path.display())]
    UnitNotInFile {
        /// The file.
        path: PathBuf,
        /// The unit.
        unit: String,
    },
    /// A tensor's dtype cannot be loaded as weights.
    #[error("{}: tensor `{name}` has dtype {dtype}, which cannot be loaded as weights: {reason}", path.display())]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: crate::DType,
        /// Why.
        reason: &'static str,
    },
    /// A ComfyUI scaled-fp8 file (`scaled_fp8` marker, per-weight `scale_weight`) that cannot
    /// be loaded as it is: a scale that is not one float, or a patch (LoRA) on a scaled weight.
    #[error("{}: `{name}`: {reason}", path.display())]
    ScaledFp8 {
        /// The weights file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A patch returned a tensor of another size than the one it was given.
    #[error("the patch for `{key}` returned {got} elements, the weight has {expected}")]
    PatchShape {
        /// The tensor's key.
        key: String,
        /// Elements of the weight.
        expected: usize,
        /// Elements the patch returned.
        got: usize,
    },
    /// Reading a tensor back from a device failed.
    #[error("reading a tensor back from the compute device failed: {reason}")]
    DeviceTransfer {
        /// The backend's message.
        reason: String,
    },
    /// A model does not fit on a device even after unloading what the eject policy allows.
    #[error("the model needs {needed} on `{device}` but only {available} is available")]
    WontFit {
        /// The device.
        device: distorch_alloc::DeviceId,
        /// Bytes the model needs there.
        needed: distorch_alloc::ByteSize,
        /// Bytes available to it.
        available: distorch_alloc::ByteSize,
    },
    /// A unit name that the weight store does not hold.
    #[error("the weight store has no unit `{unit}`")]
    UnknownUnit {
        /// The name asked for.
        unit: String,
    },
    /// Tensors the model expects are not in the file.
    #[error("{}: the {component} is missing {} expected tensor(s): {}{}", path.display(),
        missing.len(), missing.iter().take(5).map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", "),
        if missing.len() > 5 { ", ..." } else { "" })]
    MissingTensors {
        /// The file.
        path: PathBuf,
        /// The component.
        component: String,
        /// The missing keys.
        missing: Vec<String>,
    },
    /// A tensor's shape is not the one the model expects.
    #[error("{}: tensor `{name}` has shape {found:?}, the model expects {expected:?} ({count} mismatched tensor(s) in all)", path.display())]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// The first mismatched tensor.
        name: String,
        /// The expected shape.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
        /// Mismatched tensors in all.
        count: usize,
    },
    /// A weight is NaN or infinite.
    #[error("{}: tensor `{name}` holds a NaN or infinite value at element {index}", path.display())]
    NonFinite {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// The first such element.
        index: usize,
    },
    /// A tensor key the weight store does not hold.
    #[error("the weight store has no tensor `{key}`")]
    UnknownTensor {
        /// The key asked for.
        key: String,
    },
    /// A weights file changed (length or modification time) since the store was loaded
    /// from it, so its pristine weights cannot be re-read.
    #[error("{}: the weights file changed since it was loaded; reload the model", path.display())]
    SourceChanged {
        /// The file.
        path: PathBuf,
    },
    /// Building the inventory failed.
    #[error(transparent)]
    Inventory(#[from] distorch_alloc::Error),
}

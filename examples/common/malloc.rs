//! The examples' allocator choice (the library makes none): on glibc, keep freed buffers for
//! reuse instead of handing each large one back to the OS, so a step does not fault its
//! intermediates in afresh — `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:
//! glibc.malloc.trim_threshold=...` set from inside the process (BENCHMARKS.md, txt2img).

/// Buffers up to 32 MiB come from the heap (glibc's largest threshold) and the heap is
/// trimmed only past 2 GiB free. A no-op off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets the allocator's parameters; called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

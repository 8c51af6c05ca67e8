//! How the process asks the C allocator for memory.
//!
//! A training step allocates and frees its activations: gigabytes at long
//! sequence lengths, in tensors of 1–30 MB each. glibc's default malloc
//! serves such blocks with their own `mmap` (or from per-thread arenas that
//! it trims as soon as their free top grows), so every step hands its
//! activations back to the kernel and faults them in again, and the kernel
//! zeroes each page on the way. Measured on `bench train --max-len 2048`
//! (Gemma 3 270M, 2 cores): 51 s of the 110 s run was system time, 10 % of
//! the samples in the kernel's `clear_page`; with the settings of [`tune`]
//! the same run takes 20 s of system time and trains ~25 % more tokens per
//! second, at the same peak RSS.
//!
//! [`tune`] keeps blocks up to 32 MiB (glibc's largest allowed threshold)
//! on the heap, shares one arena between all threads (memory one rayon
//! worker frees is reused by the other) and never trims the heap while a
//! stage runs; [`release`] returns the free heap to the system between
//! stages, so a long `pipeline run` does not keep training's peak while it
//! quantizes. Elsewhere than glibc both are no-ops.

/// Sets the allocator up for large, short-lived tensors. Call it first
/// thing in `main`, before any thread starts.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's parameters; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
        // -1: never trim (mallopt(3)).
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
    }
}

/// Gives the heap's free memory back to the system.
pub fn release() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages; any thread may call it.
    unsafe {
        libc::malloc_trim(0);
    }
}

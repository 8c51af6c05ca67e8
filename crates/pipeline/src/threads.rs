//! The CPU thread pool a command runs in.
//!
//! Candle's matmuls, the fused kernels and the quantized matrix-vector
//! products all use rayon. Called from outside a pool, every parallel call
//! hands its work to the pool's threads and sleeps until they are done: a
//! round trip of tens of microseconds, paid hundreds of times per decoded
//! token (each RMSNorm, RoPE and matrix-vector product is one). [`run`]
//! executes a whole command on a worker of one pool sized to the physical
//! cores, so that small parallel calls run inline and large ones are split
//! between that worker and the others.

use std::sync::OnceLock;

/// Runs `f` on a worker of the pipeline's thread pool.
pub fn run<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    let pool = POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(candle_core::utils::get_num_threads())
            .thread_name(|i| format!("pipeline-{i}"))
            .build()
            .ok()
    });
    match pool {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

/// Pins the number of compute threads for the whole process: candle counts
/// physical cores again (reading `/proc/cpuinfo`) on every matmul unless
/// `RAYON_NUM_THREADS` says how many there are.
///
/// # Safety
/// Sets an environment variable: call it before any other thread starts.
pub unsafe fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        // SAFETY: the caller guarantees no other thread runs yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
}

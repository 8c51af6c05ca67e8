//! Fault injection for crash-safety tests.
//!
//! - `PIPELINE_FAULT=<point>` aborts the process (no unwinding, no
//!   destructors: as abrupt as a kill) when it reaches the named point.
//! - `PIPELINE_PAUSE=<point>` prints `paused at <point> (pid N)` on stderr and sleeps,
//!   so a test can kill the process (SIGKILL) at exactly that moment, or
//!   run another process meanwhile (`PIPELINE_PAUSE_SECONDS`, default 120).
//!
//! Points: `publish.before-rename`, `tokenize.mid-write`,
//! `lora-train.mid-checkpoint`, `lora-train.step-<N>` (after optimizer step N).

/// Aborts or pauses the process if `PIPELINE_FAULT` / `PIPELINE_PAUSE` names
/// this point.
pub fn point(name: &str) {
    if std::env::var("PIPELINE_FAULT").is_ok_and(|v| v == name) {
        eprintln!("pipeline: injected fault at `{name}`, aborting");
        std::process::abort();
    }
    if std::env::var("PIPELINE_PAUSE").is_ok_and(|v| v == name) {
        eprintln!("paused at {name} (pid {})", std::process::id());
        let seconds = std::env::var("PIPELINE_PAUSE_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(120);
        std::thread::sleep(std::time::Duration::from_secs(seconds));
    }
}

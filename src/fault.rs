//! Fault injection for crash-safety tests.
//!
//! `PIPELINE_FAULT=<point>` makes the process abort (no unwinding, no
//! destructors: as abrupt as a kill) when it reaches the named point. Tests
//! use it to show that a crash at that moment leaves the cache consistent.
//! Points: `publish.before-rename`, and `<kind>.mid-write` inside stages.

/// Aborts the process if `PIPELINE_FAULT` names this point.
pub fn point(name: &str) {
    if std::env::var("PIPELINE_FAULT").is_ok_and(|v| v == name) {
        eprintln!("pipeline: injected fault at `{name}`, aborting");
        std::process::abort();
    }
}

//! Progress bars (indicatif) and logs (tracing) that do not trample each
//! other: log lines are printed with the bars suspended.
//!
//! Bars are drawn on stderr when it is a terminal; `PIPELINE_PROGRESS=0`
//! turns them off, `PIPELINE_PROGRESS=1` forces them on. Logs follow
//! `RUST_LOG` (default `warn,pipeline=info`).

use std::io::Write;
use std::sync::OnceLock;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

fn multi() -> &'static MultiProgress {
    static MULTI: OnceLock<MultiProgress> = OnceLock::new();
    MULTI.get_or_init(|| {
        let target = if enabled() { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        MultiProgress::with_draw_target(target)
    })
}

/// Whether bars are shown.
pub fn enabled() -> bool {
    match std::env::var("PIPELINE_PROGRESS").as_deref() {
        Ok("0") | Ok("false") => false,
        Ok("1") | Ok("true") => true,
        _ => std::io::IsTerminal::is_terminal(&std::io::stderr()),
    }
}

/// A bar counting `len` units of work, labelled `what` (e.g. "rows").
pub fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = multi().add(ProgressBar::new(len));
    pb.set_style(
        ProgressStyle::with_template("  {spinner} {msg:<14} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// Prints a line above the bars.
pub fn println(line: &str) {
    multi().suspend(|| {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{line}");
    });
}

/// Installs the tracing subscriber (stderr, `RUST_LOG`, bars suspended).
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,pipeline=info"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        // Colour codes only on a terminal, never in a log file or a pipe.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_writer(|| SuspendingWriter)
        .try_init();
}

/// A writer that prints to stderr with the progress bars suspended.
struct SuspendingWriter;

impl Write for SuspendingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        multi().suspend(|| std::io::stderr().write_all(buf))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

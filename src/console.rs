//! The console: indicatif bars and tracing logs that do not trample each
//! other (log lines are printed with the bars suspended), installed as the
//! library's [`Reporter`].
//!
//! Bars are drawn on stderr when it is a terminal; `PIPELINE_PROGRESS=0`
//! turns them off, `PIPELINE_PROGRESS=1` forces them on. Without bars,
//! progress is printed as plain lines (at most twenty per unit of work, none
//! for work done in seconds). Logs are warnings only unless `-v` (info) or
//! `-vv` (debug); `RUST_LOG` overrides; colour codes only on a terminal.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use pipeline::report::{LogProgress, Progress, Reporter};

/// Installs the tracing subscriber (`verbose`: how many `-v`) and the
/// console reporter.
pub fn init(verbose: u8) {
    init_logging(verbose);
    pipeline::report::set_reporter(Box::new(Console { bars: bars_enabled() }));
}

fn multi() -> &'static MultiProgress {
    static MULTI: OnceLock<MultiProgress> = OnceLock::new();
    MULTI.get_or_init(|| {
        let target = if bars_enabled() { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        MultiProgress::with_draw_target(target)
    })
}

/// Whether bars are shown.
fn bars_enabled() -> bool {
    match std::env::var("PIPELINE_PROGRESS").as_deref() {
        Ok("0") | Ok("false") => false,
        Ok("1") | Ok("true") => true,
        _ => std::io::IsTerminal::is_terminal(&std::io::stderr()),
    }
}

/// Result lines on stderr (above the bars); progress as bars, or as log
/// lines without a terminal.
struct Console {
    bars: bool,
}

impl Reporter for Console {
    fn start(&self, what: &str, len: u64) -> Box<dyn Progress> {
        if !self.bars {
            return Box::new(LogProgress::new(what, len, |line| println(&format!("  {line}"))));
        }
        let pb = multi().add(ProgressBar::new(len));
        pb.set_style(
            ProgressStyle::with_template("  {spinner} {msg:<14} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        pb.set_message(what.to_string());
        pb.enable_steady_tick(Duration::from_millis(200));
        Box::new(Bar(pb))
    }

    fn line(&self, line: &str) {
        println(line)
    }

    fn draws_bars(&self) -> bool {
        self.bars
    }
}

struct Bar(ProgressBar);

impl Progress for Bar {
    fn set_position(&self, pos: u64) {
        self.0.set_position(pos)
    }
    fn inc(&self, n: u64) {
        self.0.inc(n)
    }
    fn set_message(&self, message: String) {
        self.0.set_message(message)
    }
    fn finish(&self) {
        self.0.finish_and_clear()
    }
}

/// Prints a line on stderr above the bars.
pub fn println(line: &str) {
    multi().suspend(|| {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{line}");
    });
}

/// Installs the tracing subscriber (stderr, bars suspended): warnings, or
/// with `-v` the library's info lines, `-vv` debug; `RUST_LOG` overrides.
fn init_logging(verbose: u8) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "warn,pipeline=info",
        _ => "warn,pipeline=debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
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

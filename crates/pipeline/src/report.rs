//! How the library tells people what it is doing: progress of long work and
//! result lines, through one [`Reporter`] the program installs.
//!
//! The library never writes to the console itself. By default
//! ([`LogReporter`]) lines and progress go to `tracing` at info level, about
//! twenty progress lines per unit of work; the `pipeline` binary installs
//! one ([`set_reporter`]) that draws indicatif bars on a terminal and prints
//! plain lines otherwise.

use std::sync::RwLock;
use std::time::Instant;

/// Where progress and result lines go.
pub trait Reporter: Send + Sync {
    /// A unit of work of `len` steps, labelled `what` (e.g. "tokenize train").
    fn start(&self, what: &str, len: u64) -> Box<dyn Progress>;
    /// A line for the people running the program (a result, a note).
    fn line(&self, line: &str);
    /// Whether progress is drawn as live bars (then third-party bars, such
    /// as hf-hub's downloads, may be shown too).
    fn draws_bars(&self) -> bool {
        false
    }
}

/// One unit of work in progress.
pub trait Progress: Send + Sync {
    fn set_position(&self, pos: u64);
    fn inc(&self, n: u64);
    /// A short status (e.g. `loss 1.23 lr 2e-4 812 tok/s`).
    fn set_message(&self, message: String);
    /// Done: a bar disappears, a log says so.
    fn finish(&self);
}

static REPORTER: RwLock<Option<Box<dyn Reporter>>> = RwLock::new(None);

/// Installs the reporter every later call uses (the binary does this once
/// at start; library users may install their own).
pub fn set_reporter(reporter: Box<dyn Reporter>) {
    *REPORTER.write().expect("reporter lock") = Some(reporter);
}

fn with<R>(f: impl FnOnce(&dyn Reporter) -> R) -> R {
    let guard = REPORTER.read().expect("reporter lock");
    match guard.as_deref() {
        Some(r) => f(r),
        None => f(&LogReporter),
    }
}

/// Starts a unit of work of `len` steps.
pub fn bar(len: u64, what: &str) -> Box<dyn Progress> {
    with(|r| r.start(what, len))
}

/// Reports a line.
pub fn println(line: &str) {
    with(|r| r.line(line))
}

/// Whether the installed reporter draws live bars.
pub fn draws_bars() -> bool {
    with(|r| r.draws_bars())
}

/// The default: everything through `tracing` at `info`.
pub struct LogReporter;

impl Reporter for LogReporter {
    fn start(&self, what: &str, len: u64) -> Box<dyn Progress> {
        Box::new(LogProgress::new(what, len, |line| tracing::info!("{line}")))
    }
    fn line(&self, line: &str) {
        tracing::info!("{}", line.trim_start());
    }
}

/// Nothing at all: a data-parallel job's ranks other than 0, whose progress
/// rank 0 reports.
pub struct Silent;

impl Reporter for Silent {
    fn start(&self, _: &str, _: u64) -> Box<dyn Progress> {
        Box::new(Silent)
    }
    fn line(&self, _: &str) {}
}

impl Progress for Silent {
    fn set_position(&self, _: u64) {}
    fn inc(&self, _: u64) {}
    fn set_message(&self, _: String) {}
    fn finish(&self) {}
}

/// Progress as plain lines, handed to `sink` (a log, or stderr): one each
/// time another twentieth of the work is done, at most one per
/// [`LINE_GAP`], with the latest message and the time left, and a last
/// one at the end when any was printed. Work done within the first
/// [`LINE_GAP`] prints nothing: the stage's own status line says it ran.
pub struct LogProgress {
    sink: fn(&str),
    what: String,
    len: u64,
    started: Instant,
    state: std::sync::Mutex<LogState>,
}

/// The shortest time between two plain progress lines (and before the first).
pub const LINE_GAP: std::time::Duration = std::time::Duration::from_secs(5);

struct LogState {
    pos: u64,
    first: u64,
    message: String,
    logged: u64,
    /// When the last line was printed (the start until one is).
    last_line: Instant,
    printed: bool,
}

impl LogProgress {
    pub fn new(what: &str, len: u64, sink: fn(&str)) -> LogProgress {
        let started = Instant::now();
        let state =
            LogState { pos: 0, first: 0, message: String::new(), logged: 0, last_line: started, printed: false };
        let state = std::sync::Mutex::new(state);
        LogProgress { sink, what: what.to_string(), len, started, state }
    }

    fn log_if_due(&self, s: &mut LogState) {
        let every = (self.len / 20).max(1);
        let finished = s.pos == self.len && s.logged < self.len;
        let another_twentieth = s.pos / every > s.logged / every && s.last_line.elapsed() >= LINE_GAP;
        if another_twentieth || (finished && s.printed) {
            s.logged = s.pos;
            s.last_line = Instant::now();
            s.printed = true;
            let done = s.pos.saturating_sub(s.first);
            let eta = if done > 0 {
                format!(
                    ", {:.0} s left",
                    (self.len - s.pos.min(self.len)) as f64 * self.started.elapsed().as_secs_f64() / done as f64
                )
            } else {
                String::new()
            };
            let message = if s.message.is_empty() { String::new() } else { format!(" {}", s.message) };
            (self.sink)(&format!("{}: {}/{}{message}{eta}", self.what, s.pos, self.len));
        }
    }
}

impl Progress for LogProgress {
    fn set_position(&self, pos: u64) {
        let mut s = self.state.lock().expect("progress lock");
        if s.pos == 0 && s.logged == 0 {
            // Resumed work: the time left counts from here.
            s.first = pos;
            s.logged = pos;
        }
        s.pos = pos;
        self.log_if_due(&mut s);
    }
    fn inc(&self, n: u64) {
        let mut s = self.state.lock().expect("progress lock");
        s.pos += n;
        self.log_if_due(&mut s);
    }
    fn set_message(&self, message: String) {
        self.state.lock().expect("progress lock").message = message;
    }
    fn finish(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    static LINES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

    #[test]
    fn instant_work_prints_no_progress_lines() {
        let p = LogProgress::new("format train", 213, |l| LINES.lock().unwrap().push(l.to_string()));
        for _ in 0..213 {
            p.inc(1);
        }
        assert!(LINES.lock().unwrap().is_empty(), "{:?}", LINES.lock().unwrap());
    }
}

/// Peak resident memory of this process (Linux: `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

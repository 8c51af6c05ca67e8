//! The `pipeline` binary: argument parsing, one function per command, and
//! the console; the work itself is done by the crates in `crates/`.

mod args;
mod bench;
mod cli;
mod console;
mod sweep;

fn main() -> std::process::ExitCode {
    cli::main()
}

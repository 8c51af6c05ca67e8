//! The `pipeline` binary: everything lives in the library (`src/lib.rs`).

fn main() -> std::process::ExitCode {
    pipeline::cli::main()
}

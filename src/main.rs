#![forbid(unsafe_code)]
//! The `casd` binary: everything lives in the library (`casd::cli`).

fn main() -> std::process::ExitCode {
    casd::cli::main()
}

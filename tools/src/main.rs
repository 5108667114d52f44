fn main() -> std::process::ExitCode {
    casd_tools::cli::main()
}

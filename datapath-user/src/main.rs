//! `datapath`: the node agent's binary; everything is in the library's `cli`.
fn main() -> std::process::ExitCode {
    datapath_user::cli::main()
}

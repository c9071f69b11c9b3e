//! `mesh-agent`: the mesh node agent and its CLI. See `mesh_agent::cli`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    mesh_agent::cli::main()
}

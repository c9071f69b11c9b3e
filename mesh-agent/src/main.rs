//! `mesh-agent`: the mesh node agent and its CLI. See `mesh_agent::cli`.
#![forbid(unsafe_code)]

/// jemalloc: the data path's buffers are reused rather than faulted in
/// afresh per read (see `mesh_agent::process::release_free_memory`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    mesh_agent::cli::main()
}

//! Builds the kernel programs (`mesh-ebpf`) for the BPF target with aya-build
//! (cargo-in-cargo with the pinned nightly, `-Z build-std=core`, bpf-linker)
//! and leaves the object in `OUT_DIR/mesh-ebpf`, which the agent embeds.
//!
//! `MESH_EBPF_TOOLCHAIN` overrides the nightly; `AYA_BUILD_SKIP=1` skips the
//! build (the agent then needs `--ebpf-object`).
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// Must match `mesh-ebpf/rust-toolchain.toml` and the Makefile.
const DEFAULT_EBPF_TOOLCHAIN: &str = "nightly-2026-06-15";

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-env-changed=MESH_EBPF_TOOLCHAIN");
    let toolchain =
        std::env::var("MESH_EBPF_TOOLCHAIN").unwrap_or_else(|_| DEFAULT_EBPF_TOOLCHAIN.into());
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let package = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "mesh-ebpf")
        .ok_or_else(|| anyhow!("package mesh-ebpf not found in the workspace"))?;
    let root_dir = package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", package.manifest_path))?;
    if std::env::var_os("AYA_BUILD_SKIP").is_none() && which::which("bpf-linker").is_err() {
        return Err(anyhow!(
            "bpf-linker is not on PATH: run `make setup` (installs bpf-linker 0.10.4)"
        ));
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: package.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}

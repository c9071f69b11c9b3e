//! Builds the kernel programs (`mesh-ebpf`) for the BPF target with aya-build
//! (cargo-in-cargo with the pinned nightly, `-Z build-std=core`, bpf-linker)
//! and leaves the object in `OUT_DIR/mesh-ebpf`, which the agent embeds.
//!
//! `MESH_EBPF_TOOLCHAIN` overrides the nightly; `AYA_BUILD_SKIP=1` skips the
//! build (the agent then needs `--ebpf-object`).
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// The one file that names the kernel programs' nightly.
const EBPF_TOOLCHAIN_FILE: &str = "../mesh-ebpf/rust-toolchain.toml";

/// The `channel = "..."` of a rust-toolchain.toml.
fn channel(toml: &str) -> Option<&str> {
    toml.lines().find_map(|line| {
        let value = line.trim().strip_prefix("channel")?.trim_start();
        let value = value.strip_prefix('=')?.trim();
        value.strip_prefix('"')?.strip_suffix('"')
    })
}

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-env-changed=MESH_EBPF_TOOLCHAIN");
    println!("cargo::rerun-if-changed={EBPF_TOOLCHAIN_FILE}");
    let toolchain = match std::env::var("MESH_EBPF_TOOLCHAIN") {
        Ok(t) => t,
        Err(_) => {
            let text = std::fs::read_to_string(EBPF_TOOLCHAIN_FILE)
                .with_context(|| format!("cannot read {EBPF_TOOLCHAIN_FILE}"))?;
            channel(&text)
                .ok_or_else(|| anyhow!("no `channel = \"...\"` in {EBPF_TOOLCHAIN_FILE}"))?
                .to_owned()
        }
    };
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
    // The nested cargo's progress lines would reach the user as ~40
    // "warning: mesh-agent: Compiling ..." lines (aya-build relays its stderr
    // as cargo warnings): keep it quiet. Compiler diagnostics still come
    // through, and a failed build still fails this script with its errors.
    // SAFETY: build scripts are single-threaded here: no thread reads the
    // environment while it is changed.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: package.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}

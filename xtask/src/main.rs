//! Developer and CI entry points: `cargo xtask <command>`.
//!
//! - `build-ebpf`: build the kernel object on its own (the agent's build.rs
//!   also builds and embeds it).
//! - `test`: format check, clippy with `-D warnings`, then every test,
//!   including the lab tests (root).
//! - `demo`: the lab demo (root).
//! - `bench`: the benchmark suite (root).
//! - `lab-clean`: remove lab leftovers of killed runs.

mod bench;
mod demo;
mod labkit;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::Parser;

#[derive(Parser)]
#[command(name = "xtask")]
enum Cmd {
    /// Build the eBPF object into target/bpfel-unknown-none/<profile>/mesh-ebpf.
    BuildEbpf {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// fmt check, clippy -D warnings, build, unit and lab tests.
    Test {
        /// Extra arguments for `cargo test` (for example a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Bring up a lab, run the agent, push traffic, print what the mesh did.
    Demo,
    /// Throughput, latency, connection rate and memory, with and without the mesh.
    Bench,
    /// Remove lab namespaces, cgroups and pins whose owner process is gone.
    LabClean,
    /// Fuzz the policy parser and evaluator for a bounded time (installs cargo-fuzz if missing).
    Fuzz {
        /// How long to fuzz, in seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

/// The nightly cargo-fuzz runs on (the kernel programs' pinned one).
const FUZZ_TOOLCHAIN: &str = "nightly-2026-06-15";

fn root() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    dir.canonicalize().unwrap_or(dir)
}

/// A `cargo` command run from the workspace root, on the user-space toolchain
/// the outer `cargo xtask` runs with (rustup passes it down as
/// `RUSTUP_TOOLCHAIN`, which every nested `rustc` must see).
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn run(step: &str, cmd: &mut Command) -> anyhow::Result<()> {
    let start = Instant::now();
    eprintln!("==> {step}");
    let status = cmd.status().with_context(|| format!("cannot run {step}"))?;
    if !status.success() {
        bail!("{step} failed ({status})");
    }
    eprintln!("==> {step}: ok in {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}

/// Fails unless running as root: lab tests and the demo need it, and must not skip silently.
fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (network namespaces, cgroups, eBPF): run it as root");
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run_cmd(Cmd::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_cmd(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::BuildEbpf { release } => {
            let dir = root().join("mesh-ebpf");
            // The kernel crate has its own toolchain file and .cargo/config.toml:
            // drop what the outer `cargo run` exported so that they apply.
            let mut cmd = Command::new("cargo");
            cmd.current_dir(&dir).args(["build", "--bins"]);
            for k in [
                "RUSTUP_TOOLCHAIN",
                "RUSTC",
                "RUSTC_WRAPPER",
                "RUSTFLAGS",
                "CARGO_ENCODED_RUSTFLAGS",
                "CARGO",
            ] {
                cmd.env_remove(k);
            }
            if release {
                cmd.arg("--release");
            }
            run("build eBPF object", &mut cmd)?;
            let profile = if release { "release" } else { "debug" };
            println!(
                "{}",
                root()
                    .join("target/bpfel-unknown-none")
                    .join(profile)
                    .join("mesh-ebpf")
                    .display()
            );
        }
        Cmd::Test { args } => {
            let start = Instant::now();
            require_root("make test (lab tests)")?;
            run(
                "cargo fmt --check",
                cargo().args(["fmt", "--all", "--", "--check"]),
            )?;
            run(
                "cargo clippy -D warnings",
                cargo().args([
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ]),
            )?;
            run(
                "cargo build (binaries the lab tests run)",
                cargo().args(["build", "--workspace", "--bins"]),
            )?;
            run(
                "cargo test",
                cargo().args(["test", "--workspace"]).args(&args),
            )?;
            eprintln!(
                "==> all checks passed in {:.0}s",
                start.elapsed().as_secs_f64()
            );
        }
        Cmd::Demo => {
            require_root("the demo")?;
            run(
                "cargo build",
                cargo().args(["build", "--release", "--workspace", "--bins"]),
            )?;
            demo::run(&root().join("target/release"))?;
        }
        Cmd::Bench => {
            require_root("the benchmarks")?;
            run(
                "cargo build",
                cargo().args(["build", "--release", "--workspace", "--bins"]),
            )?;
            bench::run(&root().join("target/release"), &root().join("target"))?;
        }
        Cmd::Fuzz { seconds } => {
            let installed = Command::new("cargo")
                .args([&format!("+{FUZZ_TOOLCHAIN}"), "fuzz", "--version"])
                .output()
                .is_ok_and(|o| o.status.success());
            if !installed {
                run(
                    "install cargo-fuzz",
                    Command::new("cargo").args([
                        &format!("+{FUZZ_TOOLCHAIN}"),
                        "install",
                        "cargo-fuzz",
                        "--version",
                        "0.13.2",
                        "--locked",
                    ]),
                )?;
            }
            let mut cmd = Command::new("cargo");
            cmd.current_dir(root().join("fuzz"))
                .args([
                    &format!("+{FUZZ_TOOLCHAIN}"),
                    "fuzz",
                    "run",
                    "policy",
                    "corpus/policy",
                    "seeds/policy",
                    "--",
                ])
                .arg(format!("-max_total_time={seconds}"));
            for k in ["RUSTUP_TOOLCHAIN", "RUSTC", "CARGO"] {
                cmd.env_remove(k);
            }
            std::fs::create_dir_all(root().join("fuzz/corpus/policy"))?;
            run("fuzz policy", &mut cmd)?;
        }
        Cmd::LabClean => {
            require_root("lab-clean")?;
            let report = mesh_lab::sweep_stale()?;
            for path in &report.removed {
                println!("removed {}", path.display());
            }
            println!("{} lab leftovers removed", report.removed.len());
        }
    }
    Ok(())
}

//! Developer and CI entry points: `cargo xtask <command>`.
//!
//! - `build-ebpf`: build the kernel object on its own (the agent's build.rs
//!   also builds and embeds it).
//! - `check`: format check, clippy with `-D warnings`, the unit tests and the
//!   integration tests that need no root. For contributors; runs as any user.
//! - `test`: `check`, then every test, including the lab tests (root).
//! - `demo`: the lab demo (root).
//! - `bench`: the benchmark suite (root).
//! - `bench-ztunnel`: the agent beside a ztunnel binary you built (root).
//! - `lab-clean`: remove lab leftovers of killed runs.

mod bench;
mod bench_datapath;
mod bench_goals;
mod bench_routing;
mod bench_waypoint;
mod bench_ztunnel;
mod canary;
mod demo;
mod demo_l7;
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
    /// Build the eBPF object into `target/bpfel-unknown-none/<profile>/mesh-ebpf`.
    BuildEbpf {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// fmt check, clippy -D warnings, unit tests and the root-free
    /// integration tests: everything that runs without root.
    Check,
    /// `check`, then every test including the lab tests (root).
    Test {
        /// Extra arguments for `cargo test` (for example a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Bring up a lab, run the agent, push traffic, print what the mesh did.
    Demo,
    /// Throughput, latency, connection rate and memory, with and without the mesh.
    Bench {
        /// Only the data path's rows (throughput and its cost, latency,
        /// connection rate, memory): no upgrades, routing or micro-benchmarks.
        #[arg(long)]
        datapath_only: bool,
    },
    /// The agent beside Istio's ztunnel in the bench's lab (issue 13's
    /// comparison), with two plain TCP relays as the floor any proxy pays;
    /// ztunnel is not installed by anything here (the README's comparison
    /// with ztunnel says how to build it).
    BenchZtunnel {
        /// A ztunnel binary built with `--features testing` (its fake CA).
        #[arg(long)]
        ztunnel: std::path::PathBuf,
        /// Rounds; each alternates which side goes first.
        #[arg(long, default_value_t = 4)]
        rounds: usize,
    },
    /// Remove lab namespaces, cgroups and pins whose owner process is gone.
    LabClean,
    /// Fuzz the policy parser and evaluator for a bounded time (installs cargo-fuzz if missing).
    Fuzz {
        /// How long to fuzz, in seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

/// Integration test targets that need no root (no lab): `check` runs them.
/// Every other integration test is a lab test and runs in `test` only.
const ROOT_FREE_TESTS: [&str; 10] = [
    "kube_sync",
    "routing_sources",
    "kube_outage",
    "deploy_manifests",
    "check_cli",
    "ca_serve",
    // mesh-waypoint/tests/waypoint.rs
    "waypoint",
    // mesh-waypoint/tests/otlp.rs
    "otlp",
    // mesh-waypoint/tests/authz.rs
    "authz",
    // mesh-waypoint/tests/issuer.rs
    "issuer",
];

/// The member crates whose `tests/*.rs` are integration tests.
const TEST_PACKAGES: [&str; 5] = [
    "mesh-agent",
    "mesh-lab",
    "mesh-policy",
    "mesh-common",
    "mesh-waypoint",
];

/// The nightly the kernel programs build with (and cargo-fuzz runs on), read
/// from the one file that names it.
fn ebpf_toolchain() -> anyhow::Result<String> {
    let path = root().join("mesh-ebpf/rust-toolchain.toml");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .find_map(|line| {
            let value = line.trim().strip_prefix("channel")?.trim_start();
            let value = value.strip_prefix('=')?.trim();
            Some(value.strip_prefix('"')?.strip_suffix('"')?.to_owned())
        })
        .with_context(|| format!("no `channel = \"...\"` in {}", path.display()))
}

/// The workspace's integration tests that are not root-free: every
/// `tests/*.rs` file of a member crate but those in [`ROOT_FREE_TESTS`].
fn lab_tests() -> anyhow::Result<Vec<String>> {
    let mut found = Vec::new();
    for package in TEST_PACKAGES {
        let dir = root().join(package).join("tests");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry
                .with_context(|| format!("cannot list {}", dir.display()))?
                .path();
            let Some(test) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            if path.extension().is_some_and(|e| e == "rs") && !ROOT_FREE_TESTS.contains(&test) {
                found.push(test.to_owned());
            }
        }
    }
    found.sort();
    Ok(found)
}

/// fmt, clippy, rustdoc, unit and doc tests, and the root-free integration tests.
fn check() -> anyhow::Result<()> {
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
    // Doc comments are checked like code: a broken intra-doc link, or one
    // from a public item to a private one, fails the check.
    run(
        "cargo doc -D warnings",
        cargo()
            .args(["doc", "--workspace", "--no-deps"])
            .env("RUSTDOCFLAGS", "-D warnings"),
    )?;
    run(
        "unit and doc tests",
        cargo().args(["test", "--workspace", "--lib", "--bins"]),
    )?;
    run("doc tests", cargo().args(["test", "--workspace", "--doc"]))?;
    let mut root_free = cargo();
    // `--workspace` like the other steps: the same feature set, so nothing
    // is rebuilt between them.
    root_free.args(["test", "--workspace"]);
    for t in ROOT_FREE_TESTS {
        let exists = |p: &&str| root().join(format!("{p}/tests/{t}.rs")).exists();
        if TEST_PACKAGES.iter().any(exists) {
            root_free.args(["--test", t]);
        }
    }
    run("root-free integration tests", &mut root_free)
}

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

/// The release build of every binary, which the demo and the benchmarks run
/// (`target/release`).
fn build_release() -> anyhow::Result<()> {
    run(
        "cargo build",
        cargo().args(["build", "--release", "--workspace", "--bins"]),
    )
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
        Cmd::Check => {
            let start = Instant::now();
            check()?;
            eprintln!(
                "==> check passed in {:.0}s (lab tests: `make test`, as root)",
                start.elapsed().as_secs_f64()
            );
        }
        Cmd::Test { args } => {
            let start = Instant::now();
            require_root("make test (lab tests)")?;
            if args.is_empty() {
                check()?;
            }
            run(
                "cargo build (binaries the lab tests run)",
                cargo().args(["build", "--workspace", "--bins"]),
            )?;
            if args.is_empty() {
                // Unit, doc and root-free tests ran in `check`.
                let mut lab = cargo();
                lab.args(["test", "--workspace"]);
                for test in lab_tests()? {
                    lab.args(["--test", &test]);
                }
                run("lab tests", &mut lab)?;
            } else {
                run(
                    "cargo test",
                    cargo().args(["test", "--workspace"]).args(&args),
                )?;
            }
            eprintln!(
                "==> all checks passed in {:.0}s",
                start.elapsed().as_secs_f64()
            );
        }
        Cmd::Demo => {
            require_root("the demo")?;
            build_release()?;
            demo::run(&root().join("target/release"))?;
        }
        Cmd::Bench { datapath_only } => {
            require_root("the benchmarks")?;
            build_release()?;
            bench::run(
                &root().join("target/release"),
                &root().join("target"),
                datapath_only,
            )?;
        }
        Cmd::BenchZtunnel { ztunnel, rounds } => {
            require_root("the benchmarks")?;
            build_release()?;
            bench_ztunnel::run(
                &labkit::Bins::in_dir(&root().join("target/release"))?,
                &ztunnel,
                &root().join("target"),
                rounds,
            )?;
        }
        Cmd::Fuzz { seconds } => {
            let toolchain = ebpf_toolchain()?;
            let installed = Command::new("cargo")
                .args([&format!("+{toolchain}"), "fuzz", "--version"])
                .output()
                .is_ok_and(|o| o.status.success());
            if !installed {
                run(
                    "install cargo-fuzz",
                    Command::new("cargo").args([
                        &format!("+{toolchain}"),
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
                    &format!("+{toolchain}"),
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

#!/usr/bin/env bash
# Installs everything `make demo` and `make test` need, idempotently: a second
# run costs about a second. Versions are pinned here and in the toolchain files.
set -euo pipefail

cd "$(dirname "$0")/.."
# The toolchains are named once, in their toolchain files.
channel_of() { sed -n 's/^channel *= *"\(.*\)"/\1/p' "$1"; }
USER_TOOLCHAIN=$(channel_of rust-toolchain.toml)
EBPF_TOOLCHAIN=$(channel_of mesh-ebpf/rust-toolchain.toml)  # LLVM 22, for bpf-linker 0.10.x
BPF_LINKER_VERSION=0.10.4          # 0.10.0 emits BTF the kernel rejects; >=0.11 needs a system LLVM 21+
# sockperf: `cargo xtask bench` (latency). python3: a plain HTTP server
# (`python3 -m http.server`) behind the waypoint in the waypoint lab test.
DEBIAN_PACKAGES=(iproute2 iperf3 bpftool tcpdump procps sockperf python3)

say() { printf '[setup] %s\n' "$*"; }

if [ -z "$USER_TOOLCHAIN" ] || [ -z "$EBPF_TOOLCHAIN" ]; then
    say "cannot read the toolchain channels from rust-toolchain.toml and mesh-ebpf/rust-toolchain.toml"; exit 1
fi
if ! command -v rustup >/dev/null; then
    say "rustup is required (https://rustup.rs); it is not installed"; exit 1
fi
# rustup's auto-install may be off (RUSTUP_AUTO_INSTALL=0): install explicitly.
have_toolchain() { rustup toolchain list | grep -q "^$1"; }
if ! have_toolchain "$USER_TOOLCHAIN" || ! rustup component list --toolchain "$USER_TOOLCHAIN" --installed 2>/dev/null | grep -q '^clippy'; then
    say "installing Rust $USER_TOOLCHAIN"
    rustup toolchain install "$USER_TOOLCHAIN" --profile minimal --component clippy,rustfmt
fi
if ! have_toolchain "$EBPF_TOOLCHAIN" || ! rustup component list --toolchain "$EBPF_TOOLCHAIN" --installed 2>/dev/null | grep -q '^rust-src'; then
    say "installing Rust $EBPF_TOOLCHAIN with rust-src (kernel programs)"
    rustup toolchain install "$EBPF_TOOLCHAIN" --profile minimal --component rust-src
fi

CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
if ! "$CARGO_BIN/bpf-linker" --version 2>/dev/null | grep -qx "bpf-linker $BPF_LINKER_VERSION"; then
    say "installing bpf-linker $BPF_LINKER_VERSION (about two minutes)"
    cargo "+$EBPF_TOOLCHAIN" install bpf-linker --version "$BPF_LINKER_VERSION" --locked --force
fi

if [ "${1:-}" = "--rust-only" ]; then
    # `make check`: toolchains only, nothing that needs root.
    say "ready: Rust $USER_TOOLCHAIN, $EBPF_TOOLCHAIN, bpf-linker $BPF_LINKER_VERSION"
    exit 0
fi

missing=()
for p in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then say "need root to install Debian packages"; exit 1; fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# `kubectl kustomize` renders deploy/ in the manifest test. Any kubectl with
# kustomize built in will do; Debian's is kubernetes-client.
if ! command -v kubectl >/dev/null; then
    say "installing kubectl (Debian kubernetes-client)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kubernetes-client
fi
say "ready: Rust $USER_TOOLCHAIN, $EBPF_TOOLCHAIN, bpf-linker $BPF_LINKER_VERSION, ${DEBIAN_PACKAGES[*]}"

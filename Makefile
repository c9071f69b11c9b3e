# The two commands: `make demo` runs the lab demo, `make test` the whole suite.
# Both install what they need first (scripts/setup.sh, idempotent).
# Lab tests and the demo need root (network namespaces, cgroups, eBPF).
# `make check` (fmt, clippy, rustdoc, unit and root-free tests) runs as any user.

CARGO ?= cargo
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: all setup build check demo test bench lab-clean clean

all: build

setup:
	@./scripts/setup.sh

build: setup
	$(CARGO) build --workspace --bins

check:
	@./scripts/setup.sh --rust-only
	$(CARGO) xtask check

demo: setup
	$(CARGO) xtask demo

test: setup
	$(CARGO) xtask test

bench: setup
	$(CARGO) xtask bench

# Removes lab namespaces, cgroups and pins left by killed runs.
lab-clean: setup
	$(CARGO) xtask lab-clean

clean:
	$(CARGO) clean

//! The datapath's error type, and the conversions from aya's errors that
//! keep the syscall's errno in the message.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use aya::programs::ProgramError;

/// Datapath failures, each with what the operator should do.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The agent lacks privileges.
    #[error(
        "the agent lacks {missing}: run it as root or grant CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_PERFMON"
    )]
    Privileges {
        /// The missing capabilities.
        missing: String,
    },
    /// The running kernel is too old or lacks a program type.
    #[error(
        "kernel unsupported: {0}; mesh-agent needs Linux 5.17 or newer with cgroup sock_addr, sock_ops and sk_lookup programs"
    )]
    Kernel(String),
    /// bpffs is missing and could not be mounted.
    #[error(
        "bpffs is not mounted at {path} and mounting it failed ({source}): mount it (`mount -t bpf bpf /sys/fs/bpf`) or, in a pod, mount the host's /sys/fs/bpf"
    )]
    Bpffs {
        /// The bpffs mount point.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The cgroup2 directory to attach to is missing or not cgroup2.
    #[error(
        "cgroup {path} cannot be used ({reason}): pass --cgroup with a cgroup2 directory covering the pods (mount the host's cgroup2 in a pod)"
    )]
    Cgroup {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The kernel object could not be loaded.
    #[error("cannot load the eBPF object: {0}")]
    Load(String),
    /// A program failed to load or attach.
    #[error("program {program}: {message}")]
    Program {
        /// Program name.
        program: &'static str,
        /// What failed.
        message: String,
    },
    /// A pinned map or link could not be used.
    #[error(
        "pinned state under {path} cannot be used ({message}): if a different agent version left it, run `mesh-agent uninstall` first"
    )]
    Pinned {
        /// The pinned path.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// A map operation failed.
    #[error("map {map}: {message}")]
    Map {
        /// Map name.
        map: &'static str,
        /// What failed.
        message: String,
    },
    /// Filesystem error under the pin directory.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// A map error as a [`DatapathError`] naming `map`.
pub(super) fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |e| DatapathError::Map {
        map,
        message: e.to_string(),
    }
}

/// A program error as a [`DatapathError`] naming `program`, with its sources.
pub(super) fn prog_err(program: &'static str) -> impl Fn(ProgramError) -> DatapathError {
    move |e| DatapathError::Program {
        program,
        message: error_chain(&e),
    }
}

/// An error and its sources, joined: aya's errors keep the syscall's errno in the source.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// An I/O error on `path` as a [`DatapathError`].
pub(super) fn io_err(path: &Path) -> impl Fn(std::io::Error) -> DatapathError + '_ {
    move |source| DatapathError::Io {
        path: path.to_owned(),
        source,
    }
}

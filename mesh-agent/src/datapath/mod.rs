//! The eBPF datapath: loads the kernel programs, pins them and their maps
//! under the agent's bpffs directory, attaches them (re-adopting what a
//! previous agent left pinned), and enrolls pods.
//!
//! Pinned layout under the pin directory:
//!
//! ```text
//! maps/<MAP NAME>            every map, reused by the next agent
//! links/<program>            the cgroup links (connect4/6, sock_ops, getpeername4/6)
//! links/sk_lookup/<cookie>   one sk_lookup link per enrolled pod netns
//! ```
//!
//! Links stay pinned when the agent stops, so captured traffic fails closed
//! instead of leaking plaintext; the next agent swaps its programs into the
//! same links atomically (`BPF_LINK_UPDATE`).

pub mod counters;
pub mod enroll;
pub mod netns;
mod sys;

pub use sys::{cgroup2_mount, check_privileges};

use std::{
    fs::File,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, ProgramType, SkLookup, SockOps,
        links::FdLink,
    },
};
use mesh_common::{IpKey, OrigDst, TupleKey, maps, programs};

/// Where the agent pins its programs and maps unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/mesh";

/// The kernel object built by `build.rs` (aya-build), embedded in the binary.
static EMBEDDED_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

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

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |e| DatapathError::Map {
        map,
        message: e.to_string(),
    }
}

fn prog_err(program: &'static str) -> impl Fn(ProgramError) -> DatapathError {
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

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> DatapathError + '_ {
    move |source| DatapathError::Io {
        path: path.to_owned(),
        source,
    }
}

/// How to load the datapath.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// bpffs directory for pins (created if missing).
    pub pin_dir: PathBuf,
    /// cgroup2 directory the cgroup programs attach to (must cover the pods).
    pub cgroup: PathBuf,
    /// Load this object instead of the embedded one.
    pub object: Option<PathBuf>,
    /// aya-log level for the kernel programs (0 = off, 4 = debug).
    pub kernel_log_level: u8,
}

/// What the start-up found and did, for the start-up summary.
#[derive(Clone, Debug)]
pub struct LoadSummary {
    /// Kernel release.
    pub kernel: String,
    /// Programs attached, with whether each re-adopted a pinned link.
    pub programs: Vec<(&'static str, bool)>,
}

/// The loaded datapath: programs, the maps the agent writes, the pin directory.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    /// The table of original destinations, shared with the proxy.
    pub orig_dst: Arc<OrigDstTable>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl Datapath {
    /// Checks privileges and kernel, mounts bpffs if needed, loads the
    /// programs with pinned maps, and attaches the cgroup programs (re-using
    /// pinned links).
    pub fn load(cfg: &DatapathConfig) -> Result<(Self, LoadSummary), DatapathError> {
        sys::check_privileges()?;
        let kernel = sys::check_kernel()?;
        sys::ensure_bpffs(&cfg.pin_dir)?;
        sys::check_cgroup2(&cfg.cgroup)?;
        sys::raise_memlock();

        let maps_dir = cfg.pin_dir.join("maps");
        let links_dir = cfg.pin_dir.join("links");
        for dir in [&maps_dir, &links_dir, &links_dir.join("sk_lookup")] {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let mut loader = EbpfLoader::new();
        let map_names = [
            maps::ENROLLED_NETNS,
            maps::POD_ADDRS,
            maps::EXCLUDED_PORTS,
            maps::PROBE_SOURCES,
            maps::SOCK_ORIG_DST,
            maps::ORIG_DST_BY_TUPLE,
            maps::INBOUND_LISTENERS,
            maps::COUNTERS,
        ];
        for name in map_names {
            loader.map_pin_path(name, maps_dir.join(name));
        }
        loader.override_global("AYA_LOG_LEVEL", &cfg.kernel_log_level, false);
        let mut ebpf = match &cfg.object {
            Some(path) => loader.load_file(path),
            None => loader.load(EMBEDDED_OBJECT),
        }
        .map_err(|e| match &e {
            aya::EbpfError::MapError(aya::maps::MapError::IncompatiblePinnedMap { .. }) => {
                DatapathError::Pinned {
                    path: maps_dir.clone(),
                    message: e.to_string(),
                }
            }
            _ => DatapathError::Load(format!("{e:#}")),
        })?;
        let logger = if cfg.kernel_log_level > 0 {
            match aya_log::EbpfLogger::init(&mut ebpf) {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, "kernel program logging unavailable");
                    None
                }
            }
        } else {
            None
        };

        let cgroup = File::open(&cfg.cgroup).map_err(|e| DatapathError::Cgroup {
            path: cfg.cgroup.clone(),
            reason: e.to_string(),
        })?;
        // Attached through bpf links, which always coexist with other programs
        // on the cgroup (BPF_F_ALLOW_MULTI is implied; the kernel rejects the
        // flag itself on link_create), so `Single` here is the flag-less mode.
        let mut attached = Vec::new();
        for (name, is_sockops) in [
            (programs::CONNECT4, false),
            (programs::CONNECT6, false),
            (programs::GETPEERNAME4, false),
            (programs::GETPEERNAME6, false),
            (programs::SOCK_OPS, true),
        ] {
            let pin = links_dir.join(name);
            let program = ebpf.program_mut(name).ok_or_else(|| {
                DatapathError::Load(format!("program {name} missing from the object"))
            })?;
            let readopted = if is_sockops {
                let prog: &mut SockOps = program.try_into().map_err(prog_err(name))?;
                prog.load().map_err(prog_err(name))?;
                let readopted = replace_pinned(&pin, prog.fd().map_err(prog_err(name))?)?;
                if !readopted {
                    let id = prog
                        .attach(&cgroup, CgroupAttachMode::Single)
                        .map_err(prog_err(name))?;
                    let link: FdLink = prog
                        .take_link(id)
                        .map_err(prog_err(name))?
                        .try_into()
                        .map_err(
                            |e: aya::programs::links::LinkError| DatapathError::Program {
                                program: name,
                                message: e.to_string(),
                            },
                        )?;
                    pin_link(link, &pin)?;
                }
                readopted
            } else {
                let prog: &mut CgroupSockAddr = program.try_into().map_err(prog_err(name))?;
                prog.load().map_err(prog_err(name))?;
                let readopted = replace_pinned(&pin, prog.fd().map_err(prog_err(name))?)?;
                if !readopted {
                    let id = prog
                        .attach(&cgroup, CgroupAttachMode::Single)
                        .map_err(prog_err(name))?;
                    let link: FdLink = prog
                        .take_link(id)
                        .map_err(prog_err(name))?
                        .try_into()
                        .map_err(
                            |e: aya::programs::links::LinkError| DatapathError::Program {
                                program: name,
                                message: e.to_string(),
                            },
                        )?;
                    pin_link(link, &pin)?;
                }
                readopted
            };
            attached.push((name, readopted));
        }
        let prog: &mut SkLookup = ebpf
            .program_mut(programs::SK_LOOKUP)
            .ok_or_else(|| {
                DatapathError::Load(format!(
                    "program {} missing from the object",
                    programs::SK_LOOKUP
                ))
            })?
            .try_into()
            .map_err(prog_err(programs::SK_LOOKUP))?;
        prog.load().map_err(prog_err(programs::SK_LOOKUP))?;

        let orig_map = ebpf.take_map(maps::ORIG_DST_BY_TUPLE).ok_or_else(|| {
            DatapathError::Load(format!("map {} missing", maps::ORIG_DST_BY_TUPLE))
        })?;
        let orig_dst = Arc::new(OrigDstTable {
            map: Mutex::new(HashMap::try_from(orig_map).map_err(map_err(maps::ORIG_DST_BY_TUPLE))?),
        });
        Ok((
            Self {
                ebpf,
                pin_dir: cfg.pin_dir.clone(),
                orig_dst,
                logger,
            },
            LoadSummary {
                kernel,
                programs: attached,
            },
        ))
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Takes the kernel-log reader (drive it with [`drive_kernel_log`]).
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }

    fn sk_lookup(&mut self) -> Result<&mut SkLookup, DatapathError> {
        self.ebpf
            .program_mut(programs::SK_LOOKUP)
            .ok_or_else(|| DatapathError::Load("sk_lookup program missing".into()))?
            .try_into()
            .map_err(prog_err(programs::SK_LOOKUP))
    }

    /// Attaches `sk_lookup` to the netns open as `netns`, or swaps the program
    /// into the link a previous agent pinned for that netns (`cookie`).
    pub fn attach_sk_lookup(&mut self, netns: &File, cookie: u64) -> Result<(), DatapathError> {
        let pin = self.sk_lookup_pin(cookie);
        let prog = self.sk_lookup()?;
        if replace_pinned(&pin, prog.fd().map_err(prog_err(programs::SK_LOOKUP))?)? {
            return Ok(());
        }
        let id = prog
            .attach(netns.as_fd())
            .map_err(prog_err(programs::SK_LOOKUP))?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(prog_err(programs::SK_LOOKUP))?
            .into();
        pin_link(link, &pin)
    }

    /// Detaches the `sk_lookup` link of the netns `cookie` (if pinned).
    pub fn detach_sk_lookup(&mut self, cookie: u64) -> Result<(), DatapathError> {
        unpin_link(&self.sk_lookup_pin(cookie))
    }

    /// Netns cookies with a pinned `sk_lookup` link.
    pub fn pinned_sk_lookup_cookies(&self) -> Result<Vec<u64>, DatapathError> {
        let dir = self.pin_dir.join("links").join("sk_lookup");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            if let Some(cookie) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
                out.push(cookie);
            }
        }
        Ok(out)
    }

    fn sk_lookup_pin(&self, cookie: u64) -> PathBuf {
        self.pin_dir
            .join("links")
            .join("sk_lookup")
            .join(cookie.to_string())
    }

    /// Takes a map out of the loaded object, typed.
    pub fn take_map<T>(&mut self, name: &'static str) -> Result<T, DatapathError>
    where
        T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self
            .ebpf
            .take_map(name)
            .ok_or_else(|| DatapathError::Load(format!("map {name} missing from the object")))?;
        T::try_from(map).map_err(map_err(name))
    }
}

/// Swaps `prog` into the link pinned at `pin`. Returns false (and removes a
/// dead pin) when there is no usable pinned link.
fn replace_pinned(pin: &Path, prog: &impl AsFd) -> Result<bool, DatapathError> {
    if !pin.exists() {
        return Ok(false);
    }
    let link = sys::obj_get(pin).map_err(|e| DatapathError::Pinned {
        path: pin.to_owned(),
        message: e.to_string(),
    })?;
    match sys::link_update(link.as_fd(), prog.as_fd()) {
        Ok(()) => {
            tracing::debug!(pin = %pin.display(), "re-adopted pinned link");
            Ok(true)
        }
        Err(e) => {
            // The link's target is gone (cgroup removed, netns destroyed):
            // drop the stale pin and attach afresh.
            tracing::warn!(pin = %pin.display(), error = %e, "pinned link unusable; attaching anew");
            std::fs::remove_file(pin).map_err(io_err(pin))?;
            Ok(false)
        }
    }
}

fn pin_link(link: FdLink, pin: &Path) -> Result<(), DatapathError> {
    link.pin(pin).map(drop).map_err(|e| DatapathError::Pinned {
        path: pin.to_owned(),
        message: e.to_string(),
    })
}

fn unpin_link(pin: &Path) -> Result<(), DatapathError> {
    if !pin.exists() {
        return Ok(());
    }
    // Removing the last reference (the pin) detaches the link.
    std::fs::remove_file(pin).map_err(io_err(pin))
}

/// Removes everything the agent pinned under `pin_dir`: links first (which
/// detaches the programs), then maps. Captured pods get direct traffic again.
pub fn uninstall(pin_dir: &Path) -> Result<usize, DatapathError> {
    let mut removed = 0;
    if !pin_dir.exists() {
        return Ok(0);
    }
    for sub in ["links/sk_lookup", "links", "maps"] {
        let dir = pin_dir.join(sub);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let entry = entry.map_err(io_err(&dir))?;
            let path = entry.path();
            if path.is_dir() {
                continue;
            }
            std::fs::remove_file(&path).map_err(io_err(&path))?;
            removed += 1;
        }
    }
    for sub in ["links/sk_lookup", "links", "maps", ""] {
        let dir = pin_dir.join(sub);
        if dir.exists() {
            std::fs::remove_dir(&dir).map_err(io_err(&dir))?;
        }
    }
    Ok(removed)
}

/// The kernel's record of original destinations, keyed by the redirected
/// client's (netns, address, port).
pub struct OrigDstTable {
    map: Mutex<HashMap<MapData, TupleKey, OrigDst>>,
}

impl OrigDstTable {
    /// Takes (reads and deletes) the original destination of the client
    /// `peer` accepted on the outbound listener of netns `netns_cookie`.
    /// The kernel files it before the client's handshake completes; a short
    /// retry covers the rare case of the agent being faster.
    pub async fn take(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let key = TupleKey {
            netns_cookie,
            addr: ip_key(peer.ip()),
            port: peer.port(),
            _pad: [0; 6],
        };
        for attempt in 0..10u32 {
            if let Some(orig) = self.take_now(&key) {
                return Some(orig);
            }
            tokio::time::sleep(Duration::from_millis(1 << attempt.min(5))).await;
        }
        None
    }

    fn take_now(&self, key: &TupleKey) -> Option<SocketAddr> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let orig = map.get(key, 0).ok()?;
        if let Err(e) = map.remove(key) {
            tracing::debug!(error = %e, "original destination already gone");
        }
        Some(SocketAddr::new(ip_from_key(&orig.addr), orig.port))
    }
}

/// The map key of an address (IPv4 mapped into IPv6).
pub fn ip_key(ip: IpAddr) -> IpKey {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpKey::v4(v4.octets()),
        IpAddr::V6(v6) => IpKey::v6(v6.octets()),
    }
}

/// The address of a map key (IPv4-mapped keys become IPv4).
pub fn ip_from_key(key: &IpKey) -> IpAddr {
    IpAddr::V6(std::net::Ipv6Addr::from(key.addr)).to_canonical()
}

/// Reads kernel-program log records as they arrive and emits them through
/// `tracing` (via the `log` bridge), until the task is dropped.
pub async fn drive_kernel_log(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring-buffer fd, which stays open and the
    // same for the logger's whole life, and the AsyncFd owns the logger.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "kernel program logging unavailable");
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// The kernel's program-type support, for the start-up summary.
pub fn probe_program_types() -> Vec<(&'static str, bool)> {
    [
        ("cgroup_sock_addr", ProgramType::CgroupSockAddr),
        ("sock_ops", ProgramType::SockOps),
        ("sk_lookup", ProgramType::SkLookup),
    ]
    .into_iter()
    .map(|(name, t)| (name, aya::sys::is_program_supported(t).unwrap_or(false)))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_keys_round_trip() {
        for ip in ["198.18.1.10", "fd18:1::10", "::1", "127.0.0.1"] {
            let ip: IpAddr = ip.parse().expect("test ip");
            assert_eq!(ip_from_key(&ip_key(ip)), ip);
        }
        let mapped: IpAddr = "::ffff:198.18.1.10".parse().expect("test ip");
        assert_eq!(
            ip_key(mapped),
            ip_key("198.18.1.10".parse().expect("test ip"))
        );
    }
}

//! Loading the kernel programs with their maps pinned, and attaching them
//! through pinned links (re-adopting the links a previous agent left): the
//! cgroup programs once at start-up, `sk_lookup` once per enrolled netns.

use std::{
    fs::File,
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSockAddr, Program, ProgramError, ProgramFd, SkLookup, SockOps,
        links::FdLink,
    },
};
use mesh_common::{maps, programs};

use super::{
    error::{DatapathError, map_err, prog_err},
    exempt::Exemptions,
    orig_dst::OrigDstTable,
    pins::{PinLayout, pin_link, replace_pinned, unpin_link},
    sys,
};

/// The kernel object built by `build.rs` (aya-build), embedded in the binary.
static EMBEDDED_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

/// The maps, all pinned (reused by the next agent).
const MAPS: [&str; 11] = [
    maps::ENROLLED_NETNS,
    maps::POD_ADDRS,
    maps::EXCLUDED_PORTS,
    maps::PROBE_SOURCES,
    maps::SOCK_ORIG_DST,
    maps::ORIG_DST_BY_TUPLE,
    maps::INBOUND_LISTENERS,
    maps::COUNTERS,
    maps::AGENT_SOCKETS,
    maps::DELIVERY_TUPLES,
    maps::NETNS_ADDRS,
];

/// The programs attached to the cgroup, and whether each is the `sock_ops`
/// one (the others are `cgroup/sock_addr` programs).
const CGROUP_PROGRAMS: [(&str, bool); 7] = [
    (programs::CONNECT4, false),
    (programs::CONNECT6, false),
    (programs::GETPEERNAME4, false),
    (programs::GETPEERNAME6, false),
    (programs::GETSOCKNAME4, false),
    (programs::GETSOCKNAME6, false),
    (programs::SOCK_OPS, true),
];

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
    pins: PinLayout,
    /// The table of original destinations, shared with the proxy.
    pub orig_dst: Arc<OrigDstTable>,
    /// The agent's own sockets and deliveries, exempt from capture; shared with the proxy.
    pub exempt: Arc<Exemptions>,
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

        let pins = PinLayout::new(&cfg.pin_dir);
        pins.create()?;
        let mut loader = EbpfLoader::new();
        for name in MAPS {
            loader.map_pin_path(name, pins.map(name));
        }
        loader.override_global("AYA_LOG_LEVEL", &cfg.kernel_log_level, false);
        let mut ebpf = match &cfg.object {
            Some(path) => loader.load_file(path),
            None => loader.load(EMBEDDED_OBJECT),
        }
        .map_err(|e| match &e {
            aya::EbpfError::MapError(aya::maps::MapError::IncompatiblePinnedMap { .. }) => {
                DatapathError::Pinned {
                    path: pins.maps(),
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
        let mut attached = Vec::new();
        for (name, is_sockops) in CGROUP_PROGRAMS {
            let pin = pins.link(name);
            let readopted = if is_sockops {
                load_and_attach::<SockOps>(&mut ebpf, name, cgroup.as_fd(), &pin)?
            } else {
                load_and_attach::<CgroupSockAddr>(&mut ebpf, name, cgroup.as_fd(), &pin)?
            };
            attached.push((name, readopted));
        }
        program::<SkLookup>(&mut ebpf, programs::SK_LOOKUP)?
            .load()
            .map_err(prog_err(programs::SK_LOOKUP))?;

        let orig_dst = Arc::new(OrigDstTable::new(take_map(
            &mut ebpf,
            maps::ORIG_DST_BY_TUPLE,
        )?));
        let exempt = Arc::new(Exemptions::new(
            take_map(&mut ebpf, maps::AGENT_SOCKETS)?,
            take_map(&mut ebpf, maps::DELIVERY_TUPLES)?,
        ));
        Ok((
            Self {
                ebpf,
                pins,
                orig_dst,
                exempt,
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
        self.pins.root()
    }

    /// Takes the kernel-log reader (drive it with [`drive_kernel_log`]).
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }

    /// Attaches `sk_lookup` to the netns open as `netns`, or swaps the program
    /// into the link a previous agent pinned for that netns (`cookie`).
    pub fn attach_sk_lookup(&mut self, netns: &File, cookie: u64) -> Result<(), DatapathError> {
        let pin = self.pins.sk_lookup_link(cookie);
        let prog = program::<SkLookup>(&mut self.ebpf, programs::SK_LOOKUP)?;
        attach_pinned(prog, programs::SK_LOOKUP, netns.as_fd(), &pin).map(drop)
    }

    /// Detaches the `sk_lookup` link of the netns `cookie` (if pinned).
    pub fn detach_sk_lookup(&mut self, cookie: u64) -> Result<(), DatapathError> {
        unpin_link(&self.pins.sk_lookup_link(cookie))
    }

    /// Netns cookies with a pinned `sk_lookup` link.
    pub fn pinned_sk_lookup_cookies(&self) -> Result<Vec<u64>, DatapathError> {
        self.pins.sk_lookup_cookies()
    }

    /// Takes a map out of the loaded object, typed.
    pub fn take_map<T>(&mut self, name: &'static str) -> Result<T, DatapathError>
    where
        T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
    {
        take_map(&mut self.ebpf, name)
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| DatapathError::Load(format!("map {name} missing from the object")))?;
    T::try_from(map).map_err(map_err(name))
}

/// The program `name` of the object, typed.
fn program<'e, P>(ebpf: &'e mut Ebpf, name: &'static str) -> Result<&'e mut P, DatapathError>
where
    &'e mut P: TryFrom<&'e mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| DatapathError::Load(format!("program {name} missing from the object")))?
        .try_into()
        .map_err(prog_err(name))
}

/// A program the agent attaches through a pinned bpf link.
trait LinkProgram {
    /// Loads it into the kernel.
    fn load_program(&mut self) -> Result<(), ProgramError>;
    /// The loaded program.
    fn program_fd(&self) -> Result<&ProgramFd, ProgramError>;
    /// Attaches it to `target` (a cgroup, a netns) with a new link.
    fn attach_link(
        &mut self,
        name: &'static str,
        target: BorrowedFd<'_>,
    ) -> Result<FdLink, DatapathError>;
}

/// Implements [`LinkProgram`] for an aya program type; `attach` takes the
/// target and then `$args`.
macro_rules! link_program {
    ($program:ty $(, $args:expr)*) => {
        impl LinkProgram for $program {
            fn load_program(&mut self) -> Result<(), ProgramError> {
                self.load()
            }
            fn program_fd(&self) -> Result<&ProgramFd, ProgramError> {
                self.fd()
            }
            fn attach_link(
                &mut self,
                name: &'static str,
                target: BorrowedFd<'_>,
            ) -> Result<FdLink, DatapathError> {
                let id = self.attach(target $(, $args)*).map_err(prog_err(name))?;
                let link = self.take_link(id).map_err(prog_err(name))?;
                FdLink::try_from(link).map_err(|e| DatapathError::Program {
                    program: name,
                    message: e.to_string(),
                })
            }
        }
    };
}

// The cgroup programs are attached through bpf links, which always coexist
// with other programs on the cgroup (BPF_F_ALLOW_MULTI is implied; the kernel
// rejects the flag itself on link_create), so `Single` is the flag-less mode.
link_program!(SockOps, CgroupAttachMode::Single);
link_program!(CgroupSockAddr, CgroupAttachMode::Single);
link_program!(SkLookup);

/// Loads the program `name` and attaches it to `target` behind the link
/// pinned at `pin`; whether a pinned link was re-adopted.
fn load_and_attach<P: LinkProgram>(
    ebpf: &mut Ebpf,
    name: &'static str,
    target: BorrowedFd<'_>,
    pin: &Path,
) -> Result<bool, DatapathError>
where
    for<'e> &'e mut P: TryFrom<&'e mut Program, Error = ProgramError>,
{
    let prog = program::<P>(ebpf, name)?;
    prog.load_program().map_err(prog_err(name))?;
    attach_pinned(prog, name, target, pin)
}

/// The one attach path: swaps the loaded program `name` into the link a
/// previous agent pinned at `pin` (`BPF_LINK_UPDATE`), else attaches it to
/// `target` and pins the new link. Returns whether a pinned link was re-adopted.
fn attach_pinned(
    prog: &mut impl LinkProgram,
    name: &'static str,
    target: BorrowedFd<'_>,
    pin: &Path,
) -> Result<bool, DatapathError> {
    if replace_pinned(pin, prog.program_fd().map_err(prog_err(name))?)? {
        return Ok(true);
    }
    let link = prog.attach_link(name, target)?;
    pin_link(link, pin)?;
    Ok(false)
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

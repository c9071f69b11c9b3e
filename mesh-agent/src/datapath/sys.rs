//! Small system facts and calls the datapath needs that aya does not expose.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use aya::programs::ProgramType;

use super::error::DatapathError;

/// The `bpf(2)` syscall: command `cmd` over `attr`; the result (an fd for
/// commands that make one, else 0) or the OS error.
///
/// # Safety
/// `attr` must be the `union bpf_attr` member `cmd` reads, zero-padded, and
/// every pointer in it must point at live memory of the size the command
/// reads or writes there.
unsafe fn bpf<A>(cmd: libc::c_long, attr: &A) -> io::Result<libc::c_long> {
    // SAFETY: the kernel reads `size_of::<A>()` bytes of the live `attr`;
    // the pointers in it are the caller's promise.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_ref(attr),
            size_of::<A>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `BPF_OBJ_GET`: opens a pinned bpffs object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    const BPF_OBJ_GET: libc::c_long = 7;
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: a zero-padded attr whose path pointer outlives the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &attr) }?;
    // SAFETY: the kernel returned a fresh fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_UPDATE`: atomically replaces the program behind a link.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    const BPF_LINK_UPDATE: libc::c_long = 29;
    #[repr(C)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: an attr without pointers; both fds are borrowed for the call.
    unsafe { bpf(BPF_LINK_UPDATE, &attr) }.map(drop)
}

/// The `union bpf_attr` member of the `BPF_MAP_*_ELEM` commands.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

impl MapElemAttr {
    /// The attr for `key` in aya's typed hash `map`, with `value` (a
    /// pointer to a `V`, or 0 for none) and `flags`. The map's fd is
    /// borrowed: the attr must not outlive `map`.
    fn new<K: aya::Pod, V: aya::Pod>(
        map: &aya::maps::HashMap<aya::maps::MapData, K, V>,
        key: &K,
        value: u64,
        flags: u64,
    ) -> Self {
        use aya::maps::IterableMap;
        use std::os::fd::AsFd;
        Self {
            map_fd: map.map().fd().as_fd().as_raw_fd() as u32,
            _pad: 0,
            key: std::ptr::from_ref(key) as u64,
            value,
            flags,
        }
    }
}

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (hash maps: Linux 5.14): reads the
/// value at `key` and deletes it in one call, so a hot path pays one
/// syscall where aya's `get` and `remove` pay two. `Ok(None)`: no such key.
/// The map is aya's typed one, whose key and value sizes aya checked
/// against `K` and `V` when it was typed: the kernel writes no more than
/// a `V`.
pub fn map_take<K: aya::Pod, V: aya::Pod>(
    map: &aya::maps::HashMap<aya::maps::MapData, K, V>,
    key: &K,
) -> io::Result<Option<V>> {
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    let mut value = std::mem::MaybeUninit::<V>::uninit();
    let attr = MapElemAttr::new(map, key, value.as_mut_ptr() as u64, 0);
    // SAFETY: the kernel reads the map's key size, `size_of::<K>()`, at the
    // live key and writes the map's value size, `size_of::<V>()` (both
    // checked by aya when the map was typed), into `value`; the map's fd is
    // borrowed for the call.
    match unsafe { bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &attr) } {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    }
    // SAFETY: the call succeeded, so the kernel wrote the whole value; `V`
    // is `Pod` (any bytes are a valid `V`).
    Ok(Some(unsafe { value.assume_init() }))
}

/// `BPF_MAP_UPDATE_ELEM` on aya's typed hash `map` through a shared
/// reference: the kernel serialises updates of one map itself, so callers
/// on several threads need no lock around it (aya's `insert` takes `&mut`).
/// `flags`: `BPF_ANY` (0) or `BPF_NOEXIST` (1); a key already there under
/// `BPF_NOEXIST` is `io::ErrorKind::AlreadyExists`.
pub fn map_insert<K: aya::Pod, V: aya::Pod>(
    map: &aya::maps::HashMap<aya::maps::MapData, K, V>,
    key: &K,
    value: &V,
    flags: u64,
) -> io::Result<()> {
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    let attr = MapElemAttr::new(map, key, std::ptr::from_ref(value) as u64, flags);
    // SAFETY: the kernel reads the map's key and value sizes (checked by
    // aya against `K` and `V` when the map was typed) at the live `key` and
    // `value`; the map's fd is borrowed for the call.
    unsafe { bpf(BPF_MAP_UPDATE_ELEM, &attr) }.map(drop)
}

/// `BPF_MAP_DELETE_ELEM` on aya's typed hash `map` through a shared
/// reference (see [`map_insert`]); whether the key was there.
pub fn map_delete<K: aya::Pod, V: aya::Pod>(
    map: &aya::maps::HashMap<aya::maps::MapData, K, V>,
    key: &K,
) -> io::Result<bool> {
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    let attr = MapElemAttr::new(map, key, 0, 0);
    // SAFETY: the kernel reads the map's key size (checked by aya against
    // `K`) at the live `key`; the map's fd is borrowed for the call.
    match unsafe { bpf(BPF_MAP_DELETE_ELEM, &attr) } {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Capabilities the datapath needs, by number (linux/capability.h).
const NEEDED_CAPS: [(u32, &str); 4] = [
    (12, "CAP_NET_ADMIN"),
    (21, "CAP_SYS_ADMIN"),
    (38, "CAP_PERFMON"),
    (39, "CAP_BPF"),
];

/// Fails with the missing capabilities' names unless all are effective.
pub fn check_privileges() -> Result<(), DatapathError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let missing: Vec<&str> = NEEDED_CAPS
        .iter()
        .filter(|(bit, _)| cap_eff & (1u64 << bit) == 0)
        .map(|(_, name)| *name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(DatapathError::Privileges {
            missing: missing.join(", "),
        })
    }
}

/// The kernel release, if it is 5.17 or newer and has the program types.
pub fn check_kernel() -> Result<String, DatapathError> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let version = aya::util::KernelVersion::current()
        .map_err(|e| DatapathError::Kernel(format!("cannot read the kernel version: {e}")))?;
    if version < aya::util::KernelVersion::new(5, 17, 0) {
        return Err(DatapathError::Kernel(format!("running {release}")));
    }
    for (name, supported) in probe_program_types() {
        if !supported {
            return Err(DatapathError::Kernel(format!(
                "{release} has no {name} programs"
            )));
        }
    }
    Ok(release)
}

/// Makes sure the bpffs that holds `pin_dir` is mounted (mounting
/// `/sys/fs/bpf` if it is missing).
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), DatapathError> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let bpf_mounts: Vec<&str> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, point, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "bpf").then_some(point)
        })
        .collect();
    if bpf_mounts.iter().any(|m| pin_dir.starts_with(m)) {
        return Ok(());
    }
    let mount_point = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(mount_point) {
        return Err(DatapathError::Bpffs {
            path: pin_dir.to_owned(),
            source: io::Error::new(io::ErrorKind::NotFound, "no bpf filesystem mounted there"),
        });
    }
    std::fs::create_dir_all(mount_point).map_err(|source| DatapathError::Bpffs {
        path: mount_point.to_owned(),
        source,
    })?;
    let c = |s: &str| CString::new(s).unwrap_or_default();
    let (src, target, fstype) = (c("bpf"), c("/sys/fs/bpf"), c("bpf"));
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call and no data.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(DatapathError::Bpffs {
            path: mount_point.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    tracing::info!(path = "/sys/fs/bpf", "mounted bpffs");
    Ok(())
}

/// Fails unless `dir` is a directory on a cgroup2 filesystem.
pub fn check_cgroup2(dir: &Path) -> Result<(), DatapathError> {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let c_path = CString::new(dir.as_os_str().as_bytes()).map_err(|_| DatapathError::Cgroup {
        path: dir.to_owned(),
        reason: "path contains NUL".into(),
    })?;
    // SAFETY: statfs is plain old data; zero is a valid initial value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs(2) with a NUL-terminated path and a live output struct.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(DatapathError::Cgroup {
            path: dir.to_owned(),
            reason: io::Error::last_os_error().to_string(),
        });
    }
    if st.f_type as i64 != CGROUP2_SUPER_MAGIC {
        return Err(DatapathError::Cgroup {
            path: dir.to_owned(),
            reason: "not a cgroup2 directory".into(),
        });
    }
    Ok(())
}

/// The cgroup2 mount point, from /proc/self/mounts (`/sys/fs/cgroup` on a
/// unified host, `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_mount() -> Option<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, point, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| std::path::PathBuf::from(point))
    })
}

/// Lifts RLIMIT_MEMLOCK for kernels that still charge BPF maps to it (< 5.11).
pub fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a live struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!("cannot lift RLIMIT_MEMLOCK (fine on Linux 5.11+)");
    }
}

/// The kernel's program-type support and transparent delivery's features,
/// for the start-up summary and `/config_dump`.
pub fn probe_program_types() -> Vec<(&'static str, bool)> {
    [
        ("cgroup_sock_addr", ProgramType::CgroupSockAddr),
        ("sock_ops", ProgramType::SockOps),
        ("sk_lookup", ProgramType::SkLookup),
    ]
    .into_iter()
    .map(|(name, t)| (name, aya::sys::is_program_supported(t).unwrap_or(false)))
    .chain(probe_transparent_delivery())
    .collect()
}

/// What transparent delivery needs, probed in the agent's netns (each pod's
/// netns is set up, and falls back per family, at enrollment):
/// `IP_TRANSPARENT` / `IPV6_TRANSPARENT` (2.6.28 / 2.6.37, `CAP_NET_ADMIN`),
/// `SO_COOKIE` (4.12, the agent's exemptions), `tcp_fwmark_accept` (3.19)
/// and `fwmark_reflect` (3.16).
fn probe_transparent_delivery() -> [(&'static str, bool); 4] {
    use socket2::{Domain, Socket, Type};
    let transparent = |domain: Domain| {
        Socket::new(domain, Type::STREAM, None).is_ok_and(|s| {
            if domain == Domain::IPV6 {
                s.set_ip_transparent_v6(true).is_ok()
            } else {
                s.set_ip_transparent_v4(true).is_ok()
            }
        })
    };
    let cookie = Socket::new(Domain::IPV4, Type::STREAM, None).is_ok_and(|s| s.cookie().is_ok());
    let sysctl = |p: &str| Path::new(p).exists();
    [
        ("ip_transparent", transparent(Domain::IPV4)),
        ("ipv6_transparent", transparent(Domain::IPV6)),
        ("socket_cookie", cookie),
        (
            "fwmark_accept",
            sysctl("/proc/sys/net/ipv4/tcp_fwmark_accept")
                && sysctl("/proc/sys/net/ipv4/fwmark_reflect"),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `map_take` over a real kernel hash map (needs `CAP_BPF`: root): the
    /// value comes back once, then the key is gone; a missing key is `None`.
    #[test]
    fn map_take_reads_and_deletes_in_one_call() {
        #[repr(C)]
        struct CreateAttr {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
        }
        const BPF_MAP_CREATE: libc::c_long = 0;
        const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
        const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
        let create = CreateAttr {
            map_type: BPF_MAP_TYPE_LRU_HASH,
            key_size: 8,
            value_size: 16,
            max_entries: 16,
            map_flags: 0,
        };
        // SAFETY: an attr without pointers.
        let fd = unsafe { bpf(BPF_MAP_CREATE, &create) }
            .unwrap_or_else(|e| panic!("BPF_MAP_CREATE: {e}: this test needs root (CAP_BPF)"));
        // SAFETY: the kernel returned a fresh fd that we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let key: u64 = 7;
        let value: [u64; 2] = [0x1122_3344_5566_7788, 42];
        let update = MapElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: std::ptr::from_ref(&key) as u64,
            value: std::ptr::from_ref(&value) as u64,
            flags: 0,
        };
        // SAFETY: key and value are live locals of the map's sizes.
        unsafe { bpf(BPF_MAP_UPDATE_ELEM, &update) }.expect("update");
        let data = aya::maps::MapData::from_fd(fd).expect("map data");
        let map: aya::maps::HashMap<_, u64, [u64; 2]> = aya::maps::Map::from_map_data(data)
            .and_then(aya::maps::HashMap::try_from)
            .expect("typed as u64 -> [u64; 2]");
        // A map typed with another value size is refused by aya, so
        // map_take never meets one.
        use aya::maps::IterableMap;
        let dup = std::os::fd::AsFd::as_fd(map.map().fd())
            .try_clone_to_owned()
            .expect("dup");
        let wrong = aya::maps::MapData::from_fd(dup)
            .and_then(aya::maps::Map::from_map_data)
            .and_then(aya::maps::HashMap::<_, u64, u64>::try_from);
        assert!(wrong.is_err(), "a map typed with the wrong value size");
        let map = &map;
        let taken: Option<[u64; 2]> = map_take(map, &key).expect("take");
        assert_eq!(taken, Some(value));
        let again: Option<[u64; 2]> = map_take(map, &key).expect("take again");
        assert_eq!(again, None, "the first take deletes");
        let other: Option<[u64; 2]> = map_take(map, &8u64).expect("missing key");
        assert_eq!(other, None);
    }
}

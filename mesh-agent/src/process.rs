//! The agent process's own resources: its file-descriptor limit and the
//! memory its allocators keep. The only system calls here that are not about
//! sockets or the kernel programs, kept apart so that the modules that use
//! them (the proxy's limits, the agent's start-up) need no `unsafe`.

/// The process's file-descriptor limit (`RLIMIT_NOFILE`) as the agent left it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit in force.
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
    /// The soft limit before the agent raised it, if it did.
    pub raised_from: Option<u64>,
}

impl FdLimit {
    /// As JSON (`/config_dump`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "soft": self.soft,
            "hard": self.hard,
            "raised_from": self.raised_from,
        })
    }
}

/// Failures to read or raise the file-descriptor limit.
#[derive(Debug, thiserror::Error)]
pub enum FdLimitError {
    /// `getrlimit` failed.
    #[error("cannot read RLIMIT_NOFILE: {0}")]
    Read(std::io::Error),
    /// `setrlimit` failed.
    #[error(
        "cannot raise the soft RLIMIT_NOFILE from {from} to {to}: {source}; raise it for the agent (e.g. LimitNOFILE= or the container runtime's ulimit)"
    )]
    Raise {
        /// The soft limit in force.
        from: u64,
        /// The target.
        to: u64,
        /// The error.
        source: std::io::Error,
    },
}

/// The most descriptors a process may open (`/proc/sys/fs/nr_open`), when
/// the hard limit is unlimited.
fn nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20)
}

/// Reads the process's `RLIMIT_NOFILE`.
pub fn fd_limit() -> Result<FdLimit, FdLimitError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid, owned struct passed by pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(FdLimitError::Read(std::io::Error::last_os_error()));
    }
    Ok(FdLimit {
        soft: lim.rlim_cur,
        hard: lim.rlim_max,
        raised_from: None,
    })
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (capped at
/// `fs.nr_open` when the hard limit is unlimited), as a server that holds
/// one descriptor per connection must.
pub fn raise_fd_limit() -> Result<FdLimit, FdLimitError> {
    let current = fd_limit()?;
    let target = if current.hard == libc::RLIM_INFINITY {
        nr_open()
    } else {
        current.hard
    };
    if current.soft >= target {
        return Ok(current);
    }
    let lim = libc::rlimit {
        rlim_cur: target,
        rlim_max: current.hard,
    };
    // SAFETY: setrlimit reads the valid struct passed by pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(FdLimitError::Raise {
            from: current.soft,
            to: target,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(FdLimit {
        soft: target,
        hard: current.hard,
        raised_from: Some(current.soft),
    })
}

/// `MALLCTL_ARENAS_ALL` of jemalloc's `mallctl` names: every arena.
const JEMALLOC_ARENAS_ALL: u32 = 4096;

/// Hands memory the allocators hold free back to the OS; whether any was
/// released. The agent binary allocates with jemalloc (its global
/// allocator), which returns unused pages itself (background threads, 10 s
/// decay) and is asked here to purge at once (`arena.<all>.purge`); C code
/// (the crypto library) still uses glibc's malloc, trimmed with
/// `malloc_trim(0)`.
pub fn release_free_memory() -> bool {
    let name = format!("arena.{JEMALLOC_ARENAS_ALL}.purge\0");
    // SAFETY: `name` is a NUL-terminated mallctl name that outlives the
    // call; the purge takes no argument and returns nothing, so every
    // pointer passed is null and the length 0, as jemalloc requires.
    let purged = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    } == 0;
    purged | trim_glibc()
}

/// glibc's `malloc_trim(0)`: whether memory was released.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_glibc() -> bool {
    // SAFETY: malloc_trim only walks glibc's own heaps; no pointers are passed.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other C libraries' allocators return memory themselves.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_glibc() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jemalloc_accepts_the_purge() {
        // jemalloc answers the purge of every arena with success whether or
        // not pages were dirty; a wrong name or argument fails (ENOENT,
        // EPERM) and the agent would never hand jemalloc's memory back.
        let burst: Vec<Vec<u8>> = (0..256).map(|_| vec![1u8; 64 * 1024]).collect();
        drop(burst);
        assert!(release_free_memory());
    }

    #[test]
    fn the_descriptor_limit_reads() {
        let l = fd_limit().expect("getrlimit");
        assert!(l.soft <= l.hard);
        assert!(l.soft > 0);
    }
}

//! Network namespaces: a worker thread that lives inside a pod's netns and
//! creates sockets there, and the socket helpers the datapath needs.
//!
//! A socket keeps the netns it was created in for its whole life, whichever
//! thread later uses it. So the agent enters a pod's netns only for the
//! `socket()` call, on a thread dedicated to that pod, and hands the socket
//! to the tokio runtime.

use std::{
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
};

use socket2::{Domain, Protocol, Socket, Type};

/// Errors entering or using a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The netns path cannot be opened: the pod is gone or the path is wrong.
    #[error(
        "network namespace {path} cannot be opened ({source}): is the pod still running, and is the path right?"
    )]
    Open {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// `setns()` failed: the agent lacks CAP_SYS_ADMIN or the path is not a netns.
    #[error(
        "cannot enter network namespace {path} ({source}): the agent needs CAP_SYS_ADMIN and the path must be a network namespace"
    )]
    Enter {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The worker thread could not be started.
    #[error("cannot start the worker thread for network namespace {path}: {source}")]
    Thread {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The path named another netns when it was checked (the pod restarted?).
    #[error(
        "network namespace {0} changed while the pod was being enrolled (did the pod restart?); retrying"
    )]
    Changed(PathBuf),
    /// The worker thread has stopped (the pod was un-enrolled).
    #[error("the worker for network namespace {0} has stopped")]
    Stopped(PathBuf),
}

/// A network namespace's identity: the device and inode of its nsfs file,
/// the same whichever path (`/proc/<pid>/ns/net`, a bind mount under
/// `/var/run/netns`) names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NetnsId {
    dev: u64,
    ino: u64,
}

impl NetnsId {
    /// The identity of the namespace `file` (opened from a netns path) is.
    pub fn of(file: &File) -> io::Result<Self> {
        let meta = file.metadata()?;
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

impl std::fmt::Display for NetnsId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // As `ls -l /proc/<pid>/ns/net` shows it.
        write!(f, "net:[{}]", self.ino)
    }
}

/// Opens the netns at `path` and reads its identity.
pub fn open(path: &Path) -> Result<(File, NetnsId), NetnsError> {
    let err = |source| NetnsError::Open {
        path: path.to_owned(),
        source,
    };
    let ns = File::open(path).map_err(err)?;
    let id = NetnsId::of(&ns).map_err(err)?;
    Ok((ns, id))
}

/// The namespaces no pod may be enrolled in: enrolling one would capture the
/// node's own processes under the pod's identity.
#[derive(Clone, Debug, Default)]
pub struct ReservedNetns {
    entries: Vec<(NetnsId, &'static str)>,
}

impl ReservedNetns {
    /// The agent's own netns (`/proc/self/ns/net`: the node's, where the
    /// agent runs) and the host's (`<proc_root>/1/ns/net`: init's). A path
    /// that cannot be read is skipped with a warning (it then cannot be
    /// what a pod's path opens either, unless the pod's path is it).
    pub fn new(proc_root: &Path) -> Self {
        let mut out = Self::default();
        out.add(
            Path::new("/proc/self/ns/net"),
            "the agent's own network namespace",
        );
        out.add(
            &proc_root.join("1/ns/net"),
            "the host's network namespace (init's)",
        );
        out
    }

    /// Refuses the netns at `path` too, described as `what` in errors.
    pub fn add(&mut self, path: &Path, what: &'static str) {
        match open(path) {
            Ok((_, id)) => {
                if !self.entries.iter().any(|(i, _)| *i == id) {
                    self.entries.push((id, what));
                }
            }
            Err(e) => {
                tracing::warn!(
                    path = %path.display(),
                    what,
                    error = %e,
                    "cannot identify a network namespace no pod may use; pods naming it by another path are not refused"
                )
            }
        }
    }

    /// What `id` is, if it is reserved.
    pub fn reserved(&self, id: NetnsId) -> Option<&'static str> {
        self.entries
            .iter()
            .find_map(|(i, what)| (*i == id).then_some(*what))
    }
}

fn setns_net(fd: &impl AsFd) -> io::Result<()> {
    // SAFETY: setns() on a valid fd borrowed for the duration of the call;
    // it only changes the calling thread's network namespace.
    let rc = unsafe { libc::setns(fd.as_fd().as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread that entered a network namespace and stays there, running jobs.
/// Dropping the worker stops the thread once queued jobs are done.
pub struct NetnsWorker {
    path: PathBuf,
    tx: mpsc::Sender<Job>,
    spares: Arc<Mutex<Spares>>,
}

/// Sockets a worker keeps made in its netns, per family, so a connection
/// takes one without waiting for the worker thread (a hop to another thread
/// and back per connection, measured as a fifth of the agent's scheduler
/// wake-ups under a connection storm). Filled on first use only, so a pod
/// that never has a connection delivered or dialled from it holds none.
#[derive(Default)]
struct Spares {
    /// `[IPv4, IPv6]` sockets: fresh, unbound, unmarked.
    ready: [Vec<Socket>; 2],
    /// Whether a refill is queued on the worker, per family.
    refilling: [bool; 2],
}

/// Sockets made ahead per family: the bound on what an idle pod holds (two
/// families: 32 descriptors). A refill wakes the netns worker: the larger
/// the batch, the fewer wake-ups per connection (with 8 and 2, one per 6
/// connections was 4 % of the agent's CPU on a connection storm).
pub const SPARE_SOCKETS: usize = 16;
/// A refill (up to [`SPARE_SOCKETS`]) is queued when this few are left, so
/// a pod's spares settle between this and the bound.
pub const SPARE_REFILL_AT: usize = 4;

/// `[IPv4, IPv6]` index of a family.
fn family_index(domain: Domain) -> usize {
    usize::from(domain == Domain::IPV6)
}

impl NetnsWorker {
    /// Starts a worker inside the netns at `path`.
    pub fn spawn(label: &str, path: &Path) -> Result<Self, NetnsError> {
        let (ns, _) = open(path)?;
        Self::spawn_in(label, path, ns)
    }

    /// Starts a worker inside the netns `ns`, already opened from `path`
    /// (so that the namespace entered is the one that was checked).
    pub fn spawn_in(label: &str, path: &Path, ns: File) -> Result<Self, NetnsError> {
        Self::start(label, path, Some(ns))
    }

    /// A worker that stays in the calling process's netns (tests of the
    /// worker itself, without privileges).
    #[cfg(test)]
    fn here(label: &str) -> Result<Self, NetnsError> {
        Self::start(label, Path::new("/proc/self/ns/net"), None)
    }

    /// Starts the thread, entering `ns` first when given.
    fn start(label: &str, path: &Path, ns: Option<File>) -> Result<Self, NetnsError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
        let mut name = format!("ns-{label}");
        name.truncate(15);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let entered = ns.as_ref().map_or(Ok(()), setns_net);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                drop(ns);
                if ok {
                    for job in rx {
                        job();
                    }
                }
            })
            .map_err(|source| NetnsError::Thread {
                path: path.to_owned(),
                source,
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                path: path.to_owned(),
                tx,
                spares: Arc::default(),
            }),
            Ok(Err(source)) => Err(NetnsError::Enter {
                path: path.to_owned(),
                source,
            }),
            Err(_) => Err(NetnsError::Stopped(path.to_owned())),
        }
    }

    /// Runs `f` on the worker (inside the netns) and waits for its result.
    pub fn run_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetnsError> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| NetnsError::Stopped(self.path.clone()))?;
        rx.recv()
            .map_err(|_| NetnsError::Stopped(self.path.clone()))
    }

    /// Runs `f` on the worker (inside the netns) without blocking the caller's thread.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetnsError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| NetnsError::Stopped(self.path.clone()))?;
        rx.await.map_err(|_| NetnsError::Stopped(self.path.clone()))
    }

    /// A fresh TCP socket of `domain` (IPv4 or IPv6) inside the netns: a
    /// spare when one is ready, else made on the worker thread. Taking one
    /// queues a refill when few are left.
    pub async fn socket(&self, domain: Domain) -> io::Result<Socket> {
        let family = family_index(domain);
        let (spare, refill) = {
            let mut spares = self.spares.lock().unwrap_or_else(|p| p.into_inner());
            let spare = spares.ready[family].pop();
            let refill = !spares.refilling[family] && spares.ready[family].len() <= SPARE_REFILL_AT;
            if refill {
                spares.refilling[family] = true;
            }
            (spare, refill)
        };
        if refill {
            self.refill(domain);
        }
        match spare {
            Some(sock) => Ok(sock),
            None => self
                .run(move || new_tcp_socket(domain))
                .await
                .map_err(io::Error::other)?,
        }
    }

    /// A socket of the netns to connect to `dst` from, set up by
    /// [`connect_socket`] (with `from`: bound to that address).
    pub async fn connect_socket(
        &self,
        dst: SocketAddr,
        from: Option<IpAddr>,
    ) -> io::Result<(Socket, Option<SocketAddr>)> {
        let sock = self.socket(Domain::for_address(dst)).await?;
        connect_socket(sock, &dst, from)
    }

    /// Queues the making of `domain`'s spares up to [`SPARE_SOCKETS`] on the
    /// worker thread; nobody waits for it.
    fn refill(&self, domain: Domain) {
        let family = family_index(domain);
        let spares = Arc::clone(&self.spares);
        let job = Box::new(move || {
            let have = spares.lock().unwrap_or_else(|p| p.into_inner()).ready[family].len();
            let mut made = Vec::with_capacity(SPARE_SOCKETS.saturating_sub(have));
            for _ in have..SPARE_SOCKETS {
                match new_tcp_socket(domain) {
                    Ok(sock) => made.push(sock),
                    Err(e) => {
                        // Out of descriptors or memory: connections make
                        // their own (and report the error) until it passes.
                        tracing::debug!(error = %e, "cannot make spare sockets");
                        break;
                    }
                }
            }
            let mut spares = spares.lock().unwrap_or_else(|p| p.into_inner());
            spares.ready[family].append(&mut made);
            spares.refilling[family] = false;
        });
        if self.tx.send(job).is_err() {
            // The worker has stopped: no refill will come.
            self.spares
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .refilling[family] = false;
        }
    }

    /// Spare sockets ready, `[IPv4, IPv6]`.
    pub fn spares(&self) -> [usize; 2] {
        let spares = self.spares.lock().unwrap_or_else(|p| p.into_inner());
        [spares.ready[0].len(), spares.ready[1].len()]
    }

    /// The netns path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A non-blocking TCP socket of `domain`, in the calling thread's netns.
/// A socket stays in the netns it was made in, whichever thread uses it.
/// It has `TCP_NODELAY` (everything the agent sends is a relay's chunk or an
/// HTTP/2 frame it wants out at once); a listener's is inherited by the
/// sockets it accepts, so neither those nor the agent's outgoing sockets
/// need a `setsockopt` per connection.
fn new_tcp_socket(domain: Domain) -> io::Result<Socket> {
    let sock = Socket::new(
        domain,
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    sock.set_tcp_nodelay(true)?;
    Ok(sock)
}

/// A non-blocking TCP socket of `addr`'s family, in the calling thread's
/// netns, carrying `mark` (`SO_MARK`) so the kernel programs leave it alone.
pub fn tcp_socket(addr: &SocketAddr, mark: u32) -> io::Result<Socket> {
    let sock = new_tcp_socket(Domain::for_address(*addr))?;
    sock.set_mark(mark)?;
    Ok(sock)
}

/// The source ports a transparent delivery socket is bound to: Linux's
/// default ephemeral range.
const DELIVERY_PORTS: std::ops::RangeInclusive<u16> = 32768..=60999;
/// Random ports tried at bind before giving up.
const DELIVERY_BIND_TRIES: usize = 8;

/// Makes `sock`, a fresh socket of a pod's netns
/// ([`NetnsWorker::socket`]), one for the agent to connect to `dst` from;
/// any thread may call it. With `from`, the socket is bound to that address (the
/// client's, not local to the pod) with `IP_TRANSPARENT`/`IPV6_TRANSPARENT`
/// (`CAP_NET_ADMIN`) and carries [`mesh_common::DELIVERY_MARK`], whose
/// replies the pod's delivery rule keeps in the pod; the bound address is
/// returned with it. Without, it carries [`mesh_common::BYPASS_MARK`] and
/// the kernel picks its source at connect.
///
/// The delivery port is random, with `SO_REUSEADDR`, not the kernel's
/// choice at `bind(from, 0)`: that choice scans the port range for a port
/// no socket is bound to, and every earlier delivery from the same client
/// address leaves a TIME_WAIT socket holding one. With thousands of them
/// (a busy client) that scan took half of the agent's CPU. Sharing a port
/// with other delivery sockets (all `SO_REUSEADDR`, their TIME_WAITs too)
/// is safe: `connect` still refuses a 4-tuple in use (`EADDRNOTAVAIL`,
/// which the caller retries on a new socket). The port is known before the
/// `SYN`, as the `sk_lookup` exemption of the delivery tuple needs.
pub fn connect_socket(
    sock: Socket,
    dst: &SocketAddr,
    from: Option<IpAddr>,
) -> io::Result<(Socket, Option<SocketAddr>)> {
    let Some(from) = from else {
        sock.set_mark(mesh_common::BYPASS_MARK)?;
        return Ok((sock, None));
    };
    sock.set_mark(mesh_common::DELIVERY_MARK)?;
    if dst.is_ipv6() {
        sock.set_ip_transparent_v6(true)?;
    } else {
        sock.set_ip_transparent_v4(true)?;
    }
    sock.set_reuse_address(true)?;
    let mut in_use = None;
    for _ in 0..DELIVERY_BIND_TRIES {
        let bound = SocketAddr::new(from, fastrand::u16(DELIVERY_PORTS));
        match sock.bind(&bound.into()) {
            Ok(()) => return Ok((sock, Some(bound))),
            // A listener (or a socket without SO_REUSEADDR) holds the port.
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => in_use = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(in_use.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse)))
}

/// The cookie of the network namespace a socket lives in (`SO_NETNS_COOKIE`, Linux 5.14).
pub fn netns_cookie(fd: &impl AsFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the live u64.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A listening socket in the calling thread's netns, non-blocking, marked.
/// `dual_stack` clears `IPV6_V6ONLY` on an IPv6 socket (one socket for both
/// families, used as the `sk_lookup` target); other IPv6 sockets are v6-only.
pub fn listener(addr: SocketAddr, dual_stack: bool) -> io::Result<std::net::TcpListener> {
    let sock = tcp_socket(&addr, mesh_common::BYPASS_MARK)?;
    sock.set_reuse_address(true)?;
    // Two agents serve a pod during an upgrade (the new one starts before the
    // old one drains): both bind the same in-pod ports.
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(!dual_stack)?;
    }
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls `done` for up to 5 s.
    fn eventually(mut done: impl FnMut() -> bool) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if done() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        done()
    }

    /// The proxy relies on accepted sockets inheriting the listener's
    /// `TCP_NODELAY` and zero linger (no `setsockopt` per connection).
    #[test]
    fn accepted_sockets_inherit_no_delay_and_zero_linger() {
        let sock = new_tcp_socket(Domain::IPV4).expect("socket");
        sock.set_linger(Some(std::time::Duration::ZERO))
            .expect("linger");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        sock.bind(&any.into()).expect("bind");
        sock.listen(8).expect("listen");
        let addr = sock.local_addr().expect("local").as_socket().expect("inet");
        let _client = std::net::TcpStream::connect(addr).expect("connect");
        let listener: std::net::TcpListener = sock.into();
        listener.set_nonblocking(false).expect("blocking");
        let (accepted, _) = listener.accept().expect("accept");
        let accepted = socket2::SockRef::from(&accepted);
        assert!(accepted.tcp_nodelay().expect("nodelay"));
        assert_eq!(
            accepted.linger().expect("linger"),
            Some(std::time::Duration::ZERO)
        );
        // And the agent's own outgoing sockets have no delay from the start.
        let fresh = new_tcp_socket(Domain::IPV6).expect("socket");
        assert!(fresh.tcp_nodelay().expect("nodelay"));
    }

    #[tokio::test]
    async fn sockets_come_from_spares_made_ahead_and_bounded_per_family() {
        let worker = NetnsWorker::here("spares").expect("worker");
        // Nothing is made before the first use.
        assert_eq!(worker.spares(), [0, 0]);
        let first = worker.socket(Domain::IPV4).await.expect("socket");
        assert!(
            eventually(|| worker.spares() == [SPARE_SOCKETS, 0]),
            "{:?}",
            worker.spares()
        );
        // Fresh sockets: IPv4, non-blocking, not bound yet.
        assert_eq!(first.domain().expect("domain"), Domain::IPV4);
        assert!(first.nonblocking().expect("flag"));
        let local = first
            .local_addr()
            .expect("local")
            .as_socket()
            .expect("inet");
        assert_eq!(local.port(), 0);
        // Taking them never lets the spares exceed the bound, refills come
        // while they are taken, and four times the bound is served.
        let mut taken = vec![first];
        for _ in 0..4 * SPARE_SOCKETS {
            taken.push(worker.socket(Domain::IPV4).await.expect("socket"));
            let [v4, v6] = worker.spares();
            assert!(v4 <= SPARE_SOCKETS && v6 == 0, "{v4} {v6}");
        }
        assert!(
            eventually(|| worker.spares()[0] > SPARE_REFILL_AT),
            "{:?}",
            worker.spares()
        );
        // Every socket handed out is a distinct one.
        let mut fds: Vec<_> = taken.iter().map(|s| s.as_raw_fd()).collect();
        fds.sort_unstable();
        fds.dedup();
        assert_eq!(fds.len(), taken.len());
        // The other family has its own spares.
        let v6 = worker.socket(Domain::IPV6).await.expect("socket");
        assert_eq!(v6.domain().expect("domain"), Domain::IPV6);
        assert!(
            eventually(|| worker.spares()[1] == SPARE_SOCKETS),
            "{:?}",
            worker.spares()
        );
        // A worker that has stopped still answers: an error, not a hang.
        let stopped = NetnsWorker {
            path: PathBuf::from("/gone"),
            tx: mpsc::channel().0,
            spares: Arc::default(),
        };
        let err = stopped.socket(Domain::IPV4).await.expect_err("stopped");
        assert!(err.to_string().contains("has stopped"), "{err}");
        assert_eq!(stopped.spares(), [0, 0]);
    }

    #[test]
    fn a_netns_is_known_by_its_identity_whatever_the_path() {
        let (_, own) = open(Path::new("/proc/self/ns/net")).unwrap();
        let (_, same) = open(&PathBuf::from(format!(
            "/proc/{}/ns/net",
            std::process::id()
        )))
        .unwrap();
        assert_eq!(own, same);
        let reserved = ReservedNetns::new(Path::new("/proc"));
        assert_eq!(
            reserved.reserved(own),
            Some("the agent's own network namespace")
        );
        // Not a netns file: another identity, not reserved.
        let other = NetnsId::of(&File::open("/proc/self/stat").unwrap()).unwrap();
        assert_ne!(other, own);
        assert_eq!(reserved.reserved(other), None);
        assert!(own.to_string().starts_with("net:["), "{own}");
        let missing = open(Path::new("/nonexistent/ns/net")).unwrap_err();
        assert!(
            missing.to_string().contains("is the pod still running"),
            "{missing}"
        );
    }
}

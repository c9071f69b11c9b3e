//! `mesh-lab-app`: the application that runs inside lab pods — an echo
//! server, a checking client, a one-shot probe, a long-lived connection
//! and a plain TCP relay (the bench's floor).

#![deny(clippy::undocumented_unsafe_blocks)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mesh_lab::app::{
    ClientReport, FlowReport, HoldReport, Pattern, PatternChecker, ProbeOutcome, error_kind,
};

const CHUNK: usize = 64 * 1024;
const MAX_LOCAL_SAMPLES: usize = 5;

/// The mesh lab's test application.
#[derive(Debug, Parser)]
#[command(name = "mesh-lab-app", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Echo server: echoes every byte until EOF, then shuts down its write
    /// side. Prints `listening <addr>` once per bound listener.
    Echo {
        /// Address to listen on (repeatable). `[::]:PORT` is dual-stack.
        #[arg(long = "listen", required = true)]
        listen: Vec<SocketAddr>,
        /// On accept, first write `peer=<client address as seen>\n`.
        #[arg(long)]
        greeting_peer: bool,
        /// The listen backlog (default: the standard library's). A small
        /// one with `--accept-after-ms` makes the kernel's accept queue
        /// overflow, as on a busy server.
        #[arg(long)]
        backlog: Option<i32>,
        /// Wait this long after listening before accepting anything.
        #[arg(long, default_value_t = 0)]
        accept_after_ms: u64,
    },
    /// A plain TCP relay: each connection accepted on a `--listen` address
    /// is relayed, byte for byte and half-close for half-close, to the same
    /// port of `--to`. No TLS, no HTTP/2, no policy: `cargo xtask bench`
    /// measures it as the least any proxy that terminates a connection and
    /// opens another pays. Prints `listening <addr>` once per listener.
    Forward {
        /// Address to listen on (repeatable).
        #[arg(long = "listen", required = true)]
        listen: Vec<SocketAddr>,
        /// Where to relay to: this address, at the listener's port.
        #[arg(long)]
        to: std::net::IpAddr,
        /// Worker threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Opens N connections (C at a time), sends a per-connection pattern,
    /// checks the echo byte for byte; prints one JSON report. Exit 1 if any failed.
    Client {
        /// Server address.
        #[arg(long)]
        connect: SocketAddr,
        /// Number of connections.
        #[arg(long, default_value_t = 1)]
        conns: u64,
        /// Connections in flight at once.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        concurrency: u64,
        /// Bytes sent on each connection.
        #[arg(long, default_value_t = 1024)]
        bytes: u64,
        /// Timeout for connect and for each read or write, in milliseconds.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Keep each connection open this long after sending, before shutdown.
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        /// Expect the server's `peer=` greeting line first (echo --greeting-peer)
        /// and report the addresses it names.
        #[arg(long)]
        greeting: bool,
        /// Keep opening connections until this file exists instead of
        /// stopping after `--conns` (a load that spans an event, e.g. an
        /// upgrade, however long it takes).
        #[arg(long)]
        stop_file: Option<std::path::PathBuf>,
    },
    /// One connection that moves bytes one way until the other side ends it
    /// (or `--bytes` are sent); prints `{"bytes":n,"end":"<how>"}` where `end`
    /// says how the stream ended: `eof` (a clean FIN), `sent` (all `--bytes`
    /// sent, then FIN), `reset`, `broken_pipe`, `timeout`, ... Exit 0.
    /// Tells a cut stream (reset) from a complete one (eof).
    Flow {
        /// Server address to connect to (or `--listen`).
        #[arg(long, conflicts_with = "listen", required_unless_present = "listen")]
        connect: Option<SocketAddr>,
        /// Address to listen on: serves one connection (or `--connect`).
        /// Prints `listening <addr>` first.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Send (otherwise receive and discard).
        #[arg(long)]
        send: bool,
        /// With `--send`: stop after this many bytes (then FIN); unlimited if absent.
        #[arg(long)]
        bytes: Option<u64>,
        /// Per-read/write timeout in milliseconds.
        #[arg(long, default_value_t = 20000)]
        timeout_ms: u64,
    },
    /// One connection attempt; prints one word: echoed, connected, refused,
    /// reset, timeout or `error:<text>`. Always exits 0. A server that closes
    /// without reading what was sent makes the kernel answer with a reset, so
    /// `connected` means the peer read the text (or never got it) and closed.
    Probe {
        /// Server address.
        #[arg(long)]
        connect: SocketAddr,
        /// Total time allowed, in milliseconds.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
        /// Text to send and expect back.
        #[arg(long, default_value = "ping", value_parser = non_empty)]
        send: String,
        /// Put this `SO_MARK` on the socket (the mesh agent's own mark is 1337).
        #[arg(long)]
        mark: Option<u32>,
        /// Bind the socket to this (possibly non-local) address first, with
        /// `IP_TRANSPARENT` / `IPV6_TRANSPARENT`: what the mesh agent's
        /// delivery sockets do (needs CAP_NET_ADMIN).
        #[arg(long)]
        transparent_from: Option<std::net::IpAddr>,
    },
    /// One HTTP/1.1 `GET` (for example of an agent's `/metrics`); prints the
    /// response body. Exit 1 unless the status is 200.
    Get {
        /// Server address.
        #[arg(long)]
        connect: SocketAddr,
        /// The path.
        #[arg(long, default_value = "/")]
        path: String,
    },
    /// One long connection sending a small message every interval and reading
    /// its echo; prints `{"rounds_ok":n,"error":null|"<kind>"}`. Exit 1 on error.
    Hold {
        /// Server address.
        #[arg(long)]
        connect: SocketAddr,
        /// Time between messages, in milliseconds.
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        /// How long to keep the connection, in milliseconds.
        #[arg(long)]
        duration_ms: u64,
        /// Timeout for connect and for each echo, in milliseconds.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
}

fn non_empty(s: &str) -> Result<String, String> {
    if s.is_empty() {
        Err("must not be empty".to_owned())
    } else {
        Ok(s.to_owned())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Echo {
            listen,
            greeting_peer,
            backlog,
            accept_after_ms,
        } => echo(
            &listen,
            greeting_peer,
            backlog,
            Duration::from_millis(accept_after_ms),
        )
        .map(|()| true),
        Cmd::Forward {
            listen,
            to,
            threads,
        } => forward(&listen, to, threads).map(|()| true),
        Cmd::Client {
            connect,
            conns,
            concurrency,
            bytes,
            timeout_ms,
            hold_ms,
            greeting,
            stop_file,
        } => {
            let opts = ClientOpts {
                addr: connect,
                bytes,
                timeout: Duration::from_millis(timeout_ms),
                hold: Duration::from_millis(hold_ms),
                greeting,
                stop_file,
            };
            let conns = if opts.stop_file.is_some() {
                u64::MAX
            } else {
                conns
            };
            let report = client(&opts, conns, concurrency);
            print_json(&report).map(|()| report.failed == 0)
        }
        Cmd::Flow {
            connect,
            listen,
            send,
            bytes,
            timeout_ms,
        } => flow(
            connect,
            listen,
            send,
            bytes,
            Duration::from_millis(timeout_ms),
        )
        .and_then(|report| print_json(&report))
        .map(|()| true),
        Cmd::Probe {
            connect,
            timeout_ms,
            send,
            mark,
            transparent_from,
        } => {
            let outcome = probe(
                connect,
                Duration::from_millis(timeout_ms),
                send.as_bytes(),
                mark,
                transparent_from,
            );
            print_line(&outcome.to_string()).map(|()| true)
        }
        Cmd::Get { connect, path } => http_get(connect, &path).and_then(|(ok, body)| {
            io::stdout().write_all(body.as_bytes())?;
            Ok(ok)
        }),
        Cmd::Hold {
            connect,
            interval_ms,
            duration_ms,
            timeout_ms,
        } => {
            let report = hold(
                connect,
                Duration::from_millis(interval_ms),
                Duration::from_millis(duration_ms),
                Duration::from_millis(timeout_ms),
            );
            print_json(&report).map(|()| report.error.is_none())
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("mesh-lab-app: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn print_line(line: &str) -> Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    print_line(&serde_json::to_string(value).context("encoding the report")?)
}

// ---------------------------------------------------------------- echo

fn echo(
    listen: &[SocketAddr],
    greeting_peer: bool,
    backlog: Option<i32>,
    accept_after: Duration,
) -> Result<()> {
    let mut listeners = Vec::new();
    for addr in listen {
        let listener = match backlog {
            None => TcpListener::bind(addr),
            Some(backlog) => listen_with_backlog(*addr, backlog),
        }
        .with_context(|| format!("binding {addr}"))?;
        let local = listener
            .local_addr()
            .context("getsockname on the listener")?;
        print_line(&format!("listening {local}"))?;
        listeners.push(listener);
    }
    thread::sleep(accept_after);
    thread::scope(|s| {
        for listener in &listeners {
            s.spawn(move || serve(listener, greeting_peer));
        }
    });
    Ok(())
}

/// A listener on `addr` (dual-stack for `[::]`, `SO_REUSEADDR` as the
/// standard library's) with an explicit listen backlog.
fn listen_with_backlog(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    if addr.is_ipv6() {
        sock.set_only_v6(false)?;
    }
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(backlog)?;
    Ok(sock.into())
}

fn serve(listener: &TcpListener, greeting_peer: bool) {
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                let spawned = thread::Builder::new().spawn(move || {
                    if let Err(e) = echo_conn(stream, peer, greeting_peer) {
                        eprintln!("echo {peer}: {e}");
                    }
                });
                if let Err(e) = spawned {
                    eprintln!("echo {peer}: no thread: {e}");
                }
            }
            Err(e) => {
                eprintln!("accept: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Each relay direction's buffer. The agent's relay reads 16 KiB at first
/// and up to 256 KiB on a busy connection; 64 KiB is near the agent's
/// bulk reads and stays on the heap (glibc maps 128 KiB and more one by
/// one, which would make the relay's new connections look dearer than
/// they are).
const FORWARD_BUFFER: usize = 64 * 1024;

/// The relay's shape is the agent's: one current-thread runtime per core,
/// each with its own `SO_REUSEPORT` listeners, so that a connection and its
/// relay stay on one thread.
fn forward(listen: &[SocketAddr], to: std::net::IpAddr, threads: Option<usize>) -> Result<()> {
    let threads = threads.unwrap_or_else(|| thread::available_parallelism().map_or(1, |n| n.get()));
    let mut workers = Vec::new();
    for _ in 0..threads.max(1) {
        let listeners = listen
            .iter()
            .map(|addr| reuseport_listener(*addr).with_context(|| format!("binding {addr}")))
            .collect::<Result<Vec<_>>>()?;
        workers.push(thread::spawn(move || forward_thread(listeners, to)));
    }
    for addr in listen {
        println!("listening {addr}");
    }
    io::stdout().flush()?;
    for worker in workers {
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("a relay thread panicked"))??;
    }
    Ok(())
}

fn reuseport_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}

fn forward_thread(listeners: Vec<TcpListener>, to: std::net::IpAddr) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a relay thread's runtime")?;
    runtime.block_on(async {
        let tasks = tokio::task::LocalSet::new();
        for listener in listeners {
            let target = SocketAddr::new(to, listener.local_addr()?.port());
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tasks.spawn_local(async move {
                loop {
                    let Ok((inbound, _)) = listener.accept().await else {
                        // Out of descriptors, say: wait instead of spinning.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    tokio::task::spawn_local(async move {
                        // Said, so that a bench row's failed connections
                        // have a cause in the relay's log.
                        if let Err(e) = relay(inbound, target).await {
                            eprintln!("relay to {target}: {e}");
                        }
                    });
                }
            });
        }
        tasks.await;
        Ok(())
    })
}

async fn relay(mut inbound: tokio::net::TcpStream, target: SocketAddr) -> io::Result<()> {
    inbound.set_nodelay(true)?;
    let mut outbound = tokio::net::TcpStream::connect(target).await?;
    outbound.set_nodelay(true)?;
    tokio::io::copy_bidirectional_with_sizes(
        &mut inbound,
        &mut outbound,
        FORWARD_BUFFER,
        FORWARD_BUFFER,
    )
    .await
    .map(|_| ())
}

fn echo_conn(mut stream: TcpStream, peer: SocketAddr, greeting_peer: bool) -> io::Result<()> {
    stream.set_nodelay(true)?;
    if greeting_peer {
        stream.write_all(format!("peer={peer}\n").as_bytes())?;
    }
    let mut buf = vec![0; CHUNK];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => stream.write_all(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    stream.shutdown(Shutdown::Write)
}

// ---------------------------------------------------------------- client

struct ClientOpts {
    addr: SocketAddr,
    bytes: u64,
    timeout: Duration,
    hold: Duration,
    greeting: bool,
    /// With `--stop-file`: stop opening connections once it exists.
    stop_file: Option<std::path::PathBuf>,
}

#[derive(Default)]
struct ConnResult {
    error: Option<String>,
    peer: Option<String>,
    local: Option<String>,
    greeting_peer: Option<String>,
    sent: u64,
    received: u64,
}

#[derive(Default)]
struct Totals {
    ok: u64,
    failed: u64,
    errors: BTreeMap<String, u64>,
    peers: BTreeSet<String>,
    locals: Vec<String>,
    greeting_peers: BTreeSet<String>,
    sent: u64,
    received: u64,
}

impl Totals {
    fn add(&mut self, r: ConnResult) {
        match r.error {
            None => self.ok += 1,
            Some(kind) => {
                self.failed += 1;
                *self.errors.entry(kind).or_default() += 1;
            }
        }
        self.peers.extend(r.peer);
        if self.locals.len() < MAX_LOCAL_SAMPLES {
            self.locals.extend(r.local);
        }
        self.greeting_peers.extend(r.greeting_peer);
        self.sent += r.sent;
        self.received += r.received;
    }
}

fn client(opts: &ClientOpts, conns: u64, concurrency: u64) -> ClientReport {
    let start = Instant::now();
    let next = AtomicU64::new(0);
    let totals = Mutex::new(Totals::default());
    thread::scope(|s| {
        for _ in 0..concurrency.min(conns) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= conns || opts.stop_file.as_ref().is_some_and(|f| f.exists()) {
                        break;
                    }
                    let r = one_connection(opts, i);
                    totals.lock().unwrap_or_else(PoisonError::into_inner).add(r);
                }
            });
        }
    });
    let t = totals.into_inner().unwrap_or_else(PoisonError::into_inner);
    ClientReport {
        ok: t.ok,
        failed: t.failed,
        errors: t.errors,
        peer_addrs: t.peers.into_iter().collect(),
        local_addrs: t.locals,
        bytes_sent: t.sent,
        bytes_received: t.received,
        elapsed_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
        greeting_peers: opts
            .greeting
            .then(|| t.greeting_peers.into_iter().collect()),
    }
}

fn one_connection(opts: &ClientOpts, index: u64) -> ConnResult {
    let mut r = ConnResult::default();
    let mut stream = match TcpStream::connect_timeout(&opts.addr, opts.timeout) {
        Ok(s) => s,
        Err(e) => {
            r.error = Some(error_kind(&e));
            return r;
        }
    };
    r.peer = stream.peer_addr().ok().map(|a| a.to_string());
    r.local = stream.local_addr().ok().map(|a| a.to_string());
    if let Err(e) = exchange(&mut stream, opts, index, &mut r) {
        r.error = Some(error_kind(&e));
    }
    r
}

fn exchange(
    stream: &mut TcpStream,
    opts: &ClientOpts,
    index: u64,
    r: &mut ConnResult,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(opts.timeout + opts.hold))?;
    stream.set_write_timeout(Some(opts.timeout))?;
    if opts.greeting {
        r.greeting_peer = Some(read_greeting(stream)?);
    }
    let mut writer = stream.try_clone()?;
    let (write_result, read_result, checker) = thread::scope(|s| {
        let w = s.spawn(|| send_pattern(&mut writer, index, opts.bytes, opts.hold));
        let mut checker = PatternChecker::new(index);
        let read_result = read_checking(stream, &mut checker);
        if read_result.is_err() {
            // Unblock the writer.
            let _ = stream.shutdown(Shutdown::Both);
        }
        let write_result = w
            .join()
            .unwrap_or_else(|_| Err((0, io::Error::other("writer thread panicked"))));
        (write_result, read_result, checker)
    });
    r.received = checker.received();
    let sent = match write_result {
        Ok(n) => n,
        Err((n, e)) => {
            r.sent = n;
            read_result?;
            return Err(e);
        }
    };
    r.sent = sent;
    read_result?;
    if !checker.matches(sent) {
        r.error = Some("mismatch".to_owned());
    }
    Ok(())
}

/// Writes `bytes` of the connection's pattern, waits `hold`, shuts down the
/// write side. On error returns what was written so far with the error.
fn send_pattern(
    stream: &mut TcpStream,
    index: u64,
    bytes: u64,
    hold: Duration,
) -> Result<u64, (u64, io::Error)> {
    let mut pattern = Pattern::new(index);
    let mut buf = vec![0; CHUNK];
    let mut sent = 0u64;
    while sent < bytes {
        let n = usize::try_from(bytes - sent).map_or(CHUNK, |left| left.min(CHUNK));
        pattern.fill(&mut buf[..n]);
        stream.write_all(&buf[..n]).map_err(|e| (sent, e))?;
        sent += n as u64;
    }
    if !hold.is_zero() {
        thread::sleep(hold);
    }
    stream.shutdown(Shutdown::Write).map_err(|e| (sent, e))?;
    Ok(sent)
}

fn read_checking(stream: &mut TcpStream, checker: &mut PatternChecker) -> io::Result<()> {
    let mut buf = vec![0; CHUNK];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                checker.feed(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Reads the `peer=<addr>\n` line byte by byte (so no echo byte is consumed).
fn read_greeting(stream: &mut TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 256 {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => {
                let text = String::from_utf8_lossy(&line);
                return text
                    .strip_prefix("peer=")
                    .map(str::to_owned)
                    .ok_or_else(|| io::Error::other(format!("bad greeting {text:?}")));
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("no greeting line"))
}

// ---------------------------------------------------------------- flow

fn flow(
    connect: Option<SocketAddr>,
    listen: Option<SocketAddr>,
    send: bool,
    bytes: Option<u64>,
    timeout: Duration,
) -> Result<FlowReport> {
    let mut stream = match (connect, listen) {
        (Some(addr), _) => match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => s,
            Err(e) => {
                return Ok(FlowReport {
                    bytes: 0,
                    end: error_kind(&e),
                });
            }
        },
        (None, Some(addr)) => {
            let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
            let local = listener
                .local_addr()
                .context("getsockname on the listener")?;
            print_line(&format!("listening {local}"))?;
            listener.accept().context("accept")?.0
        }
        (None, None) => anyhow::bail!("--connect or --listen is required"),
    };
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut moved = 0u64;
    let mut buf = vec![0u8; CHUNK];
    let end = if send {
        let mut pattern = Pattern::new(0);
        loop {
            let n = bytes.map_or(CHUNK, |b| {
                usize::try_from(b - moved).map_or(CHUNK, |left| left.min(CHUNK))
            });
            if n == 0 {
                let _ = stream.shutdown(Shutdown::Write);
                break "sent".to_owned();
            }
            pattern.fill(&mut buf[..n]);
            match stream.write(&buf[..n]) {
                Ok(0) => break "closed".to_owned(),
                Ok(k) => moved += k as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break flow_error_kind(&e),
            }
        }
    } else {
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break "eof".to_owned(),
                Ok(n) => moved += n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break flow_error_kind(&e),
            }
        }
    };
    Ok(FlowReport { bytes: moved, end })
}

/// `broken_pipe` for EPIPE (a write after the peer's reset), else [`error_kind`].
fn flow_error_kind(e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::BrokenPipe {
        "broken_pipe".to_owned()
    } else {
        error_kind(e)
    }
}

// ---------------------------------------------------------------- probe

fn probe(
    addr: SocketAddr,
    timeout: Duration,
    text: &[u8],
    mark: Option<u32>,
    transparent_from: Option<std::net::IpAddr>,
) -> ProbeOutcome {
    let deadline = Instant::now() + timeout;
    match connect_marked(addr, timeout, mark, transparent_from) {
        Ok(mut stream) => probe_exchange(&mut stream, deadline, text)
            .unwrap_or_else(|e| ProbeOutcome::from_io(&e)),
        Err(e) => ProbeOutcome::from_io(&e),
    }
}

/// `connect_timeout`, on a socket carrying `mark` (`SO_MARK`) and bound
/// transparently to `transparent_from`, when given.
fn connect_marked(
    addr: SocketAddr,
    timeout: Duration,
    mark: Option<u32>,
    transparent_from: Option<std::net::IpAddr>,
) -> io::Result<TcpStream> {
    if mark.is_none() && transparent_from.is_none() {
        return TcpStream::connect_timeout(&addr, timeout);
    }
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    if let Some(mark) = mark {
        sock.set_mark(mark)?;
    }
    if let Some(from) = transparent_from {
        if addr.is_ipv6() {
            sock.set_ip_transparent_v6(true)?;
        } else {
            sock.set_ip_transparent_v4(true)?;
        }
        sock.bind(&SocketAddr::new(from, 0).into())?;
    }
    sock.connect_timeout(&addr.into(), timeout)?;
    Ok(sock.into())
}

/// Time left before `deadline`, `None` once it has passed.
fn remaining(deadline: Instant) -> Option<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    (!left.is_zero()).then_some(left)
}

fn probe_exchange(
    stream: &mut TcpStream,
    deadline: Instant,
    text: &[u8],
) -> io::Result<ProbeOutcome> {
    let mismatch = || ProbeOutcome::Error("mismatch".to_owned());
    let Some(left) = remaining(deadline) else {
        return Ok(ProbeOutcome::Timeout);
    };
    stream.set_write_timeout(Some(left))?;
    stream.write_all(text)?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    while reply.len() < text.len() {
        let Some(left) = remaining(deadline) else {
            return Ok(ProbeOutcome::Timeout);
        };
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf)? {
            0 if reply.is_empty() => return Ok(ProbeOutcome::Connected),
            0 => return Ok(mismatch()),
            n => reply.extend_from_slice(&buf[..n]),
        }
    }
    Ok(if reply == text {
        ProbeOutcome::Echoed
    } else {
        mismatch()
    })
}

// ---------------------------------------------------------------- hold

fn hold(addr: SocketAddr, interval: Duration, duration: Duration, timeout: Duration) -> HoldReport {
    let mut report = HoldReport::default();
    match TcpStream::connect_timeout(&addr, timeout) {
        Ok(mut stream) => {
            let start = Instant::now();
            let result = hold_rounds(
                &mut stream,
                start,
                interval,
                start + duration,
                timeout,
                &mut report.rounds_ok,
            );
            match result {
                Ok(()) => {
                    let _ = stream.shutdown(Shutdown::Write);
                }
                Err(kind) => report.error = Some(kind),
            }
        }
        Err(e) => report.error = Some(hold_error_kind(&e)),
    }
    report
}

fn hold_error_kind(e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        "closed".to_owned()
    } else {
        error_kind(e)
    }
}

/// Sends `hold <round>\n` every `interval` until `end`, checking each echo.
/// Fails with the error kind.
fn hold_rounds(
    stream: &mut TcpStream,
    start: Instant,
    interval: Duration,
    end: Instant,
    timeout: Duration,
    rounds_ok: &mut u64,
) -> Result<(), String> {
    let io_kind = |e: io::Error| hold_error_kind(&e);
    stream.set_nodelay(true).map_err(io_kind)?;
    stream.set_read_timeout(Some(timeout)).map_err(io_kind)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_kind)?;
    let mut round: u32 = 0;
    loop {
        let msg = format!("hold {round:08}\n");
        stream.write_all(msg.as_bytes()).map_err(io_kind)?;
        let mut back = vec![0; msg.len()];
        stream.read_exact(&mut back).map_err(io_kind)?;
        if back != msg.as_bytes() {
            return Err("mismatch".to_owned());
        }
        *rounds_ok += 1;
        round += 1;
        let next = start + interval * round;
        if next >= end {
            return Ok(());
        }
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
}

/// `GET path` on `addr` (HTTP/1.1, `Connection: close`): whether the status
/// was 200, and the body.
fn http_get(addr: SocketAddr, path: &str) -> Result<(bool, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let ok = head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200");
    Ok((ok, body.to_owned()))
}

//! Issue 9, item 5: bounds on what a peer can make the agent hold. In the
//! lab, against a real agent: HBONE peers that stall after TLS, after the
//! HTTP/2 preface, or sit without streams are closed by the (flag-shortened)
//! deadlines; connections beyond the per-peer, handshake and global caps are
//! refused and counted while those under them work; the agent raises its
//! soft `RLIMIT_NOFILE` and reports it. Deadlines are checked only against
//! generous upper bounds.

mod common;

use std::{
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{Mesh, agent_bin, in_netns, rogue};
use mesh_agent::{cli::client, identity::WorkloadCert};
use mesh_lab::{LabChild, LabSpec, NodeSpec, PodSpec};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

const ADMIN: &str = "127.0.0.1:15000";
const METRICS: &str = "127.0.0.1:15020";
/// A generous upper bound for anything a deadline of a few seconds closes.
const CLOSE_WITHIN: Duration = Duration::from_secs(30);

/// One node: `c` enrolled with an echo server on 8080, `x` and `y` not
/// enrolled (the peers the test plays, from their netns).
fn lab() -> Mesh {
    let mut mesh = Mesh::new(
        LabSpec::new().node(
            NodeSpec::new()
                .pod(PodSpec::new("c"))
                .pod(PodSpec::new("x"))
                .pod(PodSpec::new("y")),
        ),
    );
    mesh.write_workloads(0, &[("c", true), ("x", false), ("y", false)]);
    mesh.echo("c", &[8080]);
    mesh
}

/// Starts node 0's agent with `extra` flags (and, if given, a lowered soft
/// `RLIMIT_NOFILE`), waits until it is ready.
fn start_agent(mesh: &Mesh, extra: &[&str], soft_nofile: Option<u64>) -> LabChild {
    let n = mesh.lab.node(0).expect("node");
    let mut cmd = Command::new(agent_bin());
    cmd.arg("run")
        .arg("--workloads")
        .arg(mesh.workload_path(0))
        .arg("--pin-dir")
        .arg(n.pin_dir())
        .arg("--cgroup")
        .arg(n.cgroup_dir())
        .arg("--ca-dir")
        .arg(mesh.ca_dir())
        .args(["--reload-interval-ms", "100"])
        .args(["--admin-addr", ADMIN, "--metrics-addr", METRICS])
        .args(extra)
        .env("MESH_LOG", "info");
    if let Some(soft) = soft_nofile {
        let hard = nofile().1;
        // SAFETY: runs between fork and exec; setrlimit is async-signal-safe
        // and the struct lives on the stack.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut agent = mesh.lab.spawn_in_node(0, cmd).expect("spawn agent");
    mesh.sync_agent_log(0, &mut agent, &["--admin-addr", ADMIN]);
    mesh.wait_started_agent_ready(0, &agent, extra);
    agent
}

/// This process's (soft, hard) `RLIMIT_NOFILE`.
fn nofile() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the owned struct.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    (lim.rlim_cur, lim.rlim_max)
}

/// `GET path` on the agent's `addr`, from node 0's netns.
fn get(mesh: &Mesh, addr: &str, path: &str) -> String {
    let netns = mesh.lab.node(0).expect("node").netns_path();
    let addr = addr.parse().expect("addr");
    let (status, body) = in_netns(&netns, || client::get(addr, path)).expect("HTTP GET");
    assert_eq!(status, 200, "{path}: {body}");
    body
}

/// The value of the metric series `series` (name and labels, exactly).
fn metric(mesh: &Mesh, series: &str) -> u64 {
    let text = get(mesh, METRICS, "/metrics");
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

fn limits_dump(mesh: &Mesh) -> serde_json::Value {
    let dump: serde_json::Value =
        serde_json::from_str(&get(mesh, ADMIN, "/config_dump")).expect("config_dump JSON");
    dump["limits"].clone()
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// mTLS to `to` from `netns` with `cert`.
async fn tls_from(netns: &Path, to: SocketAddr, cert: &WorkloadCert) -> Result<Tls, String> {
    let tcp = rogue::try_tcp_from(netns, to).map_err(|e| format!("connect: {e}"))?;
    tokio_rustls::TlsConnector::from(rogue::client_config(cert).0)
        .connect(ServerName::IpAddress(to.ip().into()), tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))
}

/// mTLS to `to` from `netns` with `cert`, then the HTTP/2 preface and an
/// empty SETTINGS frame, written by hand (a peer h2 would not play).
async fn h2_preface(netns: &Path, to: SocketAddr, cert: &WorkloadCert) -> Tls {
    let mut tls = tls_from(netns, to, cert).await.expect("mTLS");
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("preface");
    tls.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
        .await
        .expect("settings");
    tls.flush().await.expect("flush");
    tls
}

/// Reads (and discards) until the peer closes; `true` if it did within `within`.
async fn closed_within(mut io: impl AsyncRead + Unpin, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// An HBONE tunnel connection (TLS + HTTP/2) and its driver's handle.
struct Tunnel {
    sender: h2::client::SendRequest<Bytes>,
    driver: tokio::task::JoinHandle<()>,
}

/// Opens `n` idle TCP connections to `to` from `netns`; whether one of them
/// was refused (reset before or after `connect` returned) within
/// `CLOSE_WITHIN`. The others stay open while the returned set lives.
async fn idle_connections(
    netns: &Path,
    to: SocketAddr,
    n: usize,
) -> (bool, tokio::task::JoinSet<bool>) {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        match rogue::try_tcp_from(netns, to) {
            Ok(tcp) => set.spawn(closed_within(tcp, Duration::from_secs(600))),
            Err(_) => set.spawn(async { true }),
        };
    }
    let first = tokio::time::timeout(CLOSE_WITHIN, set.join_next()).await;
    (matches!(first, Ok(Some(Ok(true)))), set)
}

async fn tunnel(netns: &Path, to: SocketAddr, cert: &WorkloadCert) -> Result<Tunnel, String> {
    let tls = tls_from(netns, to, cert).await?;
    let (sender, conn) = h2::client::handshake(tls)
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Tunnel { sender, driver })
}

/// A CONNECT stream kept open (both halves) while held.
struct Stream {
    _send: h2::SendStream<Bytes>,
    _recv: h2::RecvStream,
}

/// CONNECT `target` on `t`: the status and, on 200, the open stream.
async fn connect(t: &Tunnel, target: SocketAddr) -> Result<(u16, Option<Stream>), String> {
    let mut sender = t.sender.clone().ready().await.map_err(|e| e.to_string())?;
    let req = http::Request::builder()
        .method("CONNECT")
        .uri(target.to_string())
        .body(())
        .expect("request");
    let (response, send) = sender.send_request(req, false).map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .map_err(|_| "no response".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let stream = (status == 200).then(|| Stream {
        _send: send,
        _recv: response.into_body(),
    });
    Ok((status, stream))
}

fn runtime() -> tokio::runtime::Runtime {
    common::rogue::multi_thread_runtime()
}

struct Addrs {
    x_netns: std::path::PathBuf,
    hbone: SocketAddr,
    app: SocketAddr,
}

fn addrs(mesh: &Mesh) -> Addrs {
    let c_ip = mesh.lab.pod("c").expect("c").ipv4();
    Addrs {
        x_netns: mesh.lab.pod("x").expect("x").netns_path(),
        hbone: SocketAddr::new(c_ip.into(), 15008),
        app: SocketAddr::new(c_ip.into(), 8080),
    }
}

#[test]
fn hbone_peers_that_stall_after_tls_or_the_preface_or_sit_idle_are_closed() {
    let mesh = lab();
    let _agent = start_agent(
        &mesh,
        &[
            "--hbone-handshake-timeout",
            "2s",
            "--hbone-first-request-timeout",
            "2s",
            "--hbone-idle-timeout",
            "2s",
        ],
        None,
    );
    let a = addrs(&mesh);
    let cert = rogue::mesh_cert(&mesh, "x");
    let rt = runtime();

    // Control: a well-behaved peer gets its tunnel.
    rt.block_on(async {
        let t = tunnel(&a.x_netns, a.hbone, &cert).await.expect("tunnel");
        assert_eq!(connect(&t, a.app).await.expect("CONNECT").0, 200);
    });

    // mTLS completes, then nothing (no HTTP/2 preface): closed.
    let stalled_after_tls = rt.block_on(async {
        let tls = tls_from(&a.x_netns, a.hbone, &cert).await.expect("mTLS");
        closed_within(tls, CLOSE_WITHIN).await
    });
    assert!(
        stalled_after_tls,
        "a peer that completed mTLS and sent nothing was still connected after {CLOSE_WITHIN:?}"
    );

    // The HTTP/2 preface and SETTINGS, then no request: closed.
    let stalled_after_preface = rt.block_on(async {
        let tls = h2_preface(&a.x_netns, a.hbone, &cert).await;
        closed_within(tls, CLOSE_WITHIN).await
    });
    assert!(
        stalled_after_preface,
        "a peer that sent the HTTP/2 preface and no request was still connected after {CLOSE_WITHIN:?}"
    );

    // A tunnel whose only stream ended sits idle: closed (GOAWAY).
    let idle_closed = rt.block_on(async {
        let t = tunnel(&a.x_netns, a.hbone, &cert).await.expect("tunnel");
        let (status, stream) = connect(&t, a.app).await.expect("CONNECT");
        assert_eq!(status, 200);
        drop(stream);
        tokio::time::timeout(CLOSE_WITHIN, t.driver).await.is_ok()
    });
    assert!(
        idle_closed,
        "a tunnel without streams was still open after {CLOSE_WITHIN:?}"
    );

    assert!(
        metric(
            &mesh,
            "mesh_limit_closed_total{reason=\"handshake_timeout\"}"
        ) >= 1
    );
    assert!(
        metric(
            &mesh,
            "mesh_limit_closed_total{reason=\"first_request_timeout\"}"
        ) >= 1
    );
    assert!(metric(&mesh, "mesh_limit_closed_total{reason=\"idle_timeout\"}") >= 1);
    let limits = limits_dump(&mesh);
    assert_eq!(limits["limits"]["idle_timeout_s"], 2.0, "{limits}");
}

#[test]
fn hbone_connections_streams_and_handshakes_beyond_their_caps_are_refused_and_counted() {
    let mesh = lab();
    let _agent = start_agent(
        &mesh,
        &[
            "--max-connections-per-peer",
            "2",
            "--max-streams-per-peer",
            "3",
            "--max-handshakes",
            "2",
            "--hbone-handshake-timeout",
            "120s",
        ],
        None,
    );
    let a = addrs(&mesh);
    let cert = rogue::mesh_cert(&mesh, "x");
    let rt = runtime();
    rt.block_on(async {
        // Two connections, three streams: all served.
        let t1 = tunnel(&a.x_netns, a.hbone, &cert).await.expect("tunnel 1");
        let (s1, _h1) = connect(&t1, a.app).await.expect("s1");
        let (s2, _h2) = connect(&t1, a.app).await.expect("s2");
        let t2 = tunnel(&a.x_netns, a.hbone, &cert).await.expect("tunnel 2");
        let (s3, _h3) = connect(&t2, a.app).await.expect("s3");
        assert_eq!((s1, s2, s3), (200, 200, 200));
        // A fourth stream of the same identity: 503.
        let s4 = connect(&t2, a.app).await.expect("s4");
        assert_eq!(s4.0, 503, "a stream beyond the per-peer cap was served");
        // A third connection of the same identity: closed, no tunnel.
        let refused = match tunnel(&a.x_netns, a.hbone, &cert).await {
            Ok(t3) => connect(&t3, a.app).await,
            Err(e) => Err(e),
        };
        assert!(
            !matches!(refused, Ok((200, _))),
            "a connection beyond the per-peer cap was served: {:?}",
            refused.map(|r| r.0)
        );
        // The connections under the cap still work.
        let (s5, _) = connect(&t1, a.app).await.expect("s5");
        assert_eq!(s5, 503, "the per-peer stream cap still holds");
    });
    assert_eq!(
        metric(&mesh, "mesh_limit_refused_total{limit=\"peer_streams\"}"),
        2
    );
    assert_eq!(
        metric(
            &mesh,
            "mesh_limit_refused_total{limit=\"peer_connections\"}"
        ),
        1
    );

    // Three idle TCP connections to 15008 with room for two in the handshake
    // phase: one is refused at once (the others wait for a TLS handshake).
    rt.block_on(async {
        let (refused, set) = idle_connections(&a.x_netns, a.hbone, 3).await;
        assert!(
            refused,
            "no idle connection beyond the handshake cap was refused"
        );
        drop(set);
    });
    assert_eq!(
        metric(&mesh, "mesh_limit_refused_total{limit=\"handshakes\"}"),
        1
    );
    // Once those are gone, a tunnel is served again.
    let served = rt.block_on(async {
        let deadline = Instant::now() + CLOSE_WITHIN;
        loop {
            if let Ok(t) = tunnel(&a.x_netns, a.hbone, &cert).await
                && let Ok((200, _)) = connect(&t, a.app).await
            {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    assert!(served, "no tunnel once the idle connections were closed");
    let limits = limits_dump(&mesh);
    assert_eq!(limits["limits"]["max_connections_per_peer"], 2, "{limits}");
    // At least the one above (the retries may have met the cap again while
    // the idle connections were still being closed).
    assert!(
        limits["refused"]["handshakes"].as_u64() >= Some(1),
        "{limits}"
    );
}

/// Echo round trip of `msg` on a plaintext connection; `false` if the
/// connection was refused (reset or closed).
async fn echo(tcp: &mut tokio::net::TcpStream, msg: &[u8]) -> bool {
    if tcp.write_all(msg).await.is_err() {
        return false;
    }
    let mut buf = vec![0u8; msg.len()];
    matches!(
        tokio::time::timeout(CLOSE_WITHIN, tcp.read_exact(&mut buf)).await,
        Ok(Ok(_)) if buf == msg
    )
}

/// A raw HTTP/2 `HEADERS` frame opening stream `id` with a `CONNECT` to
/// `to` (HPACK literals with indexed names: `:method`, `:authority`), the
/// stream left open.
fn connect_frame(id: u32, to: SocketAddr) -> Vec<u8> {
    let authority = to.to_string();
    let mut block = vec![0x02, 7];
    block.extend_from_slice(b"CONNECT");
    block.push(0x01);
    block.push(u8::try_from(authority.len()).expect("short authority"));
    block.extend_from_slice(authority.as_bytes());
    let len = u32::try_from(block.len())
        .expect("small block")
        .to_be_bytes();
    // Length (24 bits), type HEADERS, flags END_HEADERS, stream id.
    let mut frame = vec![len[1], len[2], len[3], 0x1, 0x4];
    frame.extend_from_slice(&id.to_be_bytes());
    frame.extend_from_slice(&block);
    frame
}

/// One HTTP/2 frame as read: type, flags, stream id, payload.
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

async fn read_frame(io: &mut (impl AsyncRead + Unpin)) -> Frame {
    let mut head = [0u8; 9];
    io.read_exact(&mut head).await.expect("a frame");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload)
        .await
        .expect("a frame's payload");
    Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    }
}

/// Reads frames (skipping the others) until one of `stream` (or, for
/// stream 0, one of type `0x7`, a GOAWAY); its type.
async fn next_frame_of(io: &mut (impl AsyncRead + Unpin), stream: u32) -> u8 {
    loop {
        let f = read_frame(io).await;
        if (stream != 0 && f.stream == stream) || (stream == 0 && f.kind == 0x7) {
            return f.kind;
        }
    }
}

/// The connection window the agent granted on `tls` (just past the
/// preface): HTTP/2's initial 65,535 bytes plus its `WINDOW_UPDATE`s on
/// stream 0. h2 queues that update at the handshake and writes it in the
/// same flush as its first PING answer, after it: everything it sent at
/// the handshake has arrived once a second PING is answered.
async fn granted_window(tls: &mut Tls) -> u64 {
    let mut window = 65_535u64;
    for _ in 0..2 {
        // PING (type 6), 8 bytes of opaque data, stream 0.
        tls.write_all(&[0, 0, 8, 0x6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8])
            .await
            .expect("PING");
        tls.flush().await.expect("flush");
        loop {
            let f = read_frame(tls).await;
            match (f.kind, f.stream) {
                (0x8, 0) => {
                    let inc = u32::from_be_bytes(f.payload[..4].try_into().expect("4 bytes"));
                    window += u64::from(inc & 0x7fff_ffff);
                }
                (0x6, 0) if f.flags & 0x1 != 0 => break,
                _ => {}
            }
        }
    }
    window
}

/// What a peer can make the agent buffer is the HTTP/2 windows it grants.
/// They are leased from a budget (`--max-tunnel-window-bytes`) with a share
/// per peer identity: past it a connection is still served, with HTTP/2's
/// own 65,535 bytes, and counted, and grows as the budget frees; the
/// leases return when the connections close.
#[test]
fn tunnel_windows_are_leased_from_a_budget_with_a_share_per_peer() {
    const MIB: u64 = 1 << 20;
    let mesh = lab();
    let _agent = start_agent(
        &mesh,
        &[
            "--max-tunnel-window-bytes",
            &(3 * MIB).to_string(),
            "--max-tunnel-window-bytes-per-peer",
            &(2 * MIB).to_string(),
        ],
        None,
    );
    let a = addrs(&mesh);
    let y_netns = mesh.lab.pod("y").expect("y").netns_path();
    let (x_cert, y_cert) = (rogue::mesh_cert(&mesh, "x"), rogue::mesh_cert(&mesh, "y"));
    let rt = runtime();
    let held = rt.block_on(async {
        // x's share (2 MiB) of its asked 16 MiB, then nothing more for x.
        let mut x1 = h2_preface(&a.x_netns, a.hbone, &x_cert).await;
        assert_eq!(granted_window(&mut x1).await, 2 * MIB);
        let mut x2 = h2_preface(&a.x_netns, a.hbone, &x_cert).await;
        assert_eq!(granted_window(&mut x2).await, 65_535);
        // y: what is left of the budget.
        let mut y1 = h2_preface(&y_netns, a.hbone, &y_cert).await;
        assert_eq!(granted_window(&mut y1).await, MIB);
        // The reduced connection is served.
        x2.write_all(&connect_frame(1, a.app))
            .await
            .expect("CONNECT");
        x2.flush().await.expect("flush");
        assert_eq!(next_frame_of(&mut x2, 1).await, 0x1, "stream 1 answered");
        // x1 closes: its 2 MiB return, and the reduced x2 grows (a
        // WINDOW_UPDATE on the connection), not held at 64 KiB for life. y1,
        // reduced too, may take its 1 MiB more first: x2 then has the 1 MiB
        // left of the budget, else its share's 2 MiB.
        drop(x1);
        let grown = tokio::time::timeout(CLOSE_WITHIN, async {
            loop {
                let f = read_frame(&mut x2).await;
                if (f.kind, f.stream) == (0x8, 0) {
                    let inc = u32::from_be_bytes(f.payload[..4].try_into().expect("4 bytes"));
                    return 65_535 + u64::from(inc & 0x7fff_ffff);
                }
            }
        })
        .await
        .expect("the reduced connection's window grew once x1 closed");
        assert!(grown == MIB || grown == 2 * MIB, "x2 grew to {grown}");
        (x2, y1)
    });
    let in_use = |limit: &str| metric(&mesh, &format!("mesh_limit_in_use{{limit=\"{limit}\"}}"));
    assert_eq!(in_use("tunnel_window_bytes"), 3 * MIB);
    assert_eq!(in_use("tunnel_window_bytes_per_peer"), 2 * MIB);
    // All three asked for 16 MiB.
    assert_eq!(
        metric(&mesh, "mesh_limit_reduced_total{limit=\"tunnel_window\"}"),
        3
    );
    assert_eq!(
        metric(&mesh, "mesh_limit_max{limit=\"tunnel_window_bytes\"}"),
        3 * MIB
    );
    drop(held);
    let deadline = Instant::now() + CLOSE_WITHIN;
    while in_use("tunnel_window_bytes") != 0 {
        assert!(
            Instant::now() < deadline,
            "the closed connections' windows never returned"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let limits = limits_dump(&mesh);
    assert_eq!(
        limits["limits"]["max_tunnel_window_bytes"],
        3 * MIB,
        "{limits}"
    );
    assert_eq!(limits["reduced"]["tunnel_window"], 3, "{limits}");
}

/// A peer that resets its stream while the agent connects to the app gets
/// the stream's slots back at once, not after the connect timeout (10 s).
/// The app's accept queue is full (backlog 0, one connection waiting), so
/// the agent's SYN goes unanswered.
#[test]
fn a_stream_reset_during_the_apps_connect_frees_its_slot_at_once() {
    let mesh = lab();
    let c_netns = mesh.lab.pod("c").expect("c").netns_path();
    let full: SocketAddr = SocketAddr::new(addrs(&mesh).app.ip(), 9090);
    let listener = in_netns(&c_netns, || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::new("0.0.0.0".parse().expect("ip"), 9090).into())?;
        s.listen(0)?;
        std::io::Result::Ok(s)
    })
    .expect("a listener with backlog 0");
    // Fills the accept queue before the agent runs: established on
    // loopback, never accepted, so the agent's SYN is never answered.
    let _queued = in_netns(&c_netns, || {
        std::net::TcpStream::connect_timeout(
            &SocketAddr::new("127.0.0.1".parse().expect("ip"), 9090),
            Duration::from_secs(5),
        )
    })
    .expect("the queued connection");
    let _agent = start_agent(&mesh, &[], None);
    let a = addrs(&mesh);
    let cert = rogue::mesh_cert(&mesh, "x");
    let peer_streams = || limits_dump(&mesh)["in_use"]["peer_streams"].as_u64();
    runtime().block_on(async {
        let mut tls = h2_preface(&a.x_netns, a.hbone, &cert).await;
        tls.write_all(&connect_frame(1, full))
            .await
            .expect("CONNECT");
        tls.flush().await.expect("flush");
        let deadline = Instant::now() + Duration::from_secs(5);
        while peer_streams() != Some(1) {
            assert!(Instant::now() < deadline, "the stream never held a slot");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // RST_STREAM (type 3) on stream 1, CANCEL (8).
        tls.write_all(&[0, 0, 4, 0x3, 0, 0, 0, 0, 1, 0, 0, 0, 8])
            .await
            .expect("RST_STREAM");
        tls.flush().await.expect("flush");
        let reset_at = Instant::now();
        // Half the connect timeout: without watching the reset, the slot
        // is held for all of it.
        while peer_streams() != Some(0) {
            assert!(
                reset_at.elapsed() < Duration::from_secs(5),
                "the reset stream's slot is still held"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    drop(listener);
}

/// When the agent stops (or the pod's connection is cancelled) it sends
/// GOAWAY, and h2 lowers the GOAWAY's last stream id from the highest only
/// once the peer answers its PING. A peer that never answers could go on
/// opening streams on the stopping agent; past the GOAWAY's grace they are
/// refused (`REFUSED_STREAM`), while its open stream goes on.
#[test]
fn new_streams_past_a_goaways_grace_are_refused_though_the_peer_ignores_its_ping() {
    let mesh = lab();
    let agent = start_agent(&mesh, &["--drain-timeout", "60s"], None);
    let a = addrs(&mesh);
    let cert = rogue::mesh_cert(&mesh, "x");
    runtime().block_on(async {
        let mut tls = h2_preface(&a.x_netns, a.hbone, &cert).await;
        tls.write_all(&connect_frame(1, a.app))
            .await
            .expect("CONNECT");
        tls.flush().await.expect("flush");
        assert_eq!(next_frame_of(&mut tls, 1).await, 0x1, "stream 1 answered");
        agent.signal(libc::SIGTERM).expect("SIGTERM");
        let within = tokio::time::timeout(CLOSE_WITHIN, next_frame_of(&mut tls, 0)).await;
        assert_eq!(within, Ok(0x7), "no GOAWAY after SIGTERM");
        tokio::time::sleep(mesh_agent::proxy::limits::GOAWAY_GRACE + Duration::from_secs(1)).await;
        tls.write_all(&connect_frame(3, a.app))
            .await
            .expect("CONNECT");
        tls.flush().await.expect("flush");
        // RST_STREAM (0x3), not HEADERS (0x1).
        assert_eq!(
            next_frame_of(&mut tls, 3).await,
            0x3,
            "a stream opened past the GOAWAY's grace was served"
        );
    });
}

/// A client that opens connections to 15008 and never completes them needs
/// no certificate. It may hold only its share of the handshake slots
/// (`--max-handshakes-per-source`), so a client from another address still
/// gets a tunnel.
#[test]
fn one_source_cannot_take_every_handshake_slot() {
    let mesh = lab();
    let _agent = start_agent(
        &mesh,
        &[
            "--max-handshakes",
            "4",
            "--max-handshakes-per-source",
            "2",
            "--hbone-handshake-timeout",
            "120s",
        ],
        None,
    );
    let a = addrs(&mesh);
    let y_netns = mesh.lab.pod("y").expect("y").netns_path();
    let cert = rogue::mesh_cert(&mesh, "y");
    let rt = runtime();
    rt.block_on(async {
        // x: three idle connections; the third is refused at once (the
        // node's cap of 4 would have taken it).
        let (refused, set) = idle_connections(&a.x_netns, a.hbone, 3).await;
        assert!(refused, "x's connection beyond its share was not refused");
        // While x holds its two, y is served.
        let t = tunnel(&y_netns, a.hbone, &cert).await.expect("y's tunnel");
        let (status, _) = connect(&t, a.app).await.expect("y's stream");
        assert_eq!(status, 200, "y was not served while x held its share");
        drop(set);
    });
    assert_eq!(
        metric(
            &mesh,
            "mesh_limit_refused_total{limit=\"handshakes_per_source\"}"
        ),
        1
    );
    assert_eq!(
        metric(&mesh, "mesh_limit_refused_total{limit=\"handshakes\"}"),
        0
    );
    let limits = limits_dump(&mesh);
    assert_eq!(limits["limits"]["max_handshakes_per_source"], 2, "{limits}");
}

#[test]
fn connections_beyond_the_global_cap_are_refused_counted_and_the_slot_comes_back() {
    let mesh = lab();
    let _agent = start_agent(&mesh, &["--max-connections", "2"], None);
    let a = addrs(&mesh);
    let rt = runtime();
    rt.block_on(async {
        let mut c1 = rogue::try_tcp_from(&a.x_netns, a.app).expect("connect");
        let mut c2 = rogue::try_tcp_from(&a.x_netns, a.app).expect("connect");
        assert!(echo(&mut c1, b"one").await, "first connection");
        assert!(echo(&mut c2, b"two").await, "second connection");
        // Reset by the agent (possibly before connect() returned).
        if let Ok(mut c3) = rogue::try_tcp_from(&a.x_netns, a.app) {
            assert!(
                !echo(&mut c3, b"three").await,
                "a connection beyond the global cap was served"
            );
        }
        drop(c1);
        // The freed slot serves a new connection.
        let deadline = Instant::now() + CLOSE_WITHIN;
        loop {
            if let Ok(mut c4) = rogue::try_tcp_from(&a.x_netns, a.app)
                && echo(&mut c4, b"four").await
            {
                break;
            }
            assert!(Instant::now() < deadline, "the freed slot never served");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(echo(&mut c2, b"still").await, "a served connection was cut");
    });
    assert!(metric(&mesh, "mesh_limit_refused_total{limit=\"connections\"}") >= 1);
    assert_eq!(metric(&mesh, "mesh_limit_max{limit=\"connections\"}"), 2);
}

#[test]
fn the_agent_raises_its_file_descriptor_limit_and_reports_it() {
    let (_, hard) = nofile();
    assert!(hard > 512, "the test needs a hard RLIMIT_NOFILE above 512");
    let mesh = lab();
    let _agent = start_agent(&mesh, &[], Some(512));
    let limits = limits_dump(&mesh);
    assert_eq!(limits["fd_limit"]["soft"], hard, "{limits}");
    assert_eq!(limits["fd_limit"]["raised_from"], 512, "{limits}");
    assert_eq!(metric(&mesh, "mesh_fd_limit"), hard);
    // The default caps leave room under the limit.
    let max = limits["limits"]["max_connections"]
        .as_u64()
        .expect("max_connections");
    assert!(max > 0 && 2 * max < hard, "{limits}");
    // The plaintext relays' pipes take an eighth of what the caps leave.
    let reserve = (hard / 4).min(4096);
    assert_eq!(limits["max_pipes"], reserve / 16, "{limits}");
    assert!(2 * max + 2 * (reserve / 16) <= hard, "{limits}");
}

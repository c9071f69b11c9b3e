//! `mesh-lab-http`: HTTP/1.1 in lab pods — a backend that names itself (and
//! fails on purpose), a keep-alive load generator, and a holder of many
//! open connections (the waypoint's demo and bench rows).
#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    process::ExitCode,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::TokioIo;
use mesh_lab::app::{HttpLoadReport, error_kind};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Parser)]
#[command(name = "mesh-lab-http", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// An HTTP/1.1 server answering `200 <name>` with `x-backend: <name>`;
    /// prints `listening <addr>`.
    Serve {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// The name it answers with.
        #[arg(long)]
        name: String,
        /// Answer 503 to every Nth request (0: never).
        #[arg(long, default_value_t = 0)]
        fail_every: u64,
    },
    /// Sends REQUESTS GETs over CONCURRENCY keep-alive connections; prints
    /// one JSON report (exit 0 even if some failed: the report counts them).
    Load {
        /// Server address.
        #[arg(long)]
        connect: SocketAddr,
        /// The request path.
        #[arg(long, default_value = "/")]
        path: String,
        /// Requests in all.
        #[arg(long)]
        requests: u64,
        /// Connections, each with one request in flight.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
        concurrency: u64,
        /// The deadline of one request, in milliseconds.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Opens CONNS connections, sends one GET on each and keeps them open
    /// (keep-alive) for HOLD_MS; prints `holding <n>` when all answered.
    Hold {
        /// Server address.
        #[arg(long)]
        connect: SocketAddr,
        /// Connections.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        conns: u64,
        /// How long to keep them, in milliseconds.
        #[arg(long)]
        hold_ms: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mesh-lab-http: cannot start a runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Cmd::Serve {
                listen,
                name,
                fail_every,
            } => serve(listen, name, fail_every).await,
            Cmd::Load {
                connect,
                path,
                requests,
                concurrency,
                timeout_ms,
            } => {
                let report = load(
                    connect,
                    &path,
                    requests,
                    concurrency,
                    Duration::from_millis(timeout_ms),
                )
                .await;
                println!("{}", serde_json::to_string(&report)?);
                Ok(())
            }
            Cmd::Hold {
                connect,
                conns,
                hold_ms,
            } => hold(connect, conns, Duration::from_millis(hold_ms)).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-lab-http: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn serve(listen: SocketAddr, name: String, fail_every: u64) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    println!("listening {}", listener.local_addr()?);
    let name: Arc<str> = name.into();
    let count = Arc::new(AtomicU64::new(0));
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (name, count) = (Arc::clone(&name), Arc::clone(&count));
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
                let n = count.fetch_add(1, Ordering::Relaxed) + 1;
                let fail = fail_every > 0 && n % fail_every == 0;
                let mut r = Response::new(Full::new(Bytes::from(format!("{name}\n"))));
                *r.status_mut() = if fail {
                    hyper::StatusCode::SERVICE_UNAVAILABLE
                } else {
                    hyper::StatusCode::OK
                };
                if let Ok(v) = name.parse() {
                    r.headers_mut().insert("x-backend", v);
                }
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(addr: SocketAddr) -> std::io::Result<Sender> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One answer: its status and `x-backend`, the body read to the end.
async fn get(sender: &mut Sender, host: &str, path: &str) -> Result<(u16, String), String> {
    sender.ready().await.map_err(|e| e.to_string())?;
    let req = Request::get(path)
        .header(hyper::header::HOST, host)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let backend = resp
        .headers()
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, backend))
}

#[derive(Default)]
struct Tally {
    statuses: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    backends: BTreeMap<String, u64>,
    latencies_us: Vec<u64>,
}

async fn load(
    addr: SocketAddr,
    path: &str,
    requests: u64,
    concurrency: u64,
    timeout: Duration,
) -> HttpLoadReport {
    let next = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let host = addr.to_string();
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(requests.max(1)) {
        let (next, tally, host, path) = (
            Arc::clone(&next),
            Arc::clone(&tally),
            host.clone(),
            path.to_owned(),
        );
        workers.spawn(async move {
            let mut sender: Option<Sender> = None;
            while next.fetch_add(1, Ordering::Relaxed) < requests {
                let t0 = Instant::now();
                let outcome = tokio::time::timeout(timeout, async {
                    let s = match &mut sender {
                        Some(s) => s,
                        None => sender.insert(connect(addr).await.map_err(|e| error_kind(&e))?),
                    };
                    get(s, &host, &path).await
                })
                .await
                .unwrap_or_else(|_| Err("timeout".to_owned()));
                let us = t0.elapsed().as_micros() as u64;
                let mut t = tally.lock().unwrap_or_else(PoisonError::into_inner);
                match outcome {
                    Ok((status, backend)) => {
                        *t.statuses.entry(status.to_string()).or_default() += 1;
                        *t.backends.entry(backend).or_default() += 1;
                        t.latencies_us.push(us);
                    }
                    Err(kind) => {
                        *t.errors.entry(kind).or_default() += 1;
                        // A fresh connection for the next request.
                        sender = None;
                    }
                }
            }
        });
    }
    while workers.join_next().await.is_some() {}
    let elapsed = start.elapsed();
    let mut t = std::mem::take(&mut *tally.lock().unwrap_or_else(PoisonError::into_inner));
    t.latencies_us.sort_unstable();
    let pct = |p: f64| -> u64 {
        if t.latencies_us.is_empty() {
            return 0;
        }
        let i = ((t.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        t.latencies_us[i.min(t.latencies_us.len() - 1)]
    };
    HttpLoadReport {
        requests,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        per_s: t.latencies_us.len() as f64 / elapsed.as_secs_f64().max(1e-6),
        elapsed_ms: elapsed.as_millis() as u64,
        statuses: t.statuses,
        errors: t.errors,
        backends: t.backends,
    }
}

async fn hold(addr: SocketAddr, conns: u64, hold: Duration) -> Result<()> {
    let host = addr.to_string();
    let mut held = Vec::new();
    let mut failed = 0u64;
    // One after the other: every connection is open and answered when counted.
    for _ in 0..conns {
        let opened = tokio::time::timeout(Duration::from_secs(5), async {
            let mut s = connect(addr).await.map_err(|e| error_kind(&e))?;
            get(&mut s, &host, "/").await?;
            Ok::<_, String>(s)
        })
        .await;
        match opened {
            Ok(Ok(s)) => held.push(s),
            _ => failed += 1,
        }
    }
    println!("holding {} failed {failed}", held.len());
    tokio::time::sleep(hold).await;
    drop(held);
    Ok(())
}

//! `mesh-agent run`: wires the parts together. Start-up order: validate the
//! workload file, load the datapath, publish the state, enroll pods, then
//! watch the file. The pods' connections run on the proxy threads (one
//! current-thread runtime each, `proxy::threads`); everything else (admin,
//! sources, certificates) on the main runtime; the control loop
//! (enrollment) on its own thread with a small runtime.
#![forbid(unsafe_code)]

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::{
    datapath::{Datapath, DatapathConfig, PodMaps, counters::Counters},
    identity::{CertManager, MeshTls, TrustDomain},
    pods::Enroller,
    proxy::{
        Proxy,
        limits::{self, Bounds, Limits},
    },
    state::Store,
    sync,
    telemetry::ProxyCounters,
};

/// How the agent runs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The workload file (unused with `kube`).
    pub workloads: PathBuf,
    /// Sync from the Kubernetes API server instead of the workload file.
    pub kube: Option<sync::kube::KubeArgs>,
    /// bpffs pin directory.
    pub pin_dir: PathBuf,
    /// cgroup2 directory the cgroup programs attach to.
    pub cgroup: PathBuf,
    /// An eBPF object to load instead of the embedded one.
    pub ebpf_object: Option<PathBuf>,
    /// aya-log level of the kernel programs (0 = off).
    pub kernel_log_level: u8,
    /// How often the workload file is re-read.
    pub reload_interval: Duration,
    /// Who issues the workload certificates.
    pub issuer: IssuerConfig,
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// Lifetime of the workload certificates the agent issues.
    pub cert_ttl: Duration,
    /// Istio's root namespace: policies there apply mesh-wide.
    pub root_namespace: String,
    /// The `exportTo` of VirtualServices that set none (Istio's
    /// `defaultVirtualServiceExportTo`).
    pub default_virtual_service_export_to: Vec<String>,
    /// How long a stopping agent keeps serving its open connections.
    pub drain_timeout: Duration,
    /// Where the admin, metrics and readiness endpoints listen.
    pub admin: crate::admin::AdminConfig,
    /// Connection caps and deadlines set explicitly (the rest follow the
    /// file-descriptor limit).
    pub limits: crate::proxy::limits::LimitOverrides,
    /// Deliver connections between two of this node's pods directly
    /// (`Proxy::set_same_node_fast_path`).
    pub same_node_fast_path: bool,
    /// Send a client's first bytes before a tunnel stream is answered
    /// (`Proxy::set_tunnel_early_data`).
    pub tunnel_early_data: bool,
    /// Plaintext relays splice bulk transfers (`Proxy::set_relay_splice`).
    pub relay_splice: bool,
    /// How many proxy threads serve the pods' connections (`None`: one per
    /// CPU, up to [`DEFAULT_MAX_PROXY_THREADS`]).
    pub proxy_threads: Option<usize>,
}

/// The most proxy threads the agent starts unless told otherwise.
pub const DEFAULT_MAX_PROXY_THREADS: usize = 4;

pub use crate::identity::IssuerConfig;

/// How long the control loop waits before retrying pods that failed to enroll.
const RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// Runs the agent until SIGINT or SIGTERM.
pub fn run(cfg: RunConfig) -> anyhow::Result<()> {
    let bounds = resource_bounds(&cfg.limits);
    let file = match &cfg.kube {
        // Flags checked before anything is loaded.
        Some(k) => k.config().map(|_| None)?,
        None => Some(sync::file::load(&cfg.workloads)?),
    };
    let node_name = match (&file, &cfg.kube) {
        (Some(f), _) => f.node.name.clone(),
        (None, k) => k
            .as_ref()
            .and_then(|k| k.node_name.clone())
            .unwrap_or_default(),
    };
    crate::datapath::check_privileges()?;
    // The main runtime serves no pod connection (the proxy threads do):
    // one worker is enough for the admin servers, sources and certificates.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("mesh-main")
        .enable_all()
        .build()
        .context("cannot start the main runtime")?;
    let threads = Arc::new(crate::proxy::threads::ProxyThreads::start(
        cfg.proxy_threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .min(DEFAULT_MAX_PROXY_THREADS)
        }),
    )?);
    // In the runtime: a remote issuer's client lives on it.
    let tls = {
        let _enter = runtime.enter();
        load_identity(&cfg)?
    };
    // Served from the start: readiness answers 503 until the programs are
    // attached and the first enrollment pass is done.
    let admin = crate::admin::Admin::new(&cfg.pin_dir);
    let datapath_ready = admin.readiness().block("datapath");
    let enrollment_hooks = admin.enrollment_hooks();
    let listeners = admin.start(&cfg.admin, runtime.handle())?;
    admin.certificates().set_source(tls.manager().clone());

    let (mut dp, summary) = Datapath::load(&DatapathConfig {
        pin_dir: cfg.pin_dir.clone(),
        cgroup: cfg.cgroup.clone(),
        object: cfg.ebpf_object.clone(),
        kernel_log_level: cfg.kernel_log_level,
    })?;
    let programs: Vec<String> = summary
        .programs
        .iter()
        .map(|(name, readopted)| {
            if *readopted {
                format!("{name}(re-adopted)")
            } else {
                (*name).to_owned()
            }
        })
        .collect();
    let features = crate::datapath::probe_program_types();
    admin.register_datapath(&summary, &features, &cfg.pin_dir, &cfg.cgroup);
    let source = match &cfg.kube {
        Some(_) => "kubernetes".to_owned(),
        None => format!("file:{}", cfg.workloads.display()),
    };
    admin.set_info("sources", serde_json::json!([source]));
    datapath_ready.release();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        kernel = %summary.kernel,
        node = %node_name,
        cgroup = %cfg.cgroup.display(),
        pin_dir = %cfg.pin_dir.display(),
        programs = %programs.join(","),
        source = %source,
        features = %features.iter().map(|(f, ok)| format!("{f}:{}", if *ok { "yes" } else { "no" })).collect::<Vec<_>>().join(","),
        listeners = %listeners,
        "datapath loaded"
    );
    if let Some(logger) = dp.take_logger() {
        runtime.spawn(crate::datapath::drive_kernel_log(logger));
    }

    let store = Store::with_root_namespace(&cfg.root_namespace)
        .with_default_virtual_service_export_to(cfg.default_virtual_service_export_to.clone());
    if let Some(file) = file {
        sync::file::publish(&store, file);
    }
    admin.register_store(&store);
    {
        // Rotates certificates at half-life (new handshakes get the new one).
        let _enter = runtime.enter();
        tls.manager().spawn_sweeper(Duration::from_secs(1));
    }
    let proxy = Proxy::new(
        dp.orig_dst.clone(),
        dp.exempt.clone(),
        store.clone(),
        tls,
        admin.telemetry().clone(),
        bounds.clone(),
        runtime.handle().clone(),
        threads.clone(),
    );
    proxy.set_same_node_fast_path(cfg.same_node_fast_path);
    proxy.set_tunnel_early_data(cfg.tunnel_early_data);
    proxy.set_relay_splice(cfg.relay_splice);
    admin.register_routes(&store, proxy.balancer());
    runtime.spawn(limits::trim_after_bursts(bounds.clone()));
    {
        let b = bounds.clone();
        admin.config_dump().register("limits", move || b.to_json());
        admin.metrics().set_limits_source(move || {
            let u = bounds.usage();
            crate::telemetry::LimitsReading {
                in_use: u.in_use,
                refused: u.refused,
                closed: u.closed,
                reduced: u.reduced,
                peers: u.peers,
                fd_limit: u.fd_limit,
            }
        });
    }
    {
        let p = proxy.clone();
        admin.metrics().set_pool_source(move || {
            let (connections, streams) = p.pool_occupancy();
            (connections as u64, streams as u64)
        });
    }
    admin.set_info("proxy_threads", serde_json::json!(threads.len()));
    {
        let t = threads.clone();
        admin.config_dump().register("proxy_threads", move || {
            let (tasks, tunnels): (Vec<usize>, Vec<usize>) = t.loads().into_iter().unzip();
            serde_json::json!({ "connection_tasks": tasks, "inbound_tunnels": tunnels })
        });
    }
    let in_flight = proxy.in_flight();
    let mut enroller = Enroller::new(PodMaps::new(dp)?, proxy);
    if let Some(kube) = &cfg.kube {
        // The host's /proc is mounted elsewhere: refuse its init's netns too.
        enroller.refuse_host_netns(&kube.proc_root);
    }

    let cancel = CancellationToken::new();
    if let Some(kube) = &cfg.kube {
        // Returns once the first complete state is published: the control
        // loop never starts from an empty snapshot (it would un-enroll the
        // pods a previous agent enrolled).
        runtime.block_on(kube.start(store.clone(), cancel.clone()))?;
    } else {
        runtime.spawn(sync::file::watch(
            cfg.workloads.clone(),
            store.clone(),
            cfg.reload_interval,
            cancel.clone(),
        ));
    }
    let control = {
        let (store, cancel) = (store.clone(), cancel.clone());
        std::thread::Builder::new()
            .name("mesh-control".into())
            .spawn(move || control_loop(enroller, store, cancel, enrollment_hooks))
            .context("cannot start the control thread")?
    };

    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot handle SIGTERM")?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "shutting down"),
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
        }
        anyhow::Ok(())
    })?;
    admin.readiness().shutting_down();
    cancel.cancel();
    if control.join().is_err() {
        tracing::error!("control loop panicked");
    }
    // The listeners are closed: new connections go to a successor agent if
    // there is one (and fail closed if not). Open ones finish, up to the
    // drain deadline, so an upgrade does not cut them.
    // Connection tasks count too: a connection accepted just before the
    // stop, not yet connected onwards (so not yet open in telemetry), and
    // tunnel connections still serving streams sent before our GOAWAY.
    let telemetry = admin.telemetry().clone();
    let open = telemetry.connections.len();
    let tasks = in_flight.count();
    if open > 0 || tasks > 0 {
        tracing::info!(
            open,
            tasks,
            deadline_s = cfg.drain_timeout.as_secs(),
            "draining open connections"
        );
        let (open, tasks) = runtime.block_on(async {
            let deadline = tokio::time::Instant::now() + cfg.drain_timeout;
            while (!telemetry.connections.is_empty() || in_flight.count() > 0)
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (telemetry.connections.len(), in_flight.count())
        });
        if open > 0 || tasks > 0 {
            tracing::warn!(
                open,
                tasks,
                "drain deadline reached; cutting the remaining connections"
            );
        }
    }
    log_counters(&cfg.pin_dir, &telemetry.counters);
    // The kernel state stays pinned so captured traffic fails closed until
    // the next agent.
    threads.stop(Duration::from_secs(1));
    // A proxy thread that did not stop in time still holds the access-log
    // lines it gathered (a stopped one wrote them out as it ended).
    crate::telemetry::log_batch::flush_all();
    runtime.shutdown_timeout(Duration::from_secs(1));
    tracing::info!("agent stopped; datapath left pinned (fails closed until the next agent)");
    Ok(())
}

/// Raises the soft file-descriptor limit to the hard one (a proxy holds two
/// descriptors per connection) and sizes the connection caps from it.
fn resource_bounds(overrides: &crate::proxy::limits::LimitOverrides) -> Arc<Bounds> {
    let (l, fd_limit) = Limits::for_this_process(overrides);
    tracing::info!(
        fd_limit = fd_limit.soft,
        fd_limit_hard = fd_limit.hard,
        raised_from = fd_limit
            .raised_from
            .map_or_else(|| "-".to_owned(), |n| n.to_string()),
        max_connections = l.max_connections,
        max_handshakes = l.max_handshakes,
        max_handshakes_per_source = l.max_handshakes_per_source,
        max_connections_per_peer = l.max_connections_per_peer,
        max_streams_per_peer = l.max_streams_per_peer,
        max_streams_per_connection = l.max_streams_per_connection,
        handshake_timeout_s = l.handshake_timeout.as_secs_f64(),
        first_request_timeout_s = l.first_request_timeout.as_secs_f64(),
        idle_timeout_s = l.idle_timeout.as_secs_f64(),
        max_tunnel_window_bytes = l.max_tunnel_window,
        max_tunnel_window_bytes_per_peer = l.max_tunnel_window_per_peer,
        "resource limits"
    );
    Arc::new(Bounds::new(l, fd_limit))
}

/// Builds the issuer, the certificate manager and the TLS configurations.
fn load_identity(cfg: &RunConfig) -> anyhow::Result<Arc<MeshTls>> {
    let trust_domain = TrustDomain::new(&cfg.trust_domain)?;
    let provider = cfg.issuer.provider(
        &trust_domain,
        cfg.cert_ttl,
        crate::identity::Requester::NodeAgent,
        cfg.kube.is_some(),
    )?;
    let issuer = provider.describe();
    let manager = Arc::new(CertManager::new(provider));
    let tls = MeshTls::new(manager)?;
    tracing::info!(
        issuer = %issuer.kind,
        endpoint = %issuer.endpoint,
        trust_domain = %trust_domain.as_str(),
        cert_ttl_s = cfg.cert_ttl.as_secs(),
        "mesh identity loaded"
    );
    Ok(Arc::new(tls))
}

fn control_loop(
    mut enroller: Enroller,
    store: Store,
    cancel: CancellationToken,
    mut hooks: crate::admin::EnrollmentHooks,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the control runtime");
            return;
        }
    };
    let mut rx = store.subscribe();
    let mut ready = false;
    loop {
        let snap = rx.borrow_and_update().clone();
        let report = enroller.reconcile(&snap);
        tracing::info!(
            generation = snap.generation,
            enrolled = report.enrolled,
            added = report.added.len(),
            removed = report.removed.len(),
            failed = report.failed.len(),
            "workloads applied"
        );
        if !ready {
            ready = true;
            tracing::info!(pods = report.enrolled, "agent ready");
        }
        // After the "agent ready" line: the first pass lets readiness go.
        hooks.applied(snap.generation, &report);
        let retry = !report.failed.is_empty();
        let stop = rt.block_on(async {
            tokio::select! {
                _ = cancel.cancelled() => true,
                changed = rx.changed() => changed.is_err(),
                _ = tokio::time::sleep(RETRY_INTERVAL), if retry => false,
            }
        });
        if stop {
            break;
        }
    }
    enroller.shutdown();
}

fn log_counters(pin_dir: &std::path::Path, counters: &ProxyCounters) {
    let kernel = Counters::open_pinned(pin_dir).and_then(|c| c.read());
    match kernel {
        Ok(reading) => {
            let line: Vec<String> = reading.iter().map(|(k, v)| format!("{k}={v}")).collect();
            tracing::info!(counters = %line.join(" "), "kernel counters");
        }
        Err(e) => tracing::warn!(error = %e, "cannot read kernel counters"),
    }
    let line: Vec<String> = counters
        .snapshot()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    tracing::info!(counters = %line.join(" "), "proxy counters");
}

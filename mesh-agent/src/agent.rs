//! `mesh-agent run`: wires the parts together. Start-up order: validate the
//! workload file, load the datapath, publish the state, enroll pods, then
//! watch the file. The data plane runs on a multi-thread runtime; the control
//! loop (enrollment) on its own thread with a small runtime.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::{
    datapath::{Datapath, DatapathConfig, counters::Counters, enroll::Enroller},
    proxy::{Proxy, ProxyStats},
    state::Store,
    sync,
};

/// How the agent runs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The workload file.
    pub workloads: PathBuf,
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
}

/// How long the control loop waits before retrying pods that failed to enroll.
const RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// Runs the agent until SIGINT or SIGTERM.
pub fn run(cfg: RunConfig) -> anyhow::Result<()> {
    let file = sync::file::load(&cfg.workloads)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .min(4),
        )
        .thread_name("mesh-data")
        .enable_all()
        .build()
        .context("cannot start the data-plane runtime")?;

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
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        kernel = %summary.kernel,
        node = %file.node.name,
        cgroup = %cfg.cgroup.display(),
        pin_dir = %cfg.pin_dir.display(),
        programs = %programs.join(","),
        source = %cfg.workloads.display(),
        "datapath loaded"
    );
    if let Some(logger) = dp.take_logger() {
        runtime.spawn(crate::datapath::drive_kernel_log(logger));
    }

    let store = Store::new();
    sync::file::publish(&store, file);
    let proxy = Proxy::new(dp.orig_dst.clone(), runtime.handle().clone());
    let stats = proxy.stats();
    let enroller = Enroller::new(dp, proxy)?;

    let cancel = CancellationToken::new();
    runtime.spawn(sync::file::watch(
        cfg.workloads.clone(),
        store.clone(),
        cfg.reload_interval,
        cancel.clone(),
    ));
    let control = {
        let (store, cancel) = (store.clone(), cancel.clone());
        std::thread::Builder::new()
            .name("mesh-control".into())
            .spawn(move || control_loop(enroller, store, cancel))
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
    cancel.cancel();
    if control.join().is_err() {
        tracing::error!("control loop panicked");
    }
    log_counters(&cfg.pin_dir, &stats);
    // Open connections are cut when the process exits; the kernel state
    // stays pinned so captured traffic fails closed until the next agent.
    runtime.shutdown_timeout(Duration::from_secs(1));
    tracing::info!("agent stopped; datapath left pinned (fails closed until the next agent)");
    Ok(())
}

fn control_loop(mut enroller: Enroller, store: Store, cancel: CancellationToken) {
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

fn log_counters(pin_dir: &std::path::Path, stats: &Arc<ProxyStats>) {
    let kernel = Counters::open_pinned(pin_dir).and_then(|c| c.read());
    match kernel {
        Ok(reading) => {
            let line: Vec<String> = reading.iter().map(|(k, v)| format!("{k}={v}")).collect();
            tracing::info!(counters = %line.join(" "), "kernel counters");
        }
        Err(e) => tracing::warn!(error = %e, "cannot read kernel counters"),
    }
    let line: Vec<String> = stats
        .snapshot()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    tracing::info!(counters = %line.join(" "), "proxy counters");
}

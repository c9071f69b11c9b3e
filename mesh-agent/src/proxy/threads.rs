//! The proxy's threads: each runs a current-thread tokio runtime that
//! serves its own listener of every in-pod port and dials its own tunnel
//! pool, so a connection's accept, relay, TLS and HTTP/2 framing, and its
//! tunnel's driver, all stay on the thread that accepted it.
//!
//! Why not one multi-thread runtime: its work stealing moved a tunnel's
//! driver and the relays feeding it between threads, waking idle workers to
//! steal (`cargo xtask bench`, one cross-node stream: 11 700–12 100 context
//! switches per GB against 7 700–7 900 here, 1.32 CPU s/GB against 1.20, and
//! 8.3 Gb/s against 9.6).
//!
//! How connections reach a thread: every thread's listener of a port is in
//! one `SO_REUSEPORT` group, and the kernel picks one per connection by a
//! hash of its 4-tuple (for `sk_lookup`-steered connections, the reuseport
//! selection runs after the lookup picked the group's socket in the
//! sockmap). So connections spread over the threads, and one connection's
//! work never moves.
//!
//! Inbound tunnel connections are the exception: a hash spreads few,
//! long-lived connections badly (two peers' tunnels share one thread half
//! the time, and a same-node tunnel shares its client's thread half the
//! time, leaving a core idle), so the HBONE listener hands each new one to
//! the thread running the fewest connection tasks
//! ([`ProxyThreads::least_loaded`]; every task is counted by
//! [`ProxyThreads::hold`]) before its TLS handshake.
#![forbid(unsafe_code)]

use std::{
    cell::Cell,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::telemetry::log_batch;

/// The most proxy threads an agent runs (its `--proxy-threads` bound).
pub const MAX_THREADS: usize = 64;

thread_local! {
    /// The index of the proxy thread this is, if it is one.
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The index of the calling proxy thread (`None` on any other thread).
pub fn current() -> Option<usize> {
    INDEX.with(Cell::get)
}

/// Why the proxy threads did not start.
#[derive(Debug, thiserror::Error)]
pub enum ThreadsError {
    /// The OS refused a thread or its runtime's I/O driver (out of threads,
    /// memory or file descriptors).
    #[error(
        "cannot start proxy thread {index}: {source}; lower --proxy-threads or raise the process's thread and file limits"
    )]
    Start {
        /// Which thread.
        index: usize,
        /// The OS's error.
        source: std::io::Error,
    },
}

/// The running proxy threads. Stopped by [`ProxyThreads::stop`] (or on drop).
pub struct ProxyThreads {
    handles: Vec<Handle>,
    /// What each thread runs.
    load: Vec<Load>,
    stop: CancellationToken,
    joins: Mutex<Vec<JoinHandle<()>>>,
}

impl ProxyThreads {
    /// Starts `count` proxy threads (at least one, at most [`MAX_THREADS`]),
    /// named `mesh-proxy-<index>`.
    pub fn start(count: usize) -> Result<Self, ThreadsError> {
        let stop = CancellationToken::new();
        let mut threads = Self {
            handles: Vec::new(),
            load: Vec::new(),
            stop: stop.clone(),
            joins: Mutex::new(Vec::new()),
        };
        for index in 0..count.clamp(1, MAX_THREADS) {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let stop = stop.clone();
            let join = std::thread::Builder::new()
                .name(format!("mesh-proxy-{index}"))
                .spawn(move || {
                    // Log lines go out in batches, when the thread is about
                    // to wait for work (telemetry/log_batch.rs).
                    log_batch::batch_this_thread();
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .on_thread_park(log_batch::flush)
                        .build()
                    {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    INDEX.with(|i| i.set(Some(index)));
                    if tx.send(Ok(runtime.handle().clone())).is_ok() {
                        runtime.block_on(async {
                            tokio::select! {
                                () = stop.cancelled() => {}
                                () = log_batch::flush_late() => {}
                            }
                        });
                    }
                    // Dropping the runtime drops the tasks still on it
                    // (what the drain deadline left): their sockets close,
                    // and the lines they log are written here.
                    drop(runtime);
                    log_batch::flush();
                })
                .map_err(|source| ThreadsError::Start { index, source })?;
            threads
                .joins
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .push(join);
            let handle = rx
                .recv()
                .unwrap_or_else(|_| Err(std::io::Error::other("the thread ended at start")))
                .map_err(|source| ThreadsError::Start { index, source })?;
            threads.handles.push(handle);
            threads.load.push(Load::default());
        }
        Ok(threads)
    }

    /// How many threads run.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Always false: at least one thread runs.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// The runtime of thread `index` (modulo the count).
    pub fn handle(&self, index: usize) -> &Handle {
        &self.handles[index % self.handles.len()]
    }

    /// The thread running the fewest connection tasks; `here` (the
    /// caller's thread) on a tie, so that a connection moves only when that
    /// evens the load.
    pub fn least_loaded(&self, here: usize) -> usize {
        let tasks = |i: usize| self.load[i].tasks.load(Ordering::Acquire);
        let here = here % self.load.len();
        (0..self.load.len()).fold(
            here,
            |best, i| if tasks(i) < tasks(best) { i } else { best },
        )
    }

    /// Counts a connection task on thread `index` (modulo the count) until
    /// the returned guard is dropped.
    pub fn hold(self: &Arc<Self>, index: usize) -> ThreadLoad {
        self.count(index, Counted::Task)
    }

    /// Counts an inbound tunnel connection on thread `index` (shown in
    /// [`ProxyThreads::loads`]; its task is counted by [`ProxyThreads::hold`]).
    pub fn hold_tunnel(self: &Arc<Self>, index: usize) -> ThreadLoad {
        self.count(index, Counted::Tunnel)
    }

    fn count(self: &Arc<Self>, index: usize, what: Counted) -> ThreadLoad {
        let index = index % self.load.len();
        self.load[index]
            .counter(what)
            .fetch_add(1, Ordering::AcqRel);
        ThreadLoad {
            threads: self.clone(),
            index,
            what,
        }
    }

    /// Connection tasks and inbound tunnel connections of each thread, in
    /// thread order.
    pub fn loads(&self) -> Vec<(usize, usize)> {
        self.load
            .iter()
            .map(|l| {
                (
                    l.tasks.load(Ordering::Acquire),
                    l.tunnels.load(Ordering::Acquire),
                )
            })
            .collect()
    }

    /// Stops every thread: their runtimes end, dropping what still runs on
    /// them. Waits up to `timeout` for the threads to finish.
    pub fn stop(&self, timeout: Duration) {
        self.stop.cancel();
        let joins = std::mem::take(&mut *self.joins.lock().unwrap_or_else(PoisonError::into_inner));
        let deadline = Instant::now() + timeout;
        for join in joins {
            while !join.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if join.is_finished() {
                if join.join().is_err() {
                    tracing::error!("a proxy thread panicked");
                }
            } else {
                tracing::warn!("a proxy thread did not stop in time");
            }
        }
    }
}

/// What a thread runs.
#[derive(Default)]
struct Load {
    /// Connection tasks (accepted connections, tunnel streams).
    tasks: AtomicUsize,
    /// Inbound tunnel connections.
    tunnels: AtomicUsize,
}

impl Load {
    fn counter(&self, what: Counted) -> &AtomicUsize {
        match what {
            Counted::Task => &self.tasks,
            Counted::Tunnel => &self.tunnels,
        }
    }
}

#[derive(Clone, Copy)]
enum Counted {
    Task,
    Tunnel,
}

/// One task or tunnel counted on a thread ([`ProxyThreads::hold`],
/// [`ProxyThreads::hold_tunnel`]) until dropped.
pub struct ThreadLoad {
    threads: Arc<ProxyThreads>,
    index: usize,
    what: Counted,
}

impl ThreadLoad {
    /// The thread the connection is counted on.
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Drop for ThreadLoad {
    fn drop(&mut self) {
        self.threads.load[self.index]
            .counter(self.what)
            .fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for ProxyThreads {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_knows_its_index_and_runs_its_own_tasks() {
        let threads = ProxyThreads::start(3).expect("threads");
        assert_eq!(threads.len(), 3);
        assert_eq!(current(), None);
        for i in 0..3 {
            let (tx, rx) = std::sync::mpsc::channel();
            threads.handle(i).spawn(async move {
                // A task spawned from a proxy thread's task stays on it.
                let inner = tokio::spawn(async {
                    (current(), std::thread::current().name().map(str::to_owned))
                });
                let _ = tx.send(inner.await.expect("inner task"));
            });
            let (index, name) = rx.recv_timeout(Duration::from_secs(5)).expect("ran");
            assert_eq!(index, Some(i));
            assert_eq!(name.as_deref(), Some(format!("mesh-proxy-{i}").as_str()));
        }
        // Indexes wrap: a fourth set of listeners would be served by thread 0.
        let (tx, rx) = std::sync::mpsc::channel();
        threads.handle(3).spawn(async move {
            let _ = tx.send(current());
        });
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).expect("ran"),
            Some(0)
        );
    }

    #[test]
    fn stopping_ends_the_threads_and_drops_their_tasks() {
        let threads = ProxyThreads::start(2).expect("threads");
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        threads.handle(1).spawn(async move {
            let _held = tx;
            std::future::pending::<()>().await;
        });
        threads.stop(Duration::from_secs(5));
        // The pending task was dropped with its runtime: the sender is gone.
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        );
        assert!(threads.joins.lock().expect("lock").is_empty());
    }

    #[test]
    fn connections_go_to_the_least_loaded_thread_and_stay_where_a_move_gains_nothing() {
        let threads = Arc::new(ProxyThreads::start(3).expect("threads"));
        // All idle: the caller's own thread.
        assert_eq!(threads.least_loaded(1), 1);
        let a = threads.hold(threads.least_loaded(1));
        assert_eq!(a.index(), 1);
        // Thread 1 runs one: the next goes to the lowest idle one.
        let b = threads.hold(threads.least_loaded(1));
        assert_eq!(b.index(), 0);
        let c = threads.hold(threads.least_loaded(0));
        assert_eq!(c.index(), 2);
        // Tunnels are shown, not weighed (their tasks are).
        let t = threads.hold_tunnel(2);
        assert_eq!(threads.loads(), [(1, 0), (1, 0), (1, 1)]);
        // Evenly loaded: stay.
        assert_eq!(threads.least_loaded(2), 2);
        // A task ends: its thread is the least loaded again.
        drop(a);
        assert_eq!(threads.least_loaded(2), 1);
        drop((b, c, t));
        assert_eq!(threads.loads(), [(0, 0), (0, 0), (0, 0)]);
        // Indexes wrap like `handle`'s.
        assert_eq!(threads.hold(4).index(), 1);
        threads.stop(Duration::from_secs(5));
    }

    #[test]
    fn a_threads_log_lines_go_out_together_once_it_has_nothing_left_to_do() {
        let _serial = crate::telemetry::log_batch::serial();
        use std::io::Write as _;

        use crate::telemetry::log_batch::Writes;
        let writes = Writes::seen;

        let (sink, make) = Writes::batched();
        let threads = ProxyThreads::start(1).expect("threads");
        let (tx, rx) = std::sync::mpsc::channel();
        let seen = sink.clone();
        threads.handle(0).spawn(async move {
            let _ = make.writer(true).write_all(b"one\n");
            let _ = make.writer(true).write_all(b"two\n");
            // Still working: nothing written yet.
            let _ = tx.send(writes(&seen));
        });
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).expect("ran"),
            Vec::<String>::new()
        );
        // The thread waits for work again: both lines, in one write.
        let deadline = Instant::now() + Duration::from_secs(5);
        while writes(&sink).is_empty() {
            assert!(Instant::now() < deadline, "the lines were never written");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(writes(&sink), ["one\ntwo\n"]);

        // A thread that always has work ready never waits: its line still
        // goes out, after `MAX_DELAY`.
        let make = log_batch::Batched::to(sink.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let seen = sink.clone();
        threads.handle(0).spawn(async move {
            let _ = make.writer(true).write_all(b"busy\n");
            let until = Instant::now() + Duration::from_secs(10);
            while Instant::now() < until && writes(&seen).len() < 2 {
                tokio::task::yield_now().await;
            }
            let _ = tx.send(Instant::now() < until);
        });
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(15)),
            Ok(true),
            "the busy thread's line was not written while it stayed busy"
        );
        assert_eq!(writes(&sink), ["one\ntwo\n", "busy\n"]);
        threads.stop(Duration::from_secs(5));
    }

    #[test]
    fn the_count_is_bounded() {
        let threads = ProxyThreads::start(0).expect("threads");
        assert_eq!(threads.len(), 1);
        threads.stop(Duration::from_secs(5));
    }
}

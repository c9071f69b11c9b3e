//! Access-log lines that the proxy threads write in batches (issue 13).
//!
//! Every proxied connection ends in an access-log line (two for a
//! same-node connection: both sides). With one `write(2)` per line, the
//! access log cost about a tenth of the same-node connection rate
//! (`cargo xtask bench`, medians: 8 400–9 300 new connections/s with it,
//! 10 000–10 100 with `access=off`); written in batches, 8 850–9 500. So a
//! thread that calls [`batch_this_thread`] (each proxy thread, at start)
//! gathers its access-log lines ([`ACCESS_TARGET`]) and writes them at once:
//!
//! - when the thread is about to wait for work ([`flush`], the proxy
//!   threads' `on_thread_park` hook): an idle or lightly loaded agent's
//!   lines go out as soon as the work that logged them is done, one by one;
//! - when [`BATCH_BYTES`] have gathered: a busy thread writes every few
//!   dozen lines;
//! - [`MAX_DELAY`] after the first line of a batch ([`flush_late`], a task
//!   on each proxy thread): a thread that always has work ready never
//!   waits, and a line it logs among long transfers is not held longer;
//! - before any other line the thread logs: a warning, a refusal or an
//!   error is written at once, after the access lines that came before it;
//! - when anyone asks ([`flush_all`], the admin server's
//!   `POST /logging/flush`): every thread's batch, so a reader that has
//!   seen a connection counted as closed can have its line in the log;
//! - when the thread ends, after its runtime.
//!
//! Lines keep their order per thread and each `write` carries whole lines
//! (std's stderr lock is held for the whole batch, so no other thread's
//! line lands inside one). What a crash of the process loses is the access
//! lines its proxy threads gathered since they last waited. Other threads
//! write each line at once, as before.
#![forbid(unsafe_code)]

use std::{
    cell::RefCell,
    io::{self, Write},
    sync::{Arc, Mutex, MutexGuard, PoisonError, Weak},
    time::Duration,
};

use tokio::sync::Notify;
use tracing_subscriber::fmt::MakeWriter;

use super::access_log::ACCESS_TARGET;

/// A thread's batch is written once it holds this many bytes (about fifty
/// access-log lines), waiting or not.
pub const BATCH_BYTES: usize = 32 * 1024;

/// The longest a line waits in a batch while [`flush_late`] runs on its
/// thread (plus the time the thread takes to get to it).
pub const MAX_DELAY: Duration = Duration::from_millis(100);

/// Where batched lines go: the process's log output.
pub trait Sink: Send + Sync {
    /// Writes `bytes` whole (errors are dropped, as for any log line).
    fn write_all(&self, bytes: &[u8]);
}

/// The process's stderr.
struct Stderr;

impl Sink for Stderr {
    fn write_all(&self, bytes: &[u8]) {
        let _ = io::stderr().write_all(bytes);
    }
}

/// A thread's gathered lines and the sink they are for.
struct Batch {
    bytes: Vec<u8>,
    sink: Option<Arc<dyn Sink>>,
}

impl Batch {
    /// Writes out what is gathered; the number of bytes written.
    fn flush(&mut self) -> usize {
        let n = self.bytes.len();
        if let Some(sink) = &self.sink
            && n > 0
        {
            sink.write_all(&self.bytes);
        }
        self.bytes.clear();
        n
    }

    /// Gathers `bytes` for `sink`, writing out first what was gathered for
    /// another sink, and after if the batch is full. True if the batch was
    /// empty before.
    fn push(&mut self, sink: &Arc<dyn Sink>, bytes: &[u8]) -> bool {
        if !self.sink.as_ref().is_some_and(|s| Arc::ptr_eq(s, sink)) {
            self.flush();
            self.sink = Some(sink.clone());
        }
        let was_empty = self.bytes.is_empty();
        self.bytes.extend_from_slice(bytes);
        if self.bytes.len() >= BATCH_BYTES {
            self.flush();
        }
        was_empty
    }
}

/// One batching thread's batch, shared with [`flush_all`]. Its lock is
/// taken by its own thread for each line (uncontended but for a
/// [`flush_all`]), and by [`flush_all`] after it has let go of the
/// registry's. The only lock taken inside it is the sink's own (stderr's),
/// and never the other way round, so there is no lock order to break. A
/// [`Sink`] only writes bytes, it never logs, so a line cannot re-enter
/// the lock.
struct Shared {
    batch: Mutex<Batch>,
    /// Told when a line lands in an empty batch ([`flush_late`] waits on it).
    started: Notify,
}

impl Shared {
    fn batch(&self) -> MutexGuard<'_, Batch> {
        self.batch.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.batch
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .flush();
    }
}

/// Serialises the tests that look at a batch before it is written: one
/// that calls [`flush_all`] would write out the others' batches.
#[cfg(test)]
static TEST_SERIAL: Mutex<()> = Mutex::new(());

/// Holds [`TEST_SERIAL`] for a test's length.
#[cfg(test)]
pub(crate) fn serial() -> MutexGuard<'static, ()> {
    TEST_SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Every batching thread's batch (dead ones are pruned on registration).
static REGISTRY: Mutex<Vec<Weak<Shared>>> = Mutex::new(Vec::new());

thread_local! {
    /// The calling thread's batch, if it batches.
    static BATCH: RefCell<Option<Arc<Shared>>> = const { RefCell::new(None) };
}

/// The calling thread's batch, if it batches (and is not ending).
fn this_thread() -> Option<Arc<Shared>> {
    with_this_thread(|s| s.clone())
}

/// `f` on the calling thread's batch, if it batches (and is not ending);
/// without touching the batch's reference count.
fn with_this_thread<R>(f: impl FnOnce(&Arc<Shared>) -> R) -> Option<R> {
    BATCH
        .try_with(|b| b.try_borrow().ok().and_then(|b| b.as_ref().map(f)))
        .ok()
        .flatten()
}

/// Makes the calling thread gather its access-log lines (see the module
/// docs).
pub fn batch_this_thread() {
    let _ = BATCH.try_with(|b| {
        let mut b = b.borrow_mut();
        if b.is_none() {
            let shared = Arc::new(Shared {
                batch: Mutex::new(Batch {
                    bytes: Vec::with_capacity(BATCH_BYTES),
                    sink: None,
                }),
                started: Notify::new(),
            });
            let mut all = REGISTRY.lock().unwrap_or_else(PoisonError::into_inner);
            all.retain(|w| w.strong_count() > 0);
            all.push(Arc::downgrade(&shared));
            *b = Some(shared);
        }
    });
}

/// Writes the calling thread's batch out [`MAX_DELAY`] after its first
/// line, for as long as it runs (never returns; pending forever on a thread
/// that does not batch). Run it on the thread's runtime: it sleeps while
/// nothing is gathered.
pub async fn flush_late() {
    let Some(shared) = this_thread() else {
        return std::future::pending().await;
    };
    loop {
        shared.started.notified().await;
        tokio::time::sleep(MAX_DELAY).await;
        shared.batch().flush();
    }
}

/// Writes out the calling thread's gathered lines (nothing on a thread
/// that does not batch).
pub fn flush() {
    with_this_thread(|shared| shared.batch().flush());
}

/// Writes out every thread's gathered lines, from any thread; the number
/// of bytes written. A line logged before the call started is in the log
/// when it returns.
pub fn flush_all() -> usize {
    let live: Vec<Arc<Shared>> = REGISTRY
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    live.iter().map(|s| s.batch().flush()).sum()
}

/// A [`MakeWriter`] whose access-log lines are batched on threads that
/// batch; every other line (and every line on other threads) is written
/// at once, after what the thread had gathered.
#[derive(Clone)]
pub struct Batched {
    sink: Arc<dyn Sink>,
}

impl Batched {
    /// Lines to the process's stderr.
    pub fn stderr() -> Self {
        Self::to(Arc::new(Stderr))
    }

    /// Lines to `sink`.
    pub fn to(sink: Arc<dyn Sink>) -> Self {
        Self { sink }
    }

    /// A writer for one line: gathered if `batch` and the thread batches,
    /// else written at once.
    pub fn writer(&self, batch: bool) -> Writer {
        Writer {
            sink: self.sink.clone(),
            batch,
        }
    }
}

impl<'a> MakeWriter<'a> for Batched {
    type Writer = Writer;

    /// A line of unknown kind: written at once.
    fn make_writer(&'a self) -> Writer {
        self.writer(false)
    }

    /// Access-log lines are batched; the rest written at once.
    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Writer {
        self.writer(meta.target() == ACCESS_TARGET)
    }
}

/// One line's writer (see [`Batched`]).
pub struct Writer {
    sink: Arc<dyn Sink>,
    batch: bool,
}

impl Write for Writer {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.write_all(bytes)?;
        Ok(bytes.len())
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        let done = with_this_thread(|shared| {
            let mut batch = shared.batch();
            if self.batch {
                if batch.push(&self.sink, bytes) {
                    shared.started.notify_one();
                }
            } else {
                // Not batched: after what the thread gathered, in order.
                batch.flush();
                self.sink.write_all(bytes);
            }
        });
        if done.is_none() {
            self.sink.write_all(bytes);
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A [`Sink`] for tests that keeps every write apart (log_batch's own
/// tests, the proxy threads' and the log layers').
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Writes(Mutex<Vec<String>>);

#[cfg(test)]
impl Sink for Writes {
    fn write_all(&self, bytes: &[u8]) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(String::from_utf8_lossy(bytes).into_owned());
    }
}

#[cfg(test)]
impl Writes {
    /// The writes so far, taken.
    pub(crate) fn taken(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The writes so far, left in place.
    pub(crate) fn seen(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A new test sink and a [`Batched`] writing to it.
    pub(crate) fn batched() -> (Arc<Self>, Batched) {
        let sink = Arc::new(Self::default());
        (sink.clone(), Batched::to(sink))
    }
}

/// Runs `f` on a new thread that batches ([`batch_this_thread`]), to its
/// end (which writes out what it left gathered).
#[cfg(test)]
pub(crate) fn on_batching_thread(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        batch_this_thread();
        f();
    })
    .join()
    .expect("batching thread");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An access-log line (batched on a batching thread).
    fn line(make: &Batched, text: &str) {
        let _ = make.writer(true).write_all(text.as_bytes());
    }

    /// Any other line (never batched).
    fn other(make: &Batched, text: &str) {
        let _ = make.make_writer().write_all(text.as_bytes());
    }

    #[test]
    fn a_thread_that_does_not_batch_writes_each_line_at_once() {
        let _serial = serial();
        let (sink, make) = Writes::batched();
        std::thread::spawn(move || {
            line(&make, "a\n");
            line(&make, "b\n");
            flush();
        })
        .join()
        .expect("thread");
        assert_eq!(sink.taken(), ["a\n", "b\n"]);
    }

    #[test]
    fn a_batching_thread_writes_its_lines_together_on_flush_when_full_and_at_its_end() {
        let _serial = serial();
        let (sink, make) = Writes::batched();
        let seen = sink.clone();
        on_batching_thread(move || {
            line(&make, "a\n");
            line(&make, "b\n");
            assert!(seen.taken().is_empty(), "nothing before the flush");
            flush();
            assert_eq!(seen.taken(), ["a\nb\n"], "one write, in order");
            flush();
            assert!(seen.taken().is_empty(), "an empty batch writes nothing");
            // A full batch goes out without waiting for a flush.
            let long = "x".repeat(BATCH_BYTES / 2);
            line(&make, &long);
            assert!(seen.taken().is_empty());
            line(&make, &long);
            assert_eq!(seen.taken(), [long.repeat(2)]);
            line(&make, "last\n");
        });
        assert_eq!(sink.taken(), ["last\n"], "the thread's end writes the rest");
    }

    #[test]
    fn lines_for_another_sink_do_not_mix() {
        let _serial = serial();
        let ((one, m1), (two, m2)) = (Writes::batched(), Writes::batched());
        on_batching_thread(move || {
            line(&m1, "1a\n");
            line(&m2, "2a\n");
            line(&m1, "1b\n");
            flush();
        });
        assert_eq!(one.taken(), ["1a\n", "1b\n"]);
        assert_eq!(two.taken(), ["2a\n"]);
    }

    #[test]
    fn other_lines_are_written_at_once_after_what_the_thread_gathered() {
        let _serial = serial();
        let (sink, make) = Writes::batched();
        let seen = sink.clone();
        on_batching_thread(move || {
            line(&make, "access 1\n");
            other(&make, "refused\n");
            assert_eq!(
                seen.taken(),
                ["access 1\n", "refused\n"],
                "in order, at once"
            );
            line(&make, "access 2\n");
            assert!(seen.taken().is_empty());
        });
        assert_eq!(sink.taken(), ["access 2\n"]);
    }

    #[test]
    fn any_thread_can_write_out_every_threads_batch() {
        let _serial = serial();
        let (sink, make) = Writes::batched();
        let (logged_tx, logged_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            batch_this_thread();
            line(&make, "held\n");
            let _ = logged_tx.send(());
            // Alive and not flushing until the test is done.
            let _ = done_rx.recv();
        });
        logged_rx.recv().expect("logged");
        assert!(sink.taken().is_empty(), "still gathered");
        assert!(flush_all() >= "held\n".len());
        assert_eq!(sink.taken(), ["held\n"]);
        let _ = done_tx.send(());
        worker.join().expect("thread");
        assert!(sink.taken().is_empty(), "nothing written twice");
    }
}

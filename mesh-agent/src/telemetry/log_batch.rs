//! Log output that the proxy threads write in batches (issue 13).
//!
//! Every proxied connection ends in an access-log line (two for a
//! same-node connection: both sides). With one `write(2)` per line, the
//! access log cost about a tenth of the same-node connection rate
//! (`cargo xtask bench`, medians: 8 400–9 300 new connections/s with it,
//! 10 000–10 100 with `access=off`); written in batches, 8 850–9 500. So a
//! thread that calls [`batch_this_thread`] (each proxy thread, at start)
//! gathers its lines and writes them at once:
//!
//! - when the thread is about to wait for work ([`flush`], the proxy
//!   threads' `on_thread_park` hook): an idle or lightly loaded agent's
//!   lines go out as soon as the work that logged them is done, one by one;
//! - when [`BATCH_BYTES`] have gathered: a busy thread writes every few
//!   dozen lines;
//! - [`MAX_DELAY`] after the first line of a batch ([`flush_late`], a task
//!   on each proxy thread): a thread that always has work ready never
//!   waits, and a line it logs among long transfers is not held longer;
//! - when the thread ends, after its runtime.
//!
//! Lines keep their order per thread and each `write` carries whole lines
//! (std's stderr lock is held for the whole batch, so no other thread's
//! line lands inside one). What a crash of the process loses is what its
//! proxy threads gathered since they last waited. Other threads write each
//! line at once, as before.
#![forbid(unsafe_code)]

use std::{
    cell::RefCell,
    io::{self, Write},
    sync::Arc,
    time::Duration,
};

use tokio::sync::Notify;
use tracing_subscriber::fmt::MakeWriter;

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
    /// Told when a line lands in an empty batch ([`flush_late`] waits on it).
    started: Arc<Notify>,
}

impl Batch {
    /// Writes out what is gathered.
    fn flush(&mut self) {
        if let Some(sink) = &self.sink
            && !self.bytes.is_empty()
        {
            sink.write_all(&self.bytes);
        }
        self.bytes.clear();
    }

    /// Gathers `bytes` for `sink`, writing out first what was gathered for
    /// another sink, and after if the batch is full.
    fn push(&mut self, sink: &Arc<dyn Sink>, bytes: &[u8]) {
        if !self.sink.as_ref().is_some_and(|s| Arc::ptr_eq(s, sink)) {
            self.flush();
            self.sink = Some(sink.clone());
        }
        let was_empty = self.bytes.is_empty();
        self.bytes.extend_from_slice(bytes);
        if self.bytes.len() >= BATCH_BYTES {
            self.flush();
        } else if was_empty {
            self.started.notify_one();
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.flush();
    }
}

thread_local! {
    /// The calling thread's batch, if it batches.
    static BATCH: RefCell<Option<Batch>> = const { RefCell::new(None) };
}

/// Makes the calling thread gather its log lines (see the module docs).
pub fn batch_this_thread() {
    BATCH.with(|b| {
        let mut b = b.borrow_mut();
        if b.is_none() {
            *b = Some(Batch {
                bytes: Vec::with_capacity(BATCH_BYTES),
                sink: None,
                started: Arc::new(Notify::new()),
            });
        }
    });
}

/// Writes the calling thread's batch out [`MAX_DELAY`] after its first
/// line, for as long as it runs (never returns; pending forever on a thread
/// that does not batch). Run it on the thread's runtime: it sleeps while
/// nothing is gathered.
pub async fn flush_late() {
    let started = BATCH
        .try_with(|b| b.borrow().as_ref().map(|batch| batch.started.clone()))
        .ok()
        .flatten();
    let Some(started) = started else {
        return std::future::pending().await;
    };
    loop {
        started.notified().await;
        tokio::time::sleep(MAX_DELAY).await;
        flush();
    }
}

/// Writes out the calling thread's gathered lines (nothing on a thread
/// that does not batch).
pub fn flush() {
    let _ = BATCH.try_with(|b| {
        if let Ok(mut b) = b.try_borrow_mut()
            && let Some(batch) = b.as_mut()
        {
            batch.flush();
        }
    });
}

/// A [`MakeWriter`] whose lines are batched on threads that batch and
/// written at once on the others.
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
}

impl<'a> MakeWriter<'a> for Batched {
    type Writer = Writer;

    fn make_writer(&'a self) -> Writer {
        Writer {
            sink: self.sink.clone(),
        }
    }
}

/// One line's writer (see [`Batched`]).
pub struct Writer {
    sink: Arc<dyn Sink>,
}

impl Writer {
    /// Gathers `bytes` into this thread's batch; false if the thread does
    /// not batch (or is ending).
    fn gather(&self, bytes: &[u8]) -> bool {
        BATCH
            .try_with(|b| match b.try_borrow_mut() {
                Ok(mut b) => match b.as_mut() {
                    Some(batch) => {
                        batch.push(&self.sink, bytes);
                        true
                    }
                    None => false,
                },
                Err(_) => false,
            })
            .unwrap_or(false)
    }
}

impl Write for Writer {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.write_all(bytes)?;
        Ok(bytes.len())
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        if !self.gather(bytes) {
            self.sink.write_all(bytes);
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A sink that keeps every write apart.
    #[derive(Default)]
    struct Writes(Mutex<Vec<Vec<u8>>>);

    impl Sink for Writes {
        fn write_all(&self, bytes: &[u8]) {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(bytes.to_vec());
        }
    }

    impl Writes {
        fn taken(&self) -> Vec<String> {
            std::mem::take(
                &mut *self
                    .0
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            )
            .into_iter()
            .map(|w| String::from_utf8_lossy(&w).into_owned())
            .collect()
        }
    }

    fn line(make: &Batched, text: &str) {
        let _ = make.make_writer().write_all(text.as_bytes());
    }

    #[test]
    fn a_thread_that_does_not_batch_writes_each_line_at_once() {
        let sink = Arc::new(Writes::default());
        let make = Batched::to(sink.clone());
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
        let sink = Arc::new(Writes::default());
        let make = Batched::to(sink.clone());
        let seen = sink.clone();
        std::thread::spawn(move || {
            batch_this_thread();
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
        })
        .join()
        .expect("thread");
        assert_eq!(sink.taken(), ["last\n"], "the thread's end writes the rest");
    }

    #[test]
    fn lines_for_another_sink_do_not_mix() {
        let (one, two) = (Arc::new(Writes::default()), Arc::new(Writes::default()));
        let (m1, m2) = (Batched::to(one.clone()), Batched::to(two.clone()));
        std::thread::spawn(move || {
            batch_this_thread();
            line(&m1, "1a\n");
            line(&m2, "2a\n");
            line(&m1, "1b\n");
            flush();
        })
        .join()
        .expect("thread");
        assert_eq!(one.taken(), ["1a\n", "1b\n"]);
        assert_eq!(two.taken(), ["2a\n"]);
    }
}

//! Readiness (`:15021/healthz/ready`): ready once every part that blocks it
//! has let go. The agent blocks on the datapath (programs attached) and on
//! the first enrollment pass; other parts (certificates) can add their own
//! block. Shutting down makes the agent not ready again.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
};

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    pending: BTreeMap<u64, String>,
    shutting_down: bool,
}

/// The agent's readiness. Cheap to clone; every clone is the same state.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    inner: Arc<Mutex<Inner>>,
}

/// Holds readiness back until dropped (or [`release`](Self::release)d).
#[derive(Debug)]
pub struct BlockReady {
    readiness: Readiness,
    id: u64,
}

impl BlockReady {
    /// Lets go: same as dropping it, but reads as intent at the call site.
    pub fn release(self) {}
}

impl Drop for BlockReady {
    fn drop(&mut self) {
        self.readiness.lock().pending.remove(&self.id);
    }
}

/// What the readiness endpoint reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadyState {
    /// Everything is in place.
    Ready,
    /// Still waiting for these parts (in the order they blocked).
    Waiting(Vec<String>),
    /// The agent is stopping.
    ShuttingDown,
}

impl Readiness {
    /// Readiness with nothing blocking it yet (so: ready).
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Blocks readiness until the returned guard drops; `what` is reported
    /// by the endpoint while it waits (for example `datapath`).
    pub fn block(&self, what: impl Into<String>) -> BlockReady {
        let mut inner = self.lock();
        inner.next += 1;
        let id = inner.next;
        inner.pending.insert(id, what.into());
        BlockReady {
            readiness: self.clone(),
            id,
        }
    }

    /// Not ready from now on: the agent is stopping.
    pub fn shutting_down(&self) {
        self.lock().shutting_down = true;
    }

    /// The current state.
    pub fn state(&self) -> ReadyState {
        let inner = self.lock();
        if inner.shutting_down {
            ReadyState::ShuttingDown
        } else if inner.pending.is_empty() {
            ReadyState::Ready
        } else {
            ReadyState::Waiting(inner.pending.values().cloned().collect())
        }
    }

    /// Whether the agent is ready.
    pub fn is_ready(&self) -> bool {
        self.state() == ReadyState::Ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_once_every_block_is_released() {
        let r = Readiness::new();
        let dp = r.block("datapath");
        let wl = r.block("workloads");
        assert_eq!(
            r.state(),
            ReadyState::Waiting(vec!["datapath".into(), "workloads".into()])
        );
        dp.release();
        assert_eq!(r.state(), ReadyState::Waiting(vec!["workloads".into()]));
        drop(wl);
        assert!(r.is_ready());
        r.shutting_down();
        assert_eq!(r.state(), ReadyState::ShuttingDown);
    }
}

//! `/config_dump`: a JSON object whose members are produced, at request
//! time, by closures the agent's parts register (`node`, `workloads`,
//! `datapath`, `certificates`, `policies`, …). A part registered again under
//! the same name replaces the earlier one.

use std::{
    collections::BTreeMap,
    sync::{Arc, PoisonError, RwLock},
};

/// A producer of one part of the dump.
pub type DumpFn = dyn Fn() -> serde_json::Value + Send + Sync;

/// Named JSON producers, dumped together. Cheap to clone; clones share parts.
#[derive(Clone, Default)]
pub struct ConfigDump {
    parts: Arc<RwLock<BTreeMap<String, Arc<DumpFn>>>>,
}

impl std::fmt::Debug for ConfigDump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl ConfigDump {
    /// An empty dump.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers (or replaces) the part `name`.
    pub fn register(
        &self,
        name: impl Into<String>,
        part: impl Fn() -> serde_json::Value + Send + Sync + 'static,
    ) {
        self.parts
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.into(), Arc::new(part));
    }

    /// The names of the registered parts, sorted.
    pub fn names(&self) -> Vec<String> {
        self.parts
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    /// Every part, produced now: `{"name": value, …}`.
    pub fn dump(&self) -> serde_json::Value {
        // Produce outside the lock: a part may take a while (map reads).
        let parts: Vec<(String, Arc<DumpFn>)> = self
            .parts
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        serde_json::Value::Object(parts.into_iter().map(|(k, f)| (k, f())).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_produced_at_dump_time_and_replaced_by_name() {
        let dump = ConfigDump::new();
        let n = Arc::new(std::sync::atomic::AtomicU64::new(1));
        let counter = n.clone();
        dump.register("count", move || {
            counter.load(std::sync::atomic::Ordering::Relaxed).into()
        });
        dump.register("node", || serde_json::json!({"name": "n0"}));
        assert_eq!(
            dump.dump(),
            serde_json::json!({"count": 1, "node": {"name": "n0"}})
        );
        n.store(5, std::sync::atomic::Ordering::Relaxed);
        dump.register("node", || serde_json::json!({"name": "n1"}));
        assert_eq!(
            dump.dump(),
            serde_json::json!({"count": 5, "node": {"name": "n1"}})
        );
        assert_eq!(dump.names(), ["count", "node"]);
    }
}

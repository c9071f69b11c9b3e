//! What compiling policies and routes found (errors, ignored fields),
//! logged once: a recompile logs the findings the last compile of the same
//! kind did not have, not all of them again. A tenant updating one object
//! in a loop does not make every node re-log every finding of the cluster
//! per update; a new finding is logged when it appears. At most
//! [`MAX_NEW_PER_COMPILE`] new findings are logged per compile, then one
//! summary line (`/config_dump` lists them all); those not logged stay new
//! and are logged by the next compiles. Memory: the findings of the
//! last compile of each kind, as logged.

use std::{
    collections::{HashMap, HashSet},
    sync::{Mutex, PoisonError},
};

/// The most new findings logged, one line each, per compile and kind.
pub const MAX_NEW_PER_COMPILE: usize = 32;

/// The findings last logged, by kind (`policies`, `routes`).
#[derive(Debug, Default)]
pub struct LoggedFindings {
    by_kind: Mutex<HashMap<&'static str, HashSet<String>>>,
}

impl LoggedFindings {
    /// Starts logging one compile's findings of `kind`.
    pub fn pass(&self, kind: &'static str) -> FindingsPass<'_> {
        let before = self
            .by_kind
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(kind)
            .unwrap_or_default();
        FindingsPass {
            logged: self,
            kind,
            before,
            now: HashSet::new(),
            new: 0,
            suppressed: 0,
        }
    }
}

/// One compile's findings of a kind, being logged; what was found is kept
/// (and the summary of the new ones not logged written) when it is dropped.
#[derive(Debug)]
pub struct FindingsPass<'a> {
    logged: &'a LoggedFindings,
    kind: &'static str,
    before: HashSet<String>,
    now: HashSet<String>,
    new: usize,
    suppressed: usize,
}

impl FindingsPass<'_> {
    /// Whether the finding `key` (its full text) is to be logged now: the
    /// last compile did not have it, and fewer than
    /// [`MAX_NEW_PER_COMPILE`] new ones were logged before it.
    pub fn fresh(&mut self, key: String) -> bool {
        if self.before.contains(&key) || self.now.contains(&key) {
            self.now.insert(key);
            return false;
        }
        if self.new < MAX_NEW_PER_COMPILE {
            self.new += 1;
            self.now.insert(key);
            true
        } else {
            // Not kept: still new next compile, so that one object's flood
            // of findings cannot hide the others' for good.
            self.suppressed += 1;
            false
        }
    }
}

impl Drop for FindingsPass<'_> {
    fn drop(&mut self) {
        if self.suppressed > 0 {
            tracing::warn!(
                kind = self.kind,
                logged = self.new,
                not_logged = self.suppressed,
                "more new findings than are logged per compile; /config_dump lists them all"
            );
        }
        self.logged
            .by_kind
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(self.kind, std::mem::take(&mut self.now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logged(l: &LoggedFindings, kind: &'static str, keys: &[&str]) -> Vec<String> {
        let mut pass = l.pass(kind);
        keys.iter()
            .filter(|k| pass.fresh((**k).to_owned()))
            .map(|k| (*k).to_owned())
            .collect()
    }

    #[test]
    fn a_finding_is_logged_when_it_appears_not_on_each_compile() {
        let l = LoggedFindings::default();
        assert_eq!(logged(&l, "policies", &["a", "b", "a"]), ["a", "b"]);
        assert!(logged(&l, "policies", &["a", "b"]).is_empty());
        assert_eq!(logged(&l, "policies", &["a", "b", "c"]), ["c"]);
        // Gone, then back: logged again.
        assert!(logged(&l, "policies", &["c"]).is_empty());
        assert_eq!(logged(&l, "policies", &["a", "c"]), ["a"]);
        // Kinds are apart.
        assert_eq!(logged(&l, "routes", &["a"]), ["a"]);
    }

    #[test]
    fn new_findings_logged_per_compile_are_capped() {
        let l = LoggedFindings::default();
        let keys: Vec<String> = (0..100).map(|i| format!("f{i}")).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        assert_eq!(logged(&l, "routes", &refs).len(), MAX_NEW_PER_COMPILE);
        // Those not logged are still new next time, the next 32 of them.
        let next = logged(&l, "routes", &refs);
        assert_eq!(next.len(), MAX_NEW_PER_COMPILE);
        assert_eq!(next[0], "f32");
    }
}

//! One kind's objects as the watcher reports them, with relists applied
//! atomically: objects listed after a restart are buffered and replace the
//! live set only when the list is complete, so a relist that fails half-way
//! (an outage) leaves the last good set in force, and objects deleted while
//! the watch was down disappear when the relist completes. The live set is
//! shared ([`KindCache::shared`]) with a snapshot build running off the
//! sync task; the task applies no event while it waits for that build, so
//! nothing is copied.

use std::{collections::BTreeMap, sync::Arc};

use super::model::ObjKey;

/// A watch event, reduced to what the cache needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KindEvent<T> {
    /// A (re)list starts.
    Init,
    /// An object of the (re)list.
    InitApply(ObjKey, T),
    /// The (re)list is complete.
    InitDone,
    /// An object was added or changed.
    Apply(ObjKey, T),
    /// An object was deleted.
    Delete(ObjKey),
}

/// The live objects of one kind.
#[derive(Debug)]
pub struct KindCache<T> {
    live: Arc<BTreeMap<ObjKey, T>>,
    relist: Option<BTreeMap<ObjKey, T>>,
    synced: bool,
}

impl<T> Default for KindCache<T> {
    fn default() -> Self {
        Self {
            live: Arc::default(),
            relist: None,
            synced: false,
        }
    }
}

impl<T: PartialEq + Clone> KindCache<T> {
    /// The live objects.
    pub fn live(&self) -> &BTreeMap<ObjKey, T> {
        &self.live
    }

    /// The live objects, shared: a later event copies them first if they
    /// are still held (copy on write).
    pub fn shared(&self) -> Arc<BTreeMap<ObjKey, T>> {
        Arc::clone(&self.live)
    }

    /// Whether a list has completed at least once.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// Marks the kind synced with no objects (its resource does not exist
    /// on this cluster). Returns whether the live set changed.
    pub fn mark_absent(&mut self) -> bool {
        self.synced = true;
        self.relist = None;
        let changed = !self.live.is_empty();
        if changed {
            self.live = Arc::default();
        }
        changed
    }

    /// Applies `event`; returns whether the live set changed.
    pub fn apply(&mut self, event: KindEvent<T>) -> bool {
        match event {
            KindEvent::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            KindEvent::InitApply(key, obj) => {
                self.relist.get_or_insert_default().insert(key, obj);
                false
            }
            KindEvent::InitDone => {
                let listed = self.relist.take().unwrap_or_default();
                let first = !self.synced;
                self.synced = true;
                let changed = listed != *self.live;
                self.live = Arc::new(listed);
                changed || first
            }
            KindEvent::Apply(key, obj) => {
                if self.live.get(&key) == Some(&obj) {
                    return false;
                }
                Arc::make_mut(&mut self.live).insert(key, obj);
                true
            }
            KindEvent::Delete(key) => {
                if !self.live.contains_key(&key) {
                    return false;
                }
                Arc::make_mut(&mut self.live).remove(&key);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(name: &str) -> ObjKey {
        ("ns".to_owned(), name.to_owned())
    }

    #[test]
    fn relist_replaces_atomically() {
        let mut c: KindCache<u32> = KindCache::default();
        assert!(!c.synced());
        c.apply(KindEvent::Init);
        c.apply(KindEvent::InitApply(k("a"), 1));
        c.apply(KindEvent::InitApply(k("b"), 2));
        assert!(
            c.live().is_empty(),
            "nothing live before the list completes"
        );
        assert!(c.apply(KindEvent::InitDone));
        assert!(c.synced());
        assert_eq!(c.live().len(), 2);
        assert!(c.apply(KindEvent::Apply(k("a"), 3)));
        assert!(!c.apply(KindEvent::Apply(k("a"), 3)), "no-op update");
        assert!(c.apply(KindEvent::Delete(k("b"))));
        assert!(!c.apply(KindEvent::Delete(k("b"))));
        // A relist that never completes (outage) keeps the last good set.
        c.apply(KindEvent::Init);
        c.apply(KindEvent::InitApply(k("z"), 9));
        assert_eq!(c.live().keys().collect::<Vec<_>>(), vec![&k("a")]);
        // The next relist completes: `a` was deleted meanwhile, `c` added.
        c.apply(KindEvent::Init);
        c.apply(KindEvent::InitApply(k("c"), 4));
        assert!(c.apply(KindEvent::InitDone));
        assert_eq!(c.live().keys().collect::<Vec<_>>(), vec![&k("c")]);
        // An identical relist changes nothing.
        c.apply(KindEvent::Init);
        c.apply(KindEvent::InitApply(k("c"), 4));
        assert!(!c.apply(KindEvent::InitDone));
        assert!(c.mark_absent());
        assert!(c.live().is_empty() && c.synced());
    }

    #[test]
    fn a_shared_live_set_is_never_changed_under_its_holder() {
        let mut c: KindCache<u32> = KindCache::default();
        c.apply(KindEvent::Init);
        c.apply(KindEvent::InitApply(k("a"), 1));
        c.apply(KindEvent::InitDone);
        let held = c.shared();
        assert!(c.apply(KindEvent::Apply(k("a"), 2)));
        assert!(c.apply(KindEvent::Apply(k("b"), 3)));
        assert_eq!(held.get(&k("a")), Some(&1));
        assert_eq!(held.len(), 1);
        assert_eq!(c.live().get(&k("a")), Some(&2));
        // Not held any more: changed in place.
        drop(held);
        let before = Arc::as_ptr(&c.shared());
        assert!(c.apply(KindEvent::Delete(k("b"))));
        assert_eq!(Arc::as_ptr(&c.shared()), before);
    }
}

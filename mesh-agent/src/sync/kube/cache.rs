//! One kind's objects as the watcher reports them, with relists applied
//! atomically: objects listed after a restart are buffered and replace the
//! live set only when the list is complete, so a relist that fails half-way
//! (an outage) leaves the last good set in force, and objects deleted while
//! the watch was down disappear when the relist completes.

use std::collections::BTreeMap;

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
    live: BTreeMap<ObjKey, T>,
    relist: Option<BTreeMap<ObjKey, T>>,
    synced: bool,
}

impl<T> Default for KindCache<T> {
    fn default() -> Self {
        Self {
            live: BTreeMap::new(),
            relist: None,
            synced: false,
        }
    }
}

impl<T: PartialEq> KindCache<T> {
    /// The live objects.
    pub fn live(&self) -> &BTreeMap<ObjKey, T> {
        &self.live
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
        self.live.clear();
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
                let changed = listed != self.live;
                self.live = listed;
                changed || first
            }
            KindEvent::Apply(key, obj) => {
                if self.live.get(&key) == Some(&obj) {
                    return false;
                }
                self.live.insert(key, obj);
                true
            }
            KindEvent::Delete(key) => self.live.remove(&key).is_some(),
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
}

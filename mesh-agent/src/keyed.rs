//! Slots in use per key, with a maximum per key (per source address, per
//! peer identity): shared by the proxy's limits and the CA server's.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex, PoisonError},
};

/// Slots in use per key, with a maximum per key. A key's entry is removed
/// when its last slot is freed, so the map holds only keys in use.
#[derive(Debug)]
pub struct PerKey<K: Eq + Hash> {
    in_use: Mutex<HashMap<K, usize>>,
    max: usize,
}

impl<K: Eq + Hash + Clone> PerKey<K> {
    /// At most `max` slots per key.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            in_use: Mutex::new(HashMap::new()),
            max,
        })
    }

    /// A slot of `key`'s, or `None` when it holds its maximum.
    pub fn try_acquire(self: &Arc<Self>, key: &K) -> Option<KeyPermit<K>> {
        let mut map = self.in_use.lock().unwrap_or_else(PoisonError::into_inner);
        let n = map.entry(key.clone()).or_insert(0);
        if *n >= self.max {
            if *n == 0 {
                map.remove(key);
            }
            return None;
        }
        *n += 1;
        Some(KeyPermit {
            set: self.clone(),
            key: key.clone(),
        })
    }

    fn release(&self, key: &K) {
        let mut map = self.in_use.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = map.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(key);
            }
        }
    }

    /// (keys in use, slots in use, the most any key holds).
    pub fn usage(&self) -> (usize, usize, usize) {
        let map = self.in_use.lock().unwrap_or_else(PoisonError::into_inner);
        let total = map.values().sum();
        let most = map.values().copied().max().unwrap_or(0);
        (map.len(), total, most)
    }
}

/// One slot of a per-key cap, freed when dropped.
#[derive(Debug)]
pub struct KeyPermit<K: Eq + Hash + Clone> {
    set: Arc<PerKey<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> Drop for KeyPermit<K> {
    fn drop(&mut self) {
        self.set.release(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    #[test]
    fn a_key_holds_at_most_its_slots_and_frees_them() {
        let slots = PerKey::new(2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = slots.try_acquire(&a).unwrap();
        let _a2 = slots.try_acquire(&a).unwrap();
        assert!(slots.try_acquire(&a).is_none());
        let _b1 = slots.try_acquire(&b).expect("another key is not affected");
        drop(a1);
        let _a3 = slots.try_acquire(&a).expect("freed on drop");
        drop((_a2, _a3));
        assert!(!slots.in_use.lock().unwrap().contains_key(&a));
    }
}

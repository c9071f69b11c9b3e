//! How the kernel programs know the agent's own sockets in a pod's netns:
//! by entries only the agent writes, never by a property an app can give
//! its own socket (a mark, `IP_TRANSPARENT`, a source address).
//!
//! * `AGENT_SOCKETS` (socket cookie): the connect hooks leave the socket
//!   alone (the agent's upstream connects and deliveries, made from inside
//!   the pod).
//! * `DELIVERY_TUPLES` (the SYN's addresses and ports): `sk_lookup` leaves a
//!   delivery to the app alone (its source is the client's address, so it
//!   would otherwise be steered back into the agent).
//!
//! A socket's cookie is exempt while its connect is in flight; a delivery's
//! tuple for the delivered connection's life ([`Exemption::into_delivery`]):
//! the connect completes when the app's kernel answers, but the app's side
//! may not exist yet (an overflowing accept queue answers with a SYN cookie,
//! or drops the handshake's last ACK and waits for it again), and until it
//! does the delivery's packets meet `sk_lookup`, which must leave them to
//! the app. A guard removes its entries when dropped (cookies are never
//! reused; a crashed agent's leftovers are evicted by the LRU maps, whose
//! eviction of an established delivery's tuple is harmless: only packets no
//! established socket takes meet `sk_lookup`).
//!
//! Two of the agent's connects can share a tuple: a delivery binds a random
//! port, and when that port's tuple belongs to another delivery still in
//! flight, its connect fails and it tries another port. The tuple's entry is
//! counted per holder ([`Holders`]) and removed with the last one, so the
//! failed attempt leaves the first delivery exempt. (Were the entry to go
//! with the failed attempt, the first delivery's next SYN, sent again when
//! its first met a full accept queue, would be steered into the agent and
//! reset.)
//!
//! Two agents share the pinned maps while an upgrade overlaps them, and
//! neither knows the other's holders. So the agent only ever removes an
//! entry it inserted: a tuple's first hold inserts its entry only if the map
//! has none (`BPF_NOEXIST`). An entry already there is another agent's
//! delivery in flight, or a crashed agent's leftover; the attempt fails as
//! a tuple in use ([`io::ErrorKind::AddrNotAvailable`], before any SYN) and
//! the delivery takes another port, leaving that entry alone. A leftover
//! stays until the LRU map, once full, evicts it; until then its one tuple
//! is skipped (and stays exempt, which is harmless: see above).
//!
//! What this does not cover: an upgrade from an agent older than this rule
//! (it overwrites and removes entries as its own), and an entry the LRU map
//! evicts while its delivery's connect is still in flight, so that another
//! agent can insert the same tuple and lose it to the first one's release.
//! Both need a tuple collision at the same moment, and both fail closed
//! (the delivery's retransmitted SYN is reset), never open.
#![forbid(unsafe_code)]

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use aya::maps::{HashMap, MapData};
use mesh_common::DeliveryKey;

use super::{keys::ip_key, sys};

/// `bpf_map_update_elem` flags (`include/uapi/linux/bpf.h`): create or
/// replace; create only (`EEXIST` if the key is there).
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;

/// The agent's exemption maps.
///
/// Both are written through shared references (`sys::map_insert`,
/// `sys::map_delete`): the kernel serialises a map's updates, so the
/// proxy threads take no lock for a cookie. A tuple's holder count and its
/// entry change together under the lock of the tuple's shard, so the two
/// threads wait on each other only for tuples of one shard (a lock over
/// every tuple was a contended futex wait in one of four same-node
/// connections under a connection storm).
pub struct Exemptions {
    sockets: HashMap<MapData, u64, u8>,
    deliveries: HashMap<MapData, DeliveryKey, u8>,
    holders: [Mutex<Holders>; HOLDER_SHARDS],
}

/// Locks over the delivery tuples' holder counts; a tuple's shard is picked
/// by its client port (random per delivery), so concurrent deliveries
/// rarely share one.
const HOLDER_SHARDS: usize = 16;

/// The shard of `key`'s holder count.
fn shard(key: &DeliveryKey) -> usize {
    usize::from(key.remote_port) % HOLDER_SHARDS
}

/// How many of the agent's exemptions hold each delivery tuple: an entry
/// leaves the map with its last holder. Bounded by the agent's connects in
/// flight and delivered connections (each holds one count).
#[derive(Debug, Default)]
struct Holders(std::collections::HashMap<DeliveryKey, u32>);

impl Holders {
    /// Whether this agent holds `key` (so its entry is this agent's).
    fn holds(&self, key: &DeliveryKey) -> bool {
        self.0.contains_key(key)
    }

    /// One more holder of `key`.
    fn hold(&mut self, key: DeliveryKey) {
        *self.0.entry(key).or_insert(0) += 1;
    }

    /// One holder of `key` fewer; whether it was the last (the entry must go).
    fn release(&mut self, key: &DeliveryKey) -> bool {
        match self.0.get_mut(key) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.0.remove(key);
                true
            }
            // Not held: nothing of this agent's is left to exempt.
            None => true,
        }
    }
}

/// Exempted while alive: removes its entries on drop.
#[must_use = "the exemption ends when this is dropped"]
pub struct Exemption {
    maps: Arc<Exemptions>,
    cookie: u64,
    delivery: Option<DeliveryKey>,
}

/// A delivery's tuple, exempt from `sk_lookup` while alive: held for the
/// delivered connection's life.
#[must_use = "the delivery's exemption ends when this is dropped"]
pub struct DeliveryExemption {
    maps: Arc<Exemptions>,
    key: DeliveryKey,
}

impl Exemptions {
    /// The exemptions over the loaded maps.
    pub(super) fn new(
        sockets: HashMap<MapData, u64, u8>,
        deliveries: HashMap<MapData, DeliveryKey, u8>,
    ) -> Self {
        Self {
            sockets,
            deliveries,
            holders: std::array::from_fn(|_| Mutex::default()),
        }
    }

    /// Exempts the socket `cookie` from the connect hooks and, for a
    /// delivery to an app, its SYN from `sk_lookup`: `from` is the address
    /// the socket is bound to, `to` the app's.
    pub fn exempt(
        self: &Arc<Self>,
        cookie: u64,
        delivery: Option<(SocketAddr, SocketAddr)>,
    ) -> io::Result<Exemption> {
        let key = delivery.map(|(from, to)| DeliveryKey {
            local: ip_key(to.ip()),
            remote: ip_key(from.ip()),
            local_port: to.port(),
            remote_port: from.port(),
            _pad: [0; 4],
        });
        // Built first, so that a failure below removes what was inserted.
        let guard = Exemption {
            maps: self.clone(),
            cookie,
            delivery: None,
        };
        sys::map_insert(&self.sockets, &cookie, &1, BPF_ANY)?;
        let mut guard = guard;
        if let Some(key) = key {
            let mut holders = lock(&self.holders[shard(&key)]);
            // Already held: this agent's entry, written again so that one
            // the LRU map evicted comes back. Else only into an empty slot.
            let flags = if holders.holds(&key) {
                BPF_ANY
            } else {
                BPF_NOEXIST
            };
            match sys::map_insert(&self.deliveries, &key, &1, flags) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrNotAvailable,
                        "the delivery tuple is exempted by another agent (an upgrade's overlap)",
                    ));
                }
                Err(e) => return Err(e),
            }
            holders.hold(key);
            guard.delivery = Some(key);
        }
        Ok(guard)
    }

    /// Drops one hold on `key`'s entry, removing it with the last.
    fn release(&self, key: &DeliveryKey) {
        let mut holders = lock(&self.holders[shard(key)]);
        if holders.release(key) {
            let _ = sys::map_delete(&self.deliveries, key);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Exemption {
    /// Ends the socket's exemption (its connect is done) and keeps the
    /// delivery tuple's, if it has one, for as long as the returned guard.
    pub fn into_delivery(mut self) -> Option<DeliveryExemption> {
        let key = self.delivery.take()?;
        Some(DeliveryExemption {
            maps: self.maps.clone(),
            key,
        })
    }
}

impl Drop for Exemption {
    fn drop(&mut self) {
        let _ = sys::map_delete(&self.maps.sockets, &self.cookie);
        if let Some(key) = &self.delivery {
            self.maps.release(key);
        }
    }
}

impl Drop for DeliveryExemption {
    fn drop(&mut self) {
        self.maps.release(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> DeliveryKey {
        DeliveryKey {
            local_port: 8080,
            remote_port: port,
            ..DeliveryKey::default()
        }
    }

    #[test]
    fn a_tuple_entry_goes_with_its_last_holder() {
        let mut h = Holders::default();
        h.hold(key(40000));
        h.hold(key(40000));
        h.hold(key(40001));
        // The second connect that found the tuple in use gives up its hold:
        // the first delivery keeps the entry.
        assert!(!h.release(&key(40000)));
        assert!(h.release(&key(40000)));
        assert!(h.release(&key(40001)));
        assert!(h.0.is_empty(), "{h:?}");
    }

    #[test]
    fn releasing_an_unheld_tuple_removes_its_entry() {
        assert!(Holders::default().release(&key(40000)));
    }
}

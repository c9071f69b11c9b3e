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
#![forbid(unsafe_code)]

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use aya::maps::{HashMap, MapData};
use mesh_common::DeliveryKey;

use super::keys::ip_key;

/// The agent's exemption maps.
pub struct Exemptions {
    sockets: Mutex<HashMap<MapData, u64, u8>>,
    deliveries: Mutex<HashMap<MapData, DeliveryKey, u8>>,
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
            sockets: Mutex::new(sockets),
            deliveries: Mutex::new(deliveries),
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
        lock(&self.sockets)
            .insert(&cookie, &1, 0)
            .map_err(io::Error::other)?;
        let mut guard = guard;
        if let Some(key) = key {
            lock(&self.deliveries)
                .insert(&key, &1, 0)
                .map_err(io::Error::other)?;
            guard.delivery = Some(key);
        }
        Ok(guard)
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
        let _ = lock(&self.maps.sockets).remove(&self.cookie);
        if let Some(key) = &self.delivery {
            let _ = lock(&self.maps.deliveries).remove(key);
        }
    }
}

impl Drop for DeliveryExemption {
    fn drop(&mut self) {
        let _ = lock(&self.maps.deliveries).remove(&self.key);
    }
}

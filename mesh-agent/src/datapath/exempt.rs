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
//! Entries live while the connect is in flight: a [`Exemption`] removes
//! them when dropped (cookies are never reused; a crashed agent's leftovers
//! are evicted by the LRU maps).
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

impl Drop for Exemption {
    fn drop(&mut self) {
        let _ = lock(&self.maps.sockets).remove(&self.cookie);
        if let Some(key) = &self.delivery {
            let _ = lock(&self.maps.deliveries).remove(key);
        }
    }
}

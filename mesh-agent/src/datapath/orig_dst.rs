//! The original destinations of redirected outbound connections, as the
//! kernel files them (map `ORIG_DST_BY_TUPLE`), read by the proxy.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, sync::Mutex, time::Duration};

use aya::maps::{HashMap, MapData};
use mesh_common::{OrigDst, TupleKey};

use super::keys::{ip_from_key, ip_key};

/// The kernel's record of original destinations, keyed by the redirected
/// client's (netns, address, port).
pub struct OrigDstTable {
    map: Mutex<HashMap<MapData, TupleKey, OrigDst>>,
}

impl OrigDstTable {
    /// The table over the loaded map.
    pub(super) fn new(map: HashMap<MapData, TupleKey, OrigDst>) -> Self {
        Self {
            map: Mutex::new(map),
        }
    }

    /// Takes (reads and deletes) the original destination of the client
    /// `peer` accepted on the outbound listener of netns `netns_cookie`.
    /// The kernel files it before the client's handshake completes; a short
    /// retry covers the rare case of the agent being faster.
    pub async fn take(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let key = TupleKey {
            netns_cookie,
            addr: ip_key(peer.ip()),
            port: peer.port(),
            _pad: [0; 6],
        };
        for attempt in 0..10u32 {
            if let Some(orig) = self.take_now(&key) {
                return Some(orig);
            }
            tokio::time::sleep(Duration::from_millis(1 << attempt.min(5))).await;
        }
        None
    }

    fn take_now(&self, key: &TupleKey) -> Option<SocketAddr> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let orig = map.get(key, 0).ok()?;
        if let Err(e) = map.remove(key) {
            tracing::debug!(error = %e, "original destination already gone");
        }
        Some(SocketAddr::new(ip_from_key(&orig.addr), orig.port))
    }
}

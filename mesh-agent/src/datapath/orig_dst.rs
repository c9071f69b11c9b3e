//! The original destinations of redirected outbound connections, as the
//! kernel files them (map `ORIG_DST_BY_TUPLE`), read by the proxy.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, time::Duration};

use aya::maps::{HashMap, MapData};
use mesh_common::{OrigDst, TupleKey};

use super::{
    keys::{ip_from_key, ip_key},
    sys,
};

/// The kernel's record of original destinations, keyed by the redirected
/// client's (netns, address, port).
pub struct OrigDstTable {
    map: HashMap<MapData, TupleKey, OrigDst>,
}

impl OrigDstTable {
    /// The table over the loaded map.
    pub(super) fn new(map: HashMap<MapData, TupleKey, OrigDst>) -> Self {
        Self { map }
    }

    /// Takes (reads and deletes) the original destination of the client
    /// `peer` accepted on the outbound listener of netns `netns_cookie`.
    /// The kernel files it before the client's handshake completes; a short
    /// retry covers the rare case of the agent being faster. One
    /// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` per try: one syscall, no lock.
    pub async fn take(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let key = TupleKey {
            netns_cookie,
            addr: ip_key(peer.ip()),
            port: peer.port(),
            _pad: [0; 6],
        };
        for attempt in 0..10u32 {
            match sys::map_take(&self.map, &key) {
                Ok(Some(o)) => return Some(SocketAddr::new(ip_from_key(&o.addr), o.port)),
                Ok(None) => {}
                // An error (not expected on a supported kernel) would not
                // pass by waiting: the connection is refused at once.
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read an original destination");
                    return None;
                }
            }
            tokio::time::sleep(Duration::from_millis(1 << attempt.min(5))).await;
        }
        None
    }
}

//! The kernel side of enrolling a pod: the map entries that make the kernel
//! programs capture it (`ENROLLED_NETNS`, `POD_ADDRS`, `NETNS_ADDRS`, `EXCLUDED_PORTS`,
//! `INBOUND_LISTENERS`), the node's `PROBE_SOURCES`, and the pod netns'
//! `sk_lookup` link. Which pods to enroll, and when, is decided above (in
//! `pods`), through the [`PodKernel`] trait, so that the decisions can be
//! tested without a kernel.
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeSet, HashSet},
    fs::File,
    net::{IpAddr, TcpListener},
    path::Path,
};

use aya::maps::{HashMap, MapData, SockMap};
use mesh_common::{
    IpKey, LISTENER_HBONE, LISTENER_PLAINTEXT, LISTENERS_PER_POD, PodAddrs, PodSlot, PortKey,
    direction, maps,
};

use super::{Datapath, DatapathError, ip_key, netns::NetnsError};

/// What the kernel maps hold of one pod.
#[derive(Clone, Copy, Debug)]
pub struct PodKernelState<'a> {
    /// Path of the pod's netns (where `sk_lookup` is attached).
    pub netns: &'a Path,
    /// The pod's addresses (`POD_ADDRS`).
    pub ips: &'a [IpAddr],
    /// Outbound destination ports that bypass capture (`EXCLUDED_PORTS`).
    pub exclude_outbound_ports: &'a [u16],
    /// Inbound ports that bypass capture (`EXCLUDED_PORTS`).
    pub exclude_inbound_ports: &'a [u16],
}

impl PodKernelState<'_> {
    /// The pod's first address of each family (`NETNS_ADDRS`).
    fn own_addrs(&self) -> PodAddrs {
        let mut out = PodAddrs::default();
        if let Some(v4) = self.ips.iter().find(|ip| ip.is_ipv4()) {
            out.v4 = ip_key(*v4);
            out.has_v4 = 1;
        }
        if let Some(v6) = self.ips.iter().find(|ip| ip.is_ipv6()) {
            out.v6 = ip_key(*v6);
            out.has_v6 = 1;
        }
        out
    }

    /// The `EXCLUDED_PORTS` keys of the pod in the netns `cookie`.
    fn port_keys(&self, cookie: u64) -> impl Iterator<Item = PortKey> + '_ {
        let out = self
            .exclude_outbound_ports
            .iter()
            .map(|p| (*p, direction::OUTBOUND));
        let inb = self
            .exclude_inbound_ports
            .iter()
            .map(|p| (*p, direction::INBOUND));
        out.chain(inb).map(move |(port, direction)| PortKey {
            netns_cookie: cookie,
            port,
            direction,
            _pad: [0; 5],
        })
    }
}

/// The pod's in-pod listeners the inbound `sk_lookup` steers to.
#[derive(Clone, Copy, Debug)]
pub struct InboundSockets<'a> {
    /// The inbound plaintext listener.
    pub plaintext: &'a TcpListener,
    /// The inbound HBONE listener.
    pub hbone: &'a TcpListener,
}

/// Why a pod's kernel state could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The pod's netns cannot be opened (to attach `sk_lookup`).
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A map or link operation failed.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

/// The kernel operations of the pod lifecycle. [`PodMaps`] is the real one.
pub trait PodKernel {
    /// Writes a pod's kernel state in slot `slot` for its netns `cookie`:
    /// inbound steering first (listeners, addresses, `sk_lookup`), outbound
    /// capture (the netns cookie) last. Entries already there are
    /// overwritten (an update in place).
    fn publish(
        &mut self,
        slot: u32,
        cookie: u64,
        pod: &PodKernelState<'_>,
        inbound: InboundSockets<'_>,
    ) -> Result<(), PublishError>;

    /// Removes a pod's kernel state, outbound capture first. Best effort:
    /// every step runs, failures are logged (the sweep retries them).
    fn withdraw(&mut self, slot: u32, cookie: u64, pod: &PodKernelState<'_>);

    /// Deletes entries and `sk_lookup` links that none of the pods `keep`
    /// (each with its netns cookie) owns.
    fn sweep(&mut self, keep: &[(u64, PodKernelState<'_>)]) -> Result<(), DatapathError>;

    /// Makes `PROBE_SOURCES` hold exactly `sources`.
    fn sync_probe_sources(&mut self, sources: &[IpAddr]) -> Result<(), DatapathError>;
}

/// The pod maps taken out of the loaded datapath, and the datapath itself
/// (for the `sk_lookup` links).
pub struct PodMaps {
    dp: Datapath,
    enrolled_netns: HashMap<MapData, u64, PodSlot>,
    pod_addrs: HashMap<MapData, IpKey, PodSlot>,
    excluded: HashMap<MapData, PortKey, u8>,
    probe_sources: HashMap<MapData, IpKey, u8>,
    listeners: SockMap<MapData>,
    netns_addrs: HashMap<MapData, u64, PodAddrs>,
}

impl PodMaps {
    /// Takes the maps it writes out of the datapath.
    pub fn new(mut dp: Datapath) -> Result<Self, DatapathError> {
        Ok(Self {
            enrolled_netns: dp.take_map(maps::ENROLLED_NETNS)?,
            pod_addrs: dp.take_map(maps::POD_ADDRS)?,
            excluded: dp.take_map(maps::EXCLUDED_PORTS)?,
            probe_sources: dp.take_map(maps::PROBE_SOURCES)?,
            listeners: dp.take_map(maps::INBOUND_LISTENERS)?,
            netns_addrs: dp.take_map(maps::NETNS_ADDRS)?,
            dp,
        })
    }
}

/// Removes the entries of `map` whose keys `keep` refuses (best effort: a
/// failed removal is retried at the next sweep); returns how many it found.
fn remove_stale<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    keep: impl Fn(&K) -> bool,
) -> usize {
    let stale: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !keep(k))
        .collect();
    for key in &stale {
        let _ = map.remove(key);
    }
    stale.len()
}

/// A map error, naming the map.
fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |e| DatapathError::Map {
        map,
        message: e.to_string(),
    }
}

impl PodKernel for PodMaps {
    fn publish(
        &mut self,
        slot: u32,
        cookie: u64,
        pod: &PodKernelState<'_>,
        inbound: InboundSockets<'_>,
    ) -> Result<(), PublishError> {
        let value = PodSlot {
            slot,
            _pad: 0,
            netns_cookie: cookie,
        };
        for (kind, listener) in [
            (LISTENER_PLAINTEXT, inbound.plaintext),
            (LISTENER_HBONE, inbound.hbone),
        ] {
            self.listeners
                .set(slot * LISTENERS_PER_POD + kind, listener, 0)
                .map_err(map_err(maps::INBOUND_LISTENERS))?;
        }
        for key in pod.port_keys(cookie) {
            self.excluded
                .insert(&key, &1, 0)
                .map_err(map_err(maps::EXCLUDED_PORTS))?;
        }
        for ip in pod.ips {
            self.pod_addrs
                .insert(&ip_key(*ip), &value, 0)
                .map_err(map_err(maps::POD_ADDRS))?;
        }
        let ns = File::open(pod.netns).map_err(|source| NetnsError::Open {
            path: pod.netns.to_owned(),
            source,
        })?;
        self.dp.attach_sk_lookup(&ns, cookie)?;
        self.netns_addrs
            .insert(&cookie, &pod.own_addrs(), 0)
            .map_err(map_err(maps::NETNS_ADDRS))?;
        self.enrolled_netns
            .insert(&cookie, &value, 0)
            .map_err(map_err(maps::ENROLLED_NETNS))?;
        Ok(())
    }

    fn withdraw(&mut self, slot: u32, cookie: u64, pod: &PodKernelState<'_>) {
        let log = |what: &str, r: Result<(), String>| {
            if let Err(e) = r {
                tracing::debug!(netns = %pod.netns.display(), what, error = %e, "withdraw step failed");
            }
        };
        log(
            "enrolled_netns",
            self.enrolled_netns
                .remove(&cookie)
                .map_err(|e| e.to_string()),
        );
        log(
            "sk_lookup",
            self.dp.detach_sk_lookup(cookie).map_err(|e| e.to_string()),
        );
        log(
            "netns_addrs",
            self.netns_addrs.remove(&cookie).map_err(|e| e.to_string()),
        );
        for ip in pod.ips {
            log(
                "pod_addrs",
                self.pod_addrs
                    .remove(&ip_key(*ip))
                    .map_err(|e| e.to_string()),
            );
        }
        for key in pod.port_keys(cookie) {
            log(
                "excluded_ports",
                self.excluded.remove(&key).map_err(|e| e.to_string()),
            );
        }
        for kind in [LISTENER_PLAINTEXT, LISTENER_HBONE] {
            let index = slot * LISTENERS_PER_POD + kind;
            log(
                "listeners",
                self.listeners
                    .clear_index(&index)
                    .map_err(|e| e.to_string()),
            );
        }
    }

    fn sweep(&mut self, keep: &[(u64, PodKernelState<'_>)]) -> Result<(), DatapathError> {
        let cookies: BTreeSet<u64> = keep.iter().map(|(cookie, _)| *cookie).collect();
        let addrs: HashSet<IpKey> = keep
            .iter()
            .flat_map(|(_, p)| p.ips.iter().map(|ip| ip_key(*ip)))
            .collect();
        let ports: HashSet<PortKey> = keep
            .iter()
            .flat_map(|(cookie, p)| p.port_keys(*cookie))
            .collect();
        let mut swept = remove_stale(&mut self.enrolled_netns, |k| cookies.contains(k));
        swept += remove_stale(&mut self.pod_addrs, |k| addrs.contains(k));
        swept += remove_stale(&mut self.netns_addrs, |k| cookies.contains(k));
        swept += remove_stale(&mut self.excluded, |k| ports.contains(k));
        for cookie in self.dp.pinned_sk_lookup_cookies()? {
            if !cookies.contains(&cookie) {
                self.dp.detach_sk_lookup(cookie)?;
                swept += 1;
            }
        }
        if swept > 0 {
            tracing::info!(entries = swept, "removed stale datapath state");
        }
        Ok(())
    }

    fn sync_probe_sources(&mut self, sources: &[IpAddr]) -> Result<(), DatapathError> {
        let want: HashSet<IpKey> = sources.iter().map(|ip| ip_key(*ip)).collect();
        let have: Vec<IpKey> = self.probe_sources.keys().filter_map(Result::ok).collect();
        let err = map_err(maps::PROBE_SOURCES);
        for key in have.iter().filter(|k| !want.contains(k)) {
            self.probe_sources.remove(key).map_err(&err)?;
        }
        for key in want.iter().filter(|k| !have.contains(k)) {
            self.probe_sources.insert(key, &1, 0).map_err(&err)?;
        }
        Ok(())
    }
}

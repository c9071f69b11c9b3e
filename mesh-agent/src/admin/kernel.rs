//! The kernel's view, read from the pinned maps at the time of asking (a
//! scrape, a `/stats` or `/config_dump` request): the programs' counters,
//! how full the maps are, and which pod addresses are enrolled. Maps are
//! opened from their pins on every read, so a reinstalled datapath is never
//! read through a stale descriptor.

use std::{fmt, net::IpAddr, path::PathBuf};

use aya::maps::{HashMap, Map, MapData, MapInfo};
use mesh_common::{IpKey, PodSlot, PortKey, TupleKey, maps};

use crate::datapath::{DatapathError, counters::Counters, ip_from_key};

/// How full one map is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapOccupancy {
    /// The map's name.
    pub map: &'static str,
    /// Entries in it now.
    pub entries: u64,
    /// Its `max_entries`.
    pub capacity: u64,
}

/// An enrolled pod address as the kernel has it (`POD_ADDRS`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KernelPodAddr {
    /// The pod's address.
    pub ip: IpAddr,
    /// The pod's listener slot.
    pub slot: u32,
    /// The cookie of the pod's network namespace.
    pub netns_cookie: u64,
}

/// A reader of the kernel's state. [`PinnedKernel`] reads the agent's pins;
/// tests use fixed readings.
pub trait KernelSource: Send + Sync + fmt::Debug + 'static {
    /// Every counter of the kernel programs (name, value summed over CPUs).
    fn counters(&self) -> Result<Vec<(&'static str, u64)>, DatapathError>;
    /// Occupancy of the maps that are cheap to count.
    fn occupancy(&self) -> Vec<MapOccupancy>;
    /// The enrolled pod addresses.
    fn pod_addrs(&self) -> Result<Vec<KernelPodAddr>, DatapathError>;
}

/// Reads the maps pinned under an agent's pin directory.
#[derive(Clone, Debug)]
pub struct PinnedKernel {
    pin_dir: PathBuf,
}

impl PinnedKernel {
    /// Reads the pins under `pin_dir`.
    pub fn new(pin_dir: PathBuf) -> Self {
        Self { pin_dir }
    }

    fn open(&self, name: &'static str) -> Result<MapData, DatapathError> {
        let path = self.pin_dir.join("maps").join(name);
        MapData::from_pin(&path).map_err(|e| DatapathError::Pinned {
            path,
            message: e.to_string(),
        })
    }

    /// Entries and capacity of the hash map `name`; `lru` for LRU maps.
    fn count<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
        lru: bool,
    ) -> Result<MapOccupancy, DatapathError> {
        let data = self.open(name)?;
        let capacity = data
            .info()
            .map(|i: MapInfo| u64::from(i.max_entries()))
            .unwrap_or(0);
        let map = if lru {
            Map::LruHashMap(data)
        } else {
            Map::HashMap(data)
        };
        let map: HashMap<MapData, K, V> =
            HashMap::try_from(map).map_err(|e| DatapathError::Map {
                map: name,
                message: e.to_string(),
            })?;
        let entries = map.keys().filter(Result::is_ok).count() as u64;
        Ok(MapOccupancy {
            map: name,
            entries,
            capacity,
        })
    }
}

impl KernelSource for PinnedKernel {
    fn counters(&self) -> Result<Vec<(&'static str, u64)>, DatapathError> {
        Counters::open_pinned(&self.pin_dir)?.read()
    }

    fn occupancy(&self) -> Vec<MapOccupancy> {
        // The socket-keyed LRU (SOCK_ORIG_DST) can hold 64k entries: too
        // many syscalls for a scrape. ORIG_DST_BY_TUPLE is drained by the
        // agent, so it stays small unless something leaks.
        [
            self.count::<u64, PodSlot>(maps::ENROLLED_NETNS, false),
            self.count::<IpKey, PodSlot>(maps::POD_ADDRS, false),
            self.count::<PortKey, u8>(maps::EXCLUDED_PORTS, false),
            self.count::<IpKey, u8>(maps::PROBE_SOURCES, false),
            self.count::<TupleKey, mesh_common::OrigDst>(maps::ORIG_DST_BY_TUPLE, true),
        ]
        .into_iter()
        .filter_map(|r| {
            r.map_err(|e| tracing::debug!(error = %e, "cannot count map entries"))
                .ok()
        })
        .collect()
    }

    fn pod_addrs(&self) -> Result<Vec<KernelPodAddr>, DatapathError> {
        let map: HashMap<MapData, IpKey, PodSlot> =
            HashMap::try_from(Map::HashMap(self.open(maps::POD_ADDRS)?)).map_err(|e| {
                DatapathError::Map {
                    map: maps::POD_ADDRS,
                    message: e.to_string(),
                }
            })?;
        let mut out: Vec<KernelPodAddr> = map
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| KernelPodAddr {
                ip: ip_from_key(&k),
                slot: v.slot,
                netns_cookie: v.netns_cookie,
            })
            .collect();
        out.sort_by_key(|p| (p.slot, p.ip));
        Ok(out)
    }
}

/// The kernel counters as a JSON object (`{"connect_redirected": 3, …}`).
pub fn counters_json(kernel: &dyn KernelSource) -> serde_json::Value {
    match kernel.counters() {
        Ok(reading) => serde_json::Value::Object(
            reading
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.into()))
                .collect(),
        ),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    }
}

//! The kernel programs' counters (per-CPU array `COUNTERS`), summed over CPUs.
//! Readable from a running agent or straight from the pinned map, so
//! `mesh-agent stats` works even while no agent runs.
#![forbid(unsafe_code)]

use std::path::Path;

use aya::maps::{Map, MapData, PerCpuArray};
use mesh_common::{Counter, maps};

use super::error::DatapathError;

/// A reader of the counters map.
pub struct Counters {
    map: PerCpuArray<MapData, u64>,
}

/// One reading: every counter's name and value, in index order.
pub type Reading = Vec<(&'static str, u64)>;

impl Counters {
    /// Opens the pinned counters map under the agent's pin directory.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, DatapathError> {
        let path = pin_dir.join("maps").join(maps::COUNTERS);
        let data = MapData::from_pin(&path).map_err(|e| DatapathError::Pinned {
            path: path.clone(),
            message: format!("{e}: is an agent installed with this --pin-dir?"),
        })?;
        let map =
            PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(|e| DatapathError::Pinned {
                path,
                message: e.to_string(),
            })?;
        Ok(Self { map })
    }

    /// Reads every counter, summed over CPUs.
    pub fn read(&self) -> Result<Reading, DatapathError> {
        Counter::ALL
            .iter()
            .map(|c| {
                let values = self
                    .map
                    .get(&(*c as u32), 0)
                    .map_err(|e| DatapathError::Map {
                        map: maps::COUNTERS,
                        message: e.to_string(),
                    })?;
                Ok((
                    c.name(),
                    values.iter().copied().fold(0u64, u64::wrapping_add),
                ))
            })
            .collect()
    }
}

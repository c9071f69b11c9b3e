//! Which network namespace a pod may be enrolled in: not the agent's or the
//! host's (reserved), and not one another pod claims (the kernel knows a
//! netns by its cookie only, so one netns cannot carry two identities).
#![forbid(unsafe_code)]

use std::collections::HashMap;

use super::EnrollError;
use crate::{
    datapath::netns::{NetnsId, ReservedNetns},
    state::{Workload, WorkloadKey},
};

/// The netns each pod arriving in this pass names.
pub(super) type Claims<'a> = HashMap<NetnsId, Vec<&'a WorkloadKey>>;

/// Refuses the netns `id` for pod `key` if it is reserved (the agent's, the
/// host's), enrolled for another pod (`enrolled`: each enrolled pod with its
/// netns), or claimed by another pod of this pass (`claims`).
pub(super) fn check<'a>(
    reserved: &ReservedNetns,
    enrolled: impl IntoIterator<Item = (&'a WorkloadKey, NetnsId)>,
    claims: &Claims<'_>,
    key: &WorkloadKey,
    w: &Workload,
    id: NetnsId,
) -> Result<(), EnrollError> {
    if let Some(what) = reserved.reserved(id) {
        return Err(EnrollError::ReservedNetns {
            path: w.netns.clone(),
            id,
            what,
        });
    }
    let enrolled = enrolled
        .into_iter()
        .find(|(k, netns)| *k != key && *netns == id)
        .map(|(k, _)| k);
    let arriving = claims
        .get(&id)
        .and_then(|keys| keys.iter().find(|k| **k != key).copied());
    match enrolled.or(arriving) {
        Some(other) => Err(EnrollError::SharedNetns {
            path: w.netns.clone(),
            id,
            other: other.clone(),
        }),
        None => Ok(()),
    }
}

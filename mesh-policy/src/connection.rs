//! What the store is asked about: the destination workload and the
//! inbound connection, as the caller knows them.

use std::collections::BTreeMap;
use std::net::IpAddr;

/// The workload a connection is for (the destination pod).
#[derive(Debug, Clone, Copy)]
pub struct WorkloadRef<'a> {
    /// Its namespace.
    pub namespace: &'a str,
    /// Its pod labels.
    pub labels: &'a BTreeMap<String, String>,
}

/// What is known of an inbound connection. Borrowed, so a decision
/// allocates nothing unless an AUDIT policy matches.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// The verified peer identity, as a SPIFFE ID with or without the
    /// `spiffe://` scheme (`cluster.local/ns/default/sa/sleep`); `None` for
    /// plaintext. The source namespace and service account are read from it
    /// (`<trust domain>/ns/<namespace>/sa/<service account>`).
    pub source_principal: Option<&'a str>,
    /// The direct peer's address (`ipBlocks`, `source.ip`). A v4-mapped v6
    /// address (a dual-stack listener's view of a v4 peer) is treated as v4.
    pub source_ip: IpAddr,
    /// The original client address when the transport carries one that the
    /// agent trusts (`remoteIpBlocks`, `remote.ip`); `None`: the direct
    /// peer's address, as Istio does for a TCP connection without PROXY
    /// protocol or `X-Forwarded-For`.
    pub remote_ip: Option<IpAddr>,
    /// The address the client dialled (`destination.ip`).
    pub destination_ip: IpAddr,
    /// The workload port the client dialled (`ports`, `destination.port`,
    /// `portLevelMtls`).
    pub destination_port: u16,
}

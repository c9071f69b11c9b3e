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

/// What a waypoint knows of an HTTP request, for the L7 fields of a policy
/// (`methods`, `paths`, `hosts`, `when: request.headers[...]`).
#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    /// The method, as sent (`GET`).
    pub method: &'a str,
    /// The path, normalised by [`normalize_path`] and without its query.
    pub path: &'a str,
    /// The authority (`:authority` or `Host`), possibly with a port.
    pub host: &'a str,
    /// The request headers: lowercase names, values as sent.
    pub headers: &'a [(String, String)],
}

impl HttpRequest<'_> {
    /// The value of header `name` (lowercase); several are joined with
    /// `,`, as Envoy's header matchers see them.
    pub fn header(&self, name: &str) -> Option<String> {
        let mut values = self
            .headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str());
        let first = values.next()?;
        Some(values.fold(first.to_owned(), |mut acc, v| {
            acc.push(',');
            acc.push_str(v);
            acc
        }))
    }
}

/// Normalises a request path as Istio's default `pathNormalization: BASE`
/// (Envoy's `normalize_path`, RFC 3986) does before policies see it: the
/// query is dropped, `\` becomes `/`, percent-encoded unreserved
/// characters (`A-Z a-z 0-9 - . _ ~`) are decoded (other escapes, such as
/// `%2F`, stay encoded, hex in upper case), and `.`/`..` segments are
/// removed. `None` for a path Envoy would refuse with 400: not starting
/// with `/`, a malformed escape, or a control character or space.
pub fn normalize_path(raw: &str) -> Option<String> {
    let path = raw.split_once('?').map_or(raw, |(p, _)| p);
    let path = path.split_once('#').map_or(path, |(p, _)| p);
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') && bytes.first() != Some(&b'\\') {
        return None;
    }
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let v = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
                if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
                    decoded.push(char::from(v));
                } else {
                    decoded.push('%');
                    decoded.push_str(&format!("{v:02X}"));
                }
                i += 3;
                continue;
            }
            b'\\' => decoded.push('/'),
            0..=0x20 | 0x7f => return None,
            _ => {
                // Multi-byte UTF-8 is copied whole below.
                let ch = path[i..].chars().next()?;
                decoded.push(ch);
                i += ch.len_utf8();
                continue;
            }
        }
        i += 1;
    }
    // RFC 3986 5.2.4 on the segments.
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    Some(format!("/{}", out.join("/")))
}

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
/// does before policies see it (Envoy's `normalize_path`: RFC 3986 by
/// Chromium's URL canonicaliser, and `\` as `/`): the query is dropped;
/// percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are
/// decoded, other escapes (`%2F`, `%5C`) kept as written, a `%` not
/// followed by two hex digits kept as is; `"`, `<`, `>`, `` ` ``, `{`,
/// `}` and non-ASCII bytes are percent-encoded; `.` and `..` segments
/// are removed. `//` is kept (that is `MERGE_SLASHES`). `None` for a
/// path Envoy answers 400: not starting with `/`, `%00`, a control
/// character or a space.
pub fn normalize_path(raw: &str) -> Option<String> {
    let path = raw.split_once('?').map_or(raw, |(p, _)| p);
    let path = path.split_once('#').map_or(path, |(p, _)| p);
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') && bytes.first() != Some(&b'\\') {
        return None;
    }
    let hex = |b: u8| char::from_digit(u32::from(b), 16).map(|c| c.to_ascii_uppercase());
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        i += 1;
        match b {
            b'%' => {
                let escape = bytes
                    .get(i..i + 2)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok().map(|v| (h, v)));
                match escape {
                    Some((_, 0)) => return None,
                    Some((_, v))
                        if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') =>
                    {
                        decoded.push(char::from(v));
                        i += 2;
                    }
                    Some((h, _)) => {
                        decoded.push('%');
                        decoded.push_str(h);
                        i += 2;
                    }
                    // Not an escape: kept, as Chromium does.
                    None => decoded.push('%'),
                }
            }
            b'\\' => decoded.push('/'),
            0..=0x20 | 0x7f => return None,
            b'"' | b'<' | b'>' | b'`' | b'{' | b'}' | 0x80.. => {
                decoded.push('%');
                decoded.extend([hex(b >> 4)?, hex(b & 0xf)?]);
            }
            _ => decoded.push(char::from(b)),
        }
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

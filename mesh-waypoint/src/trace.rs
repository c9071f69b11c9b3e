//! W3C Trace Context (`traceparent`) propagation: the waypoint is one hop
//! of the trace, as Envoy is in an Istio waypoint: a request's trace id and
//! flags are kept and the parent id becomes the waypoint's own span id; a
//! request without a valid `traceparent` starts a trace. `tracestate`
//! passes through untouched. (Exporting the spans over OTLP is not done yet.)

use http::{HeaderMap, HeaderValue};

/// The header.
pub const TRACEPARENT: &str = "traceparent";

/// A trace id and the flags of a valid `traceparent`.
fn parse(value: &str) -> Option<(&str, &str)> {
    let mut parts = value.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    // Version 00 has exactly four fields; later versions may add more; ff is invalid.
    let fields_ok = version != "00" || parts.next().is_none();
    (hex(version, 2)
        && version != "ff"
        && fields_ok
        && hex(trace, 32)
        && nonzero(trace)
        && hex(parent, 16)
        && nonzero(parent)
        && hex(flags, 2))
    .then_some((trace, flags))
}

fn random_hex(bytes: usize) -> String {
    let mut s = String::with_capacity(bytes * 2);
    while s.len() < bytes * 2 {
        // A zero id is invalid: never produced (the top bit is set).
        s.push_str(&format!("{:016x}", fastrand::u64(..) | (1 << 63)));
    }
    s.truncate(bytes * 2);
    s
}

/// Replaces the request's `traceparent` with the waypoint's span (a child
/// of the incoming one, or a new trace); returns the trace id.
pub fn propagate(headers: &mut HeaderMap) -> String {
    let incoming = headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse)
        .map(|(t, f)| (t.to_owned(), f.to_owned()));
    let (trace, flags) = incoming.unwrap_or_else(|| (random_hex(16), "01".to_owned()));
    let value = format!("00-{trace}-{}-{flags}", random_hex(8));
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(TRACEPARENT, v);
    }
    trace
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_parent_keeps_its_trace_and_gets_a_new_span() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(SAMPLE));
        let trace = propagate(&mut h);
        assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
        let out = h[TRACEPARENT].to_str().expect("ascii").to_owned();
        assert!(
            out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{out}"
        );
        assert!(out.ends_with("-01"), "{out}");
        assert_ne!(out, SAMPLE);
        assert!(parse(&out).is_some());
    }

    #[test]
    fn invalid_or_missing_parents_start_a_trace() {
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            let mut h = HeaderMap::new();
            if !bad.is_empty() {
                h.insert(TRACEPARENT, HeaderValue::from_static(bad));
            }
            let trace = propagate(&mut h);
            assert_ne!(trace, "4bf92f3577b34da6a3ce929d0e0e4736", "{bad}");
            let out = h[TRACEPARENT].to_str().expect("ascii");
            assert!(parse(out).is_some(), "{bad} -> {out}");
        }
    }
}

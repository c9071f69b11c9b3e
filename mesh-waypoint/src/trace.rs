//! W3C Trace Context (`traceparent`) propagation: the waypoint is one hop
//! of the trace, as Envoy is in an Istio waypoint: a request's trace id and
//! flags are kept and the parent id becomes the waypoint's own span id; a
//! request without a valid `traceparent` starts a trace. `tracestate`
//! passes through untouched. The span is exported over OTLP when the
//! waypoint has a collector ([`crate::otlp`]) and the trace is sampled.

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

/// The waypoint's span of one request: its ids in the W3C hex form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    /// The trace id (32 hex digits): the incoming one, or a new trace's.
    pub trace_id: String,
    /// The waypoint's own span id (16 hex digits), new per request.
    pub span_id: String,
    /// The caller's span id, when the request came with a valid `traceparent`.
    pub parent_id: Option<String>,
    /// The trace flags (2 hex digits), kept from the caller; `01` for a new trace.
    pub flags: String,
}

impl Span {
    /// The span of a request with `headers`: a child of their valid
    /// `traceparent`, else the root of a new, sampled trace.
    pub fn start(headers: &HeaderMap) -> Self {
        let incoming = headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Some((parse(v)?, v.trim().split('-').nth(2)?)));
        match incoming {
            Some(((trace, flags), parent)) => Self {
                trace_id: trace.to_owned(),
                span_id: random_hex(8),
                parent_id: Some(parent.to_owned()),
                flags: flags.to_owned(),
            },
            None => Self {
                trace_id: random_hex(16),
                span_id: random_hex(8),
                parent_id: None,
                flags: "01".to_owned(),
            },
        }
    }

    /// The `sampled` flag (bit 0 of the flags): the caller asks for the
    /// trace to be recorded.
    pub fn sampled(&self) -> bool {
        u8::from_str_radix(&self.flags, 16).is_ok_and(|f| f & 1 == 1)
    }

    /// Replaces the request's `traceparent` with this span's.
    pub fn inject(&self, headers: &mut HeaderMap) {
        let value = format!("00-{}-{}-{}", self.trace_id, self.span_id, self.flags);
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(TRACEPARENT, v);
        }
    }
}

/// Replaces the request's `traceparent` with the waypoint's span (a child
/// of the incoming one, or a new trace); returns the span.
pub fn propagate(headers: &mut HeaderMap) -> Span {
    let span = Span::start(headers);
    span.inject(headers);
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_parent_keeps_its_trace_and_gets_a_new_span() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(SAMPLE));
        let span = propagate(&mut h);
        assert_eq!(span.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(span.parent_id.as_deref(), Some("00f067aa0ba902b7"));
        assert!(span.sampled());
        let out = h[TRACEPARENT].to_str().expect("ascii").to_owned();
        assert!(
            out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{out}"
        );
        assert!(out.ends_with("-01"), "{out}");
        assert_ne!(out, SAMPLE);
        assert!(parse(&out).is_some());
        assert_eq!(out.split('-').nth(2), Some(span.span_id.as_str()));
    }

    #[test]
    fn the_sampled_flag_is_bit_zero_of_the_callers_flags() {
        for (flags, sampled) in [("00", false), ("01", true), ("02", false), ("03", true)] {
            let mut h = HeaderMap::new();
            let v = format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}");
            h.insert(TRACEPARENT, HeaderValue::from_str(&v).expect("ascii"));
            let span = propagate(&mut h);
            assert_eq!(span.sampled(), sampled, "{flags}");
            assert!(h[TRACEPARENT].to_str().expect("ascii").ends_with(flags));
        }
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
            let span = propagate(&mut h);
            assert_ne!(span.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736", "{bad}");
            assert_eq!(span.parent_id, None, "{bad}");
            assert!(span.sampled(), "a new trace is sampled");
            let out = h[TRACEPARENT].to_str().expect("ascii");
            assert!(parse(out).is_some(), "{bad} -> {out}");
        }
    }
}

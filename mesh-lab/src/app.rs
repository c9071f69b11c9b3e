//! The pure pieces of `mesh-lab-app` (the application run inside lab pods),
//! shared with the tests that read its output: the data pattern, the error
//! kinds and the JSON reports.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::process::Output;
use std::str::FromStr;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// A deterministic byte stream (SplitMix64), seeded by a connection index:
/// what `client` sends on connection `i` is `Pattern::new(i)`.
#[derive(Debug, Clone)]
pub struct Pattern {
    state: u64,
    buf: [u8; 8],
    pos: usize,
}

impl Pattern {
    /// The stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed,
            buf: [0; 8],
            pos: 8,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)).to_le_bytes()
    }

    /// Fills `out` with the next `out.len()` bytes of the stream. How the
    /// stream is cut into calls does not change the bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut i = 0;
        while i < out.len() && self.pos < 8 {
            out[i] = self.buf[self.pos];
            self.pos += 1;
            i += 1;
        }
        let (words, rest) = out[i..].as_chunks_mut::<8>();
        for word in words {
            *word = self.next_word();
        }
        if !rest.is_empty() {
            self.buf = self.next_word();
            let n = rest.len();
            rest.copy_from_slice(&self.buf[..n]);
            self.pos = n;
        }
    }

    /// The first `len` bytes for `seed`.
    pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        Self::new(seed).fill(&mut v);
        v
    }
}

/// Compares a received stream, chunk by chunk, with the pattern that was sent.
#[derive(Debug, Clone)]
pub struct PatternChecker {
    pattern: Pattern,
    expected: Vec<u8>,
    received: u64,
    mismatch: bool,
}

impl PatternChecker {
    /// A checker for the stream of `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            pattern: Pattern::new(seed),
            expected: Vec::new(),
            received: 0,
            mismatch: false,
        }
    }

    /// Feeds the next received bytes; returns false once any byte differed.
    pub fn feed(&mut self, data: &[u8]) -> bool {
        self.expected.resize(data.len(), 0);
        self.pattern.fill(&mut self.expected);
        self.received += data.len() as u64;
        if self.expected != data {
            self.mismatch = true;
        }
        !self.mismatch
    }

    /// Bytes fed so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Whether exactly `sent` bytes were fed and every one matched.
    pub fn matches(&self, sent: u64) -> bool {
        !self.mismatch && self.received == sent
    }
}

/// The error kind reported for an I/O error: `refused`, `reset`, `timeout` or
/// `other:<slug>` (for example `other:host_unreachable`).
pub fn error_kind(e: &io::Error) -> String {
    use io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => "refused".to_owned(),
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => "reset".to_owned(),
        K::TimedOut | K::WouldBlock => "timeout".to_owned(),
        K::Other => format!("other:{}", slug(&e.to_string())),
        kind => {
            // Errors std has no stable kind for are "Uncategorized": use the text.
            let name = format!("{kind:?}");
            if name == "Uncategorized" {
                format!("other:{}", slug(&e.to_string()))
            } else {
                format!("other:{}", slug(&name))
            }
        }
    }
}

/// Lower-case `snake_case` of `text` (CamelCase split, anything else to `_`),
/// at most 60 bytes, so that it stays one word.
pub fn slug(text: &str) -> String {
    let mut out = String::new();
    let mut prev_lower = false;
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            if c.is_ascii_uppercase() && prev_lower {
                out.push('_');
            }
            prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
            out.push(c.to_ascii_lowercase());
        } else {
            if !out.is_empty() && !out.ends_with('_') {
                out.push('_');
            }
            prev_lower = false;
        }
    }
    let mut s = out.trim_end_matches('_').to_owned();
    s.truncate(60);
    if s.is_empty() {
        "unknown".to_owned()
    } else {
        s
    }
}

/// What `mesh-lab-app client` prints (one JSON object on stdout).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientReport {
    /// Connections whose echo came back byte-exact.
    pub ok: u64,
    /// Connections that failed.
    pub failed: u64,
    /// Failures by kind: `refused`, `reset`, `timeout`, `mismatch`, `other:<text>`.
    pub errors: BTreeMap<String, u64>,
    /// The distinct `getpeername()` values seen (sorted).
    pub peer_addrs: Vec<String>,
    /// Up to 5 `getsockname()` samples.
    pub local_addrs: Vec<String>,
    /// Bytes written by all connections.
    pub bytes_sent: u64,
    /// Bytes read back by all connections.
    pub bytes_received: u64,
    /// Wall time of the whole run.
    pub elapsed_ms: u64,
    /// With `--greeting`: the distinct `peer=` addresses the server reported
    /// seeing as the client (sorted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub greeting_peers: Option<Vec<String>>,
}

impl ClientReport {
    /// Parses the report from a `client` run's output (the last JSON line of
    /// stdout); the error shows stdout and stderr.
    pub fn from_output(out: &Output) -> Result<Self> {
        parse_last_json_line(out)
    }
}

/// The `client` flags for a held burst: `conns` connections opened at once,
/// each sending 64 bytes and, after the echo, staying open `hold_ms` before
/// it closes; a connection not served within 30 s fails as a timeout.
pub fn held_burst_args(conns: u64, hold_ms: u64) -> Vec<String> {
    let conns = conns.to_string();
    [
        "--conns",
        &conns,
        "--concurrency",
        &conns,
        "--bytes",
        "64",
        "--hold-ms",
        &hold_ms.to_string(),
        "--timeout-ms",
        "30000",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// What `mesh-lab-app hold` prints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldReport {
    /// Rounds whose message came back intact.
    pub rounds_ok: u64,
    /// Why the connection ended early (`refused`, `reset`, `timeout`,
    /// `closed`, `mismatch`, `other:<text>`), or null if it lasted.
    pub error: Option<String>,
}

impl HoldReport {
    /// Parses the report from a `hold` run's output.
    pub fn from_output(out: &Output) -> Result<Self> {
        parse_last_json_line(out)
    }
}

/// What `mesh-lab-app flow` prints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowReport {
    /// Bytes sent or received.
    pub bytes: u64,
    /// How the stream ended: `eof` (the peer's clean FIN), `sent` (all bytes
    /// sent), `reset`, `broken_pipe`, `timeout`, `closed`, `other:<text>`.
    pub end: String,
}

impl FlowReport {
    /// Parses the report from a `flow` run's output.
    pub fn from_output(out: &Output) -> Result<Self> {
        parse_last_json_line(out)
    }
}

fn parse_last_json_line<T: for<'de> Deserialize<'de>>(out: &Output) -> Result<T> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'));
    line.and_then(|l| serde_json::from_str(l).ok())
        .with_context(|| {
            format!(
                "no JSON report in the output ({}); stdout:\n{stdout}\nstderr:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// The one word `mesh-lab-app probe` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// Connected, sent the text and read it back.
    Echoed,
    /// Connected, then end of stream before any reply.
    Connected,
    /// Connection refused.
    Refused,
    /// Reset (at connect, while writing or while reading).
    Reset,
    /// No answer within the timeout.
    Timeout,
    /// Anything else: `error:<slug>` (for example `error:mismatch`).
    Error(String),
}

impl ProbeOutcome {
    /// The outcome for an I/O error.
    pub fn from_io(e: &io::Error) -> Self {
        match error_kind(e).as_str() {
            "refused" => Self::Refused,
            "reset" => Self::Reset,
            "timeout" => Self::Timeout,
            other => Self::Error(other.strip_prefix("other:").unwrap_or(other).to_owned()),
        }
    }

    /// Parses the word from a `probe` run's output.
    pub fn from_output(out: &Output) -> Result<Self> {
        let stdout = String::from_utf8_lossy(&out.stdout);
        stdout.trim().parse().with_context(|| {
            format!(
                "probe printed {stdout:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }
}

impl fmt::Display for ProbeOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Echoed => f.write_str("echoed"),
            Self::Connected => f.write_str("connected"),
            Self::Refused => f.write_str("refused"),
            Self::Reset => f.write_str("reset"),
            Self::Timeout => f.write_str("timeout"),
            Self::Error(text) => write!(f, "error:{text}"),
        }
    }
}

impl FromStr for ProbeOutcome {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "echoed" => Self::Echoed,
            "connected" => Self::Connected,
            "refused" => Self::Refused,
            "reset" => Self::Reset,
            "timeout" => Self::Timeout,
            other => match other.strip_prefix("error:") {
                Some(text) => Self::Error(text.to_owned()),
                None => anyhow::bail!("not a probe outcome: {other:?}"),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_deterministic_and_split_independent() {
        let whole = Pattern::bytes(7, 1000);
        assert_eq!(whole, Pattern::bytes(7, 1000));
        assert_ne!(whole, Pattern::bytes(8, 1000));
        assert_eq!(&Pattern::bytes(7, 13)[..], &whole[..13]);
        let mut p = Pattern::new(7);
        let mut pieces = Vec::new();
        for len in [1usize, 3, 8, 0, 5, 16, 7, 9, 951] {
            let mut chunk = vec![0; len];
            p.fill(&mut chunk);
            pieces.extend_from_slice(&chunk);
        }
        assert_eq!(pieces, whole);
        // Not trivially constant.
        assert!(whole.iter().collect::<std::collections::HashSet<_>>().len() > 200);
    }

    #[test]
    fn checker_detects_mismatch_and_length() {
        let data = Pattern::bytes(3, 100);
        let mut c = PatternChecker::new(3);
        assert!(c.feed(&data[..40]));
        assert!(c.feed(&data[40..]));
        assert!(c.matches(100));
        assert!(!c.matches(101));

        let mut bad = data.clone();
        bad[50] ^= 1;
        let mut c = PatternChecker::new(3);
        assert!(!c.feed(&bad));
        assert!(!c.matches(100));
    }

    #[test]
    fn error_kinds() {
        let k = |kind| error_kind(&io::Error::from(kind));
        assert_eq!(k(io::ErrorKind::ConnectionRefused), "refused");
        assert_eq!(k(io::ErrorKind::ConnectionReset), "reset");
        assert_eq!(k(io::ErrorKind::BrokenPipe), "reset");
        assert_eq!(k(io::ErrorKind::WouldBlock), "timeout");
        assert_eq!(k(io::ErrorKind::HostUnreachable), "other:host_unreachable");
        assert_eq!(
            error_kind(&io::Error::other("Bad thing: x")),
            "other:bad_thing_x"
        );
        assert_eq!(slug("  "), "unknown");
    }

    #[test]
    fn client_report_json_shape() {
        let mut r = ClientReport {
            ok: 2,
            failed: 1,
            ..Default::default()
        };
        r.errors.insert("refused".into(), 1);
        r.peer_addrs.push("198.18.1.10:8080".into());
        let v: serde_json::Value = serde_json::to_value(&r).expect("serializes");
        let mut keys: Vec<&str> = v
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "bytes_received",
                "bytes_sent",
                "elapsed_ms",
                "errors",
                "failed",
                "local_addrs",
                "ok",
                "peer_addrs"
            ]
        );
        assert_eq!(v["errors"]["refused"], 1);
        let out = Output {
            status: std::process::ExitStatus::default(),
            stdout: format!("noise\n{v}\n").into_bytes(),
            stderr: Vec::new(),
        };
        assert_eq!(ClientReport::from_output(&out).expect("parses"), r);
    }

    #[test]
    fn flow_report_json_shape() {
        let r = FlowReport {
            bytes: 42,
            end: "reset".to_owned(),
        };
        let text = serde_json::to_string(&r).expect("serializes");
        assert_eq!(text, r#"{"bytes":42,"end":"reset"}"#);
        assert_eq!(
            serde_json::from_str::<FlowReport>(&text).expect("parses"),
            r
        );
    }

    #[test]
    fn hold_report_json_shape() {
        let r = HoldReport {
            rounds_ok: 3,
            error: None,
        };
        assert_eq!(
            serde_json::to_string(&r).expect("serializes"),
            r#"{"rounds_ok":3,"error":null}"#
        );
    }

    #[test]
    fn probe_words_round_trip() {
        for o in [
            ProbeOutcome::Echoed,
            ProbeOutcome::Connected,
            ProbeOutcome::Refused,
            ProbeOutcome::Reset,
            ProbeOutcome::Timeout,
            ProbeOutcome::Error("mismatch".into()),
        ] {
            assert_eq!(o.to_string().parse::<ProbeOutcome>().expect("parses"), o);
        }
        assert!("nonsense".parse::<ProbeOutcome>().is_err());
    }
}

/// What `mesh-lab-http load` prints: keep-alive HTTP/1.1 requests from a
/// fixed number of connections, each answer counted by status and by the
/// `x-backend` header of the server that answered.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpLoadReport {
    /// Requests sent.
    pub requests: u64,
    /// Answers by status code (`"200"`, `"503"`...).
    pub statuses: BTreeMap<String, u64>,
    /// Requests that got no answer, by error kind.
    pub errors: BTreeMap<String, u64>,
    /// Answers by their `x-backend` header (`-` when absent).
    pub backends: BTreeMap<String, u64>,
    /// Wall time of the run.
    pub elapsed_ms: u64,
    /// Answered requests per second.
    pub per_s: f64,
    /// Median latency of the answered requests, in microseconds.
    pub p50_us: u64,
    /// 99th percentile latency of the answered requests, in microseconds.
    pub p99_us: u64,
}

impl HttpLoadReport {
    /// Parses the report from a `load` run's output.
    pub fn from_output(out: &Output) -> Result<Self> {
        parse_last_json_line(out)
    }

    /// Answers with status `code`.
    pub fn status(&self, code: u16) -> u64 {
        self.statuses.get(&code.to_string()).copied().unwrap_or(0)
    }
}

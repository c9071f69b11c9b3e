//! A tiny HTTP/1.1 client for the agent's admin endpoint: one `GET` per
//! connection (`Connection: close`), blocking, with timeouts. Enough for
//! the diagnostics subcommands; no dependency on a client stack.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, ToSocketAddrs as _},
    time::Duration,
};

/// How long to wait for the agent to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to wait for the agent's answer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer accepted (a config dump of many pods stays far below).
const MAX_RESPONSE: u64 = 64 << 20;

/// Why a request to the agent failed, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address does not parse or resolve.
    #[error(
        "invalid admin address {addr:?}: {reason} (expected HOST:PORT, for example 127.0.0.1:15000)"
    )]
    Address {
        /// What was given.
        addr: String,
        /// Why it is unusable.
        reason: String,
    },
    /// Nothing listens there.
    #[error(
        "no agent is answering on {addr}: is mesh-agent running on this node? (run the command inside the node's network namespace)"
    )]
    NoAgent {
        /// The address tried.
        addr: SocketAddr,
    },
    /// The connection failed midway.
    #[error("cannot talk to the agent on {addr}: {source}")]
    Io {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The answer is not HTTP as the agent speaks it.
    #[error(
        "the agent on {addr} sent a malformed answer ({reason}): is something other than mesh-agent listening there?"
    )]
    Malformed {
        /// The address.
        addr: SocketAddr,
        /// What is wrong.
        reason: String,
    },
    /// The agent answered with an error status.
    #[error("the agent on {addr} answered {path} with {status}: {body}")]
    Status {
        /// The address.
        addr: SocketAddr,
        /// The path asked for.
        path: String,
        /// HTTP status.
        status: u16,
        /// The body (the agent's error message).
        body: String,
    },
    /// The answer is not the JSON expected.
    #[error(
        "the agent on {addr} answered {path} with JSON this CLI cannot read ({source}): are the CLI and the agent the same version?"
    )]
    Json {
        /// The address.
        addr: SocketAddr,
        /// The path asked for.
        path: String,
        /// The error.
        source: serde_json::Error,
    },
}

/// Resolves `HOST:PORT` to its first address.
pub fn resolve(addr: &str) -> Result<SocketAddr, ClientError> {
    let err = |reason: String| ClientError::Address {
        addr: addr.to_owned(),
        reason,
    };
    addr.to_socket_addrs()
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("it resolves to no address".into()))
}

/// `GET path` on the agent at `addr`; the status and body.
pub fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), ClientError> {
    request(addr, "GET", path)
}

/// `method path` on the agent at `addr` (no request body); the status and body.
pub fn request(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String), ClientError> {
    let io = |source| ClientError::Io { addr, source };
    let mut stream = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
                    | std::io::ErrorKind::AddrNotAvailable
            ) =>
        {
            return Err(ClientError::NoAgent { addr });
        }
        Err(e) => return Err(io(e)),
    };
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: mesh-agent-cli\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut raw = Vec::new();
    stream
        .take(MAX_RESPONSE)
        .read_to_end(&mut raw)
        .map_err(io)?;
    parse_response(&raw).map_err(|reason| ClientError::Malformed { addr, reason })
}

/// `GET path` expecting 200 and a JSON body.
pub fn get_json(addr: SocketAddr, path: &str) -> Result<serde_json::Value, ClientError> {
    let (status, body) = get(addr, path)?;
    if status != 200 {
        return Err(ClientError::Status {
            addr,
            path: path.to_owned(),
            status,
            body: error_message(&body),
        });
    }
    serde_json::from_str(&body).map_err(|source| ClientError::Json {
        addr,
        path: path.to_owned(),
        source,
    })
}

/// The `error` member of a JSON error body, else the body itself.
pub fn error_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_else(|| body.trim().to_owned())
}

/// Parses an HTTP/1.x response: status and body (by `Content-Length`,
/// chunked, or to the end).
pub fn parse_response(raw: &[u8]) -> Result<(u16, String), String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "headers are not UTF-8")?;
    let mut body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("empty answer")?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1 status line: {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status code in {status_line:?}"))?;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            let len: usize = value
                .parse()
                .map_err(|_| format!("bad Content-Length {value:?}"))?;
            body = body
                .get(..len)
                .ok_or("the answer is shorter than its Content-Length")?;
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.eq_ignore_ascii_case("chunked")
        {
            chunked = true;
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    let body = String::from_utf8(body).map_err(|_| "the body is not UTF-8")?;
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size = std::str::from_utf8(&data[..eol]).map_err(|_| "bad chunk size")?;
        let size = size.split(';').next().unwrap_or_default().trim();
        let size =
            usize::from_str_radix(size, 16).map_err(|_| format!("bad chunk size {size:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(data.get(..size).ok_or("truncated chunk")?);
        data = data.get(size + 2..).ok_or("truncated chunk")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_length_and_chunked_answers() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nready";
        assert_eq!(parse_response(raw).expect("parse"), (200, "ready".into()));
        let raw = b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n4\r\nnot \r\n5\r\nready\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(raw).expect("parse"),
            (503, "not ready".into())
        );
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort").is_err());
    }

    #[test]
    fn nobody_listening_is_a_clear_error() {
        // Bind then drop: the port is (almost certainly) closed afterwards.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let err = get(addr, "/config_dump").expect_err("nobody listens");
        assert_eq!(
            err.to_string(),
            format!(
                "no agent is answering on {addr}: is mesh-agent running on this node? (run the command inside the node's network namespace)"
            )
        );
    }

    #[test]
    fn error_bodies_are_unwrapped() {
        assert_eq!(error_message("{\"error\": \"bad level\"}"), "bad level");
        assert_eq!(error_message("plain\n"), "plain");
    }
}

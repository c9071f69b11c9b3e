//! The pod netns' reply path for transparent delivery: the agent delivers to
//! an app from a socket bound to the client's (non-local) address with
//! `IP_TRANSPARENT`, so the app's replies must be routed back to that socket
//! inside the pod instead of out of it. As ztunnel's in-pod mode does, with
//! a mark and a policy rule, but without iptables:
//!
//! * the delivery socket carries [`DELIVERY_MARK`]; `net.ipv4.tcp_fwmark_accept`
//!   (which covers IPv6 too) makes the app's accepted socket inherit the SYN's
//!   mark, SYN-ACK included (`ir_mark`), so every reply carries it;
//!   `net.ipv{4,6}.fwmark_reflect` does the same for the kernel's own
//!   socketless replies (a reset to a stale segment);
//! * `ip rule add fwmark DELIVERY_MARK lookup DELIVERY_TABLE pref
//!   DELIVERY_RULE_PRIORITY` and `ip route add local default dev lo table
//!   DELIVERY_TABLE` (and the IPv6 twins) deliver such replies locally,
//!   where the agent's socket takes them.
//!
//! Only packets carrying the agent's delivery mark are affected. Runs inside
//! the pod's netns (on its worker thread); the rules are left in place when
//! the pod is withdrawn so that connections delivered before keep their
//! reply path until they end (they match nothing else), and they vanish with
//! the netns.
#![forbid(unsafe_code)]

use std::io;

use mesh_common::{DELIVERY_MARK, DELIVERY_RULE_PRIORITY, DELIVERY_TABLE};
use socket2::{Domain, Protocol, Socket, Type};

/// What the pod's reply path allows: transparent delivery per family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplyRoutes {
    /// IPv4 replies come back to the agent: IPv4 clients' addresses can be used.
    pub v4: bool,
    /// IPv6 replies come back to the agent.
    pub v6: bool,
    /// Why a family is not available (for the log and `/config_dump`).
    pub reason: Option<String>,
}

const NLMSG_ERROR: u16 = 2;
const RTM_NEWROUTE: u16 = 24;
const RTM_NEWRULE: u16 = 32;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const FR_ACT_TO_TBL: u8 = 1;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;
const LOOPBACK_IFINDEX: u32 = 1;
const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;

/// The sysctls transparent delivery needs in the pod (paths under `/proc/sys`,
/// as seen from a thread inside the pod's netns), and whether each is
/// required for IPv4 / IPv6.
const SYSCTLS: [(&str, bool, bool); 3] = [
    ("/proc/sys/net/ipv4/tcp_fwmark_accept", true, true),
    ("/proc/sys/net/ipv4/fwmark_reflect", true, false),
    ("/proc/sys/net/ipv6/fwmark_reflect", false, true),
];

/// Sets up the reply path in the calling thread's netns (the pod's). A
/// family whose step fails is reported unavailable; the agent then delivers
/// that family's connections from the pod's own address (never fails them).
pub fn route_replies_to_agent() -> ReplyRoutes {
    let mut out = ReplyRoutes {
        v4: true,
        v6: true,
        reason: None,
    };
    let mut fail = |v4: bool, v6: bool, why: String| {
        out.v4 &= !v4;
        out.v6 &= !v6;
        if out.reason.is_none() {
            out.reason = Some(why);
        }
    };
    for (path, v4, v6) in SYSCTLS {
        if let Err(e) = set_sysctl(path) {
            fail(v4, v6, format!("{path}: {e}"));
        }
    }
    let sock = match netlink_socket() {
        Ok(s) => s,
        Err(e) => {
            fail(true, true, format!("rtnetlink socket: {e}"));
            return out;
        }
    };
    for (family, v4) in [(AF_INET, true), (AF_INET6, false)] {
        let done = request(&sock, &rule_message(family))
            .and_then(|()| request(&sock, &route_message(family)));
        if let Err(e) = done {
            let name = if v4 { "IPv4" } else { "IPv6" };
            fail(v4, !v4, format!("{name} delivery rule/route: {e}"));
        }
    }
    out
}

fn set_sysctl(path: &str) -> io::Result<()> {
    if std::fs::read_to_string(path)?.trim() == "1" {
        return Ok(());
    }
    std::fs::write(path, "1")
}

fn netlink_socket() -> io::Result<Socket> {
    Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::RAW.cloexec(),
        Some(Protocol::from(libc::NETLINK_ROUTE)),
    )
}

/// Appends one attribute (`struct rtattr` + a `u32` payload).
fn attr_u32(buf: &mut Vec<u8>, kind: u16, value: u32) {
    buf.extend_from_slice(&8u16.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&value.to_ne_bytes());
}

/// A netlink message: header, then `body` (already 4-byte aligned).
fn message(kind: u16, body: &[u8]) -> Vec<u8> {
    let len = 16 + body.len();
    let mut buf = Vec::with_capacity(len);
    buf.extend_from_slice(&(len as u32).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
    buf.extend_from_slice(body);
    buf
}

/// `ip rule add fwmark DELIVERY_MARK/0xffffffff lookup DELIVERY_TABLE pref DELIVERY_RULE_PRIORITY`.
fn rule_message(family: u8) -> Vec<u8> {
    // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags.
    let mut body = vec![family, 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL, 0, 0, 0, 0];
    attr_u32(&mut body, FRA_PRIORITY, DELIVERY_RULE_PRIORITY);
    attr_u32(&mut body, FRA_FWMARK, DELIVERY_MARK);
    attr_u32(&mut body, FRA_FWMASK, u32::MAX);
    attr_u32(&mut body, FRA_TABLE, DELIVERY_TABLE);
    message(RTM_NEWRULE, &body)
}

/// `ip route add local default dev lo table DELIVERY_TABLE`.
fn route_message(family: u8) -> Vec<u8> {
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    let mut body = vec![
        family,
        0,
        0,
        0,
        0,
        RTPROT_STATIC,
        RT_SCOPE_HOST,
        RTN_LOCAL,
        0,
        0,
        0,
        0,
    ];
    attr_u32(&mut body, RTA_TABLE, DELIVERY_TABLE);
    attr_u32(&mut body, RTA_OIF, LOOPBACK_IFINDEX);
    message(RTM_NEWROUTE, &body)
}

/// Sends one request and reads its acknowledgement; "already there" is success.
fn request(sock: &Socket, msg: &[u8]) -> io::Result<()> {
    use std::io::{Read as _, Write as _};
    let mut sock = sock;
    sock.write_all(msg)?;
    let mut buf = [0u8; 1024];
    let n = sock.read(&mut buf)?;
    ack_error(&buf[..n])
}

/// The errno of a netlink acknowledgement (`NLMSG_ERROR`, 0 = success).
fn ack_error(bytes: &[u8]) -> io::Result<()> {
    if bytes.len() < 20 {
        return Err(io::Error::other("short netlink acknowledgement"));
    }
    let kind = u16::from_ne_bytes([bytes[4], bytes[5]]);
    if kind != NLMSG_ERROR {
        return Err(io::Error::other(format!(
            "unexpected netlink answer type {kind}"
        )));
    }
    let errno = i32::from_ne_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
    match -errno {
        0 => Ok(()),
        libc::EEXIST => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

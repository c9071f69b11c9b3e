//! Types shared by the kernel programs (`mesh-ebpf`) and the agent.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding, so that the
//! byte layout is the same on both sides and no key carries uninitialised
//! bytes (the kernel hashes keys byte for byte).
//!
//! Byte orders, once for all: **addresses** are stored in network byte order,
//! as the 16 bytes of an IPv6 address; an IPv4 address is stored in its
//! IPv4-mapped form `::ffff:a.b.c.d`, so one key type serves both families and
//! a dual-stack socket's v4-mapped address matches its v4 twin. **Ports** are
//! stored in host byte order.
#![no_std]

/// Port of the in-pod outbound capture listener (`127.0.0.1` and `[::1]`).
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the in-pod inbound plaintext listener.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// Port of the in-pod inbound HBONE (mTLS HTTP/2 CONNECT) listener.
pub const INBOUND_HBONE_PORT: u16 = 15008;
/// `SO_MARK` carried by the sockets the agent opens itself. It does **not**
/// exempt them from capture (an app with `CAP_NET_ADMIN` can set any mark):
/// the kernel programs recognise the agent's sockets by their cookies in
/// `AGENT_SOCKETS` and its deliveries by their tuples in `DELIVERY_TUPLES`,
/// which only the agent writes.
pub const BYPASS_MARK: u32 = 0x539;
/// `SO_MARK` of the agent's transparent delivery sockets (bound to the
/// client's address inside the server pod's netns). With
/// `net.ipv4.tcp_fwmark_accept` the app's accepted socket inherits it, and
/// the pod's policy rule (`fwmark DELIVERY_MARK lookup DELIVERY_TABLE`,
/// a table holding `local default dev lo`) keeps the app's replies to the
/// (non-local) client address inside the pod, on the agent's socket.
pub const DELIVERY_MARK: u32 = 0x53a;
/// The routing table of the pod's delivery rule (see [`DELIVERY_MARK`]).
pub const DELIVERY_TABLE: u32 = 0x53a;
/// The priority of the pod's delivery rule: after `local` (0), before `main` (32766).
pub const DELIVERY_RULE_PRIORITY: u32 = 0x53a;
/// Entries of `AGENT_SOCKETS` and `DELIVERY_TUPLES` (connects in flight).
pub const MAX_AGENT_SOCKETS: u32 = 65536;

/// Index of a pod's plaintext inbound listener in the `INBOUND_LISTENERS`
/// sockmap: `slot * LISTENERS_PER_POD + LISTENER_PLAINTEXT`.
pub const LISTENER_PLAINTEXT: u32 = 0;
/// Index of a pod's HBONE listener in the sockmap, relative to its slot base.
pub const LISTENER_HBONE: u32 = 1;
/// Sockmap entries reserved per pod slot.
pub const LISTENERS_PER_POD: u32 = 2;
/// Pods one agent can enroll (pod slots).
pub const MAX_PODS: u32 = 1024;
/// Entries of the original-destination maps (in-flight connects).
pub const MAX_ORIG_DST: u32 = 65536;
/// Entries of the excluded-port map (all pods, both directions).
pub const MAX_EXCLUDED_PORTS: u32 = 16384;
/// Entries of the probe-source map (node addresses whose inbound is not captured).
pub const MAX_PROBE_SOURCES: u32 = 64;

/// Names of the maps, as the kernel object declares them and as they are pinned.
pub mod maps {
    /// netns cookie (`u64`) -> [`crate::PodSlot`]: which network namespaces are enrolled.
    pub const ENROLLED_NETNS: &str = "ENROLLED_NETNS";
    /// pod address ([`crate::IpKey`]) -> [`crate::PodSlot`]: which addresses `sk_lookup` steers.
    pub const POD_ADDRS: &str = "POD_ADDRS";
    /// [`crate::PortKey`] -> `u8`: ports a pod excludes from capture.
    pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    /// [`crate::IpKey`] -> `u8`: node addresses (kubelet probes) that bypass inbound capture.
    pub const PROBE_SOURCES: &str = "PROBE_SOURCES";
    /// socket cookie (`u64`) -> [`crate::OrigDst`]: original destination for the socket's life.
    pub const SOCK_ORIG_DST: &str = "SOCK_ORIG_DST";
    /// [`crate::TupleKey`] -> [`crate::OrigDst`]: original destination, for the agent's accept().
    pub const ORIG_DST_BY_TUPLE: &str = "ORIG_DST_BY_TUPLE";
    /// Sockmap of the in-pod inbound listeners.
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    /// Per-CPU `u64` counters, indexed by [`crate::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// Socket cookie -> 1: the agent's own sockets in pod netns, exempt from capture while they connect.
    pub const AGENT_SOCKETS: &str = "AGENT_SOCKETS";
    /// [`crate::DeliveryKey`] -> 1: the agent's deliveries to apps, left alone by `sk_lookup`.
    pub const DELIVERY_TUPLES: &str = "DELIVERY_TUPLES";
    /// netns cookie (`u64`) -> [`crate::PodAddrs`]: the pod's own addresses,
    /// which `getsockname()` of a redirected socket shows.
    pub const NETNS_ADDRS: &str = "NETNS_ADDRS";
}

/// Names of the kernel programs (the function names in `mesh-ebpf`).
pub mod programs {
    /// `cgroup/connect4`: redirect enrolled IPv4 connects to the outbound listener.
    pub const CONNECT4: &str = "redirect_connect4";
    /// `cgroup/connect6`: redirect enrolled IPv6 connects to the outbound listener.
    pub const CONNECT6: &str = "redirect_connect6";
    /// `sock_ops`: file the original destination under the client's tuple.
    pub const SOCK_OPS: &str = "track_orig_dst";
    /// `cgroup/getpeername4`: show the redirected client the address it dialled.
    pub const GETPEERNAME4: &str = "restore_peer4";
    /// `cgroup/getpeername6`: the same for IPv6.
    pub const GETPEERNAME6: &str = "restore_peer6";
    /// `cgroup/getsockname4`.
    pub const GETSOCKNAME4: &str = "restore_local4";
    /// `cgroup/getsockname6`.
    pub const GETSOCKNAME6: &str = "restore_local6";
    /// `sk_lookup` (per pod netns): steer inbound connections to the agent's listeners.
    pub const SK_LOOKUP: &str = "steer_inbound";
}

/// A 16-byte address key, network byte order; IPv4 is stored IPv4-mapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpKey {
    /// The address bytes, network byte order.
    pub addr: [u8; 16],
}

impl IpKey {
    /// The IPv4-mapped key of an IPv4 address given as its four octets.
    pub const fn v4(octets: [u8; 4]) -> Self {
        let [a, b, c, d] = octets;
        Self {
            addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d],
        }
    }

    /// The key of an IPv6 address given as its sixteen octets.
    pub const fn v6(octets: [u8; 16]) -> Self {
        Self { addr: octets }
    }

    /// Whether this is an IPv4-mapped address (`::ffff:a.b.c.d`).
    pub const fn is_v4_mapped(&self) -> bool {
        let a = &self.addr;
        a[0] == 0
            && a[1] == 0
            && a[2] == 0
            && a[3] == 0
            && a[4] == 0
            && a[5] == 0
            && a[6] == 0
            && a[7] == 0
            && a[8] == 0
            && a[9] == 0
            && a[10] == 0xff
            && a[11] == 0xff
    }

    /// Whether this is a loopback address (`127.0.0.0/8` or `::1`).
    pub const fn is_loopback(&self) -> bool {
        let a = &self.addr;
        if self.is_v4_mapped() {
            return a[12] == 127;
        }
        let mut i = 0;
        while i < 15 {
            if a[i] != 0 {
                return false;
            }
            i += 1;
        }
        a[15] == 1
    }
}

/// The value of `ENROLLED_NETNS` and `POD_ADDRS`: the pod's slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodSlot {
    /// The pod's slot; its listeners sit at `slot * LISTENERS_PER_POD + kind`.
    pub slot: u32,
    /// Reserved, zero.
    pub _pad: u32,
    /// The pod's network namespace cookie (lets `sk_lookup` find the pod's port exclusions).
    pub netns_cookie: u64,
}

/// Direction of a port exclusion.
pub mod direction {
    /// Connections the pod makes.
    pub const OUTBOUND: u8 = 1;
    /// Connections the pod receives.
    pub const INBOUND: u8 = 2;
}

/// Key of `EXCLUDED_PORTS`: a port a pod excludes from capture, in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    /// The pod's network namespace cookie.
    pub netns_cookie: u64,
    /// The port, host byte order (destination port for both directions).
    pub port: u16,
    /// [`direction::OUTBOUND`] or [`direction::INBOUND`].
    pub direction: u8,
    /// Reserved, zero.
    pub _pad: [u8; 5],
}

/// An original destination, as the client dialled it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// The address, network byte order, IPv4-mapped for IPv4.
    pub addr: IpKey,
    /// The port, host byte order.
    pub port: u16,
    /// Reserved, zero.
    pub _pad: [u8; 6],
    /// Cookie of the network namespace the client lives in.
    pub netns_cookie: u64,
}

/// Key of `ORIG_DST_BY_TUPLE`: the redirected client socket as the agent sees it
/// on accept(). The netns cookie is part of the key because every pod has its
/// own `127.0.0.1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TupleKey {
    /// Cookie of the client's network namespace.
    pub netns_cookie: u64,
    /// The client's (loopback) address, network byte order, IPv4-mapped for IPv4.
    pub addr: IpKey,
    /// The client's port, host byte order.
    pub port: u16,
    /// Reserved, zero.
    pub _pad: [u8; 6],
}

/// The value of `NETNS_ADDRS`: an enrolled pod's own address of each family
/// (its first), the local address its redirected sockets report.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodAddrs {
    /// The pod's IPv4 address, IPv4-mapped (valid when `has_v4` is 1).
    pub v4: IpKey,
    /// The pod's IPv6 address (valid when `has_v6` is 1).
    pub v6: IpKey,
    /// 1 when the pod has an IPv4 address.
    pub has_v4: u8,
    /// 1 when the pod has an IPv6 address.
    pub has_v6: u8,
    /// Reserved, zero.
    pub _pad: [u8; 6],
}

/// Key of `DELIVERY_TUPLES`: one connect of the agent to an app, as the
/// app's netns sees the SYN (`local` the app's address and port, `remote`
/// the address and port the agent's socket is bound to).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DeliveryKey {
    /// The app's address, network byte order, IPv4-mapped for IPv4.
    pub local: IpKey,
    /// The agent socket's address (the client's, or the pod's own).
    pub remote: IpKey,
    /// The app's port, host byte order.
    pub local_port: u16,
    /// The agent socket's port, host byte order.
    pub remote_port: u16,
    /// Reserved, zero.
    pub _pad: [u8; 4],
}

/// The kernel programs' counters: indexes into the per-CPU `COUNTERS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A TCP connect from a netns that is not enrolled: left alone.
    ConnectNotEnrolled = 0,
    /// A TCP connect of an enrolled pod redirected to its outbound listener.
    ConnectRedirected,
    /// An enrolled pod's connect to a loopback address: left alone.
    ConnectBypassLoopback,
    /// A connect from one of the agent's own sockets (its cookie in `AGENT_SOCKETS`): left alone.
    ConnectBypassAgent,
    /// An enrolled pod's connect to an excluded port: left alone.
    ConnectBypassPort,
    /// The original destination could not be stored: the connect was refused (fail closed).
    ConnectRecordFailed,
    /// sock_ops filed an original destination under the client's tuple.
    SockOpsRecorded,
    /// sock_ops could not file an original destination.
    SockOpsRecordFailed,
    /// getpeername() of a redirected socket rewritten to the dialled address.
    PeernameRestored,
    /// Inbound connection steered to the pod's plaintext listener.
    LookupSteeredPlaintext,
    /// Inbound connection steered to the pod's HBONE listener.
    LookupSteeredHbone,
    /// Inbound lookup on loopback, from the pod to itself, or an agent
    /// delivery (its tuple in `DELIVERY_TUPLES`): left alone.
    LookupBypassLoopback,
    /// Inbound lookup for an excluded port: left alone.
    LookupBypassPort,
    /// Inbound lookup from a probe source (the node): left alone.
    LookupBypassProbe,
    /// Inbound lookup for an address that is not an enrolled pod's: left alone.
    LookupNotEnrolled,
    /// Inbound connection to an enrolled pod with no live listener: dropped (fail closed).
    LookupDroppedNoListener,
}

impl Counter {
    /// Number of counters (size of the `COUNTERS` array).
    pub const COUNT: u32 = 16;

    /// Every counter, in index order.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::ConnectNotEnrolled,
        Counter::ConnectRedirected,
        Counter::ConnectBypassLoopback,
        Counter::ConnectBypassAgent,
        Counter::ConnectBypassPort,
        Counter::ConnectRecordFailed,
        Counter::SockOpsRecorded,
        Counter::SockOpsRecordFailed,
        Counter::PeernameRestored,
        Counter::LookupSteeredPlaintext,
        Counter::LookupSteeredHbone,
        Counter::LookupBypassLoopback,
        Counter::LookupBypassPort,
        Counter::LookupBypassProbe,
        Counter::LookupNotEnrolled,
        Counter::LookupDroppedNoListener,
    ];

    /// A stable snake_case name, used in metrics, logs and the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::ConnectNotEnrolled => "connect_not_enrolled",
            Counter::ConnectRedirected => "connect_redirected",
            Counter::ConnectBypassLoopback => "connect_bypass_loopback",
            Counter::ConnectBypassAgent => "connect_bypass_agent",
            Counter::ConnectBypassPort => "connect_bypass_port",
            Counter::ConnectRecordFailed => "connect_record_failed",
            Counter::SockOpsRecorded => "sockops_recorded",
            Counter::SockOpsRecordFailed => "sockops_record_failed",
            Counter::PeernameRestored => "peername_restored",
            Counter::LookupSteeredPlaintext => "lookup_steered_plaintext",
            Counter::LookupSteeredHbone => "lookup_steered_hbone",
            Counter::LookupBypassLoopback => "lookup_bypass_loopback",
            Counter::LookupBypassPort => "lookup_bypass_port",
            Counter::LookupBypassProbe => "lookup_bypass_probe",
            Counter::LookupNotEnrolled => "lookup_not_enrolled",
            Counter::LookupDroppedNoListener => "lookup_dropped_no_listener",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: every type here is `#[repr(C)]`, `Copy`, made of integers and
    // byte arrays with explicit padding fields, so any bit pattern is valid
    // and none has uninitialised bytes.
    unsafe impl aya::Pod for super::IpKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PodSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TupleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DeliveryKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PodAddrs {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<IpKey>(), 16);
        assert_eq!(core::mem::size_of::<PodSlot>(), 16);
        assert_eq!(core::mem::size_of::<PortKey>(), 16);
        assert_eq!(core::mem::size_of::<OrigDst>(), 32);
        assert_eq!(core::mem::size_of::<TupleKey>(), 32);
        assert_eq!(core::mem::size_of::<DeliveryKey>(), 40);
        assert_eq!(core::mem::size_of::<PodAddrs>(), 40);
    }

    #[test]
    fn loopback_and_mapping() {
        assert!(IpKey::v4([127, 0, 0, 1]).is_loopback());
        assert!(IpKey::v4([127, 9, 9, 9]).is_loopback());
        assert!(!IpKey::v4([198, 18, 0, 1]).is_loopback());
        let mut one = [0u8; 16];
        one[15] = 1;
        assert!(IpKey::v6(one).is_loopback());
        assert!(!IpKey::v6(one).is_v4_mapped());
        assert!(IpKey::v4([10, 0, 0, 1]).is_v4_mapped());
    }

    #[test]
    fn counters_are_indexed_in_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as u32, i as u32, "{}", c.name());
        }
    }
}

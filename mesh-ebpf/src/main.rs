//! The mesh's kernel programs: in-pod traffic capture without iptables.
//!
//! # Datapath
//!
//! * **Outbound.** [`redirect_connect4`] and [`redirect_connect6`]
//!   (`cgroup/connect4`, `cgroup/connect6`, attached to a cgroup covering the
//!   pods) act on TCP connects of sockets whose network namespace is enrolled
//!   (`ENROLLED_NETNS`, keyed by netns cookie). Loopback destinations, the
//!   agent's own sockets (their cookies in `AGENT_SOCKETS`, written by the
//!   agent alone: no mark an app can set exempts a socket) and excluded ports
//!   are left alone; every other
//!   connect has its original destination stored in `SOCK_ORIG_DST` (keyed by
//!   socket cookie) and is rewritten to the pod's own outbound listener
//!   (`127.0.0.1:15001`, `[::1]:15001`, or `::ffff:127.0.0.1:15001` for a
//!   v4-mapped destination). If the original destination cannot be stored the
//!   connect is refused: the datapath fails closed and never leaks plaintext.
//! * **Tuple.** [`track_orig_dst`] (`sock_ops`, same cgroup) files the
//!   original destination under the client's (netns cookie, address, port) in
//!   `ORIG_DST_BY_TUPLE` once the redirected connect is established, which is
//!   what the agent sees on `accept()`. It also arms the TCP state callback of
//!   redirected sockets, so that their `SOCK_ORIG_DST` entry is deleted when
//!   they close.
//! * **Peer name.** [`restore_peer4`] and [`restore_peer6`]
//!   (`cgroup/getpeername4`, `cgroup/getpeername6`) make a redirected client
//!   see the address it dialled instead of the outbound listener.
//! * **Local name.** [`restore_local4`] and [`restore_local6`]
//!   (`cgroup/getsockname4`, `cgroup/getsockname6`) make a redirected client
//!   see its pod's own address (`NETNS_ADDRS`) as its local address instead
//!   of the loopback address the redirect gave it.
//! * **Inbound.** [`steer_inbound`] (`sk_lookup`, attached to each pod's
//!   netns) hands TCP connections to an enrolled pod address to the pod's
//!   HBONE listener (port 15008) or plaintext listener (every other port),
//!   both held in the `INBOUND_LISTENERS` sockmap. Connections the pod makes
//!   to itself, the agent's deliveries to the app (their tuples filed by the
//!   agent in `DELIVERY_TUPLES`, as their source is the client's), those from probe
//!   sources and those to excluded ports are left alone; an enrolled pod
//!   without a live listener gets `SK_DROP`, which TCP answers with a reset
//!   (fail closed).
//!
//! # Byte orders
//!
//! The map contract ([`mesh_common`]) stores addresses in network byte order
//! as 16 bytes, IPv4 in its IPv4-mapped form `::ffff:a.b.c.d`, and ports in
//! host byte order. The kernel contexts differ field by field:
//!
//! | context field | byte order |
//! |---|---|
//! | `bpf_sock_addr.user_ip4`, `user_ip6[i]` | network order (bytes in memory = address bytes) |
//! | `bpf_sock_addr.user_port` | network order, in the low 16 bits of the `u32` |
//! | `bpf_sock_ops.local_ip4`, `local_ip6[i]` | network order |
//! | `bpf_sock_ops.local_port` | host order |
//! | `bpf_sk_lookup.local_ip4`, `remote_ip4`, `local_ip6[i]`, `remote_ip6[i]` | network order |
//! | `bpf_sk_lookup.local_port` | host order (`u32`) |
//! | `bpf_sk_lookup.remote_port` | network order (`__be16`) |
//!
//! An address field read as `u32` words on this little-endian target keeps the
//! address bytes in memory order, so `u32::to_ne_bytes` yields them unchanged
//! (and `u32::from_ne_bytes` packs them back) with no swapping.
//!
//! # Verifier rules kept here
//!
//! * Context fields are read and written with single 4-byte volatile accesses
//!   ([`ctx_load`], [`ctx_store`]): the verifier rewrites context accesses per
//!   field and refuses the wider loads or stores LLVM could otherwise merge
//!   adjacent words into.
//! * Context fields of both families are read unconditionally and selected
//!   afterwards: LLVM merges loads from the two arms of a branch into one
//!   load through a computed context pointer, which the verifier refuses
//!   ("dereference of modified ctx ptr").
//! * Map keys are built on the stack: a key pointing into the context is
//!   rejected ("R2 type=ctx expected=fp").
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// aya's program macros generate the undocumented `extern "C"` entry points.
#![allow(missing_docs)]

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, bpf_sock_addr,
        sk_action::{SK_DROP, SK_PASS},
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{HashMap, LruHashMap, PerCpuArray, SockMap},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use mesh_common::{
    Counter, DeliveryKey, INBOUND_HBONE_PORT, IpKey, LISTENER_HBONE, LISTENER_PLAINTEXT,
    LISTENERS_PER_POD, MAX_AGENT_SOCKETS, MAX_EXCLUDED_PORTS, MAX_ORIG_DST, MAX_PODS,
    MAX_PROBE_SOURCES, OUTBOUND_PORT, OrigDst, PodAddrs, PodSlot, PortKey, TupleKey, direction,
};

/// `AF_INET`.
const AF_INET: u32 = 2;
/// `AF_INET6`.
const AF_INET6: u32 = 10;
/// `SOCK_STREAM`.
const SOCK_STREAM: u32 = 1;
/// `IPPROTO_TCP`.
const IPPROTO_TCP: u32 = 6;
/// Interface index of `lo` in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// cgroup `sock_addr` verdict: let the call proceed.
const SOCK_ADDR_ALLOW: i32 = 1;
/// cgroup `sock_addr` verdict: fail the call with `EPERM`.
const SOCK_ADDR_REJECT: i32 = 0;
/// `sock_ops` programs return 1.
const SOCK_OPS_OK: u32 = 1;

/// `127.0.0.1` as `bpf_sock_addr.user_ip4` holds it: network order, i.e. the
/// address bytes in memory order.
const LOOPBACK4_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// `[::1]` as the four network-order words of `bpf_sock_addr.user_ip6`.
const LOOPBACK6_WORDS: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
/// `::ffff:127.0.0.1` as the four network-order words of `user_ip6`.
const LOOPBACK4_MAPPED_WORDS: [u32; 4] =
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), LOOPBACK4_BE];
/// [`OUTBOUND_PORT`] as `bpf_sock_addr.user_port` holds it: big-endian in the
/// low 16 bits.
const OUTBOUND_PORT_BE: u32 = OUTBOUND_PORT.to_be() as u32;

// ------------------------------------------------------------------- maps
// Names are those of `mesh_common::maps` (the static's name is the map's
// name). None is pinned here: the agent pins the maps itself.

/// netns cookie -> pod slot: the enrolled network namespaces.
#[map]
static ENROLLED_NETNS: HashMap<u64, PodSlot> = HashMap::with_max_entries(MAX_PODS, 0);
/// Pod address -> pod slot: the addresses `sk_lookup` steers.
#[map]
static POD_ADDRS: HashMap<IpKey, PodSlot> = HashMap::with_max_entries(MAX_PODS * 4, 0);
/// Ports a pod excludes from capture, per direction (value unused).
#[map]
static EXCLUDED_PORTS: HashMap<PortKey, u8> = HashMap::with_max_entries(MAX_EXCLUDED_PORTS, 0);
/// Source addresses (the node's, for kubelet probes) whose inbound is not captured.
#[map]
static PROBE_SOURCES: HashMap<IpKey, u8> = HashMap::with_max_entries(MAX_PROBE_SOURCES, 0);
/// Socket cookie -> original destination, for the redirected socket's life.
#[map]
static SOCK_ORIG_DST: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(MAX_ORIG_DST, 0);
/// Client tuple -> original destination, taken by the agent on `accept()`.
#[map]
static ORIG_DST_BY_TUPLE: LruHashMap<TupleKey, OrigDst> =
    LruHashMap::with_max_entries(MAX_ORIG_DST, 0);
/// The in-pod inbound listeners, at `slot * LISTENERS_PER_POD + kind`.
#[map]
static INBOUND_LISTENERS: SockMap = SockMap::with_max_entries(MAX_PODS * LISTENERS_PER_POD, 0);
/// Socket cookie -> 1: the agent's sockets in pod netns, while they connect.
#[map]
static AGENT_SOCKETS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(MAX_AGENT_SOCKETS, 0);
/// The agent's connects to apps, by the tuple of their SYN (value unused).
#[map]
static DELIVERY_TUPLES: LruHashMap<DeliveryKey, u8> =
    LruHashMap::with_max_entries(MAX_AGENT_SOCKETS, 0);
/// netns cookie -> the pod's own addresses (what getsockname shows).
#[map]
static NETNS_ADDRS: HashMap<u64, PodAddrs> = HashMap::with_max_entries(MAX_PODS, 0);
/// Per-CPU counters, indexed by [`Counter`].
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

// ---------------------------------------------------------------- helpers

/// Adds one to `counter` in this CPU's slot of `COUNTERS`.
#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: `slot` is this CPU's value of a live array element (array
        // elements are never freed), 8-byte aligned, and written by programs
        // on this CPU only. (The bpf target has no atomic read-modify-write in
        // `core`; a program preempted mid-increment on a preemptible kernel
        // could lose one count, which statistics tolerate.)
        unsafe { *slot += 1 };
    }
}

/// Reads a `u32` context field with one 4-byte load.
///
/// # Safety
///
/// `field` must point into the program's context, or into a `bpf_sock` the
/// context hands out (the verifier rewrites both kinds of access).
#[inline(always)]
unsafe fn ctx_load(field: *const u32) -> u32 {
    // SAFETY: guaranteed by the caller; volatile keeps the load 4 bytes wide.
    unsafe { read_volatile(field) }
}

/// Writes a `u32` context field with one 4-byte store.
///
/// # Safety
///
/// `field` must point to a writable field of the program's context.
#[inline(always)]
unsafe fn ctx_store(field: *mut u32, value: u32) {
    // SAFETY: guaranteed by the caller; volatile keeps the store 4 bytes wide.
    unsafe { write_volatile(field, value) }
}

/// Reads an IPv6 address field of the context: four network-order `u32`
/// words, one 4-byte load each.
///
/// # Safety
///
/// `field` must point to a `[u32; 4]` address field of the program's context.
#[inline(always)]
unsafe fn ctx_load_ip6(field: *const [u32; 4]) -> [u32; 4] {
    let word = field.cast::<u32>();
    // SAFETY: the four words lie inside the field the caller vouches for.
    unsafe {
        [
            ctx_load(word),
            ctx_load(word.add(1)),
            ctx_load(word.add(2)),
            ctx_load(word.add(3)),
        ]
    }
}

/// Writes an address, given as four network-order words, to an IPv6 address
/// field of the context, word by word.
///
/// # Safety
///
/// `field` must point to a writable `[u32; 4]` address field of the context.
#[inline(always)]
unsafe fn ctx_store_ip6(field: *mut [u32; 4], words: [u32; 4]) {
    let word = field.cast::<u32>();
    // SAFETY: the four words lie inside the field the caller vouches for.
    unsafe {
        ctx_store(word, words[0]);
        ctx_store(word.add(1), words[1]);
        ctx_store(word.add(2), words[2]);
        ctx_store(word.add(3), words[3]);
    }
}

/// The key of an IPv4 address held as a network-order `u32` (IPv4-mapped).
#[inline(always)]
const fn ip4_key(addr_be: u32) -> IpKey {
    // Network order: the native-endian bytes are the address octets.
    IpKey::v4(addr_be.to_ne_bytes())
}

/// The key of an IPv6 address held as four network-order `u32` words.
#[inline(always)]
const fn ip6_key(words: [u32; 4]) -> IpKey {
    let [a0, a1, a2, a3] = words[0].to_ne_bytes();
    let [b0, b1, b2, b3] = words[1].to_ne_bytes();
    let [c0, c1, c2, c3] = words[2].to_ne_bytes();
    let [d0, d1, d2, d3] = words[3].to_ne_bytes();
    IpKey::v6([
        a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3,
    ])
}

/// The four network-order `u32` words of an address key.
#[inline(always)]
const fn key_words(key: &IpKey) -> [u32; 4] {
    let a = &key.addr;
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

// ------------------------------------------------------- outbound: connect

/// `cgroup/connect4`: redirects an enrolled pod's IPv4 TCP connect to its
/// outbound listener `127.0.0.1:15001`, after storing the original
/// destination by socket cookie. Returns 1 (allow), or 0 (refuse, `EPERM`)
/// when the original destination cannot be stored.
#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    redirect_connect(&ctx, false)
}

/// `cgroup/connect6`: as [`redirect_connect4`] for IPv6 sockets. A
/// v4-mapped destination (`::ffff:a.b.c.d`, dual-stack socket) goes to
/// `::ffff:127.0.0.1:15001`, any other to `[::1]:15001`.
#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    redirect_connect(&ctx, true)
}

/// The connect hook of both families (`v6` is a constant at each call site).
#[inline(always)]
fn redirect_connect(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the kernel's context for this run; `type` and
    // `protocol` are readable `u32` fields.
    let (sock_type, protocol) = unsafe {
        (
            ctx_load(&raw const (*sa).type_),
            ctx_load(&raw const (*sa).protocol),
        )
    };
    if sock_type != SOCK_STREAM || (protocol != IPPROTO_TCP && protocol != 0) {
        return SOCK_ADDR_ALLOW;
    }

    // SAFETY: the helper only reads the context it is given.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if ENROLLED_NETNS.get_ptr(&netns_cookie).is_none() {
        count(Counter::ConnectNotEnrolled);
        return SOCK_ADDR_ALLOW;
    }

    // SAFETY: `user_ip4`, `user_ip6` and `user_port` are readable fields of
    // the context. Both address fields are network order; `user_port` holds
    // the big-endian port in its low 16 bits.
    let (addr, port) = unsafe {
        let addr = if v6 {
            ip6_key(ctx_load_ip6(&raw const (*sa).user_ip6))
        } else {
            ip4_key(ctx_load(&raw const (*sa).user_ip4))
        };
        (
            addr,
            u16::from_be(ctx_load(&raw const (*sa).user_port) as u16),
        )
    };

    // Covers 127/8, ::1 and ::ffff:127/104, hence the redirect target itself.
    if addr.is_loopback() {
        count(Counter::ConnectBypassLoopback);
        return SOCK_ADDR_ALLOW;
    }

    // The agent's own sockets in the pod (deliveries to the app, its
    // upstream connects) are recognised by their cookies, which only the
    // agent writes: a mark or IP_TRANSPARENT set by an app exempts nothing.
    // SAFETY: the helper only reads the context it is given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if AGENT_SOCKETS.get_ptr(&cookie).is_some() {
        count(Counter::ConnectBypassAgent);
        return SOCK_ADDR_ALLOW;
    }

    let port_key = PortKey {
        netns_cookie,
        port, // host order
        direction: direction::OUTBOUND,
        _pad: [0; 5],
    };
    if EXCLUDED_PORTS.get_ptr(&port_key).is_some() {
        count(Counter::ConnectBypassPort);
        return SOCK_ADDR_ALLOW;
    }

    let orig = OrigDst {
        addr, // network order, v4 mapped
        port, // host order
        _pad: [0; 6],
        netns_cookie,
    };
    if SOCK_ORIG_DST
        .insert(&cookie, &orig, u64::from(BPF_ANY))
        .is_err()
    {
        // Without the original destination the proxy cannot serve this
        // connection; refusing it beats letting it out in plaintext.
        count(Counter::ConnectRecordFailed);
        debug!(
            ctx,
            "connect: cannot record {:i}:{}, refused", addr.addr, port
        );
        return SOCK_ADDR_REJECT;
    }

    // SAFETY: `user_ip4`, `user_ip6` and `user_port` are writable in connect
    // programs; all values are in the context's byte order (network order,
    // port big-endian in the low 16 bits).
    unsafe {
        if v6 {
            let target = if addr.is_v4_mapped() {
                LOOPBACK4_MAPPED_WORDS
            } else {
                LOOPBACK6_WORDS
            };
            ctx_store_ip6(&raw mut (*sa).user_ip6, target);
        } else {
            ctx_store(&raw mut (*sa).user_ip4, LOOPBACK4_BE);
        }
        ctx_store(&raw mut (*sa).user_port, OUTBOUND_PORT_BE);
    }
    count(Counter::ConnectRedirected);
    debug!(
        ctx,
        "connect: netns {} cookie {} to {:i}:{} redirected", netns_cookie, cookie, addr.addr, port
    );
    SOCK_ADDR_ALLOW
}

// -------------------------------------------------------- outbound: tuple

/// `sock_ops`: for a socket whose connect was redirected, arms the TCP state
/// callback when the SYN goes out, files the original destination under the
/// client's (netns cookie, local address, local port) in `ORIG_DST_BY_TUPLE`
/// when the connection is established, and deletes the socket's
/// `SOCK_ORIG_DST` entry when it reaches `TCP_CLOSE`. Always returns 1.
#[sock_ops]
pub fn track_orig_dst(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => arm_state_cb(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => record_tuple(&ctx),
        BPF_SOCK_OPS_STATE_CB => forget_on_close(&ctx),
        _ => {}
    }
    SOCK_OPS_OK
}

/// Enables the state callback of a redirected socket, keeping its other
/// callback flags.
#[inline(always)]
fn enable_state_cb(ctx: &SockOpsContext) {
    // A failure only means a later LRU eviction instead of a prompt delete.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

/// `TCP_CONNECT_CB` (SYN about to be sent): arm the state callback of a
/// redirected socket now, so that a connect that never establishes also has
/// its `SOCK_ORIG_DST` entry deleted on close.
#[inline(always)]
fn arm_state_cb(ctx: &SockOpsContext) {
    // SAFETY: the helper only reads the context it is given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if SOCK_ORIG_DST.get_ptr(&cookie).is_some() {
        enable_state_cb(ctx);
    }
}

/// `ACTIVE_ESTABLISHED_CB`: file the original destination under the tuple
/// the agent sees on `accept()`. The `SOCK_ORIG_DST` entry stays (the
/// getpeername hooks need it for the socket's life).
#[inline(always)]
fn record_tuple(ctx: &SockOpsContext) {
    // SAFETY: the helper only reads the context it is given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = SOCK_ORIG_DST.get_ptr(&cookie) else {
        return;
    };
    // SAFETY: a non-NULL lookup result points to a live `OrigDst`; it is
    // copied to the stack at once.
    let orig = unsafe { *orig };

    let ops = ctx.ops;
    // SAFETY: `ops` is the kernel's context for this run; `family`,
    // `local_ip4`, `local_ip6` and `local_port` are readable fields (the
    // address fields of the other family read as zero or stale bytes, never
    // fault). The addresses are network order, `local_port` host order.
    // Both families are read unconditionally: loads in the two arms of a
    // branch get merged by LLVM into one load through a computed context
    // pointer, which the verifier refuses ("dereference of modified ctx ptr").
    let (family, local4, local6, port) = unsafe {
        (
            ctx_load(&raw const (*ops).family),
            ctx_load(&raw const (*ops).local_ip4),
            ctx_load_ip6(&raw const (*ops).local_ip6),
            ctx_load(&raw const (*ops).local_port) as u16,
        )
    };
    let addr = if family == AF_INET6 {
        // A dual-stack socket's v4-mapped address stays as it is, which is
        // also the key of its IPv4 twin.
        ip6_key(local6)
    } else {
        ip4_key(local4)
    };
    let key = TupleKey {
        netns_cookie: orig.netns_cookie,
        addr,
        port, // host order
        _pad: [0; 6],
    };
    if ORIG_DST_BY_TUPLE
        .insert(&key, &orig, u64::from(BPF_ANY))
        .is_ok()
    {
        count(Counter::SockOpsRecorded);
        debug!(
            ctx,
            "sockops: {:i}:{} in netns {} recorded, dialled {:i}:{}",
            addr.addr,
            port,
            orig.netns_cookie,
            orig.addr.addr,
            orig.port
        );
    } else {
        count(Counter::SockOpsRecordFailed);
        debug!(ctx, "sockops: {:i}:{} not recorded", addr.addr, port);
    }
    // Already armed at TCP_CONNECT_CB; this covers a program attached while
    // the handshake was in flight.
    enable_state_cb(ctx);
}

/// `STATE_CB`: when a redirected socket reaches `TCP_CLOSE`, delete its
/// `SOCK_ORIG_DST` entry. Its `ORIG_DST_BY_TUPLE` entry is left to the agent
/// (which takes it on `accept()`, possibly after the client has closed) and
/// to LRU eviction.
#[inline(always)]
fn forget_on_close(ctx: &SockOpsContext) {
    // args[1] is the new state (args[0] the old one).
    if ctx.arg(1) != BPF_TCP_CLOSE {
        return;
    }
    // SAFETY: the helper only reads the context it is given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // ENOENT (the flag was set by another program) is fine.
    let _ = SOCK_ORIG_DST.remove(&cookie);
}

// -------------------------------------------------- outbound: getpeername

/// `cgroup/getpeername4`: shows a redirected IPv4 client the address it
/// dialled instead of the outbound listener. Always returns 1.
#[cgroup_sock_addr(getpeername4)]
pub fn restore_peer4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, false)
}

/// `cgroup/getpeername6`: as [`restore_peer4`] for IPv6 sockets; a
/// v4-mapped original destination stays v4-mapped.
#[cgroup_sock_addr(getpeername6)]
pub fn restore_peer6(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, true)
}

/// The original destination of a redirected socket (its `SOCK_ORIG_DST`
/// entry, copied to the stack), or `None` for any other socket.
#[inline(always)]
fn redirected(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: the helper only reads the context it is given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = SOCK_ORIG_DST.get_ptr(&cookie)?;
    // SAFETY: a non-NULL lookup result points to a live `OrigDst`; it is
    // copied to the stack at once.
    Some(unsafe { *orig })
}

/// Writes an address, given as four network-order words (IPv4 mapped), to
/// `user_ip6` (`v6`) or, its low word, to `user_ip4`.
///
/// # Safety
///
/// `sa` must be the context of a program type in which `user_ip4` and
/// `user_ip6` are writable (getpeername, getsockname, connect).
#[inline(always)]
unsafe fn store_user_addr(sa: *mut bpf_sock_addr, v6: bool, words: [u32; 4]) {
    // SAFETY: guaranteed by the caller; addresses go in network order.
    unsafe {
        if v6 {
            ctx_store_ip6(&raw mut (*sa).user_ip6, words);
        } else {
            // The IPv4 address is the low 4 bytes of the mapped form.
            ctx_store(&raw mut (*sa).user_ip4, words[3]);
        }
    }
}

/// The getpeername hook of both families (`v6` is a constant at each call site).
#[inline(always)]
fn restore_peer(ctx: &SockAddrContext, v6: bool) -> i32 {
    let Some(orig) = redirected(ctx) else {
        return SOCK_ADDR_ALLOW;
    };
    let sa = ctx.sock_addr;
    // SAFETY: `user_ip4`, `user_ip6` and `user_port` are writable in
    // getpeername programs; the port goes big-endian in the low 16 bits.
    unsafe {
        store_user_addr(sa, v6, key_words(&orig.addr));
        ctx_store(&raw mut (*sa).user_port, u32::from(orig.port.to_be()));
    }
    count(Counter::PeernameRestored);
    SOCK_ADDR_ALLOW
}

// -------------------------------------------------- outbound: getsockname

/// `cgroup/getsockname4`: shows a redirected IPv4 client its pod's own
/// address as its local address instead of the loopback address the
/// redirect gave it (the port is the socket's real one). Always returns 1.
#[cgroup_sock_addr(getsockname4)]
pub fn restore_local4(ctx: SockAddrContext) -> i32 {
    restore_local(&ctx, false)
}

/// `cgroup/getsockname6`: as [`restore_local4`] for IPv6 sockets; a socket
/// whose original destination is v4-mapped gets the pod's IPv4 address,
/// v4-mapped.
#[cgroup_sock_addr(getsockname6)]
pub fn restore_local6(ctx: SockAddrContext) -> i32 {
    restore_local(&ctx, true)
}

/// The getsockname hook of both families (`v6` is a constant at each call site).
#[inline(always)]
fn restore_local(ctx: &SockAddrContext, v6: bool) -> i32 {
    let Some(orig) = redirected(ctx) else {
        return SOCK_ADDR_ALLOW;
    };
    let Some(addrs) = NETNS_ADDRS.get_ptr(&orig.netns_cookie) else {
        return SOCK_ADDR_ALLOW;
    };
    // SAFETY: a non-NULL lookup result points to a live `PodAddrs`; it is
    // copied to the stack at once.
    let addrs = unsafe { *addrs };
    let (has, own) = if orig.addr.is_v4_mapped() {
        (addrs.has_v4, addrs.v4)
    } else {
        (addrs.has_v6, addrs.v6)
    };
    if has == 0 {
        return SOCK_ADDR_ALLOW;
    }
    // SAFETY: `user_ip4` and `user_ip6` are writable in getsockname programs.
    unsafe { store_user_addr(ctx.sock_addr, v6, key_words(&own)) };
    SOCK_ADDR_ALLOW
}

// ------------------------------------------------------- inbound: steering

/// `sk_lookup` (attached to a pod's netns): steers TCP connections to an
/// enrolled pod address to the pod's listener in `INBOUND_LISTENERS` — the
/// HBONE listener for port 15008, the plaintext listener for any other port.
/// Connections the pod makes to itself (arriving on `lo`, or with the
/// destination address as source), the agent's deliveries to the app (their
/// tuples in `DELIVERY_TUPLES`), and lookups from probe sources, to
/// excluded ports or to addresses that are not enrolled pass untouched.
/// Returns `SK_PASS`, or `SK_DROP` when the pod has no usable listener (fail
/// closed: the client gets a reset).
#[sk_lookup]
pub fn steer_inbound(ctx: SkLookupContext) -> u32 {
    let lookup = ctx.lookup;
    // SAFETY: `lookup` is the kernel's context for this run; `family`,
    // `protocol`, `ingress_ifindex` and `local_port` (host order) are readable
    // `u32` fields.
    let (family, protocol, ifindex, local_port) = unsafe {
        (
            ctx_load(&raw const (*lookup).family),
            ctx_load(&raw const (*lookup).protocol),
            ctx_load(&raw const (*lookup).ingress_ifindex),
            ctx_load(&raw const (*lookup).local_port) as u16,
        )
    };
    if protocol != IPPROTO_TCP || (family != AF_INET && family != AF_INET6) {
        return SK_PASS;
    }
    // SAFETY: the address fields are readable (those of the other family
    // read as zero); all are network order. Both families are read
    // unconditionally: loads in the two arms of a branch get merged by LLVM
    // into one load through a computed context pointer, which the verifier
    // refuses ("dereference of modified ctx ptr"). The keys live on the stack.
    let (local4, remote4, local6, remote6) = unsafe {
        (
            ctx_load(&raw const (*lookup).local_ip4),
            ctx_load(&raw const (*lookup).remote_ip4),
            ctx_load_ip6(&raw const (*lookup).local_ip6),
            ctx_load_ip6(&raw const (*lookup).remote_ip6),
        )
    };
    let (local, remote) = if family == AF_INET6 {
        (ip6_key(local6), ip6_key(remote6))
    } else {
        (ip4_key(local4), ip4_key(remote4))
    };

    // SAFETY: `remote_port` is a readable `__be16` field (network order).
    let remote_port = u16::from_be(unsafe { read_volatile(&raw const (*lookup).remote_port) });

    // Connections the pod makes to itself. Those to 127/8 or ::1 arrive on
    // `lo` (ingress_ifindex 1). Those to the pod's own address do not: the
    // kernel reports the ifindex of the device owning the address (the veth,
    // observed on 6.18), but their source is the destination itself, which
    // the kernel picks as source of a local route. Neither can be forged: a
    // remote peer cannot complete a handshake from the pod's own address (the
    // SYN-ACK stays in the pod), and an in-pod socket's connect passed the
    // connect hooks, which captured it unless the port is excluded.
    let from_itself = if family == AF_INET6 {
        local6[0] == remote6[0]
            && local6[1] == remote6[1]
            && local6[2] == remote6[2]
            && local6[3] == remote6[3]
    } else {
        local4 == remote4
    };
    // The agent delivering to the app, from the client's address
    // (IP_TRANSPARENT) or its own: recognised by the SYN's tuple, which the
    // agent files in DELIVERY_TUPLES before it connects. An app's socket
    // bound to the same addresses with the same options is not in the map.
    let delivery = DeliveryKey {
        local,
        remote,
        local_port,
        remote_port,
        _pad: [0; 4],
    };
    if ifindex == LOOPBACK_IFINDEX || from_itself || DELIVERY_TUPLES.get_ptr(&delivery).is_some() {
        count(Counter::LookupBypassLoopback);
        return SK_PASS;
    }

    let Some(slot) = POD_ADDRS.get_ptr(&local) else {
        count(Counter::LookupNotEnrolled);
        return SK_PASS;
    };
    // SAFETY: a non-NULL lookup result points to a live `PodSlot`; it is
    // copied to the stack at once.
    let slot = unsafe { *slot };

    if PROBE_SOURCES.get_ptr(&remote).is_some() {
        count(Counter::LookupBypassProbe);
        return SK_PASS;
    }

    let port_key = PortKey {
        netns_cookie: slot.netns_cookie,
        port: local_port, // host order
        direction: direction::INBOUND,
        _pad: [0; 5],
    };
    if EXCLUDED_PORTS.get_ptr(&port_key).is_some() {
        count(Counter::LookupBypassPort);
        return SK_PASS;
    }

    let hbone = local_port == INBOUND_HBONE_PORT;
    let kind = if hbone {
        LISTENER_HBONE
    } else {
        LISTENER_PLAINTEXT
    };
    // An out-of-range slot finds no socket below and is dropped.
    let index = slot.slot.wrapping_mul(LISTENERS_PER_POD).wrapping_add(kind);
    match INBOUND_LISTENERS.redirect_sk_lookup(&ctx, index, 0) {
        Ok(()) => {
            count(if hbone {
                Counter::LookupSteeredHbone
            } else {
                Counter::LookupSteeredPlaintext
            });
            debug!(
                &ctx,
                "sk_lookup: {:i}:{} -> {:i}:{} steered to listener {}",
                remote.addr,
                remote_port,
                local.addr,
                local_port,
                index
            );
            SK_PASS
        }
        Err(errno) => {
            count(Counter::LookupDroppedNoListener);
            debug!(
                &ctx,
                "sk_lookup: {:i}:{} -> {:i}:{} dropped, listener {} unusable (errno {})",
                remote.addr,
                remote_port,
                local.addr,
                local_port,
                index,
                -errno
            );
            SK_DROP
        }
    }
}

// ------------------------------------------------------------- boilerplate

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // No program here has a panicking path; if one had, the verifier would
    // refuse the endless loop, so a program that loads cannot panic.
    loop {}
}

/// A host build has nothing to run: the crate is an eBPF object, built for
/// `bpfel-unknown-none`.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

/// The programs' license; GPL-compatible, as the helpers require.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

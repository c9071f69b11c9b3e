//! The eBPF datapath: loads the kernel programs, pins them and their maps
//! under the agent's bpffs directory, attaches them (re-adopting what a
//! previous agent left pinned), and writes enrolled pods' map entries.
//!
//! One file per job: `error` ([`DatapathError`]), `load` (loading and
//! attaching: [`Datapath`]), `pins` (the pin layout, re-adoption, [`uninstall`]),
//! `orig_dst` ([`OrigDstTable`], read by the proxy), `exempt`
//! ([`Exemptions`]: the agent's sockets and deliveries the kernel programs
//! leave alone, written by the proxy), `reply_route` (a pod's policy rule
//! that brings the app's replies to a transparent delivery back to the
//! agent: [`route_replies_to_agent`]), `keys` (addresses as
//! map keys), `sys` (system facts and calls aya does not expose),
//! `pod_maps` (a pod's map entries and `sk_lookup` link: [`PodMaps`], behind
//! the [`PodKernel`] trait the pod lifecycle in `pods` drives), and the
//! public [`counters`] and [`netns`]. The files import one way:
//! `load` → `pins`, `exempt`, `orig_dst` → `keys`, `pod_maps` → `load`, `keys`,
//! `netns`, everything → `error`; this file only re-exports.
//!
//! Links stay pinned when the agent stops, so captured traffic fails closed
//! instead of leaking plaintext (the pin layout is documented in `pins.rs`).

pub mod counters;
mod error;
mod exempt;
mod keys;
mod load;
pub mod netns;
mod orig_dst;
mod pins;
mod pod_maps;
mod reply_route;
mod sys;

pub use error::DatapathError;
pub use exempt::{DeliveryExemption, Exemption, Exemptions};
pub use keys::{ip_from_key, ip_key};
pub use load::{Datapath, DatapathConfig, LoadSummary, drive_kernel_log};
pub use orig_dst::OrigDstTable;
pub use pins::{DEFAULT_PIN_DIR, uninstall};
pub use pod_maps::{InboundSockets, PodKernel, PodKernelState, PodMaps, PublishError};
pub use reply_route::{ReplyRoutes, route_replies_to_agent};
pub use sys::{cgroup2_mount, check_privileges, probe_program_types};

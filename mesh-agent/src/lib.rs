//! The mesh node agent: an eBPF datapath that captures enrolled pods' TCP
//! traffic inside their network namespaces, and the proxy that carries it.
//!
//! Data flows one way: [`sync`] fills [`state`]; [`pods`] (the pod
//! lifecycle) acts on it through [`datapath`] and [`proxy`], which report
//! through [`telemetry`]; [`admin`] serves the
//! reports.

pub mod admin;
pub mod agent;
pub mod ca_server;
pub mod cli;
pub mod datapath;
pub mod identity;
pub mod keyed;
pub mod pods;
pub mod process;
pub mod proxy;
pub mod state;
pub mod sync;
pub mod telemetry;

/// Istio `AuthorizationPolicy` / `PeerAuthentication` engine (the `mesh-policy`
/// crate, kept free of agent dependencies so that it fuzzes on its own).
pub use mesh_policy as policy;
pub use mesh_routing as routing;

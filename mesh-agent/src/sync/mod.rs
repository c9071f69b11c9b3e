//! Sources that fill the state store: a local workload file, or the
//! Kubernetes API server (with pod discovery on the node).
#![forbid(unsafe_code)]

pub mod discovery;
pub mod file;
pub mod kube;
pub mod resources;

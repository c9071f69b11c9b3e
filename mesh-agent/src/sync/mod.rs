//! Sources that fill the state store. Today: a local workload file.

pub mod file;

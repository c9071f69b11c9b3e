//! L7 decisions. `route.rs`: the route model (pure: config in, decisions out).
#![forbid(unsafe_code)]

pub mod route;

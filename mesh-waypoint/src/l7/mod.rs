//! L7 decisions. `route.rs`: the route model (pure: config in, decisions
//! out); `virtual_service.rs`: Istio `VirtualService` `http:` routes
//! compiled into the same model; `compile.rs`: both into one table.
#![forbid(unsafe_code)]

mod compile;
pub mod route;
pub mod virtual_service;

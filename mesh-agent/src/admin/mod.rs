//! Operator-facing surfaces: logging set-up today; metrics, config dump and
//! readiness come with the observability work.

pub mod logging;

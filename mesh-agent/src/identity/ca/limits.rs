//! The mesh CA's fixed file names and limits.

use std::time::Duration;

/// File name of the CA certificate written by `ca init`.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA key written by `ca init` (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// Default lifetime of a root created by `ca init`: ten years.
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Longest lifetime `ca init` accepts: a hundred years.
pub const MAX_CA_DAYS: u32 = 36_500;

/// How far a workload certificate's validity is back-dated, so that peers
/// whose clocks run a little behind accept it.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

//! Validation and lowering of the written policies into the matchers of
//! [`crate::rule`]: one file per part of a policy (the policy itself, a
//! rule, its sources, operations and conditions, the field values), each
//! reporting problems with the field path.

mod authz;
mod condition;
mod layer;
mod operation;
mod peer_authn;
mod rule;
mod source;
mod values;

pub(crate) use authz::{Attach, compile_authz};
pub use authz::{DRY_RUN_ANNOTATION, parse_bool};
pub(crate) use layer::Layer;
pub(crate) use peer_authn::compile_peer_authn;

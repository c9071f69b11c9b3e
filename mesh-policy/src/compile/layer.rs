//! Which proxy a policy is lowered for, and the fields of a rule that
//! layer cannot check: what the rule, source, operation and condition
//! lowerings share (kept apart so that they import it, not each other).

/// Which proxy a policy is lowered for: the node agent (L4: HTTP fields
/// cannot be checked) or a waypoint (HTTP fields are matchers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layer {
    Node,
    /// HTTP requests at a waypoint.
    Waypoint,
    /// Opaque TCP streams at a waypoint: its policies (targetRefs), their
    /// HTTP fields lowered as the node agent does (fail safe).
    WaypointTcp,
}

/// The rule's fields that the layer cannot check (field paths), set aside
/// by `rule::with_l7`.
pub(super) struct Unchecked {
    pub layer: Layer,
    pub fields: Vec<String>,
}

impl Unchecked {
    pub(super) fn push(&mut self, field: String) {
        self.fields.push(field);
    }

    /// Whether HTTP fields become matchers.
    pub(super) fn http(&self) -> bool {
        self.layer == Layer::Waypoint
    }
}

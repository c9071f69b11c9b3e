//! What became of each object: applied, rejected (with the field path),
//! left to L7, or not for the mesh, and the fields that were ignored.

use serde::Serialize;

/// The kinds of object the engine reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    /// `networking.istio.io` DestinationRule.
    DestinationRule,
    /// `networking.istio.io` VirtualService.
    VirtualService,
    /// `gateway.networking.k8s.io` TCPRoute.
    #[serde(rename = "TCPRoute")]
    TcpRoute,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::DestinationRule => "DestinationRule",
            Self::VirtualService => "VirtualService",
            Self::TcpRoute => "TCPRoute",
        })
    }
}

/// The fate of one object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Status {
    /// In force (its warnings list what of it is not).
    Applied,
    /// Invalid: nothing of it is in force.
    Rejected {
        /// Where (`spec.subsets[1].name`).
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// Only L7 routes (`http:`, `tls:`): needs a waypoint; not applied here.
    NeedsL7 {
        /// Which.
        reason: String,
    },
    /// Valid, but not for the mesh's node proxy (bound to a gateway).
    NotApplied {
        /// Why.
        reason: String,
    },
}

/// A field of an applied object that is not in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Warning {
    /// Where (`spec.http`, `spec.trafficPolicy.connectionPool.http`).
    pub field: String,
    /// Why it is not applied.
    pub message: String,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// One object's report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ObjectReport {
    /// Its kind.
    pub kind: Kind,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// What became of it.
    #[serde(flatten)]
    pub status: Status,
    /// Ignored fields and doubtful values.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<Warning>,
}

impl ObjectReport {
    /// `Kind namespace/name`.
    pub fn object(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// Every object's report, in input order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The objects.
    pub objects: Vec<ObjectReport>,
}

impl Report {
    /// Whether every object is applied without warnings.
    pub fn is_clean(&self) -> bool {
        self.objects
            .iter()
            .all(|o| o.status == Status::Applied && o.warnings.is_empty())
    }

    /// The report of `kind namespace/name`.
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<&ObjectReport> {
        self.objects
            .iter()
            .find(|o| o.kind == kind && o.namespace == namespace && o.name == name)
    }
}

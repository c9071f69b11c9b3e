//! A criterion-free micro-benchmark of [`PolicyStore::evaluate`], callable
//! from `cargo xtask bench` (or any binary): it shows that the cost of a
//! decision depends on the policies selecting the workload, not on the
//! number of policies in the mesh.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use crate::connection::{Connection, WorkloadRef};
use crate::parse::parse_documents;
use crate::store::PolicyStore;

/// Result of [`bench_evaluate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchResult {
    /// AuthorizationPolicies in the mesh.
    pub policies_in_mesh: usize,
    /// Of which apply to the evaluated workload.
    pub policies_selecting_workload: usize,
    /// Evaluations run.
    pub iterations: usize,
    /// Total time.
    pub total: Duration,
}

impl BenchResult {
    /// Mean time of one decision.
    pub fn per_evaluation(&self) -> Duration {
        self.total / u32::try_from(self.iterations.max(1)).unwrap_or(u32::MAX)
    }
}

/// Builds a mesh of `n_policies` AuthorizationPolicies — spread over
/// namespaces of 10 workloads (`app: app-0..9`), one selector policy per
/// workload alternating ALLOW and DENY, plus 2 mesh-wide and 1
/// namespace-wide policy per namespace — then times `iterations` decisions
/// for one workload (a worst case: its DENY does not match, so every ALLOW
/// rule is tried).
pub fn bench_evaluate(n_policies: usize, iterations: usize) -> BenchResult {
    let mut text = String::new();
    let mut doc = |ns: &str, name: &str, spec: &str| {
        let _ = writeln!(
            text,
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}"
        );
    };
    doc(
        "istio-system",
        "mesh-deny-bad",
        "{action: DENY, rules: [{from: [{source: {ipBlocks: [203.0.113.0/24]}}]}]}",
    );
    doc(
        "istio-system",
        "mesh-audit",
        "{action: AUDIT, rules: [{to: [{operation: {ports: ['9999']}}]}]}",
    );
    let mut made = 2;
    let mut ns_i = 0;
    while made < n_policies {
        let ns = format!("ns-{ns_i}");
        doc(
            &ns,
            "ns-deny",
            "{action: DENY, rules: [{from: [{source: {namespaces: [evil]}}]}]}",
        );
        made += 1;
        for app in 0..10 {
            if made >= n_policies {
                break;
            }
            let spec = if app % 2 == 0 {
                format!(
                    "{{selector: {{matchLabels: {{app: app-{app}}}}}, rules: [{{from: [{{source: {{principals: [cluster.local/ns/{ns}/sa/client-{app}]}}}}], to: [{{operation: {{ports: ['8080', '9090']}}}}]}}]}}"
                )
            } else {
                format!(
                    "{{selector: {{matchLabels: {{app: app-{app}}}}}, action: DENY, rules: [{{from: [{{source: {{notNamespaces: [{ns}, istio-system]}}}}]}}]}}"
                )
            };
            doc(&ns, &format!("app-{app}"), &spec);
            made += 1;
        }
        ns_i += 1;
    }
    let (store, _report) = PolicyStore::from_text("istio-system", &text);
    let labels = BTreeMap::from([("app".to_owned(), "app-0".to_owned())]);
    let workload = WorkloadRef {
        namespace: "ns-0",
        labels: &labels,
    };
    let conn = Connection {
        source_principal: Some("cluster.local/ns/ns-0/sa/client-0"),
        source_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)),
        remote_ip: None,
        destination_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 1, 9)),
        destination_port: 8080,
    };
    let start = Instant::now();
    for _ in 0..iterations {
        black_box(store.evaluate(black_box(&conn), black_box(&workload)));
    }
    let total = start.elapsed();
    BenchResult {
        policies_in_mesh: store.authorization_policy_count(),
        policies_selecting_workload: store.policies_for(&workload).len(),
        iterations,
        total,
    }
}

/// Parses `text` `iterations` times (the parser's cost, for the same
/// report).
pub fn bench_parse(text: &str, iterations: usize) -> Duration {
    let start = Instant::now();
    for _ in 0..iterations {
        black_box(parse_documents(black_box(text)));
    }
    start.elapsed()
}

//! Policy conformance on the real agent (issue 9, item 8): IPv4-mapped
//! `ipBlocks`, the `istio.io/dry-run` annotation, and policy objects in the
//! workload file that the API server would refuse.

mod common;

use common::Mesh;
use mesh_lab::{LabSpec, NodeSpec, PodSpec, app::ProbeOutcome};

/// Node 0: `a` (enrolled), `p` (not enrolled: a plaintext client). Node 1:
/// `c` (enrolled, echo on 8080). No agent runs yet.
fn lab() -> Mesh {
    let mut mesh = Mesh::new(
        LabSpec::new()
            .node(
                NodeSpec::new()
                    .pod(PodSpec::new("a"))
                    .pod(PodSpec::new("p")),
            )
            .node(NodeSpec::new().pod(PodSpec::new("c"))),
    );
    mesh.echo("c", &[8080]);
    mesh
}

/// Writes both nodes' files with `policies` (YAML list items; none if
/// empty): before the agents start, or for the agents to reject.
fn write(mesh: &Mesh, policies: &str) {
    write_with(mesh, policies, false);
}

/// Writes both nodes' files with `policies` and waits until both running
/// agents have published and applied them.
fn write_applied(mesh: &Mesh, policies: &str) {
    write_with(mesh, policies, true);
}

fn write_with(mesh: &Mesh, policies: &str, wait: bool) {
    let n0 = mesh.workloads_yaml(0, &[("a", true), ("p", false)], &[("c", true)]);
    let n1 = mesh.workloads_yaml(1, &[("c", true)], &[("a", true), ("p", false)]);
    for (node, text) in [(0, n0), (1, n1)] {
        let text = if policies.is_empty() {
            text
        } else {
            Mesh::with_policies(&text, policies)
        };
        if wait {
            mesh.write_workload_text_applied(node, &text);
        } else {
            mesh.write_workload_text(node, &text);
        }
    }
}

fn start(mesh: &mut Mesh) {
    mesh.start_agent(0);
    mesh.start_agent(1);
}

fn authz(name: &str, annotations: &str, spec: &str) -> String {
    format!(
        "  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    metadata: {{name: {name}, namespace: default{annotations}}}\n    spec: {spec}\n"
    )
}

fn denied(o: &ProbeOutcome) -> bool {
    matches!(
        o,
        ProbeOutcome::Reset | ProbeOutcome::Refused | ProbeOutcome::Connected
    )
}

/// `ipBlocks: ["::ffff:<p>"]` once matched the IPv4 client p (an over-allow);
/// in Istio an IPv4 peer never matches an IPv6 range. p reaches the agent's
/// dual-stack listener as `::ffff:<p>`, which the agent compares as IPv4.
#[test]
fn a_v4_mapped_ip_block_never_matches_an_ipv4_peer() {
    let mut mesh = lab();
    let p = mesh.lab.pod("p").expect("p").ipv4();
    let c = mesh.v4("c", 8080);
    write(
        &mesh,
        &authz(
            "mapped",
            "",
            &format!(r#"{{rules: [{{from: [{{source: {{ipBlocks: ["::ffff:{p}"]}}}}]}}]}}"#),
        ),
    );
    start(&mut mesh);
    let o = mesh.probe("p", &c, &[]);
    assert!(denied(&o), "p allowed by an IPv4-mapped IPv6 block: {o}");
    // A denied connection is logged before it is refused; the policy's
    // warning, when it is compiled (before the agent is ready).
    mesh.wait_closed(1, 1);
    assert!(mesh.agent_log_count(1, "no ALLOW policy matched") >= 1);
    assert!(mesh.agent_log_count(1, "is an IPv4-mapped IPv6 range") >= 1);

    // The same address written as IPv4 matches the (v4-mapped) peer.
    write_applied(
        &mesh,
        &authz(
            "v4",
            "",
            &format!(r#"{{rules: [{{from: [{{source: {{ipBlocks: ["{p}/32"]}}}}]}}]}}"#),
        ),
    );
    assert_eq!(mesh.probe("p", &c, &[]), ProbeOutcome::Echoed);
}

/// `istio.io/dry-run` is read like Go's `strconv.ParseBool`: `"1"` is a
/// dry run (audited, not enforced), `"F"` is not. `"tRuE"` is invalid: the
/// API server (Istio's webhook) refuses it, so the file source rejects the
/// file and keeps the last good state (the engine, given such an object by
/// another source, reports it and enforces the policy: unit-tested).
#[test]
fn the_dry_run_annotation_is_read_like_go_parse_bool() {
    let mut mesh = lab();
    let c = mesh.v4("c", 8080);
    let deny_all = |value: &str| {
        authz(
            "deny-all",
            &format!(", annotations: {{istio.io/dry-run: '{value}'}}"),
            "{action: DENY, rules: [{}]}",
        )
    };
    write(&mesh, &deny_all("1"));
    start(&mut mesh);
    assert_eq!(mesh.probe("a", &c, &[]), ProbeOutcome::Echoed);
    // The audit is logged when the connection is authorized, before it is relayed.
    assert!(mesh.agent_log_count(1, "connection matched an AUDIT policy") >= 1);

    write(&mesh, &deny_all("tRuE"));
    mesh.wait_rejected(1, 1);
    let log = mesh.agent(1).log_contents().expect("log");
    assert!(
        log.contains("policies[0].metadata.annotations[istio.io/dry-run]: AuthorizationPolicy default/deny-all: invalid value \"tRuE\""),
        "{log}"
    );
    assert_eq!(mesh.probe("a", &c, &[]), ProbeOutcome::Echoed);

    write_applied(&mesh, &deny_all("F"));
    let o = mesh.probe("a", &c, &[]);
    assert!(denied(&o), "a under a deny-all with dry-run 'F' got {o}");
    mesh.wait_closed(1, 1);
    assert!(mesh.agent_log_count(1, "denied by AuthorizationPolicy default/deny-all") >= 1);
}

/// A deny-all without a name reached the engine, which could only drop it:
/// the file is now rejected with the field, and the last good state stays.
#[test]
fn a_policy_the_api_server_would_refuse_rejects_the_workload_file() {
    let mut mesh = lab();
    let c = mesh.v4("c", 8080);
    write(&mesh, "");
    start(&mut mesh);
    assert_eq!(mesh.probe("a", &c, &[]), ProbeOutcome::Echoed);

    write(
        &mesh,
        "  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    metadata: {namespace: default}\n    spec: {action: DENY, rules: [{}]}\n",
    );
    mesh.wait_rejected(1, 1);
    let log = mesh.agent(1).log_contents().expect("log");
    let line = log
        .lines()
        .find(|l| l.contains("workload file rejected"))
        .expect("line");
    assert!(line.contains("policies[0].metadata.name"), "{line}");
    // The last good state (no policy) stays in force.
    assert_eq!(mesh.probe("a", &c, &[]), ProbeOutcome::Echoed);

    // Selector and targetRefs together: refused too, not ignored as a waypoint policy.
    write(
        &mesh,
        &authz(
            "both",
            "",
            "{action: DENY, selector: {matchLabels: {app: c}}, targetRefs: [{kind: Service, name: c}], rules: [{}]}",
        ),
    );
    mesh.wait_rejected(1, 2);
    assert!(
        mesh.agent(1)
            .log_contents()
            .expect("log")
            .contains("policies[0].spec: AuthorizationPolicy default/both: only one of selector"),
    );
}

//! The traffic-management objects reach the running agent from both
//! sources, and `/config_dump` shows them (`routing_objects`, with a count
//! per kind): from the workload file's `resources:` list (with a policy in
//! the same list enforced, an invalid object refused with its field path
//! while the last good state stays), and from the API server (with a CRD
//! that is not installed listed in `sources.missing_kinds` until it is).
//! Needs root (lab tests do not skip).

mod common;
mod kube_fake;

use std::time::Duration;

use common::{Mesh, listener_in_netns};
use kube_fake::{FakeApiServer, Res, objects};
use mesh_lab::{LabSpec, NodeSpec, PodSpec, app::ProbeOutcome};
use serde_json::{Value, json};

/// `{"destination_rules": n, "virtual_services": n, "tcp_routes": n}`.
/// The dump's routing object counts (no HTTPRoute in these tests: the
/// waypoint's kind, carried for it).
fn counts(dr: u64, vs: u64, tcp: u64) -> Value {
    json!({"destination_rules": dr, "virtual_services": vs, "tcp_routes": tcp, "http_routes": 0})
}

fn resources(weight_v2: u32, deny_all: bool) -> String {
    let mut out = format!(
        "resources:
  - apiVersion: networking.istio.io/v1beta1
    kind: DestinationRule
    metadata: {{name: b}}
    spec: {{host: b, subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]}}
  - apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {{name: b, namespace: default}}
    spec: {{hosts: [b], tcp: [{{route: [{{destination: {{host: b, subset: v1}}, weight: {}}}, {{destination: {{host: b, subset: v2}}, weight: {weight_v2}}}]}}]}}
  - apiVersion: gateway.networking.k8s.io/v1alpha2
    kind: TCPRoute
    metadata: {{name: b, namespace: default}}
    spec: {{parentRefs: [{{group: '', kind: Service, name: b}}], rules: [{{backendRefs: [{{name: b, port: 8080}}]}}]}}
",
        100 - weight_v2
    );
    if deny_all {
        out.push_str(
            "  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: deny-all, namespace: default}
    spec: {action: DENY, rules: [{}]}
",
        );
    }
    out
}

#[test]
fn file_resources_reach_the_running_agent() {
    let mut mesh = Mesh::new(
        LabSpec::new().node(
            NodeSpec::new()
                .pod(PodSpec::new("a"))
                .pod(PodSpec::new("b")),
        ),
    );
    mesh.echo("b", &[8080]);
    let pods = mesh.workloads_yaml(0, &[("a", true), ("b", true)], &[]);
    mesh.write_workload_text(0, &format!("{pods}{}", resources(10, true)));
    mesh.start_agent(0);
    let dump = mesh.wait_dump(0, "the file's routing objects", |d| {
        d["routing_objects"]["counts"] == counts(1, 1, 1)
    });
    let r = &dump["routing_objects"];
    // As the API server would serve them: storage version, namespace, defaults.
    assert_eq!(
        r["destination_rules"][0]["apiVersion"],
        "networking.istio.io/v1"
    );
    assert_eq!(
        r["destination_rules"][0]["metadata"]["namespace"],
        "default"
    );
    assert_eq!(
        r["virtual_services"][0]["spec"]["tcp"][0]["route"][1]["weight"],
        10
    );
    assert_eq!(
        r["tcp_routes"][0]["spec"]["rules"][0]["backendRefs"][0]["weight"],
        1
    );
    // The policy of the same list is in force: a→b is denied.
    assert_eq!(
        dump["policies"]["authorization"].as_array().map(Vec::len),
        Some(1)
    );
    assert_ne!(
        mesh.probe("a", &mesh.v4("b", 8080), &[]),
        ProbeOutcome::Echoed,
        "deny-all from resources: enforced"
    );

    // A changed weight, and the policy gone: both applied.
    mesh.write_workload_text_applied(0, &format!("{pods}{}", resources(100, false)));
    let dump = mesh.config_dump(0);
    assert_eq!(
        dump["routing_objects"]["virtual_services"][0]["spec"]["tcp"][0]["route"][1]["weight"],
        100
    );
    assert_eq!(dump["policies"]["authorization"], json!([]));
    assert_eq!(
        mesh.probe("a", &mesh.v4("b", 8080), &[]),
        ProbeOutcome::Echoed
    );

    // An invalid object: the file is refused with the field path and the
    // last good state stays in force.
    let generation = mesh.published_generation(0);
    let bad = resources(50, true).replace(
        "destination: {host: b, subset: v2}",
        "destination: {subset: v2}",
    );
    mesh.write_workload_text(0, &format!("{pods}{bad}"));
    mesh.wait_rejected(0, 1);
    let dump = mesh.config_dump(0);
    let error = dump["sources"]["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("resources[1].spec.tcp[0].route[1].destination.host"),
        "{error}"
    );
    assert_eq!(mesh.published_generation(0), generation);
    assert_eq!(
        dump["routing_objects"]["virtual_services"][0]["spec"]["tcp"][0]["route"][1]["weight"],
        100
    );
    assert_eq!(
        dump["policies"]["authorization"],
        json!([]),
        "deny-all not applied"
    );
    assert_eq!(
        mesh.probe("a", &mesh.v4("b", 8080), &[]),
        ProbeOutcome::Echoed
    );
    mesh.stop_agent(0);
}

#[test]
fn kube_routing_objects_reach_the_running_agent() {
    let mut mesh = Mesh::new(LabSpec::new().node(NodeSpec::new().pod(PodSpec::new("a"))));
    let node = mesh.lab.node(0).expect("node").clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let api = runtime.block_on(FakeApiServer::start_on(listener_in_netns(
        &node.netns_path(),
    )));
    api.apply(objects::namespace("shop", json!({})));
    api.apply(objects::node(node.name(), &node.bridge_v4().to_string()));
    api.apply(objects::destination_rule(
        "shop",
        "web",
        "web",
        "LEAST_REQUEST",
    ));
    api.apply(objects::virtual_service("shop", "web", "web", 90, 10));
    api.apply(objects::tcp_route(
        "shop",
        "web",
        "web",
        &[("web-v2", 80, 1)],
    ));
    // The Gateway API is not installed yet.
    api.set_missing(Res::TcpRoutes, true);

    mesh.write_workloads(0, &[]); // not read in --kube mode
    let url = api.url();
    mesh.start_agent_with(
        0,
        &["--kube", "--api-server", &url, "--node-name", node.name()],
    );
    let dump = mesh.wait_dump(0, "the routing objects and the missing TCPRoute", |d| {
        d["routing_objects"]["counts"] == counts(1, 1, 0)
            && d["sources"]["missing_kinds"]
                == json!([{"kind": "tcproutes.gateway.networking.k8s.io", "reason": "not_served"}])
    });
    let dr = &dump["routing_objects"]["destination_rules"][0];
    assert_eq!(dr["kind"], "DestinationRule");
    assert_eq!(
        dr["spec"]["trafficPolicy"]["loadBalancer"]["simple"],
        "LEAST_REQUEST"
    );
    assert!(dr["metadata"].get("managedFields").is_none(), "{dr}");

    // Installed later: picked up without a restart, no longer missing.
    api.set_missing(Res::TcpRoutes, false);
    mesh.wait_dump(0, "the TCPRoute once its CRD is served", |d| {
        d["routing_objects"]["counts"] == counts(1, 1, 1)
            && d["sources"]["missing_kinds"] == json!([])
    });
    // A change and a delete arrive.
    api.apply(objects::virtual_service("shop", "web", "web", 0, 100));
    api.delete("networking.istio.io/v1", "DestinationRule", "shop", "web");
    mesh.wait_dump(0, "the changed weights and the deleted rule", |d| {
        d["routing_objects"]["counts"] == counts(0, 1, 1)
            && d["routing_objects"]["virtual_services"][0]["spec"]["tcp"][0]["route"][1]["weight"]
                == 100
    });
    mesh.stop_agent(0);
    drop(api);
    runtime.shutdown_timeout(Duration::from_secs(1));
}

//! The agent in Kubernetes mode in the lab: configured only from the fake API
//! server (pods, namespace labels, the node), it finds the lab pods' network
//! namespaces with the same `/proc` discovery it uses on a cluster node,
//! enrolls them, carries their traffic, and un-enrolls them when the
//! namespace label goes. Needs root (lab tests do not skip).
//!
//! Discovery looks for the pod UID in a process's cgroup path, as kubelet's
//! cgroupfs driver writes it (`…/pod<uid>/…`). The lab puts a pod's processes
//! in `<lab cgroup>/n<i>/<lab pod name>`, so the lab pods here are named
//! `pod<uid>` and the API objects carry that `<uid>`: the agent sees the same
//! layout as on a node. (Kubernetes UIDs are 36-character UUIDs; the lab's
//! names are limited to 32 characters, so these UIDs are shorter. Discovery
//! does not depend on the UID's format.)

mod common;
mod kube_fake;

use std::time::Duration;

use common::{Mesh, delta, listener_in_netns};
use kube_fake::{FakeApiServer, objects};
use mesh_lab::{LabSpec, NodeSpec, PodSpec};
use serde_json::json;

/// Inbound connections the kernel handed to the agent (to its plaintext or
/// its HBONE listener, whichever the proxy uses between enrolled pods).
fn steered(before: &common::Counters, after: &common::Counters) -> u64 {
    after
        .keys()
        .filter(|k| k.starts_with("lookup_steered"))
        .map(|k| delta(before, after, k))
        .sum()
}

#[test]
fn agent_configured_from_the_api_server_enrolls_lab_pods_and_carries_traffic() {
    const UID_CLIENT: &str = "c11e47-0001";
    const UID_SERVER: &str = "5e7e72-0002";
    const UID_OTHER: &str = "07be72-0003";
    let (client, server, other) = (
        format!("pod{UID_CLIENT}"),
        format!("pod{UID_SERVER}"),
        format!("pod{UID_OTHER}"),
    );
    let mut mesh = Mesh::new(
        LabSpec::new().node(
            NodeSpec::new()
                .pod(PodSpec::new(client.as_str()))
                .pod(PodSpec::dual_stack(server.as_str()))
                .pod(PodSpec::new(other.as_str())),
        ),
    );
    let node = mesh.lab.node(0).expect("node").clone();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = listener_in_netns(&node.netns_path());
    let api = runtime.block_on(FakeApiServer::start_on(listener));

    // The cluster as the API server describes it: namespace `shop` in
    // ambient mode with `client` and `server`; `other` in an unlabelled one.
    api.apply(objects::namespace(
        "shop",
        json!({"istio.io/dataplane-mode": "ambient"}),
    ));
    api.apply(objects::namespace("tools", json!({})));
    let mut node_obj = objects::node(node.name(), &node.bridge_v4().to_string());
    node_obj["status"]["addresses"]
        .as_array_mut()
        .expect("addresses")
        .push(json!({"type": "InternalIP", "address": node.bridge_v6().to_string()}));
    api.apply(node_obj);
    for (ns, name, uid, lab_pod) in [
        ("shop", "client", UID_CLIENT, &client),
        ("shop", "server", UID_SERVER, &server),
        ("tools", "other", UID_OTHER, &other),
    ] {
        let ips: Vec<String> = mesh
            .lab
            .pod(lab_pod)
            .expect("lab pod")
            .ips()
            .iter()
            .map(ToString::to_string)
            .collect();
        let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
        api.apply(objects::pod(
            ns,
            name,
            uid,
            node.name(),
            &ips,
            json!({"app": name}),
        ));
    }
    // A pod of another node, which this agent must leave alone.
    api.apply(objects::pod(
        "shop",
        "elsewhere",
        "e15e00-0004",
        "another-node",
        &["198.18.99.10"],
        json!({}),
    ));

    // Every pod has a running process (found by discovery); then the agent.
    mesh.echo(&client, &[9000]);
    mesh.echo(&server, &[8080]);
    mesh.echo(&other, &[8080]);
    mesh.write_workloads(0, &[]); // not read in --kube mode
    let url = api.url();
    mesh.start_agent_with(
        0,
        &["--kube", "--api-server", &url, "--node-name", node.name()],
    );
    // Ready: the source synced and the first enrollment pass ran.
    mesh.wait_enrolled(0, 2);
    let log = mesh.agent(0).log_contents().expect("agent log");
    for pod in ["shop/client", "shop/server"] {
        assert!(
            log.lines()
                .any(|l| l.contains("pod enrolled") && l.contains(pod) && l.contains("/ns/net")),
            "{pod} enrolled with a /proc netns:\n{log}"
        );
    }
    assert!(!log.contains("pod enrolled pod=tools/other"), "{log}");
    assert!(
        !log.contains("shop/elsewhere"),
        "remote pod not enrolled here:\n{log}"
    );

    // Traffic between the enrolled pods goes through the agent, both ways.
    let before = mesh.counters(0);
    let to_server = mesh.v4(&server, 8080);
    let report = mesh.client(&client, &to_server, &["--conns", "2", "--bytes", "50000"]);
    assert_eq!((report.ok, report.failed), (2, 0), "{report:?}");
    assert_eq!(report.bytes_received, 100_000);
    let after = mesh.counters(0);
    assert_eq!(delta(&before, &after, "connect_redirected"), 2);
    // Both pods are this node's: the agent delivered into the server pod
    // itself (the same-node fast path), nothing steered as from outside.
    assert_eq!(steered(&before, &after), 0, "inbound steered");
    assert_eq!(mesh.proxy_stats(0)["same_node_fast_path"], 2);
    // The workload identities come from the API server's namespace and
    // service account (`spec.serviceAccountName` is `<name>-sa` there).
    mesh.wait_closed(0, 2);
    assert!(mesh.agent_log_count(0, "/ns/shop/sa/client-sa") >= 1);

    // The un-enrolled pod is untouched by the mesh.
    let before = mesh.counters(0);
    let report = mesh.client(&other, &mesh.v4(&server, 8080), &["--conns", "1"]);
    assert_eq!((report.ok, report.failed), (1, 0), "{report:?}");
    let after = mesh.counters(0);
    assert_eq!(delta(&before, &after, "connect_not_enrolled"), 1);
    assert_eq!(delta(&before, &after, "connect_redirected"), 0);

    // Removing the namespace label un-enrolls both pods; traffic goes direct.
    api.apply(objects::namespace("shop", json!({})));
    mesh.wait_enrolled(0, 0);
    assert!(mesh.agent_log_count(0, "pod unenrolled") >= 2);
    let before = mesh.counters(0);
    let report = mesh.client(&client, &to_server, &["--conns", "1"]);
    assert_eq!((report.ok, report.failed), (1, 0), "{report:?}");
    let after = mesh.counters(0);
    assert_eq!(delta(&before, &after, "connect_redirected"), 0);
    assert_eq!(steered(&before, &after), 0);

    // The agent stops cleanly; the API server goes with the runtime.
    mesh.stop_agent(0);
    drop(api);
    runtime.shutdown_timeout(Duration::from_secs(1));
}

//! Node-scoped issuance in the lab (issue 15): two agents with no CA key
//! get their pods' certificates from `mesh-agent ca serve` (the real binary,
//! gRPC over TLS, with a fake API server answering TokenReview and pod
//! lookups), and carry mutual-TLS traffic across nodes with them; through an
//! issuer outage during rotation the traffic continues on the valid
//! certificates, and rotation recovers when the issuer returns. Needs root
//! (lab tests do not skip).

mod common;
mod kube_fake;

use std::{net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use common::{Mesh, agent_bin, delta, listener_in_netns};
use kube_fake::{FakeApiServer, TokenUser, objects};
use mesh_lab::{LabChild, LabSpec, NodeSpec, PodSpec};
use serde_json::{Value, json};

/// The name on the issuer's TLS certificate, which the agents check.
const CA_NAME: &str = "mesh-ca.lab";
const AUDIENCE: &str = "istio-ca";
/// Short enough that rotation (at 40-50 % of the life) happens within the
/// test; the issuer's minimum is lowered to match.
const CERT_TTL: &str = "40s";
/// Longer than the whole rotation window of a [`CERT_TTL`] certificate
/// (40-50 % of 40 s after issuance), with room for a loaded machine.
const ROTATION_WAIT: Duration = Duration::from_secs(35);

struct Issuer {
    /// Kept alive: the fake API server's runtime.
    _runtime: tokio::runtime::Runtime,
    _api: FakeApiServer,
    addr: SocketAddr,
    api_url: String,
    ca_dir: PathBuf,
    child: Option<LabChild>,
}

impl Issuer {
    /// Starts `mesh-agent ca serve` in node 0's netns.
    fn start(&mut self, mesh: &Mesh) {
        let mut cmd = Command::new(agent_bin());
        cmd.args(["ca", "serve", "--listen", &self.addr.to_string()])
            .args(["--dns-name", CA_NAME, "--audience", AUDIENCE])
            .args(["--node-service-account", "mesh-system/mesh-agent"])
            .args(["--min-cert-ttl", "30s", "--api-server", &self.api_url])
            .arg("--ca-dir")
            .arg(&self.ca_dir)
            .env("MESH_LOG", "info");
        self.child = Some(mesh.lab.spawn_in_node(0, cmd).expect("spawn ca serve"));
    }

    fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            let _ = child.kill();
        }
    }
}

/// Pods `a` (node 0) and `c` (node 1, echo on 8080), both enrolled; the API
/// server knows them and the two agents' pods; the issuer runs; each agent
/// has a node-bound token and asks the issuer.
fn setup() -> (Mesh, Issuer) {
    let mut mesh = Mesh::new(
        LabSpec::new()
            .node(NodeSpec::new().pod(PodSpec::new("a")))
            .node(NodeSpec::new().pod(PodSpec::new("c"))),
    );
    let nodes = [
        mesh.lab.node(0).expect("node").clone(),
        mesh.lab.node(1).expect("node").clone(),
    ];
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let api = runtime.block_on(FakeApiServer::start_on(listener_in_netns(
        &nodes[0].netns_path(),
    )));
    let pod = |ns: &str, name: &str, uid: &str, node: &str, sa: &str, ips: &[&str]| {
        let mut p = objects::pod(ns, name, uid, node, ips, json!({}));
        p["spec"]["serviceAccountName"] = Value::from(sa);
        p
    };
    for (i, node) in nodes.iter().enumerate() {
        let agent = format!("mesh-agent-{i}");
        let uid = format!("a9e47-{i}");
        api.apply(pod(
            "mesh-system",
            &agent,
            &uid,
            node.name(),
            "mesh-agent",
            &[&node.bridge_v4().to_string()],
        ));
        let token = format!("token-of-agent-{i}");
        api.add_token(
            &token,
            TokenUser::bound(
                "mesh-system",
                "mesh-agent",
                &agent,
                &uid,
                Some(node.name()),
                AUDIENCE,
            ),
        );
        std::fs::write(mesh.lab.scratch_path(&format!("token-{i}")), token).expect("token");
    }
    // The workload file names a pod's service account after the pod.
    for (name, node) in [("a", 0), ("c", 1)] {
        let ip = mesh.lab.pod(name).expect("pod").ips()[0].to_string();
        api.apply(pod(
            "default",
            name,
            &format!("{name}-uid"),
            nodes[node].name(),
            name,
            &[&ip],
        ));
    }
    let n0 = mesh.workloads_yaml(0, &[("a", true)], &[("c", true)]);
    let n1 = mesh.workloads_yaml(1, &[("c", true)], &[("a", true)]);
    mesh.write_workload_text(0, &n0);
    mesh.write_workload_text(1, &n1);
    mesh.echo("c", &[8080]);

    let mut issuer = Issuer {
        addr: SocketAddr::new(nodes[0].bridge_v4().into(), 15012),
        api_url: api.url(),
        ca_dir: mesh.ca_dir(),
        _runtime: runtime,
        _api: api,
        child: None,
    };
    issuer.start(&mesh);
    for i in 0..2 {
        let flags = agent_flags(&mesh, &issuer, i, &["--cert-ttl", CERT_TTL]);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        mesh.start_agent_with(i, &flags);
    }
    (mesh, issuer)
}

/// The flags of node `node`'s agent: the remote issuer, its token, `extra`.
fn agent_flags(mesh: &Mesh, issuer: &Issuer, node: usize, extra: &[&str]) -> Vec<String> {
    let token = mesh.lab.scratch_path(&format!("token-{node}"));
    let mut flags = vec![
        "--issuer".to_owned(),
        "istio-ca".to_owned(),
        "--ca-address".to_owned(),
        format!("https://{}", issuer.addr),
        "--ca-server-name".to_owned(),
        CA_NAME.to_owned(),
        "--ca-root-cert".to_owned(),
        issuer.ca_dir.join("ca.crt").display().to_string(),
        "--ca-token-file".to_owned(),
        token.display().to_string(),
    ];
    flags.extend(extra.iter().map(|s| (*s).to_owned()));
    flags
}

/// Node `node`'s issuer record (`/config_dump` `issuer`).
fn issuer_of(mesh: &Mesh, node: usize) -> Value {
    mesh.config_dump(node)["issuer"].clone()
}

fn count(issuer: &Value, key: &str) -> u64 {
    issuer[key].as_u64().unwrap_or_default()
}

/// Waits until node `node`'s agent holds a certificate for `identity`
/// issued by the CA (at least `issued` issuances so far).
fn wait_issued(mesh: &Mesh, node: usize, identity: &str, issued: u64) {
    mesh.wait_dump(
        node,
        &format!("{issued} issuances and a certificate for {identity}"),
        |dump| {
            count(&dump["issuer"], "issued") >= issued
                && dump["certificates"].as_array().is_some_and(|certs| {
                    certs.iter().any(|c| {
                        c["identity"] == identity
                            && c["expires_in_seconds"].as_i64().unwrap_or(-1) > 0
                    })
                })
        },
    );
}

fn serial(mesh: &Mesh, node: usize, identity: &str) -> String {
    mesh.config_dump(node)["certificates"]
        .as_array()
        .and_then(|certs| certs.iter().find(|c| c["identity"] == identity))
        .and_then(|c| c["serial"].as_str())
        .unwrap_or_default()
        .to_owned()
}

const ID_A: &str = "spiffe://cluster.local/ns/default/sa/a";
const ID_C: &str = "spiffe://cluster.local/ns/default/sa/c";

#[test]
fn agents_without_the_ca_key_get_node_scoped_certificates_and_ride_out_an_issuer_outage() {
    let (mesh, mut issuer) = setup();

    // Both agents use the remote issuer and hold certificates it issued
    // for their own pods only.
    for (node, id) in [(0, ID_A), (1, ID_C)] {
        let record = issuer_of(&mesh, node);
        assert_eq!(record["kind"], "istio-ca", "{record}");
        assert_eq!(
            record["endpoint"],
            format!("https://{}", issuer.addr),
            "{record}"
        );
        wait_issued(&mesh, node, id, 1);
        let certs = mesh.config_dump(node)["certificates"].clone();
        assert_eq!(certs.as_array().map(Vec::len), Some(1), "{certs}");
    }

    // Mutual TLS across nodes with the issued certificates: each agent
    // accepts the other's (chained to the mesh root, SPIFFE checked).
    let before = mesh.counters(1);
    let c = mesh.v4("c", 8080);
    let report = mesh.client("a", &c, &["--conns", "5", "--bytes", "20000"]);
    assert_eq!((report.ok, report.failed), (5, 0), "{report:?}");
    let after = mesh.counters(1);
    // Pooled: at most one TLS connection per proxy thread of a's agent.
    let threads = mesh.config_dump(0)["agent"]["proxy_threads"]
        .as_u64()
        .expect("proxy_threads");
    let tunnels = delta(&before, &after, "lookup_steered_hbone");
    assert!(
        (1..=threads).contains(&tunnels),
        "{tunnels} TLS connections, {threads} threads"
    );
    assert!(
        mesh.agent_log_count(1, &format!("src.identity=\"{ID_A}\"")) >= 5,
        "the server side saw a's issued identity"
    );

    // The issuer goes away while rotation is due: the agents fail to
    // rotate (counted), keep serving the valid certificates, and traffic
    // continues.
    let first_a = serial(&mesh, 0, ID_A);
    let failed_before = count(&issuer_of(&mesh, 0), "failed");
    issuer.stop();
    // Rotation is due 16-20 s after issuance, which can be later than the
    // common wait after the traffic above: wait for the whole window.
    mesh.wait_dump_within(
        0,
        "a failed rotation while the issuer is down",
        ROTATION_WAIT,
        |dump| count(&dump["issuer"], "failed") > failed_before,
    );
    assert_eq!(
        serial(&mesh, 0, ID_A),
        first_a,
        "still the first certificate"
    );
    let during = mesh.client("a", &c, &["--conns", "5", "--bytes", "20000"]);
    assert_eq!((during.ok, during.failed), (5, 0), "{during:?}");
    let record = issuer_of(&mesh, 0);
    assert_eq!(record["last_failure"]["identity"], ID_A, "{record}");

    // The issuer returns: rotation succeeds (before the certificate
    // expires: retries back off to at most a quarter of the time left).
    let issued_before = count(&issuer_of(&mesh, 0), "issued");
    issuer.start(&mesh);
    wait_issued(&mesh, 0, ID_A, issued_before + 1);
    assert_ne!(serial(&mesh, 0, ID_A), first_a, "rotated");
    let after = mesh.client("a", &c, &["--conns", "5", "--bytes", "20000"]);
    assert_eq!((after.ok, after.failed), (5, 0), "{after:?}");
    issuer.stop();
}

#[test]
fn an_agent_whose_issuer_refuses_fails_closed() {
    // Node 1's agent presents a token for node 0: the issuer refuses every
    // identity of node 1 (its pod is not on the token's node), so c gets
    // no certificate and a's connections to c are refused, never made
    // without mutual TLS.
    let (mut mesh, mut issuer) = setup();
    std::fs::write(mesh.lab.scratch_path("token-1"), "token-of-agent-0").expect("token");
    // A fresh identity on node 1 forces a new issuance with the bad token:
    // restart node 1's agent with an empty certificate cache.
    mesh.stop_agent(1);
    let flags = agent_flags(&mesh, &issuer, 1, &[]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    mesh.start_agent_with(1, &flags);
    mesh.wait_dump(1, "a refused issuance", |dump| {
        count(&dump["issuer"], "failed") >= 1
    });
    let record = issuer_of(&mesh, 1);
    let error = record["last_failure"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("c-uid") || error.contains("node"),
        "{record}"
    );
    assert_eq!(
        mesh.config_dump(1)["certificates"].as_array().map(Vec::len),
        Some(0)
    );
    let c = mesh.v4("c", 8080);
    let report = mesh.client("a", &c, &["--conns", "3", "--timeout-ms", "3000"]);
    assert_eq!((report.ok, report.failed), (0, 3), "{report:?}");
    issuer.stop();
}

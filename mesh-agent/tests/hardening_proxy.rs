//! Hardening of the proxy against hostile peers (issue 9): connections
//! addressed to the agent's own ports in a pod are refused instead of looping
//! back into the agent; the source of an inbound tunnel is its TCP peer, not
//! an address the peer claims; failed tunnels are reported as the mTLS
//! attempts they were.

mod common;

use std::net::SocketAddr;

use common::{Mesh, rogue};
use mesh_lab::{LabSpec, NodeSpec, PodSpec, app::ProbeOutcome};

/// Node 0: `a` (enrolled, dual-stack) and `x` (not enrolled). Node 1: `c`
/// (enrolled, dual-stack), `d` (enrolled), `u` (not enrolled) and `z`, a
/// pod in no workload file (an address the mesh does not know). Echo
/// servers on c and u. `policies` (YAML list items, made once the lab's
/// addresses are known) go to node 1's file, which `edit1` may rewrite.
fn lab(policies: impl Fn(&Mesh) -> String, edit1: impl Fn(String) -> String) -> Mesh {
    let mut mesh = Mesh::new(
        LabSpec::new()
            .node(
                NodeSpec::new()
                    .pod(PodSpec::dual_stack("a"))
                    .pod(PodSpec::new("x")),
            )
            .node(
                NodeSpec::new()
                    .pod(PodSpec::dual_stack("c"))
                    .pod(PodSpec::new("d"))
                    .pod(PodSpec::new("u"))
                    .pod(PodSpec::new("z")),
            ),
    );
    let n0 = mesh.workloads_yaml(
        0,
        &[("a", true), ("x", false)],
        &[("c", true), ("d", true), ("u", false)],
    );
    let n1 = mesh.workloads_yaml(
        1,
        &[("c", true), ("d", true), ("u", false)],
        &[("a", true), ("x", false)],
    );
    let policies = policies(&mesh);
    let n1 = if policies.is_empty() {
        n1
    } else {
        Mesh::with_policies(&n1, &policies)
    };
    mesh.write_workload_text(0, &n0);
    mesh.write_workload_text(1, &edit1(n1));
    mesh.echo("c", &[8080]);
    mesh.echo("u", &[8080]);
    mesh.start_agent(0);
    mesh.start_agent(1);
    mesh
}

fn counter(stats: &serde_json::Value, name: &str) -> u64 {
    stats[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no proxy counter {name}: {stats:#}"))
}

/// The access-log lines of node `node`'s agent that contain every `needle`.
fn access_lines(mesh: &Mesh, node: usize, needles: &[&str]) -> Vec<String> {
    mesh.agent(node)
        .log_contents()
        .expect("agent log")
        .lines()
        .filter(|l| l.contains("access: connection closed"))
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_owned)
        .collect()
}

/// The port of the `src.addr=ip:port` field of an access-log line.
fn src_port(line: &str) -> u16 {
    let addr = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("src.addr="))
        .unwrap_or_else(|| panic!("no src.addr in {line}"));
    addr.parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("src.addr {addr}: {e}"))
        .port()
}

/// What the agent writes as the reason for a connection to its own port.
const OWN_PORT: &str = "one of the agent's own ports in the pod";

#[test]
fn connections_to_the_agents_own_ports_are_refused_not_looped() {
    let mesh = lab(|_| String::new(), |t| t);
    let c = mesh.lab.pod("c").expect("c");
    let (c4, c6) = (c.ipv4(), c.ipv6().expect("c has IPv6"));
    let x_ip = mesh.lab.pod("x").expect("x").ipv4();
    let before = mesh.proxy_stats(1);

    // Plaintext to c's inbound port, from outside the mesh on another node
    // and on c's own node: one accept each, then a reset.
    for from in ["x", "u"] {
        assert_eq!(
            mesh.probe(from, &mesh.v4("c", 15006), &[]),
            ProbeOutcome::Reset,
            "{from} -> c:15006"
        );
    }
    // From an enrolled pod: its agent sends CONNECT c:15006 through a
    // tunnel, c's agent answers 400 and the app's connection is reset.
    let from_a = mesh.probe("a", &mesh.v6("c", 15006), &[]);
    assert!(
        matches!(from_a, ProbeOutcome::Reset | ProbeOutcome::Connected),
        "a -> [c]:15006 got {from_a}"
    );

    // A hostile mesh peer asking for the agent's ports by hand: 400 each.
    let rt = rogue::runtime();
    let x_netns = mesh.lab.pod("x").expect("x").netns_path();
    let hbone = SocketAddr::new(c4.into(), 15008);
    let cert = rogue::mesh_cert(&mesh, "x");
    for target in [
        SocketAddr::new(c4.into(), 15006),
        SocketAddr::new(c4.into(), 15008),
        SocketAddr::new(c4.into(), 15001),
        SocketAddr::new(c6.into(), 15006),
    ] {
        assert_eq!(
            rt.block_on(rogue::connect(&x_netns, hbone, &cert, target)),
            Ok(400),
            "CONNECT {target}"
        );
    }
    // Control: the same peer reaches the app.
    assert_eq!(
        rt.block_on(rogue::connect(
            &x_netns,
            hbone,
            &cert,
            SocketAddr::new(c4.into(), 8080)
        )),
        Ok(200)
    );

    // Each connection was accepted once, not re-delivered to the agent.
    let after = mesh.proxy_stats(1);
    let d = |name: &str| counter(&after, name) - counter(&before, name);
    assert_eq!(d("inbound_accepted"), 2 + 1 + 4 + 1, "{after:#}");
    assert_eq!(d("agent_port_refused"), 2 + 1 + 4, "{after:#}");

    // The plaintext refusals are in the access log, with the reason.
    // Each refusal is counted and logged before the client is reset, so the
    // answers above synchronise (the peer's tunnel stays open: no idle wait).
    assert!(mesh.closed_connections(1) >= 2);
    let refused = access_lines(&mesh, 1, &[OWN_PORT]);
    assert_eq!(refused.len(), 2, "{refused:#?}");
    for l in &refused {
        assert!(
            l.contains("direction=\"inbound\"") && l.contains("outcome=\"error\""),
            "{l}"
        );
        assert!(l.contains(&format!("dst.addr={c4}:15006")), "{l}");
    }
    assert!(
        refused
            .iter()
            .any(|l| l.contains(&format!("src.addr={x_ip}:"))),
        "{refused:#?}"
    );

    // Normal connections work right after, plaintext and mesh.
    assert_eq!(
        mesh.probe("x", &mesh.v4("c", 8080), &[]),
        ProbeOutcome::Echoed
    );
    assert_eq!(
        mesh.probe("a", &mesh.v6("c", 8080), &[]),
        ProbeOutcome::Echoed
    );
}

/// On node 1: only `u`'s address may connect (an `ipBlocks` ALLOW).
fn allow_only(ip: &str) -> String {
    format!(
        "  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    \
         metadata: {{name: only-u, namespace: default}}\n    \
         spec: {{action: ALLOW, rules: [{{from: [{{source: {{ipBlocks: [\"{ip}/32\"]}}}}]}}]}}\n"
    )
}

#[test]
fn a_forged_forwarded_header_neither_passes_policy_nor_hides_the_real_peer() {
    let mesh = lab(
        |m| allow_only(&m.lab.pod("u").expect("u").ipv4().to_string()),
        |t| t,
    );
    let u_ip = mesh.lab.pod("u").expect("u").ipv4();
    let rt = rogue::runtime();
    let c4 = mesh.lab.pod("c").expect("c").ipv4();
    let x_ip = mesh.lab.pod("x").expect("x").ipv4();
    let z_ip = mesh.lab.pod("z").expect("z").ipv4();
    let netns = |pod: &str| mesh.lab.pod(pod).expect("pod").netns_path();
    let hbone = SocketAddr::new(c4.into(), 15008);
    let target = SocketAddr::new(c4.into(), 8080);
    let cert_x = rogue::mesh_cert(&mesh, "x");

    // Control: the allowed address itself gets its tunnel.
    assert_eq!(
        rt.block_on(rogue::connect(&netns("u"), hbone, &cert_x, target)),
        Ok(200)
    );
    // Another address claiming to be u: denied.
    let forged = format!("for=\"{u_ip}:40000\"");
    assert_eq!(
        rt.block_on(rogue::connect_with_headers(
            &netns("x"),
            hbone,
            &cert_x,
            target,
            &[("forwarded", &forged)],
        )),
        Ok(401)
    );
    mesh.wait_closed(1, 1);
    let denied = access_lines(&mesh, 1, &["outcome=\"denied\""]);
    assert_eq!(denied.len(), 1, "{denied:#?}");
    let line = &denied[0];
    for field in [
        &format!("src.addr={x_ip}:"),
        "src.workload=\"x\"",
        "src.identity=\"spiffe://cluster.local/ns/default/sa/x\"",
        &format!("forwarded_for=\"{u_ip}:40000\""),
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
    assert!(!line.contains(&format!("src.addr={u_ip}")), "{line}");

    // A peer at an address the mesh does not know, with a verified
    // identity: the identity is what names it.
    let cert_intruder = rogue::mesh_cert(&mesh, "intruder");
    assert_eq!(
        rt.block_on(rogue::connect(&netns("z"), hbone, &cert_intruder, target)),
        Ok(401)
    );
    mesh.wait_closed(1, 2);
    let line = access_lines(&mesh, 1, &[&format!("src.addr={z_ip}:")]);
    assert_eq!(line.len(), 1, "{line:#?}");
    assert!(
        line[0].contains("src.identity=\"spiffe://cluster.local/ns/default/sa/intruder\""),
        "{}",
        line[0]
    );
    assert!(!line[0].contains("src.workload="), "{}", line[0]);
}

#[test]
fn a_tunnel_that_fails_is_logged_as_the_mtls_attempt_it_was() {
    // c's agent denies a; d's agent holds another identity (sa/d-real) than
    // the one node 0 expects of d (sa/d).
    let deny_a = "  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    \
                  metadata: {name: deny-a, namespace: default}\n    \
                  spec: {action: DENY, rules: [{from: [{source: {principals: \
                  [cluster.local/ns/default/sa/a]}}]}]}\n";
    let mesh = lab(
        |_| deny_a.to_owned(),
        |t| {
            t.replacen(
                "- name: d\n    namespace: default\n    serviceAccount: d\n",
                "- name: d\n    namespace: default\n    serviceAccount: d-real\n",
                1,
            )
        },
    );
    let a_ip = mesh.lab.pod("a").expect("a").ipv4();
    let c = mesh.v4("c", 8080);
    let d = mesh.v4("d", 8080);

    // Refused by the peer (401).
    let r = mesh.probe("a", &c, &[]);
    assert!(
        matches!(r, ProbeOutcome::Reset | ProbeOutcome::Connected),
        "a -> c got {r}"
    );
    mesh.wait_closed(0, 1);
    let lines = access_lines(
        &mesh,
        0,
        &["outcome=\"connect_failed\"", &format!("dst.addr={c}")],
    );
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let line = &lines[0];
    for field in [
        "direction=\"outbound\"",
        "security=\"mutual_tls\"",
        "src.identity=\"spiffe://cluster.local/ns/default/sa/a\"",
        "dst.identity=\"spiffe://cluster.local/ns/default/sa/c\"",
        &format!("src.addr={a_ip}:"),
        "HTTP 401",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
    assert_ne!(src_port(line), 0, "{line}");

    // The peer fails the identity check (TLS).
    let r = mesh.probe("a", &d, &[]);
    assert!(
        matches!(r, ProbeOutcome::Reset | ProbeOutcome::Connected),
        "a -> d got {r}"
    );
    mesh.wait_closed(0, 2);
    let lines = access_lines(
        &mesh,
        0,
        &["outcome=\"connect_failed\"", &format!("dst.addr={d}")],
    );
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let line = &lines[0];
    for field in [
        "security=\"mutual_tls\"",
        "dst.identity=\"spiffe://cluster.local/ns/default/sa/d\"",
        &format!("src.addr={a_ip}:"),
        "mTLS handshake with",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
    assert_ne!(src_port(line), 0, "{line}");
}

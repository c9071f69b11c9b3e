//! Observability in the lab: readiness, the admin endpoint, the CLI that
//! queries it, metrics (kernel and Istio TCP) and the access log, against a
//! real agent in a node's network namespace. The endpoints listen inside
//! that namespace, so every request is made from a thread that joined it
//! (or by a command the lab runs there).

mod common;

use std::{
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use common::{AGENT_TIMEOUT, Mesh, agent_bin, in_netns};
use mesh_agent::cli::client::{self, ClientError};
use mesh_lab::{LabSpec, NodeSpec, PodSpec, app::ProbeOutcome};

const ADMIN: &str = "127.0.0.1:15000";
const METRICS: &str = "127.0.0.1:15020";
const READINESS: &str = "127.0.0.1:15021";

/// The endpoint flags every agent of these tests runs with (the defaults,
/// spelled out: each lab has its own node netns, so they never clash).
const ENDPOINTS: &[&str] = &[
    "--admin-addr",
    "127.0.0.1:15000",
    "--metrics-addr",
    "127.0.0.1:15020",
    "--readiness-addr",
    "0.0.0.0:15021",
];

/// `GET path` on `addr` from inside node `node`'s netns.
fn get(mesh: &Mesh, node: usize, addr: &str, path: &str) -> (u16, String) {
    let netns = mesh.lab.node(node).expect("node").netns_path();
    let addr = addr.parse().expect("addr");
    in_netns(&netns, || client::get(addr, path)).expect("HTTP GET in node netns")
}

/// Runs `mesh-agent ARGS` in node `node`'s netns.
fn cli(mesh: &Mesh, node: usize, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(agent_bin());
    cmd.args(args);
    mesh.lab.run_in_node(node, cmd).expect("run mesh-agent")
}

fn cli_ok(mesh: &Mesh, node: usize, args: &[&str]) -> String {
    let out = cli(mesh, node, args);
    assert!(
        out.status.success(),
        "mesh-agent {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// An AuthorizationPolicy on `b` denying connections from `d`'s identity.
const DENY_D: &str = "  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    \
metadata: {name: deny-d, namespace: default}\n    spec: {action: DENY, rules: [{from: [{source: \
{principals: [cluster.local/ns/default/sa/d]}}]}]}\n";

/// One node: `a`, `b` and `d` enrolled, `c` not; a policy denying `d`.
fn lab() -> Mesh {
    let mesh = Mesh::new(
        LabSpec::new().node(
            NodeSpec::new()
                .pod(PodSpec::new("a"))
                .pod(PodSpec::new("b"))
                .pod(PodSpec::new("c"))
                .pod(PodSpec::new("d")),
        ),
    );
    let pods = [("a", true), ("b", true), ("c", false), ("d", true)];
    let yaml = mesh.lab.workload_file_yaml(0, &pods);
    mesh.write_workload_text(0, &Mesh::with_policies(&yaml, DENY_D));
    mesh
}

/// Parses the leading RFC 3339 timestamp of a log line
/// (`2026-01-02T03:04:05.123456Z …`).
fn log_time(line: &str) -> Option<SystemTime> {
    let ts = line.split_whitespace().next()?;
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>());
    let (h, min, s) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days * 86_400 + h * 3600 + min * 60 + s).ok()?;
    let nanos: u32 = format!("{frac:0<9}").get(..9)?.parse().ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

#[test]
fn log_time_parses_tracing_timestamps() {
    let t = log_time("2024-02-29T12:34:56.250000Z  INFO agent ready").expect("parse");
    assert_eq!(
        t.duration_since(UNIX_EPOCH).expect("after epoch"),
        Duration::from_millis(1_709_210_096_250)
    );
}

/// What a readiness poll saw.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    NoAgent,
    NotReady,
    Ready,
}

#[test]
fn readiness_flips_only_once_the_agent_is_ready() {
    let mut mesh = lab();
    let netns = mesh.lab.node(0).expect("node").netns_path();
    // Poll from inside the node while the agent starts: nothing answers,
    // then 503, then 200 — and 200 only after the "agent ready" line (the
    // line's time is this test's subject; the start synchronises on readiness).
    let (seen, first_ready) = std::thread::scope(|s| {
        let poller = s.spawn(|| {
            in_netns(&netns, || {
                let addr = READINESS.parse().expect("addr");
                let deadline = Instant::now() + AGENT_TIMEOUT;
                let mut seen = Vec::new();
                while Instant::now() < deadline {
                    let now = match client::get(addr, "/healthz/ready") {
                        Ok((200, _)) => Seen::Ready,
                        Ok((503, body)) => {
                            assert!(body.starts_with("not ready"), "{body}");
                            Seen::NotReady
                        }
                        Ok((status, body)) => panic!("readiness answered {status}: {body}"),
                        Err(ClientError::NoAgent { .. }) => Seen::NoAgent,
                        Err(e) => panic!("readiness: {e}"),
                    };
                    if seen.last() != Some(&now) {
                        seen.push(now);
                    }
                    if seen.last() == Some(&Seen::Ready) {
                        return (seen, Some(SystemTime::now()));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                (seen, None)
            })
        });
        mesh.start_agent_with(0, ENDPOINTS);
        poller.join().expect("poller")
    });
    let first_ready =
        first_ready.unwrap_or_else(|| panic!("readiness never answered 200: {seen:?}"));
    // The servers start before the datapath loads, so a 503 is always seen
    // between "nothing listens" and 200, and readiness never goes back.
    assert!(
        seen == [Seen::NoAgent, Seen::NotReady, Seen::Ready]
            || seen == [Seen::NotReady, Seen::Ready],
        "readiness went {seen:?}"
    );
    let log = mesh.agent(0).log_contents().expect("agent log");
    let ready_line = log
        .lines()
        .find(|l| l.contains("agent ready"))
        .expect("agent ready line");
    let ready_at = log_time(ready_line).expect("timestamp of the agent ready line");
    assert!(
        first_ready >= ready_at,
        "readiness answered 200 at {first_ready:?}, before the agent logged ready at {ready_at:?}"
    );
    let loaded = log
        .lines()
        .find(|l| l.contains("datapath loaded"))
        .expect("start-up summary");
    for field in ["features=", "listeners=", "programs=", "kernel=", "source="] {
        assert!(loaded.contains(field), "{field} missing: {loaded}");
    }
    assert!(
        loaded.contains("admin=127.0.0.1:15000,metrics=127.0.0.1:15020,readiness=0.0.0.0:15021"),
        "{loaded}"
    );
    // Shutting down: stop cleanly (the readiness flip to 503 is checked in-process).
    mesh.stop_agent(0);
}

#[test]
fn admin_endpoint_cli_and_kernel_metrics() {
    let mut mesh = lab();
    mesh.echo("b", &[8080]);
    mesh.start_agent_with(0, ENDPOINTS);
    let (status, _) = get(&mesh, 0, READINESS, "/healthz/ready");
    assert_eq!(status, 200);

    // /config_dump lists the lab's workloads, with their enrollment.
    let (status, body) = get(&mesh, 0, ADMIN, "/config_dump");
    assert_eq!(status, 200, "{body}");
    let dump: serde_json::Value = serde_json::from_str(&body).expect("config dump JSON");
    assert_eq!(dump["agent"]["ready"], true, "{dump:#}");
    let node_name = mesh.lab.node(0).expect("node").name().to_owned();
    assert_eq!(dump["node"]["name"], node_name.as_str());
    let mut rows: Vec<(String, String)> = dump["workloads"]
        .as_array()
        .expect("workloads")
        .iter()
        .map(|w| {
            (
                w["name"].as_str().unwrap_or_default().to_owned(),
                w["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    rows.sort();
    let row = |n: &str, s: &str| (n.to_owned(), s.to_owned());
    assert_eq!(
        rows,
        [
            row("a", "enrolled"),
            row("b", "enrolled"),
            row("c", "not enrolled"),
            row("d", "enrolled")
        ]
    );
    let programs = dump["datapath"]["programs"].as_array().expect("programs");
    let names: Vec<&str> = programs.iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "redirect_connect4",
            "redirect_connect6",
            "restore_peer4",
            "restore_peer6",
            "restore_local4",
            "restore_local6",
            "track_orig_dst"
        ],
        "{dump:#}"
    );
    assert_eq!(dump["datapath"]["features"]["sk_lookup"], true);

    // The CLI: JSON parses, tables list the pods, no agent is a clear error.
    let json = cli_ok(&mesh, 0, &["workloads", "--json", "--admin-addr", ADMIN]);
    let parsed: serde_json::Value = serde_json::from_str(&json).expect("--json parses");
    assert_eq!(parsed.as_array().map(Vec::len), Some(4));
    let table = cli_ok(&mesh, 0, &["workloads", "--admin-addr", ADMIN]);
    assert!(table.starts_with("NAMESPACE  NAME  IPS"), "{table}");
    let a_ip = mesh.lab.pod("a").expect("pod").ipv4().to_string();
    assert!(
        table
            .lines()
            .any(|l| l.contains(&a_ip) && l.contains(" enrolled ")),
        "{table}"
    );
    let status = cli_ok(&mesh, 0, &["status", "--admin-addr", ADMIN]);
    assert!(status.starts_with("Agent:        ready\n"), "{status}");
    assert!(
        status.contains("Workloads:    4 (3 enrolled, 0 pending, 0 failed)"),
        "{status}"
    );
    let policies = cli_ok(&mesh, 0, &["policies", "--admin-addr", ADMIN]);
    assert_eq!(
        policies,
        "KIND                 NAMESPACE  NAME    ACTION/MODE  RULES\n\
         AuthorizationPolicy  default    deny-d  DENY         1\n"
    );
    for sub in ["status", "policies", "certs", "connections"] {
        let json = cli_ok(&mesh, 0, &[sub, "--json", "--admin-addr", ADMIN]);
        serde_json::from_str::<serde_json::Value>(&json)
            .unwrap_or_else(|e| panic!("mesh-agent {sub} --json: {e}: {json}"));
    }
    let out = cli(&mesh, 0, &["status", "--admin-addr", "127.0.0.1:15999"]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: no agent is answering on 127.0.0.1:15999: is mesh-agent running on this node? \
         (run the command inside the node's network namespace)"
    );

    // The log level changes at runtime.
    let netns = mesh.lab.node(0).expect("node").netns_path();
    let admin = ADMIN.parse().expect("addr");
    let (status, body) = in_netns(&netns, || {
        client::request(admin, "POST", "/logging?level=debug")
    })
    .expect("POST /logging");
    assert_eq!(status, 200, "{body}");
    let (_, body) = get(&mesh, 0, ADMIN, "/logging");
    assert!(body.contains("\"level\": \"debug\""), "{body}");
    in_netns(&netns, || {
        client::request(admin, "POST", "/logging?level=info")
    })
    .expect("reset level");

    // Kernel counters appear in /metrics and /stats after traffic.
    let report = mesh.client(
        "a",
        &mesh.v4("b", 8080),
        &["--conns", "2", "--bytes", "1000"],
    );
    assert_eq!((report.ok, report.failed), (2, 0), "{report:?}");
    let (status, text) = get(&mesh, 0, METRICS, "/metrics");
    assert_eq!(status, 200);
    let value = |prefix: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in:\n{text}"))
    };
    assert!(value("mesh_ebpf_decisions_total{decision=\"connect_redirected\"} ") >= 2);
    // Inbound steering is exported (a and b share the node: the agent
    // delivered into b itself, the same-node fast path, so nothing was
    // steered; `/stats` counts those below).
    for decision in ["lookup_steered_plaintext", "lookup_steered_hbone"] {
        value(&format!(
            "mesh_ebpf_decisions_total{{decision=\"{decision}\"}} "
        ));
    }
    assert_eq!(value("mesh_ebpf_map_entries{map=\"ENROLLED_NETNS\"} "), 3);
    assert_eq!(value("mesh_enrolled_pods "), 3);
    assert!(text.ends_with("# EOF\n"));
    // The workloads' certificates, issued on first use, are listed (no keys).
    let certs = cli_ok(&mesh, 0, &["certs", "--admin-addr", ADMIN]);
    for sa in ["a", "b"] {
        assert!(
            certs.contains(&format!("spiffe://cluster.local/ns/default/sa/{sa} ")),
            "{certs}"
        );
    }
    assert!(value("mesh_certificates ") >= 2);
    assert!(
        text.contains(
            "mesh_certificate_expiry_seconds{identity=\"spiffe://cluster.local/ns/default/sa/a\"} "
        ),
        "{text}"
    );
    let (_, stats) = get(&mesh, 0, ADMIN, "/stats");
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("stats JSON");
    assert!(
        stats["kernel"]["connect_redirected"].as_u64() >= Some(2),
        "{stats:#}"
    );
    assert!(
        stats["proxy"]["outbound_accepted"].as_u64() >= Some(2),
        "{stats:#}"
    );
    assert!(
        stats["proxy"]["same_node_fast_path"].as_u64() >= Some(2),
        "{stats:#}"
    );
}

/// Waits for the proxy to report through `mesh_agent::telemetry::Telemetry`
/// (issue 6 wiring in `proxy/`): exact Istio TCP counts, policy decisions
/// and the access log after known traffic, including a denied connection.
#[test]

fn istio_tcp_metrics_and_access_log_count_known_traffic() {
    let mut mesh = lab();
    mesh.echo("b", &[8080]);
    mesh.start_agent_with(0, ENDPOINTS);
    let b = mesh.v4("b", 8080);
    let report = mesh.client("a", &b, &["--conns", "3", "--bytes", "1000"]);
    assert_eq!((report.ok, report.failed), (3, 0), "{report:?}");
    // Both sides of each connection close and log (outbound and inbound).
    mesh.wait_closed(0, 6);
    // d is denied by b's policy (at b's inbound side).
    let denied = mesh.probe("d", &b, &[]);
    assert!(
        matches!(
            denied,
            ProbeOutcome::Reset | ProbeOutcome::Refused | ProbeOutcome::Connected
        ),
        "d got {denied}"
    );
    mesh.wait_closed(0, 7);

    let (_, text) = get(&mesh, 0, METRICS, "/metrics");
    let series = |metric: &str, reporter: &str, src: &str| -> Vec<(String, u64)> {
        text.lines()
            .filter(|l| l.starts_with(&format!("{metric}{{reporter=\"{reporter}\"")))
            .filter(|l| l.contains(&format!("source_workload=\"{src}\"")))
            .map(|l| {
                let (labels, v) = l.rsplit_once(' ').expect("sample");
                (labels.to_owned(), v.parse().expect("value"))
            })
            .collect()
    };
    for reporter in ["source", "destination"] {
        for (metric, expect) in [
            ("istio_tcp_connections_opened_total", 3),
            ("istio_tcp_connections_closed_total", 3),
            ("istio_tcp_received_bytes_total", 3000),
            ("istio_tcp_sent_bytes_total", 3000),
        ] {
            let s = series(metric, reporter, "a");
            assert_eq!(s.len(), 1, "{metric} {reporter}: {s:?}\n{text}");
            let (labels, value) = &s[0];
            assert_eq!(*value, expect, "{labels}");
            for l in [
                "source_workload=\"a\"",
                "source_workload_namespace=\"default\"",
                "source_principal=\"spiffe://cluster.local/ns/default/sa/a\"",
                "destination_workload=\"b\"",
                "destination_workload_namespace=\"default\"",
                "destination_principal=\"spiffe://cluster.local/ns/default/sa/b\"",
                "request_protocol=\"tcp\"",
                "response_flags=\"-\"",
                "connection_security_policy=\"mutual_tls\"",
            ] {
                assert!(labels.contains(l), "{l} missing: {labels}");
            }
            // Bounded cardinality: no addresses or ports in labels.
            assert!(!labels.contains(&b), "{labels}");
        }
    }
    // The denied connection: opened, then closed with DENY, no bytes.
    let closed = series("istio_tcp_connections_closed_total", "destination", "d");
    assert_eq!(closed.len(), 1, "{closed:?}\n{text}");
    assert!(
        closed[0].0.contains("response_flags=\"DENY\""),
        "{closed:?}"
    );
    assert_eq!(closed[0].1, 1);
    let decision = |result: &str| -> u64 {
        let prefix = format!("mesh_policy_decisions_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!((decision("allow"), decision("deny")), (3, 1), "{text}");

    let log = mesh.agent(0).log_contents().expect("agent log");
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("access: connection closed"))
        .collect();
    for direction in ["outbound", "inbound"] {
        let mine: Vec<&&str> = lines
            .iter()
            .filter(|l| l.contains(&format!("direction=\"{direction}\"")))
            .filter(|l| l.contains("src.workload=\"a\""))
            .collect();
        assert_eq!(mine.len(), 3, "{direction}: {lines:#?}");
        for l in mine {
            for field in [
                "src.namespace=\"default\"",
                "src.identity=\"spiffe://cluster.local/ns/default/sa/a\"",
                "dst.workload=\"b\"",
                "dst.identity=\"spiffe://cluster.local/ns/default/sa/b\"",
                &format!("dst.addr={b}"),
                "security=\"mutual_tls\"",
                "bytes_sent=1000",
                "bytes_recv=1000",
                "duration_ms=",
                "outcome=\"closed\"",
            ] {
                assert!(l.contains(field), "{field} missing: {l}");
            }
        }
    }
    let denied_line = lines
        .iter()
        .find(|l| l.contains("outcome=\"denied\""))
        .expect("denied access line");
    for field in [
        "direction=\"inbound\"",
        "src.workload=\"d\"",
        "src.identity=\"spiffe://cluster.local/ns/default/sa/d\"",
        "dst.workload=\"b\"",
        "policy=\"default/deny-d\"",
        "bytes_sent=0",
        "bytes_recv=0",
    ] {
        assert!(
            denied_line.contains(field),
            "{field} missing: {denied_line}"
        );
    }
}

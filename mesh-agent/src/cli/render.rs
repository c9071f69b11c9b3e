//! Human tables of what the admin endpoint returns. Pure functions of the
//! JSON, so the text is tested for fixed input. Missing members render as
//! `-`, so a newer or older agent still prints something useful.

use serde_json::Value;

/// A column-aligned table: two spaces between columns, no trailing spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            text.push_str(cell);
            text.extend(std::iter::repeat_n(
                ' ',
                w.saturating_sub(cell.chars().count()),
            ));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// A string member, or `-`.
fn s(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        _ => "-".into(),
    }
}

fn arr<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn u(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

/// `1h02m`, `3m04s`, `5s`, `250ms`.
pub fn duration_ms(ms: u64) -> String {
    let secs = ms / 1000;
    match secs {
        0 => format!("{ms}ms"),
        1..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86_400 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{:02}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

/// `mesh-agent status`: the agent part of the config dump, summarised.
pub fn status(dump: &Value) -> String {
    let agent = &dump["agent"];
    let datapath = &dump["datapath"];
    let ready = match agent.get("ready").and_then(Value::as_bool) {
        Some(true) => "ready".to_owned(),
        Some(false) => {
            let waiting: Vec<&str> = arr(agent, "waiting_for")
                .iter()
                .filter_map(Value::as_str)
                .collect();
            if waiting.is_empty() {
                "not ready".to_owned()
            } else {
                format!("not ready (waiting for {})", waiting.join(", "))
            }
        }
        None => "-".to_owned(),
    };
    let programs = arr(datapath, "programs");
    let readopted = programs
        .iter()
        .filter(|p| p.get("readopted").and_then(Value::as_bool) == Some(true))
        .count();
    let names: Vec<String> = programs.iter().map(|p| s(p, "name")).collect();
    let features = datapath
        .get("features")
        .and_then(Value::as_object)
        .map(|f| {
            f.iter()
                .map(|(k, v)| {
                    if v.as_bool() == Some(true) {
                        k.clone()
                    } else {
                        format!("{k} (missing)")
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_else(|| "-".into());
    let sources: Vec<String> = arr(agent, "sources")
        .iter()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    let listeners = agent
        .get("listeners")
        .and_then(Value::as_object)
        .map(|l| {
            ["admin", "metrics", "readiness"]
                .iter()
                .filter_map(|k| {
                    l.get(*k)
                        .and_then(Value::as_str)
                        .map(|a| format!("{k} {a}"))
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_else(|| "-".into());
    let workloads = arr(dump, "workloads");
    let count = |status: &str| {
        workloads
            .iter()
            .filter(|w| w.get("status").and_then(Value::as_str) == Some(status))
            .count()
    };
    // Kinds the source cannot read (a CRD not installed, RBAC missing).
    let missing: Vec<String> = dump["sources"]["missing_kinds"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(|m| format!("{} ({})", s(m, "kind"), s(m, "reason").replace('_', " ")))
        .collect();
    let sources = if missing.is_empty() {
        sources
    } else {
        let mut with = sources;
        with.push(format!("missing kinds: {}", missing.join(", ")));
        with
    };
    let rows = [
        ("Agent", ready),
        ("Version", s(agent, "version")),
        ("Node", s(&dump["node"], "name")),
        (
            "Uptime",
            u(agent, "uptime_seconds").map_or("-".into(), |s| duration_ms(s * 1000)),
        ),
        ("Kernel", s(datapath, "kernel")),
        (
            "Programs",
            if names.is_empty() {
                "-".into()
            } else {
                format!(
                    "{} ({} attached, {readopted} re-adopted)",
                    names.join(", "),
                    names.len()
                )
            },
        ),
        ("Features", features),
        (
            "Sources",
            if sources.is_empty() {
                "-".into()
            } else {
                sources.join(", ")
            },
        ),
        ("Listeners", listeners),
        (
            "Workloads",
            format!(
                "{} ({} enrolled, {} pending, {} failed)",
                workloads.len(),
                count("enrolled"),
                count("pending"),
                count("failed")
            ),
        ),
        ("Certificates", arr(dump, "certificates").len().to_string()),
        (
            "Issuer",
            dump.get("issuer")
                .filter(|i| !i.is_null())
                .map_or("-".into(), |i| {
                    format!(
                        "{} ({}), {} issued, {} failed",
                        s(i, "kind"),
                        s(i, "endpoint"),
                        i.get("issued").and_then(Value::as_u64).unwrap_or(0),
                        i.get("failed").and_then(Value::as_u64).unwrap_or(0)
                    )
                }),
        ),
        (
            "Connections",
            u(agent, "open_connections").map_or("-".into(), |n| format!("{n} open")),
        ),
    ];
    rows.iter()
        .map(|(k, v)| format!("{:<14}{v}\n", format!("{k}:")))
        .collect()
}

/// `mesh-agent workloads`: the workloads part of the config dump; failed
/// enrollments are explained below the table.
pub fn workloads(workloads: &Value) -> String {
    let list = workloads.as_array().map_or(&[][..], Vec::as_slice);
    if list.is_empty() {
        return "no workloads\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|w| {
            let ips: Vec<&str> = arr(w, "ips").iter().filter_map(Value::as_str).collect();
            vec![
                s(w, "namespace"),
                s(w, "name"),
                if ips.is_empty() {
                    "-".into()
                } else {
                    ips.join(",")
                },
                s(w, "status"),
                s(w, "slot"),
                s(w, "netns"),
            ]
        })
        .collect();
    let mut out = table(
        &["NAMESPACE", "NAME", "IPS", "STATUS", "SLOT", "NETNS"],
        &rows,
    );
    for w in list {
        if let Some(e) = w.get("error").and_then(Value::as_str) {
            out.push_str(&format!("{}/{}: {e}\n", s(w, "namespace"), s(w, "name")));
        }
    }
    out
}

/// `mesh-agent policies`: the policies part of the config dump.
pub fn policies(policies: &Value) -> String {
    let mut rows = Vec::new();
    for p in arr(policies, "authorization") {
        let meta = &p["metadata"];
        let spec = &p["spec"];
        rows.push(vec![
            "AuthorizationPolicy".into(),
            s(meta, "namespace"),
            s(meta, "name"),
            spec.get("action")
                .and_then(Value::as_str)
                .unwrap_or("ALLOW")
                .to_owned(),
            arr(spec, "rules").len().to_string(),
        ]);
    }
    for p in arr(policies, "peer_authentication") {
        let meta = &p["metadata"];
        rows.push(vec![
            "PeerAuthentication".into(),
            s(meta, "namespace"),
            s(meta, "name"),
            s(&p["spec"]["mtls"], "mode"),
            "-".into(),
        ]);
    }
    if rows.is_empty() {
        return "no policies\n".into();
    }
    table(
        &["KIND", "NAMESPACE", "NAME", "ACTION/MODE", "RULES"],
        &rows,
    )
}

/// Appends `what: a, b, c` for the strings of `part[key]`, if any.
fn list_line(out: &mut String, part: &Value, key: &str, what: &str) {
    let items: Vec<&str> = arr(part, key).iter().filter_map(Value::as_str).collect();
    if !items.is_empty() {
        out.push_str(&format!("{what}: {}\n", items.join(", ")));
    }
}

/// `mesh-agent routes`: the routes part of the config dump — per service
/// its routes (weight → destination), then its destinations (balancing,
/// endpoints, ejected ones marked), then every routing object's fate.
pub fn routes(routes: &Value) -> String {
    let mut out = String::new();
    for svc in arr(routes, "services") {
        let vips: Vec<String> = arr(svc, "vips")
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        out.push_str(&format!("{} ({})\n", s(svc, "service"), vips.join(", ")));
        for r in arr(svc, "routes") {
            for rule in r
                .get("rules")
                .and_then(Value::as_array)
                .map_or(&[][..], Vec::as_slice)
            {
                let dests: Vec<String> = rule
                    .as_array()
                    .map_or(&[][..], Vec::as_slice)
                    .iter()
                    .map(|d| format!("{} -> {}", s(d, "weight"), s(d, "destination")))
                    .collect();
                out.push_str(&format!("  route {}: {}\n", s(r, "name"), dests.join(", ")));
            }
        }
        for d in arr(svc, "destinations") {
            let eps: Vec<String> = arr(d, "endpoints")
                .iter()
                .map(|e| {
                    let mut t = format!("{} ({} active)", s(e, "address"), s(e, "active"));
                    if e.get("ejected").and_then(Value::as_bool) == Some(true) {
                        t.push_str(" EJECTED");
                    }
                    t
                })
                .collect();
            let name = match d.get("subset").and_then(Value::as_str) {
                Some(sub) => format!("{}/{sub}", s(d, "destination")),
                None => s(d, "destination"),
            };
            out.push_str(&format!(
                "  {name}  {}  endpoints: {}\n",
                s(&d["policy"], "lb"),
                if eps.is_empty() {
                    "none".into()
                } else {
                    eps.join(", ")
                }
            ));
        }
    }
    for w in arr(routes, "waypoints") {
        let what = match w.get("pod").and_then(Value::as_str) {
            Some(pod) => format!("pod {pod}"),
            None => s(w, "service"),
        };
        out.push_str(&format!(
            "{what} -> waypoint {} (label on the {}): routed by the waypoint, not this node\n",
            s(w, "waypoint"),
            s(w, "from")
        ));
    }
    list_line(
        &mut out,
        routes,
        "ignored_pod_waypoints",
        "pods whose istio.io/use-waypoint names a waypoint that does not take workload traffic (istio.io/waypoint-for), so traffic to their IPs goes directly",
    );
    list_line(
        &mut out,
        routes,
        "refused_waypoint_bindings",
        "waypoint bindings refused (the waypoint's Gateway does not allow routes from their namespace: allowedRoutes), so their traffic goes directly",
    );
    let objects = arr(routes, "objects");
    if !objects.is_empty() {
        let rows: Vec<Vec<String>> = objects
            .iter()
            .map(|o| {
                let detail = match (o.get("field"), o.get("reason")) {
                    (Some(f), Some(r)) => format!(
                        "{}: {}",
                        f.as_str().unwrap_or("-"),
                        r.as_str().unwrap_or("-")
                    ),
                    (None, Some(r)) => r.as_str().unwrap_or("-").to_owned(),
                    _ => arr(o, "warnings")
                        .iter()
                        .map(|w| format!("{}: {}", s(w, "field"), s(w, "message")))
                        .collect::<Vec<_>>()
                        .join("; "),
                };
                vec![
                    s(o, "kind"),
                    s(o, "namespace"),
                    s(o, "name"),
                    s(o, "status"),
                    detail,
                ]
            })
            .collect();
        out.push_str(&table(
            &["KIND", "NAMESPACE", "NAME", "STATUS", "DETAIL"],
            &rows,
        ));
    }
    if out.is_empty() {
        return "no services\n".into();
    }
    out
}

/// `mesh-agent certs`: the certificates part of the config dump.
pub fn certs(certs: &Value) -> String {
    let list = certs.as_array().map_or(&[][..], Vec::as_slice);
    if list.is_empty() {
        return "no certificates\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|c| {
            let expires =
                c.get("expires_in_seconds")
                    .and_then(Value::as_i64)
                    .map_or("-".into(), |s| match u64::try_from(s) {
                        Ok(s) => duration_ms(s * 1000),
                        Err(_) => "expired".into(),
                    });
            vec![s(c, "identity"), s(c, "serial"), s(c, "not_after"), expires]
        })
        .collect();
    table(&["IDENTITY", "SERIAL", "NOT AFTER", "EXPIRES IN"], &rows)
}

/// The issuer line of `mesh-agent certs` (and `status`): its kind and
/// address, issuances and failures, the last failure.
pub fn issuer(issuer: &Value) -> String {
    if issuer.is_null() {
        return String::new();
    }
    let mut out = format!(
        "issuer: {} ({}); {} issued, {} failed\n",
        s(issuer, "kind"),
        s(issuer, "endpoint"),
        issuer.get("issued").and_then(Value::as_u64).unwrap_or(0),
        issuer.get("failed").and_then(Value::as_u64).unwrap_or(0),
    );
    if let Some(last) = issuer.get("last_failure").filter(|v| !v.is_null()) {
        out.push_str(&format!(
            "last failure: {} at {}: {}\n",
            s(last, "identity"),
            s(last, "at"),
            s(last, "error")
        ));
    }
    out
}

/// `mesh-agent connections`: the open connections.
pub fn connections(conns: &Value) -> String {
    let list = conns.as_array().map_or(&[][..], Vec::as_slice);
    if list.is_empty() {
        return "no open connections\n".into();
    }
    let workload = |e: &Value| match (e.get("namespace"), e.get("workload")) {
        (Some(Value::String(ns)), Some(Value::String(w))) => format!("{ns}/{w}"),
        (_, Some(Value::String(w))) => w.clone(),
        _ => "-".into(),
    };
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|c| {
            let (src, dst) = (&c["src"], &c["dst"]);
            let peer = if c.get("direction").and_then(Value::as_str) == Some("inbound") {
                src
            } else {
                dst
            };
            vec![
                s(c, "id"),
                s(c, "direction"),
                workload(src),
                s(src, "addr"),
                workload(dst),
                s(dst, "addr"),
                s(peer, "identity"),
                s(c, "security_policy"),
                u(c, "age_ms").map_or("-".into(), duration_ms),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "DIRECTION",
            "SOURCE",
            "SOURCE ADDR",
            "DESTINATION",
            "DESTINATION ADDR",
            "PEER IDENTITY",
            "SECURITY",
            "AGE",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::cli::query::{QueryCommand, Target, format_answer};

    /// A config dump as an agent with four pods, one policy pair and one
    /// certificate answers it.
    fn dump() -> Value {
        json!({
            "agent": {
                "version": "0.1.0",
                "ready": true,
                "waiting_for": [],
                "uptime_seconds": 3725,
                "open_connections": 1,
                "sources": ["file:/etc/mesh/workloads.yaml"],
                "listeners": {"admin": "127.0.0.1:15000", "metrics": "0.0.0.0:15020", "readiness": "0.0.0.0:15021"}
            },
            "node": {"name": "node-1", "probe_sources": ["10.0.0.1"], "generation": 3},
            "datapath": {
                "kernel": "6.8.0-45-generic",
                "programs": [
                    {"name": "redirect_connect4", "readopted": false},
                    {"name": "redirect_connect6", "readopted": true}
                ],
                "features": {"cgroup_sock_addr": true, "sk_lookup": true, "sock_ops": false}
            },
            "workloads": [
                {"namespace": "default", "name": "a", "ips": ["10.1.0.10", "fd00::10"], "status": "enrolled", "slot": 1023, "netns": "/var/run/netns/a"},
                {"namespace": "default", "name": "b", "ips": ["10.1.0.11"], "status": "failed", "error": "cannot enter netns /var/run/netns/b: No such file or directory", "netns": "/var/run/netns/b"},
                {"namespace": "shop", "name": "cart-7d9f", "ips": ["10.1.0.12"], "status": "pending", "netns": "/proc/4242/ns/net"},
                {"namespace": "shop", "name": "db", "ips": [], "status": "not enrolled", "netns": "/var/run/netns/db"}
            ],
            "policies": {
                "authorization": [
                    {"metadata": {"namespace": "shop", "name": "deny-a"}, "spec": {"action": "DENY", "rules": [{}, {}]}},
                    {"metadata": {"namespace": "shop", "name": "allow-all"}, "spec": {}}
                ],
                "peer_authentication": [
                    {"metadata": {"namespace": "istio-system", "name": "default"}, "spec": {"mtls": {"mode": "STRICT"}}}
                ]
            },
            "issuer": {"kind": "istio-ca", "endpoint": "https://mesh-ca.mesh-system.svc:15012", "issued": 3, "failed": 1,
                       "last_failure": {"identity": "spiffe://cluster.local/ns/shop/sa/cart", "at": "2026-11-25T00:00:00Z", "error": "the CA refused: no pod of shop/cart on node-1"}},
            "certificates": [
                {"identity": "spiffe://cluster.local/ns/default/sa/a", "serial": "3f2a", "not_after": "2026-11-26T17:55:20Z", "expires_in_seconds": 86000},
                {"identity": "spiffe://cluster.local/ns/shop/sa/cart", "serial": "01", "not_after": "2026-11-25T00:00:00Z", "expires_in_seconds": -5}
            ]
        })
    }

    #[test]
    fn status_names_the_kinds_the_source_cannot_read() {
        let mut d = dump();
        d["agent"]["sources"] = json!(["kubernetes"]);
        d["sources"] = json!({"rejected": 0, "missing_kinds": [
            {"kind": "tcproutes.gateway.networking.k8s.io", "reason": "not_served"},
            {"kind": "virtualservices.networking.istio.io", "reason": "forbidden"}
        ]});
        let out = status(&d);
        assert!(
            out.contains(
                "Sources:      kubernetes, missing kinds: tcproutes.gateway.networking.k8s.io \
                 (not served), virtualservices.networking.istio.io (forbidden)\n"
            ),
            "{out}"
        );
    }

    fn open_connections() -> Value {
        json!([
            {"id": 7, "direction": "outbound",
             "src": {"addr": "10.1.0.10:40312", "workload": "a", "namespace": "default"},
             "dst": {"addr": "10.1.0.12:8080", "workload": "cart-7d9f", "namespace": "shop", "identity": "spiffe://cluster.local/ns/shop/sa/cart"},
             "security_policy": "mutual_tls", "opened_at": 0, "age_ms": 65000},
            {"id": 9, "direction": "inbound",
             "src": {"addr": "10.2.0.5:51000"},
             "dst": {"addr": "10.1.0.10:80", "workload": "a", "namespace": "default"},
             "security_policy": "none", "opened_at": 0, "age_ms": 250}
        ])
    }

    #[test]
    fn status_summarises_the_agent() {
        assert_eq!(
            status(&dump()),
            "\
Agent:        ready
Version:      0.1.0
Node:         node-1
Uptime:       1h02m
Kernel:       6.8.0-45-generic
Programs:     redirect_connect4, redirect_connect6 (2 attached, 1 re-adopted)
Features:     cgroup_sock_addr, sk_lookup, sock_ops (missing)
Sources:      file:/etc/mesh/workloads.yaml
Listeners:    admin 127.0.0.1:15000, metrics 0.0.0.0:15020, readiness 0.0.0.0:15021
Workloads:    4 (1 enrolled, 1 pending, 1 failed)
Certificates: 2
Issuer:       istio-ca (https://mesh-ca.mesh-system.svc:15012), 3 issued, 1 failed
Connections:  1 open
"
        );
        let waiting = json!({"agent": {"ready": false, "waiting_for": ["datapath", "workloads"]}});
        assert!(
            status(&waiting)
                .starts_with("Agent:        not ready (waiting for datapath, workloads)\n")
        );
        // An empty answer still renders, with dashes.
        assert!(status(&json!({})).contains("Kernel:       -\n"));
    }

    #[test]
    fn workloads_table() {
        assert_eq!(
            workloads(&dump()["workloads"]),
            "\
NAMESPACE  NAME       IPS                 STATUS        SLOT  NETNS
default    a          10.1.0.10,fd00::10  enrolled      1023  /var/run/netns/a
default    b          10.1.0.11           failed        -     /var/run/netns/b
shop       cart-7d9f  10.1.0.12           pending       -     /proc/4242/ns/net
shop       db         -                   not enrolled  -     /var/run/netns/db
default/b: cannot enter netns /var/run/netns/b: No such file or directory
"
        );
        assert_eq!(workloads(&json!([])), "no workloads\n");
    }

    #[test]
    fn policies_table() {
        assert_eq!(
            policies(&dump()["policies"]),
            "\
KIND                 NAMESPACE     NAME       ACTION/MODE  RULES
AuthorizationPolicy  shop          deny-a     DENY         2
AuthorizationPolicy  shop          allow-all  ALLOW        0
PeerAuthentication   istio-system  default    STRICT       -
"
        );
        assert_eq!(
            policies(&json!({"authorization": [], "peer_authentication": []})),
            "no policies\n"
        );
    }

    #[test]
    fn certs_table() {
        assert_eq!(
            certs(&dump()["certificates"]),
            "\
IDENTITY                                SERIAL  NOT AFTER             EXPIRES IN
spiffe://cluster.local/ns/default/sa/a  3f2a    2026-11-26T17:55:20Z  23h53m
spiffe://cluster.local/ns/shop/sa/cart  01      2026-11-25T00:00:00Z  expired
"
        );
        assert_eq!(certs(&json!([])), "no certificates\n");
    }

    #[test]
    fn issuer_line_names_kind_endpoint_counts_and_last_failure() {
        assert_eq!(
            issuer(&dump()["issuer"]),
            "\
issuer: istio-ca (https://mesh-ca.mesh-system.svc:15012); 3 issued, 1 failed
last failure: spiffe://cluster.local/ns/shop/sa/cart at 2026-11-25T00:00:00Z: the CA refused: no pod of shop/cart on node-1
"
        );
        assert_eq!(issuer(&Value::Null), "");
    }

    #[test]
    fn routes_name_the_refused_waypoint_bindings() {
        let routes = json!({
            "refused_waypoint_bindings": [
                "service tenant/web -> shop/waypoint",
                "pod tenant/api-1 -> shop/waypoint"
            ]
        });
        assert!(
            super::routes(&routes).contains(
                "so their traffic goes directly: service tenant/web -> shop/waypoint, pod tenant/api-1 -> shop/waypoint\n"
            ),
            "{}",
            super::routes(&routes)
        );
        assert!(!super::routes(&json!({})).contains("refused"));
    }

    #[test]
    fn connections_table() {
        assert_eq!(
            connections(&open_connections()),
            "\
ID  DIRECTION  SOURCE     SOURCE ADDR      DESTINATION     DESTINATION ADDR  PEER IDENTITY                           SECURITY    AGE
7   outbound   default/a  10.1.0.10:40312  shop/cart-7d9f  10.1.0.12:8080    spiffe://cluster.local/ns/shop/sa/cart  mutual_tls  1m05s
9   inbound    -          10.2.0.5:51000   default/a       10.1.0.10:80      -                                       none        250ms
"
        );
        assert_eq!(connections(&json!([])), "no open connections\n");
    }

    #[test]
    fn json_output_is_the_part_and_parses() {
        let target = Target {
            admin_addr: "127.0.0.1:15000".into(),
            json: true,
        };
        let cases = [
            (QueryCommand::Status(target.clone()), dump(), dump()),
            (
                QueryCommand::Workloads(target.clone()),
                dump(),
                dump()["workloads"].clone(),
            ),
            (
                QueryCommand::Policies(target.clone()),
                dump(),
                dump()["policies"].clone(),
            ),
            (
                QueryCommand::Certs(target.clone()),
                dump(),
                dump()["certificates"].clone(),
            ),
            (
                QueryCommand::Connections(target),
                open_connections(),
                open_connections(),
            ),
        ];
        for (cmd, answer, expected) in cases {
            let out = format_answer(&cmd, &answer, true);
            let parsed: Value = serde_json::from_str(&out).expect("--json parses");
            assert_eq!(parsed, expected, "{cmd:?}");
        }
    }

    #[test]
    fn routes_show_weights_destinations_ejected_endpoints_and_rejections() {
        let dump = serde_json::json!({
            "services": [{
                "service": "shop/web", "vips": ["10.96.0.1"],
                "routes": [{"name": "VirtualService/shop/web", "port": null, "export_to": ["*"],
                            "rules": [[{"weight": 90, "destination": "shop/web/v1"}, {"weight": 10, "destination": "shop/web/v2"}]]}],
                "destinations": [{"destination": "shop/web:80", "subset": "v1", "policy": {"lb": "ROUND_ROBIN"},
                                  "endpoints": [{"address": "10.0.0.1:8080", "active": 2, "ejected": false},
                                                {"address": "10.0.0.2:8080", "active": 0, "ejected": true}]}]
            }],
            "objects": [
                {"kind": "VirtualService", "namespace": "shop", "name": "web", "status": "applied"},
                {"kind": "DestinationRule", "namespace": "shop", "name": "bad", "status": "rejected",
                 "field": "spec.trafficPolicy.connectionPool.tcp.connectTimeout", "reason": "not a duration"}
            ]
        });
        let text = routes(&dump);
        assert!(text.contains("shop/web (10.96.0.1)\n"), "{text}");
        assert!(
            text.contains(
                "  route VirtualService/shop/web: 90 -> shop/web/v1, 10 -> shop/web/v2\n"
            ),
            "{text}"
        );
        assert!(text.contains("  shop/web:80/v1  ROUND_ROBIN  endpoints: 10.0.0.1:8080 (2 active), 10.0.0.2:8080 (0 active) EJECTED\n"), "{text}");
        assert!(
            text.contains(
                "rejected  spec.trafficPolicy.connectionPool.tcp.connectTimeout: not a duration"
            ),
            "{text}"
        );
        assert_eq!(routes(&serde_json::json!({})), "no services\n");
        let w = routes(&serde_json::json!({"waypoints": [
            {"service": "shop/web", "waypoint": "shop/wp", "from": "namespace"},
            {"pod": "shop/db-0", "waypoint": "shop/wp", "from": "pod"}]}));
        assert_eq!(
            w,
            "shop/web -> waypoint shop/wp (label on the namespace): routed by the waypoint, not this node\n\
             pod shop/db-0 -> waypoint shop/wp (label on the pod): routed by the waypoint, not this node\n"
        );
    }
}

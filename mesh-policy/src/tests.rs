//! Table-driven tests: every case is one line of data.
//!
//! Policies are written in a shorthand, `;`-separated:
//! `AP <ns>/<name> <spec as flow YAML>` (AuthorizationPolicy),
//! `PA <ns>/<name>[@<creationTimestamp>] <spec>` (PeerAuthentication),
//! `AP~<value> <ns>/<name> <spec>` (annotated `istio.io/dry-run: '<value>'`),
//! `@<fixture>` (a named policy from [`FIXTURES`]), or `RAW:<yaml>` (a raw
//! document, `\n` for newlines).
//!
//! Connections: space-separated `key=value`, defaults in brackets:
//! `id=<ns>/<sa>` (principal `cluster.local/ns/<ns>/sa/<sa>`) or
//! `p=<raw principal>` [plaintext], `src=<ip>` [10.0.0.1], `remote=<ip>`
//! [none], `dst=<ip>` [10.1.0.1], `port=<n>` [8080],
//! `wl=<ns>:<k=v,...>` [shop:app=web].
//!
//! Decisions: `allow` (no ALLOW policy applies), `allow:<policy>`,
//! `deny:no-allow`, `deny:<policy>`, `deny:mtls:<policy>`,
//! `deny:custom:<policy>`, `deny:rejected:<policy>`, followed by
//! ` audit:<p1>,<p2>` when AUDIT policies matched.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::{
    Connection, Decision, DenyReason, MtlsMode, PolicyError, PolicyStore, Report, WorkloadRef,
    bench, parse_documents,
};

const ROOT: &str = "istio-system";

/// Named policies, referenced as `@name`.
const FIXTURES: &[(&str, &str)] = &[
    ("allow-nothing", "AP shop/allow-nothing {}"),
    ("allow-all", "AP shop/allow-all {rules: [{}]}"),
    ("deny-all", "AP shop/deny-all {action: DENY, rules: [{}]}"),
    (
        "audit-all",
        "AP shop/audit-all {action: AUDIT, rules: [{}]}",
    ),
    (
        "from-a",
        "AP shop/from-a {rules: [{from: [{source: {namespaces: [a]}}]}]}",
    ),
    (
        "from-b",
        "AP shop/from-b {rules: [{from: [{source: {namespaces: [b]}}]}]}",
    ),
    (
        "deny-evil",
        "AP shop/deny-evil {action: DENY, rules: [{from: [{source: {namespaces: [evil]}}]}]}",
    ),
    (
        "mesh-strict",
        "PA istio-system/default {mtls: {mode: STRICT}}",
    ),
    (
        "mesh-permissive",
        "PA istio-system/default {mtls: {mode: PERMISSIVE}}",
    ),
    (
        "mesh-deny-evil",
        "AP istio-system/deny-evil {action: DENY, rules: [{from: [{source: {namespaces: [evil]}}]}]}",
    ),
    ("mesh-allow-nothing", "AP istio-system/allow-nothing {}"),
    (
        "web-only-8080",
        "AP shop/web-8080 {selector: {matchLabels: {app: web}}, rules: [{to: [{operation: {ports: ['8080']}}]}]}",
    ),
];

fn expand(spec: &str) -> String {
    let mut docs = Vec::new();
    for part in spec.split(" ; ").map(str::trim).filter(|p| !p.is_empty()) {
        if let Some(name) = part.strip_prefix('@') {
            let fixture = FIXTURES
                .iter()
                .find(|(n, _)| *n == name)
                .unwrap_or_else(|| panic!("no fixture {name}"));
            docs.push(expand(fixture.1));
            continue;
        }
        if let Some(raw) = part.strip_prefix("RAW:") {
            docs.push(raw.replace("\\n", "\n"));
            continue;
        }
        let (kind, rest) = part.split_once(' ').expect("kind");
        // `AP~<value>`: an AuthorizationPolicy annotated `istio.io/dry-run: '<value>'`.
        let (kind, dry_run) = match kind.split_once('~') {
            Some((k, v)) => (k, Some(v)),
            None => (kind, None),
        };
        let kind = match kind {
            "AP" => "AuthorizationPolicy",
            "PA" => "PeerAuthentication",
            "AP1b" => "AuthorizationPolicy\napiVersion: security.istio.io/v1beta1",
            other => panic!("bad kind {other}"),
        };
        let (id, spec) = rest.split_once(' ').unwrap_or((rest, ""));
        let (id, ts) = id.split_once('@').unwrap_or((id, ""));
        let (ns, name) = id.split_once('/').expect("ns/name");
        let ts = if ts.is_empty() {
            String::new()
        } else {
            format!(", creationTimestamp: '{ts}'")
        };
        let (api, kind) = match kind.split_once('\n') {
            Some((k, api)) => (api.to_owned(), k),
            None => ("apiVersion: security.istio.io/v1".to_owned(), kind),
        };
        let annotations = dry_run
            .map(|v| format!(", annotations: {{istio.io/dry-run: '{v}'}}"))
            .unwrap_or_default();
        let mut doc = format!(
            "{api}\nkind: {kind}\nmetadata: {{name: {name}, namespace: {ns}{ts}{annotations}}}\n"
        );
        if !spec.is_empty() {
            doc.push_str(&format!("spec: {spec}\n"));
        }
        docs.push(doc);
    }
    docs.join("---\n")
}

fn store(policies: &str) -> (PolicyStore, Report) {
    PolicyStore::from_text(ROOT, &expand(policies))
}

struct Conn {
    principal: Option<String>,
    src: IpAddr,
    remote: Option<IpAddr>,
    dst: IpAddr,
    port: u16,
    ns: String,
    labels: BTreeMap<String, String>,
}

fn conn(spec: &str) -> Conn {
    let mut c = Conn {
        principal: None,
        src: "10.0.0.1".parse().unwrap(),
        remote: None,
        dst: "10.1.0.1".parse().unwrap(),
        port: 8080,
        ns: "shop".into(),
        labels: BTreeMap::from([("app".into(), "web".into())]),
    };
    for tok in spec.split_whitespace() {
        let (k, v) = tok.split_once('=').expect("key=value");
        match k {
            "id" => {
                let (ns, sa) = v.split_once('/').expect("ns/sa");
                c.principal = Some(format!("cluster.local/ns/{ns}/sa/{sa}"));
            }
            "p" => c.principal = Some(v.into()),
            "src" => c.src = v.parse().unwrap(),
            "remote" => c.remote = Some(v.parse().unwrap()),
            "dst" => c.dst = v.parse().unwrap(),
            "port" => c.port = v.parse().unwrap(),
            "wl" => {
                let (ns, labels) = v.split_once(':').unwrap_or((v, ""));
                c.ns = ns.into();
                c.labels = labels
                    .split(',')
                    .filter(|l| !l.is_empty())
                    .map(|l| {
                        let (k, v) = l.split_once('=').expect("label k=v");
                        (k.to_owned(), v.to_owned())
                    })
                    .collect();
            }
            other => panic!("bad connection key {other}"),
        }
    }
    c
}

fn decide(store: &PolicyStore, c: &Conn) -> Decision {
    let connection = Connection {
        source_principal: c.principal.as_deref(),
        source_ip: c.src,
        remote_ip: c.remote,
        destination_ip: c.dst,
        destination_port: c.port,
    };
    let workload = WorkloadRef {
        namespace: &c.ns,
        labels: &c.labels,
    };
    store.evaluate(&connection, &workload)
}

fn render(d: &Decision) -> String {
    let mut s = match d {
        Decision::Allow {
            allowed_by: None, ..
        } => "allow".to_owned(),
        Decision::Allow {
            allowed_by: Some(p),
            ..
        } => format!("allow:{p}"),
        Decision::Deny { reason, .. } => match reason {
            DenyReason::NoAllowMatched => "deny:no-allow".to_owned(),
            DenyReason::DeniedBy(p) => format!("deny:{p}"),
            DenyReason::MtlsRequired { policy: Some(p) } => format!("deny:mtls:{p}"),
            DenyReason::MtlsRequired { policy: None } => "deny:mtls".to_owned(),
            DenyReason::CustomUnsupported(p) => format!("deny:custom:{p}"),
            DenyReason::RejectedPolicy(p) => format!("deny:rejected:{p}"),
        },
    };
    if !d.audited_by().is_empty() {
        let names: Vec<String> = d.audited_by().iter().map(ToString::to_string).collect();
        s.push_str(&format!(" audit:{}", names.join(",")));
    }
    s
}

/// (case, policies, connection, expected decision)
#[rustfmt::skip]
const AUTHZ: &[(&str, &str, &str, &str)] = &[
    // --- precedence and the empty forms
    ("no policy allows", "", "", "allow"),
    ("allow-nothing denies", "@allow-nothing", "id=a/x", "deny:no-allow"),
    ("allow-nothing denies plaintext", "@allow-nothing", "", "deny:no-allow"),
    ("rules: [] allows nothing", "AP shop/p {rules: []}", "id=a/x", "deny:no-allow"),
    ("rules: null allows nothing", "AP shop/p {rules: null}", "id=a/x", "deny:no-allow"),
    ("no spec allows nothing", "AP shop/p", "id=a/x", "deny:no-allow"),
    ("explicit ALLOW action", "AP shop/p {action: ALLOW, rules: [{}]}", "", "allow:shop/p"),
    ("allow-all allows", "@allow-all", "", "allow:shop/allow-all"),
    ("allow-all beats allow-nothing", "@allow-nothing ; @allow-all", "", "allow:shop/allow-all"),
    ("deny-all denies", "@deny-all", "id=a/x", "deny:shop/deny-all"),
    ("DENY over ALLOW", "@allow-all ; @deny-all", "", "deny:shop/deny-all"),
    ("non-matching DENY, no ALLOW: allow", "@deny-evil", "id=a/x", "allow"),
    ("matching DENY", "@deny-evil", "id=evil/x", "deny:shop/deny-evil"),
    ("non-matching DENY, matching ALLOW", "@deny-evil ; @from-a", "id=a/x", "allow:shop/from-a"),
    ("non-matching DENY, non-matching ALLOW", "@deny-evil ; @from-a", "id=b/x", "deny:no-allow"),
    ("two ALLOWs, second matches", "@from-a ; @from-b", "id=b/x", "allow:shop/from-b"),
    ("two ALLOWs, none matches", "@from-a ; @from-b", "id=c/x", "deny:no-allow"),
    ("v1beta1 accepted", "AP1b shop/p {}", "", "deny:no-allow"),
    ("rules ORed: first", "AP shop/p {rules: [{from: [{source: {namespaces: [a]}}]}, {from: [{source: {namespaces: [b]}}]}]}", "id=a/x", "allow:shop/p"),
    ("rules ORed: second", "AP shop/p {rules: [{from: [{source: {namespaces: [a]}}]}, {from: [{source: {namespaces: [b]}}]}]}", "id=b/x", "allow:shop/p"),
    ("rules ORed: neither", "AP shop/p {rules: [{from: [{source: {namespaces: [a]}}]}, {from: [{source: {namespaces: [b]}}]}]}", "id=c/x", "deny:no-allow"),
    // --- principals
    ("principal exact", "AP shop/p {rules: [{from: [{source: {principals: [cluster.local/ns/a/sa/x]}}]}]}", "id=a/x", "allow:shop/p"),
    ("principal exact, other sa", "AP shop/p {rules: [{from: [{source: {principals: [cluster.local/ns/a/sa/x]}}]}]}", "id=a/y", "deny:no-allow"),
    ("principal exact, plaintext", "AP shop/p {rules: [{from: [{source: {principals: [cluster.local/ns/a/sa/x]}}]}]}", "", "deny:no-allow"),
    ("principal with spiffe:// from the peer", "AP shop/p {rules: [{from: [{source: {principals: [cluster.local/ns/a/sa/x]}}]}]}", "p=spiffe://cluster.local/ns/a/sa/x", "allow:shop/p"),
    ("principal other trust domain", "AP shop/p {rules: [{from: [{source: {principals: [cluster.local/ns/a/sa/x]}}]}]}", "p=other.td/ns/a/sa/x", "deny:no-allow"),
    ("principals ORed", "AP shop/p {rules: [{from: [{source: {principals: [cluster.local/ns/a/sa/x, cluster.local/ns/b/sa/y]}}]}]}", "id=b/y", "allow:shop/p"),
    ("principal prefix", "AP shop/p {rules: [{from: [{source: {principals: [cluster.local/ns/a/*]}}]}]}", "id=a/anything", "allow:shop/p"),
    ("principal prefix, other ns", "AP shop/p {rules: [{from: [{source: {principals: [cluster.local/ns/a/*]}}]}]}", "id=ab/x", "deny:no-allow"),
    ("principal suffix", "AP shop/p {rules: [{from: [{source: {principals: ['*/sa/x']}}]}]}", "id=b/x", "allow:shop/p"),
    ("principal suffix, other sa", "AP shop/p {rules: [{from: [{source: {principals: ['*/sa/x']}}]}]}", "id=b/y", "deny:no-allow"),
    ("principal suffix, plaintext", "AP shop/p {rules: [{from: [{source: {principals: ['*/sa/x']}}]}]}", "", "deny:no-allow"),
    ("principal * any authenticated", "AP shop/p {rules: [{from: [{source: {principals: ['*']}}]}]}", "id=z/z", "allow:shop/p"),
    ("principal * not plaintext", "AP shop/p {rules: [{from: [{source: {principals: ['*']}}]}]}", "", "deny:no-allow"),
    ("principal * empty principal is plaintext", "AP shop/p {rules: [{from: [{source: {principals: ['*']}}]}]}", "p=", "deny:no-allow"),
    ("notPrincipals exact excludes", "AP shop/p {rules: [{from: [{source: {notPrincipals: [cluster.local/ns/a/sa/x]}}]}]}", "id=a/x", "deny:no-allow"),
    ("notPrincipals exact others", "AP shop/p {rules: [{from: [{source: {notPrincipals: [cluster.local/ns/a/sa/x]}}]}]}", "id=a/y", "allow:shop/p"),
    ("notPrincipals matches plaintext", "AP shop/p {rules: [{from: [{source: {notPrincipals: [cluster.local/ns/a/sa/x]}}]}]}", "", "allow:shop/p"),
    ("DENY notPrincipals * denies plaintext", "AP shop/p {action: DENY, rules: [{from: [{source: {notPrincipals: ['*']}}]}]}", "", "deny:shop/p"),
    ("DENY notPrincipals * lets mTLS", "AP shop/p {action: DENY, rules: [{from: [{source: {notPrincipals: ['*']}}]}]}", "id=a/x", "allow"),
    ("principals and notPrincipals", "AP shop/p {rules: [{from: [{source: {principals: [cluster.local/ns/a/*], notPrincipals: [cluster.local/ns/a/sa/bad]}}]}]}", "id=a/bad", "deny:no-allow"),
    ("principals and notPrincipals, good", "AP shop/p {rules: [{from: [{source: {principals: [cluster.local/ns/a/*], notPrincipals: [cluster.local/ns/a/sa/bad]}}]}]}", "id=a/good", "allow:shop/p"),
    // --- namespaces
    ("namespace exact", "@from-a", "id=a/x", "allow:shop/from-a"),
    ("namespace other", "@from-a", "id=b/x", "deny:no-allow"),
    ("namespace plaintext never matches", "@from-a", "", "deny:no-allow"),
    ("namespace from non-k8s id", "@from-a", "p=cluster.local/a", "deny:no-allow"),
    ("namespace prefix", "AP shop/p {rules: [{from: [{source: {namespaces: [te*]}}]}]}", "id=test/x", "allow:shop/p"),
    ("namespace prefix other", "AP shop/p {rules: [{from: [{source: {namespaces: [te*]}}]}]}", "id=prod/x", "deny:no-allow"),
    ("namespace suffix", "AP shop/p {rules: [{from: [{source: {namespaces: ['*-prod']}}]}]}", "id=shop-prod/x", "allow:shop/p"),
    ("namespace *", "AP shop/p {rules: [{from: [{source: {namespaces: ['*']}}]}]}", "id=q/x", "allow:shop/p"),
    ("namespace * not plaintext", "AP shop/p {rules: [{from: [{source: {namespaces: ['*']}}]}]}", "", "deny:no-allow"),
    ("notNamespaces excludes", "AP shop/p {rules: [{from: [{source: {notNamespaces: [a]}}]}]}", "id=a/x", "deny:no-allow"),
    ("notNamespaces others", "AP shop/p {rules: [{from: [{source: {notNamespaces: [a]}}]}]}", "id=b/x", "allow:shop/p"),
    ("notNamespaces matches plaintext", "AP shop/p {rules: [{from: [{source: {notNamespaces: [a]}}]}]}", "", "allow:shop/p"),
    // --- service accounts
    ("serviceAccounts ns/name", "AP shop/p {rules: [{from: [{source: {serviceAccounts: [a/x]}}]}]}", "id=a/x", "allow:shop/p"),
    ("serviceAccounts ns/name other", "AP shop/p {rules: [{from: [{source: {serviceAccounts: [a/x]}}]}]}", "id=a/y", "deny:no-allow"),
    ("serviceAccounts plaintext", "AP shop/p {rules: [{from: [{source: {serviceAccounts: [a/x]}}]}]}", "", "deny:no-allow"),
    ("serviceAccounts name is policy ns", "AP shop/p {rules: [{from: [{source: {serviceAccounts: [x]}}]}]}", "id=shop/x", "allow:shop/p"),
    ("serviceAccounts name other ns", "AP shop/p {rules: [{from: [{source: {serviceAccounts: [x]}}]}]}", "id=a/x", "deny:no-allow"),
    ("notServiceAccounts excludes", "AP shop/p {rules: [{from: [{source: {notServiceAccounts: [shop/x]}}]}]}", "id=shop/x", "deny:no-allow"),
    ("notServiceAccounts others", "AP shop/p {rules: [{from: [{source: {notServiceAccounts: [shop/x]}}]}]}", "id=shop/y", "allow:shop/p"),
    ("notServiceAccounts plaintext", "AP shop/p {rules: [{from: [{source: {notServiceAccounts: [shop/x]}}]}]}", "", "allow:shop/p"),
    // --- ipBlocks
    ("ipBlocks CIDR in", "AP shop/p {rules: [{from: [{source: {ipBlocks: [10.0.0.0/24]}}]}]}", "src=10.0.0.5", "allow:shop/p"),
    ("ipBlocks CIDR out", "AP shop/p {rules: [{from: [{source: {ipBlocks: [10.0.0.0/24]}}]}]}", "src=10.0.1.5", "deny:no-allow"),
    ("ipBlocks single IP", "AP shop/p {rules: [{from: [{source: {ipBlocks: [10.0.0.1]}}]}]}", "src=10.0.0.1", "allow:shop/p"),
    ("ipBlocks single IP other", "AP shop/p {rules: [{from: [{source: {ipBlocks: [10.0.0.1]}}]}]}", "src=10.0.0.2", "deny:no-allow"),
    ("ipBlocks host bits set", "AP shop/p {rules: [{from: [{source: {ipBlocks: [10.0.0.7/24]}}]}]}", "src=10.0.0.200", "allow:shop/p"),
    ("ipBlocks v6 in", "AP shop/p {rules: [{from: [{source: {ipBlocks: ['fd00::/64']}}]}]}", "src=fd00::1", "allow:shop/p"),
    ("ipBlocks v6 out", "AP shop/p {rules: [{from: [{source: {ipBlocks: ['fd00::/64']}}]}]}", "src=fd01::1", "deny:no-allow"),
    ("ipBlocks v6 vs v4 peer", "AP shop/p {rules: [{from: [{source: {ipBlocks: ['fd00::/64']}}]}]}", "src=10.0.0.1", "deny:no-allow"),
    ("ipBlocks v4-mapped peer", "AP shop/p {rules: [{from: [{source: {ipBlocks: [10.0.0.0/24]}}]}]}", "src=::ffff:10.0.0.5", "allow:shop/p"),
    // An IPv4-mapped IPv6 block is an IPv6 block: IPv4 peers (and v4-mapped peers,
    // which are compared as IPv4) never match it, as in Istio (Envoy and ztunnel).
    ("ipBlocks v4-mapped block never matches v4 peer", "AP shop/p {rules: [{from: [{source: {ipBlocks: ['::ffff:10.0.0.0/120']}}]}]}", "src=10.0.0.3", "deny:no-allow"),
    ("ipBlocks v4-mapped /104 never matches v4 peer", "AP shop/p {rules: [{from: [{source: {ipBlocks: ['::ffff:10.0.0.0/104']}}]}]}", "src=10.0.0.3", "deny:no-allow"),
    ("ipBlocks v4-mapped block vs v4-mapped peer", "AP shop/p {rules: [{from: [{source: {ipBlocks: ['::ffff:10.0.0.0/104']}}]}]}", "src=::ffff:10.0.0.3", "deny:no-allow"),
    ("ipBlocks v4-mapped single address", "AP shop/p {rules: [{from: [{source: {ipBlocks: ['::ffff:10.0.0.3']}}]}]}", "src=10.0.0.3", "deny:no-allow"),
    ("ipBlocks ::ffff:0:0/96 never matches v4 peer", "AP shop/p {rules: [{from: [{source: {ipBlocks: ['::ffff:0:0/96']}}]}]}", "src=192.0.2.1", "deny:no-allow"),
    ("ipBlocks ::/0 never matches v4 peer", "AP shop/p {rules: [{from: [{source: {ipBlocks: ['::/0']}}]}]}", "src=192.0.2.1", "deny:no-allow"),
    ("ipBlocks ::/0 matches v6 peer", "AP shop/p {rules: [{from: [{source: {ipBlocks: ['::/0']}}]}]}", "src=fd00::1", "allow:shop/p"),
    ("ipBlocks 0.0.0.0/0 never matches v6 peer", "AP shop/p {rules: [{from: [{source: {ipBlocks: [0.0.0.0/0]}}]}]}", "src=fd00::1", "deny:no-allow"),
    ("notIpBlocks v4-mapped block excludes no v4 peer", "AP shop/p {rules: [{from: [{source: {notIpBlocks: ['::ffff:10.0.0.0/104']}}]}]}", "src=10.0.0.3", "allow:shop/p"),
    ("DENY ipBlocks v4-mapped block: v4 peer not denied", "AP shop/p {action: DENY, rules: [{from: [{source: {ipBlocks: ['::ffff:10.0.0.0/104']}}]}]}", "src=10.0.0.3", "allow"),
    ("remoteIpBlocks v4-mapped block", "AP shop/p {rules: [{from: [{source: {remoteIpBlocks: ['::ffff:192.0.2.0/120']}}]}]}", "remote=192.0.2.9", "deny:no-allow"),
    ("when source.ip v4-mapped block", "AP shop/p {rules: [{when: [{key: source.ip, values: ['::ffff:10.0.0.0/104']}]}]}", "src=10.0.0.3", "deny:no-allow"),
    ("when remote.ip v4-mapped block", "AP shop/p {rules: [{when: [{key: remote.ip, values: ['::ffff:10.0.0.0/104']}]}]}", "src=10.0.0.3", "deny:no-allow"),
    ("when destination.ip v4-mapped block", "AP shop/p {rules: [{when: [{key: destination.ip, values: ['::ffff:10.1.0.0/112']}]}]}", "dst=10.1.0.1", "deny:no-allow"),
    ("when destination.ip v4-mapped dst compared as v4", "AP shop/p {rules: [{when: [{key: destination.ip, values: [10.1.0.0/16]}]}]}", "dst=::ffff:10.1.0.1", "allow:shop/p"),
    ("ipBlocks plaintext by IP", "AP shop/p {rules: [{from: [{source: {ipBlocks: [10.0.0.0/8]}}]}]}", "src=10.2.3.4", "allow:shop/p"),
    ("ipBlocks /0 matches all v4", "AP shop/p {rules: [{from: [{source: {ipBlocks: [0.0.0.0/0]}}]}]}", "src=192.0.2.1", "allow:shop/p"),
    ("notIpBlocks excludes", "AP shop/p {rules: [{from: [{source: {notIpBlocks: [10.0.0.0/24]}}]}]}", "src=10.0.0.5", "deny:no-allow"),
    ("notIpBlocks others", "AP shop/p {rules: [{from: [{source: {notIpBlocks: [10.0.0.0/24]}}]}]}", "src=10.9.0.1", "allow:shop/p"),
    ("DENY ipBlocks", "AP shop/p {action: DENY, rules: [{from: [{source: {ipBlocks: [192.0.2.0/24]}}]}]}", "src=192.0.2.7", "deny:shop/p"),
    // --- remoteIpBlocks (direct peer unless the transport gave the client)
    ("remoteIpBlocks = peer by default", "AP shop/p {rules: [{from: [{source: {remoteIpBlocks: [192.0.2.0/24]}}]}]}", "src=192.0.2.1", "allow:shop/p"),
    ("remoteIpBlocks uses remote", "AP shop/p {rules: [{from: [{source: {remoteIpBlocks: [192.0.2.0/24]}}]}]}", "src=10.0.0.1 remote=192.0.2.9", "allow:shop/p"),
    ("remoteIpBlocks remote outside", "AP shop/p {rules: [{from: [{source: {remoteIpBlocks: [192.0.2.0/24]}}]}]}", "src=192.0.2.1 remote=10.0.0.1", "deny:no-allow"),
    ("notRemoteIpBlocks excludes", "AP shop/p {rules: [{from: [{source: {notRemoteIpBlocks: [192.0.2.0/24]}}]}]}", "remote=192.0.2.3", "deny:no-allow"),
    ("notRemoteIpBlocks others", "AP shop/p {rules: [{from: [{source: {notRemoteIpBlocks: [192.0.2.0/24]}}]}]}", "remote=198.51.100.3", "allow:shop/p"),
    ("ipBlocks ignores remote", "AP shop/p {rules: [{from: [{source: {ipBlocks: [10.0.0.0/24]}}]}]}", "src=10.0.0.1 remote=192.0.2.9", "allow:shop/p"),
    // --- fields ANDed, entries ORed
    ("source fields ANDed: both", "AP shop/p {rules: [{from: [{source: {namespaces: [a], ipBlocks: [10.0.0.0/24]}}]}]}", "id=a/x src=10.0.0.9", "allow:shop/p"),
    ("source fields ANDed: ip fails", "AP shop/p {rules: [{from: [{source: {namespaces: [a], ipBlocks: [10.0.0.0/24]}}]}]}", "id=a/x src=10.9.0.9", "deny:no-allow"),
    ("source fields ANDed: ns fails", "AP shop/p {rules: [{from: [{source: {namespaces: [a], ipBlocks: [10.0.0.0/24]}}]}]}", "id=b/x src=10.0.0.9", "deny:no-allow"),
    ("from entries ORed: by ip", "AP shop/p {rules: [{from: [{source: {namespaces: [a]}}, {source: {ipBlocks: [10.0.0.0/24]}}]}]}", "src=10.0.0.9", "allow:shop/p"),
    ("from entries ORed: by ns", "AP shop/p {rules: [{from: [{source: {namespaces: [a]}}, {source: {ipBlocks: [10.0.0.0/24]}}]}]}", "id=a/x src=10.9.0.9", "allow:shop/p"),
    ("from and to ANDed: both", "AP shop/p {rules: [{from: [{source: {namespaces: [a]}}], to: [{operation: {ports: ['8080']}}]}]}", "id=a/x port=8080", "allow:shop/p"),
    ("from and to ANDed: port fails", "AP shop/p {rules: [{from: [{source: {namespaces: [a]}}], to: [{operation: {ports: ['8080']}}]}]}", "id=a/x port=80", "deny:no-allow"),
    ("from and to ANDed: source fails", "AP shop/p {rules: [{from: [{source: {namespaces: [a]}}], to: [{operation: {ports: ['8080']}}]}]}", "id=b/x port=8080", "deny:no-allow"),
    // --- ports
    ("ports in", "AP shop/p {rules: [{to: [{operation: {ports: ['8080']}}]}]}", "port=8080", "allow:shop/p"),
    ("ports out", "AP shop/p {rules: [{to: [{operation: {ports: ['8080']}}]}]}", "port=9090", "deny:no-allow"),
    ("ports as YAML integers", "AP shop/p {rules: [{to: [{operation: {ports: [8080, 9090]}}]}]}", "port=9090", "allow:shop/p"),
    ("ports 65535", "AP shop/p {rules: [{to: [{operation: {ports: ['65535']}}]}]}", "port=65535", "allow:shop/p"),
    // Port 0 is valid in Istio (0..=65535) and matches no connection.
    ("ports 0 matches nothing", "AP shop/p {rules: [{to: [{operation: {ports: ['0']}}]}]}", "port=8080", "deny:no-allow"),
    ("ports 0 as a YAML integer", "AP shop/p {rules: [{to: [{operation: {ports: [0]}}]}]}", "port=8080", "deny:no-allow"),
    ("ports 0 next to a real port", "AP shop/p {rules: [{to: [{operation: {ports: ['0', '8080']}}]}]}", "port=8080", "allow:shop/p"),
    ("notPorts 0 excludes nothing", "AP shop/p {rules: [{to: [{operation: {notPorts: ['0']}}]}]}", "port=8080", "allow:shop/p"),
    ("DENY ports 0 denies nothing", "AP shop/p {action: DENY, rules: [{to: [{operation: {ports: ['0']}}]}]}", "port=8080", "allow"),
    ("when destination.port 0 matches nothing", "AP shop/p {rules: [{when: [{key: destination.port, values: ['0']}]}]}", "port=8080", "deny:no-allow"),
    ("ports with leading zeros (Go ParseUint)", "AP shop/p {rules: [{to: [{operation: {ports: ['0008080']}}]}]}", "port=8080", "allow:shop/p"),
    ("notPorts excludes", "AP shop/p {rules: [{to: [{operation: {notPorts: ['8080']}}]}]}", "port=8080", "deny:no-allow"),
    ("notPorts others", "AP shop/p {rules: [{to: [{operation: {notPorts: ['8080']}}]}]}", "port=9090", "allow:shop/p"),
    ("to entries ORed", "AP shop/p {rules: [{to: [{operation: {ports: ['80']}}, {operation: {ports: ['8080']}}]}]}", "port=8080", "allow:shop/p"),
    ("DENY port", "AP shop/p {action: DENY, rules: [{to: [{operation: {ports: ['22']}}]}]}", "port=22", "deny:shop/p"),
    ("DENY port other", "AP shop/p {action: DENY, rules: [{to: [{operation: {ports: ['22']}}]}]}", "port=8080", "allow"),
    // --- when
    ("when source.ip in", "AP shop/p {rules: [{when: [{key: source.ip, values: [10.0.0.0/8]}]}]}", "src=10.2.0.1", "allow:shop/p"),
    ("when source.ip out", "AP shop/p {rules: [{when: [{key: source.ip, values: [10.0.0.0/8]}]}]}", "src=192.168.0.1", "deny:no-allow"),
    ("when source.ip notValues", "AP shop/p {rules: [{when: [{key: source.ip, notValues: [10.0.0.1]}]}]}", "src=10.0.0.1", "deny:no-allow"),
    ("when values and notValues", "AP shop/p {rules: [{when: [{key: source.ip, values: [10.0.0.0/8], notValues: [10.0.0.1]}]}]}", "src=10.0.0.2", "allow:shop/p"),
    ("when values and notValues excluded", "AP shop/p {rules: [{when: [{key: source.ip, values: [10.0.0.0/8], notValues: [10.0.0.1]}]}]}", "src=10.0.0.1", "deny:no-allow"),
    ("when remote.ip", "AP shop/p {rules: [{when: [{key: remote.ip, values: [192.0.2.0/24]}]}]}", "remote=192.0.2.5", "allow:shop/p"),
    ("when remote.ip defaults to peer", "AP shop/p {rules: [{when: [{key: remote.ip, values: [10.0.0.1]}]}]}", "", "allow:shop/p"),
    ("when source.namespace", "AP shop/p {rules: [{when: [{key: source.namespace, values: [a]}]}]}", "id=a/x", "allow:shop/p"),
    ("when source.namespace plaintext", "AP shop/p {rules: [{when: [{key: source.namespace, values: [a]}]}]}", "", "deny:no-allow"),
    ("when source.namespace notValues", "AP shop/p {rules: [{when: [{key: source.namespace, notValues: [a]}]}]}", "id=a/x", "deny:no-allow"),
    ("when source.principal prefix", "AP shop/p {rules: [{when: [{key: source.principal, values: [cluster.local/ns/a/*]}]}]}", "id=a/q", "allow:shop/p"),
    ("when source.principal notValues", "AP shop/p {rules: [{when: [{key: source.principal, notValues: ['*']}]}]}", "", "allow:shop/p"),
    ("when destination.ip in", "AP shop/p {rules: [{when: [{key: destination.ip, values: [10.1.0.0/16]}]}]}", "dst=10.1.0.1", "allow:shop/p"),
    ("when destination.ip out", "AP shop/p {rules: [{when: [{key: destination.ip, values: [10.1.0.0/16]}]}]}", "dst=10.2.0.1", "deny:no-allow"),
    ("when destination.ip notValues", "AP shop/p {rules: [{when: [{key: destination.ip, notValues: [10.1.0.1]}]}]}", "dst=10.1.0.1", "deny:no-allow"),
    ("when destination.port", "AP shop/p {rules: [{when: [{key: destination.port, values: ['8080']}]}]}", "port=8080", "allow:shop/p"),
    ("when destination.port notValues", "AP shop/p {rules: [{when: [{key: destination.port, notValues: ['8080']}]}]}", "port=8080", "deny:no-allow"),
    ("when conditions ANDed: both", "AP shop/p {rules: [{when: [{key: source.namespace, values: [a]}, {key: destination.port, values: ['8080']}]}]}", "id=a/x port=8080", "allow:shop/p"),
    ("when conditions ANDed: one", "AP shop/p {rules: [{when: [{key: source.namespace, values: [a]}, {key: destination.port, values: ['8080']}]}]}", "id=a/x port=9", "deny:no-allow"),
    ("DENY when", "AP shop/p {action: DENY, rules: [{when: [{key: source.ip, values: [192.0.2.0/24]}]}]}", "src=192.0.2.1", "deny:shop/p"),
    // source.serviceAccount: `<ns>/<sa>` or `<sa>` (the policy's namespace), from the peer's principal.
    ("when source.serviceAccount ns/sa", "AP shop/p {rules: [{when: [{key: source.serviceAccount, values: [a/x]}]}]}", "id=a/x", "allow:shop/p"),
    ("when source.serviceAccount other sa", "AP shop/p {rules: [{when: [{key: source.serviceAccount, values: [a/x]}]}]}", "id=a/y", "deny:no-allow"),
    ("when source.serviceAccount other ns", "AP shop/p {rules: [{when: [{key: source.serviceAccount, values: [a/x]}]}]}", "id=b/x", "deny:no-allow"),
    ("when source.serviceAccount plaintext", "AP shop/p {rules: [{when: [{key: source.serviceAccount, values: [a/x]}]}]}", "", "deny:no-allow"),
    ("when source.serviceAccount other trust domain", "AP shop/p {rules: [{when: [{key: source.serviceAccount, values: [a/x]}]}]}", "p=other.td/ns/a/sa/x", "allow:shop/p"),
    ("when source.serviceAccount non-k8s principal", "AP shop/p {rules: [{when: [{key: source.serviceAccount, values: [a/x]}]}]}", "p=cluster.local/ns/a/sa/x/extra", "deny:no-allow"),
    ("when source.serviceAccount name is policy ns", "AP shop/p {rules: [{when: [{key: source.serviceAccount, values: [x]}]}]}", "id=shop/x", "allow:shop/p"),
    ("when source.serviceAccount name, other ns", "AP shop/p {rules: [{when: [{key: source.serviceAccount, values: [x]}]}]}", "id=a/x", "deny:no-allow"),
    ("when source.serviceAccount notValues excludes", "AP shop/p {rules: [{when: [{key: source.serviceAccount, notValues: [a/x]}]}]}", "id=a/x", "deny:no-allow"),
    ("when source.serviceAccount notValues others", "AP shop/p {rules: [{when: [{key: source.serviceAccount, notValues: [a/x]}]}]}", "id=a/y", "allow:shop/p"),
    ("when source.serviceAccount notValues plaintext", "AP shop/p {rules: [{when: [{key: source.serviceAccount, notValues: [a/x]}]}]}", "", "allow:shop/p"),
    ("when source.serviceAccount with principals", "AP shop/p {rules: [{from: [{source: {principals: ['*']}}], when: [{key: source.serviceAccount, values: [a/x]}]}]}", "id=a/x", "allow:shop/p"),
    ("DENY when source.serviceAccount", "AP shop/p {action: DENY, rules: [{when: [{key: source.serviceAccount, values: [evil/x]}]}]}", "id=evil/x", "deny:shop/p"),
    ("DENY when source.serviceAccount other", "AP shop/p {action: DENY, rules: [{when: [{key: source.serviceAccount, values: [evil/x]}]}]}", "id=evil/y", "allow"),
    // --- scope
    ("mesh ALLOW-nothing applies everywhere", "@mesh-allow-nothing", "id=a/x", "deny:no-allow"),
    ("mesh ALLOW-nothing in other namespace", "@mesh-allow-nothing", "wl=other:app=x", "deny:no-allow"),
    ("mesh DENY", "@mesh-deny-evil", "id=evil/x", "deny:istio-system/deny-evil"),
    ("mesh DENY other source", "@mesh-deny-evil", "id=good/x", "allow"),
    ("mesh DENY beats ns ALLOW", "@mesh-deny-evil ; @allow-all", "id=evil/x", "deny:istio-system/deny-evil"),
    ("mesh DENY named before ns DENY", "@mesh-deny-evil ; @deny-evil", "id=evil/x", "deny:istio-system/deny-evil"),
    ("mesh ALLOW + ns ALLOW both apply", "AP istio-system/mesh-a {rules: [{from: [{source: {namespaces: [a]}}]}]} ; @from-b", "id=b/x", "allow:shop/from-b"),
    ("ns policy other namespace does not apply", "AP other/p {}", "", "allow"),
    ("ns policy applies to all its workloads", "AP shop/p {}", "wl=shop:app=anything", "deny:no-allow"),
    ("ns policy applies to unlabelled workload", "AP shop/p {}", "wl=shop:", "deny:no-allow"),
    ("selector selects", "AP shop/p {selector: {matchLabels: {app: web}}}", "", "deny:no-allow"),
    ("selector other workload", "AP shop/p {selector: {matchLabels: {app: web}}}", "wl=shop:app=db", "allow"),
    ("selector unlabelled workload", "AP shop/p {selector: {matchLabels: {app: web}}}", "wl=shop:", "allow"),
    ("selector all labels needed", "AP shop/p {selector: {matchLabels: {app: web, ver: v1}}}", "wl=shop:app=web", "allow"),
    ("selector all labels present", "AP shop/p {selector: {matchLabels: {app: web, ver: v1}}}", "wl=shop:app=web,ver=v1,extra=1", "deny:no-allow"),
    ("selector label value differs", "AP shop/p {selector: {matchLabels: {app: web, ver: v1}}}", "wl=shop:app=web,ver=v2", "allow"),
    ("selector numeric label", "AP shop/p {selector: {matchLabels: {ver: 1}}}", "wl=shop:ver=1", "deny:no-allow"),
    ("selector other namespace", "AP other/p {selector: {matchLabels: {app: web}}}", "", "allow"),
    ("empty matchLabels = namespace", "AP shop/p {selector: {matchLabels: {}}}", "wl=shop:app=db", "deny:no-allow"),
    ("root selector applies in every namespace", "AP istio-system/p {selector: {matchLabels: {app: web}}}", "wl=other:app=web", "deny:no-allow"),
    ("root selector not other workloads", "AP istio-system/p {selector: {matchLabels: {app: web}}}", "wl=other:app=db", "allow"),
    ("root ns workload sees mesh policies", "AP istio-system/p {}", "wl=istio-system:app=gw", "deny:no-allow"),
    ("selector fixture: port 8080 ok", "@web-only-8080", "port=8080", "allow:shop/web-8080"),
    ("selector fixture: port 9090 denied", "@web-only-8080", "port=9090", "deny:no-allow"),
    ("selector fixture: db unaffected", "@web-only-8080", "wl=shop:app=db port=9090", "allow"),
    ("ns + selector ALLOWs both apply", "@from-a ; AP shop/sel {selector: {matchLabels: {app: web}}, rules: [{from: [{source: {namespaces: [b]}}]}]}", "id=b/x", "allow:shop/sel"),
    ("ns + selector ALLOWs, neither", "@from-a ; AP shop/sel {selector: {matchLabels: {app: web}}, rules: [{from: [{source: {namespaces: [b]}}]}]}", "id=c/x", "deny:no-allow"),
    ("List kind", "RAW:apiVersion: v1\\nkind: List\\nitems:\\n- {apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: l, namespace: shop}, spec: {}}", "", "deny:no-allow"),
    ("JSON document", "RAW:{\"apiVersion\": \"security.istio.io/v1\", \"kind\": \"AuthorizationPolicy\", \"metadata\": {\"name\": \"j\", \"namespace\": \"shop\"}, \"spec\": {\"action\": \"DENY\", \"rules\": [{}]}}", "", "deny:shop/j"),
    ("namespace defaults to default", "RAW:apiVersion: security.istio.io/v1\\nkind: AuthorizationPolicy\\nmetadata: {name: d}\\nspec: {}", "wl=default:app=x", "deny:no-allow"),
    // --- AUDIT and dry-run
    ("AUDIT matching is listed", "@audit-all", "", "allow audit:shop/audit-all"),
    ("AUDIT not matching", "AP shop/a {action: AUDIT, rules: [{to: [{operation: {ports: ['22']}}]}]}", "", "allow"),
    ("AUDIT is not an ALLOW", "@audit-all ; @allow-nothing", "", "deny:no-allow audit:shop/audit-all"),
    ("AUDIT with DENY", "@audit-all ; @deny-all", "", "deny:shop/deny-all audit:shop/audit-all"),
    ("AUDIT with ALLOW", "@audit-all ; @allow-all", "", "allow:shop/allow-all audit:shop/audit-all"),
    ("AUDIT L7 rule never matches", "AP shop/a {action: AUDIT, rules: [{to: [{operation: {methods: [GET]}}]}]}", "", "allow"),
    ("dry-run DENY only audited", "RAW:apiVersion: security.istio.io/v1\\nkind: AuthorizationPolicy\\nmetadata: {name: d, namespace: shop, annotations: {istio.io/dry-run: 'true'}}\\nspec: {action: DENY, rules: [{}]}", "", "allow audit:shop/d"),
    // istio.io/dry-run is read like Go's strconv.ParseBool; anything else is invalid and the policy is enforced.
    ("dry-run '1'", "AP~1 shop/d {action: DENY, rules: [{}]}", "", "allow audit:shop/d"),
    ("dry-run 't'", "AP~t shop/d {action: DENY, rules: [{}]}", "", "allow audit:shop/d"),
    ("dry-run 'T'", "AP~T shop/d {action: DENY, rules: [{}]}", "", "allow audit:shop/d"),
    ("dry-run 'TRUE'", "AP~TRUE shop/d {action: DENY, rules: [{}]}", "", "allow audit:shop/d"),
    ("dry-run 'True'", "AP~True shop/d {action: DENY, rules: [{}]}", "", "allow audit:shop/d"),
    ("dry-run 'true'", "AP~true shop/d {action: DENY, rules: [{}]}", "", "allow audit:shop/d"),
    ("dry-run 'tRuE' invalid: enforced", "AP~tRuE shop/d {action: DENY, rules: [{}]}", "", "deny:shop/d"),
    ("dry-run 'yes' invalid: enforced", "AP~yes shop/d {action: DENY, rules: [{}]}", "", "deny:shop/d"),
    ("dry-run ' true' invalid: enforced", "RAW:apiVersion: security.istio.io/v1\\nkind: AuthorizationPolicy\\nmetadata: {name: d, namespace: shop, annotations: {istio.io/dry-run: ' true'}}\\nspec: {action: DENY, rules: [{}]}", "", "deny:shop/d"),
    ("dry-run empty invalid: enforced", "AP~ shop/d {action: DENY, rules: [{}]}", "", "deny:shop/d"),
    ("dry-run '0': enforced", "AP~0 shop/d {action: DENY, rules: [{}]}", "", "deny:shop/d"),
    ("dry-run 'F': enforced", "AP~F shop/d {action: DENY, rules: [{}]}", "", "deny:shop/d"),
    ("dry-run 'False': enforced", "AP~False shop/d {action: DENY, rules: [{}]}", "", "deny:shop/d"),
    ("dry-run 'tRuE' ALLOW enforced", "AP~tRuE shop/d {}", "", "deny:no-allow"),
    ("dry-run ALLOW-nothing not enforced", "RAW:apiVersion: security.istio.io/v1\\nkind: AuthorizationPolicy\\nmetadata: {name: d, namespace: shop, annotations: {istio.io/dry-run: 'true'}}\\nspec: {}", "", "allow"),
    // --- L7 fail-safe
    ("ALLOW methods never matches", "AP shop/p {rules: [{to: [{operation: {methods: [GET]}}]}]}", "id=a/x", "deny:no-allow"),
    ("ALLOW L4+L7 rule dropped whole", "AP shop/p {rules: [{from: [{source: {namespaces: [a]}}], to: [{operation: {methods: [GET]}}]}]}", "id=a/x", "deny:no-allow"),
    ("ALLOW other L4 rule still grants", "AP shop/p {rules: [{to: [{operation: {paths: [/x]}}]}, {from: [{source: {namespaces: [b]}}]}]}", "id=b/x", "allow:shop/p"),
    ("ALLOW requestPrincipals never matches", "AP shop/p {rules: [{from: [{source: {requestPrincipals: ['*']}}]}]}", "id=a/x", "deny:no-allow"),
    ("ALLOW hosts never matches", "AP shop/p {rules: [{to: [{operation: {hosts: [a.example]}}]}]}", "", "deny:no-allow"),
    ("ALLOW notPaths never matches", "AP shop/p {rules: [{to: [{operation: {notPaths: [/admin]}}]}]}", "", "deny:no-allow"),
    ("ALLOW when header never matches", "AP shop/p {rules: [{when: [{key: 'request.headers[x-user]', values: [bob]}]}]}", "", "deny:no-allow"),
    ("ALLOW when sni never matches", "AP shop/p {rules: [{when: [{key: connection.sni, values: [a.example]}]}]}", "", "deny:no-allow"),
    ("ALLOW when inline header never matches", "AP shop/p {rules: [{when: [{key: 'request.experimental.inline.headers[x-user]', values: [bob]}]}]}", "id=a/x", "deny:no-allow"),
    ("DENY when inline header only denies all", "AP shop/p {action: DENY, rules: [{when: [{key: 'request.experimental.inline.headers[x-user]', values: [bob]}]}]}", "id=a/x", "deny:shop/p"),
    ("DENY inline header + ns: match", "AP shop/p {action: DENY, rules: [{from: [{source: {namespaces: [a]}}], when: [{key: 'request.experimental.inline.headers[x-user]', notValues: [bob]}]}]}", "id=a/x", "deny:shop/p"),
    ("DENY inline header + ns: other", "AP shop/p {action: DENY, rules: [{from: [{source: {namespaces: [a]}}], when: [{key: 'request.experimental.inline.headers[x-user]', notValues: [bob]}]}]}", "id=b/x", "allow"),
    ("ALLOW when jwt claim never matches", "AP shop/p {rules: [{when: [{key: 'request.auth.claims[iss]', values: [x]}]}]}", "", "deny:no-allow"),
    ("DENY methods only denies all", "AP shop/p {action: DENY, rules: [{to: [{operation: {methods: [POST]}}]}]}", "id=a/x", "deny:shop/p"),
    ("DENY methods only denies plaintext", "AP shop/p {action: DENY, rules: [{to: [{operation: {methods: [POST]}}]}]}", "", "deny:shop/p"),
    ("DENY L4 part still selects: match", "AP shop/p {action: DENY, rules: [{from: [{source: {namespaces: [a]}}], to: [{operation: {methods: [POST]}}]}]}", "id=a/x", "deny:shop/p"),
    ("DENY L4 part still selects: other", "AP shop/p {action: DENY, rules: [{from: [{source: {namespaces: [a]}}], to: [{operation: {methods: [POST]}}]}]}", "id=b/x", "allow"),
    ("DENY port+method: port", "AP shop/p {action: DENY, rules: [{to: [{operation: {ports: ['8080'], methods: [POST]}}]}]}", "port=8080", "deny:shop/p"),
    ("DENY port+method: other port", "AP shop/p {action: DENY, rules: [{to: [{operation: {ports: ['8080'], methods: [POST]}}]}]}", "port=9090", "allow"),
    ("DENY notPorts+paths", "AP shop/p {action: DENY, rules: [{to: [{operation: {notPorts: ['9090'], paths: [/admin]}}]}]}", "port=8080", "deny:shop/p"),
    ("DENY notPorts+paths exempt port", "AP shop/p {action: DENY, rules: [{to: [{operation: {notPorts: ['9090'], paths: [/admin]}}]}]}", "port=9090", "allow"),
    ("DENY notRequestPrincipals denies all", "AP shop/p {action: DENY, rules: [{from: [{source: {notRequestPrincipals: ['*']}}]}]}", "id=a/x", "deny:shop/p"),
    ("DENY L7-only entry matches all", "AP shop/p {action: DENY, rules: [{from: [{source: {requestPrincipals: [x]}}, {source: {namespaces: [a]}}]}]}", "id=b/x", "deny:shop/p"),
    ("DENY mixed source keeps L4 field", "AP shop/p {action: DENY, rules: [{from: [{source: {namespaces: [a], requestPrincipals: [x]}}]}]}", "id=b/x", "allow"),
    ("DENY when claim + ns: match", "AP shop/p {action: DENY, rules: [{from: [{source: {namespaces: [a]}}], when: [{key: 'request.auth.claims[iss]', values: [x]}]}]}", "id=a/x", "deny:shop/p"),
    ("DENY when claim + ns: other", "AP shop/p {action: DENY, rules: [{from: [{source: {namespaces: [a]}}], when: [{key: 'request.auth.claims[iss]', values: [x]}]}]}", "id=b/x", "allow"),
    ("DENY sni + port", "AP shop/p {action: DENY, rules: [{to: [{operation: {ports: ['443']}}], when: [{key: connection.sni, values: [x.example]}]}]}", "port=443", "deny:shop/p"),
    // --- CUSTOM (fail closed)
    ("CUSTOM denies what its rules select", "AP shop/c {action: CUSTOM, provider: {name: ext}, rules: [{to: [{operation: {ports: ['8080'], paths: [/admin]}}]}]}", "port=8080", "deny:custom:shop/c"),
    ("CUSTOM other port untouched", "AP shop/c {action: CUSTOM, provider: {name: ext}, rules: [{to: [{operation: {ports: ['8080'], paths: [/admin]}}]}]}", "port=9090", "allow"),
    ("CUSTOM without rules", "AP shop/c {action: CUSTOM, provider: {name: ext}}", "", "allow"),
    ("CUSTOM is not an ALLOW", "AP shop/c {action: CUSTOM, provider: {name: ext}, rules: [{to: [{operation: {ports: ['22']}}]}]} ; @allow-nothing", "", "deny:no-allow"),
    // --- rejected policies fail closed
    ("rejected ALLOW grants nothing", "AP shop/p {rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]}", "src=10.0.0.1", "deny:no-allow"),
    ("rejected ALLOW, valid ALLOW grants", "AP shop/p {rules: [{from: [{source: {ipBlocks: [bad]}}]}]} ; @allow-all", "", "allow:shop/allow-all"),
    ("rejected DENY denies all", "AP shop/p {action: DENY, rules: [{to: [{operation: {ports: ['65536']}}]}]}", "id=a/x port=9", "deny:rejected:shop/p"),
    ("rejected DENY beats ALLOW", "AP shop/p {action: DENY, rules: [{to: [{operation: {ports: [http]}}]}]} ; @allow-all", "", "deny:rejected:shop/p"),
    ("rejected DENY scoped by selector", "AP shop/p {action: DENY, selector: {matchLabels: {app: web}}, rules: [{to: [{operation: {ports: ['99999']}}]}]}", "wl=shop:app=db", "allow"),
    ("rejected DENY selected workload", "AP shop/p {action: DENY, selector: {matchLabels: {app: web}}, rules: [{to: [{operation: {ports: ['99999']}}]}]}", "", "deny:rejected:shop/p"),
    ("rejected DENY unknown field, selector kept", "AP shop/p {action: DENY, selector: {matchLabels: {app: web}}, rules: [{from: [{source: {principal: [x]}}]}]}", "wl=shop:app=db", "allow"),
    ("rejected DENY unknown field denies", "AP shop/p {action: DENY, selector: {matchLabels: {app: web}}, rules: [{from: [{source: {principal: [x]}}]}]}", "", "deny:rejected:shop/p"),
    ("rejected DENY bad selector widens scope", "AP shop/p {action: DENY, selector: {matchLabels: {app: 'w*'}}, rules: [{}]}", "wl=shop:app=db", "deny:rejected:shop/p"),
    ("unknown action fails closed", "AP shop/p {action: REJECT, rules: [{}]}", "", "deny:rejected:shop/p"),
    ("lowercase action fails closed", "AP shop/p {action: deny, rules: [{}]}", "", "deny:rejected:shop/p"),
    ("non-string action fails closed", "AP shop/p {action: [DENY], rules: [{}]}", "", "deny:rejected:shop/p"),
    ("rejected mesh DENY hits every namespace", "AP istio-system/p {action: DENY, rules: [{from: [{source: {principals: ['a*b']}}]}]}", "wl=other:app=x", "deny:rejected:istio-system/p"),
    ("rejected AUDIT has no effect", "AP shop/a {action: AUDIT, rules: [{to: [{operation: {ports: ['x']}}]}]}", "", "allow"),
    ("rejected ALLOW other namespace", "AP other/p {rules: [{to: [{operation: {ports: ['x']}}]}]}", "", "allow"),
    ("selector and targetRefs DENY fails closed", "AP shop/t {selector: {matchLabels: {app: web}}, targetRefs: [{kind: Service, name: web}], action: DENY, rules: [{}]}", "", "deny:rejected:shop/t"),
    ("selector and targetRefs DENY keeps selector scope", "AP shop/t {selector: {matchLabels: {app: web}}, targetRefs: [{kind: Service, name: web}], action: DENY, rules: [{}]}", "wl=shop:app=db", "allow"),
    ("selector and targetRefs ALLOW grants nothing", "AP shop/t {selector: {matchLabels: {app: web}}, targetRefs: [{kind: Service, name: web}], rules: [{}]}", "", "deny:no-allow"),
    ("targetRefs not enforced", "AP shop/t {targetRefs: [{kind: Service, group: '', name: web}]}", "", "allow"),
    // --- PeerAuthentication in the decision
    ("STRICT rejects plaintext", "@mesh-strict", "", "deny:mtls:istio-system/default"),
    ("STRICT accepts mTLS", "@mesh-strict", "id=a/x", "allow"),
    ("STRICT before ALLOW-all", "@mesh-strict ; @allow-all", "", "deny:mtls:istio-system/default"),
    ("PERMISSIVE plaintext authorized", "@mesh-permissive ; @from-a", "", "deny:no-allow"),
    ("PERMISSIVE plaintext by ipBlocks", "@mesh-permissive ; AP shop/p {rules: [{from: [{source: {ipBlocks: [10.0.0.1]}}]}]}", "", "allow:shop/p"),
    ("port-level PERMISSIVE exempts port", "@mesh-strict ; PA shop/w {selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: PERMISSIVE}}}", "port=8080", "allow"),
    ("port-level PERMISSIVE other port", "@mesh-strict ; PA shop/w {selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: PERMISSIVE}}}", "port=9090", "deny:mtls:istio-system/default"),
    ("AUDIT still listed on mTLS deny", "@mesh-strict ; @audit-all", "", "deny:mtls:istio-system/default audit:shop/audit-all"),
];

#[test]
fn authz_table() {
    let mut failures = Vec::new();
    for (name, policies, c, want) in AUTHZ {
        let (store, report) = store(policies);
        for e in &report.errors {
            if matches!(
                e,
                PolicyError::Syntax { .. }
                    | PolicyError::Document { .. }
                    | PolicyError::UnsupportedKind { .. }
            ) {
                failures.push(format!("{name}: fixture does not parse: {e}"));
            }
        }
        let got = render(&decide(&store, &conn(c)));
        if got != *want {
            failures.push(format!(
                "{name}: want {want:?}, got {got:?} (report: {report:?})"
            ));
        }
    }
    assert_no_failures(&failures);
}

/// (case, policies, workload and port, expected mode[:deciding policy])
#[rustfmt::skip]
const MTLS: &[(&str, &str, &str, &str)] = &[
    ("default PERMISSIVE", "", "", "PERMISSIVE"),
    ("mesh STRICT", "@mesh-strict", "", "STRICT:istio-system/default"),
    ("mesh PERMISSIVE", "@mesh-permissive", "", "PERMISSIVE:istio-system/default"),
    ("mesh DISABLE", "PA istio-system/default {mtls: {mode: DISABLE}}", "", "DISABLE:istio-system/default"),
    ("mesh UNSET is default", "PA istio-system/default {mtls: {mode: UNSET}}", "", "PERMISSIVE"),
    ("mesh without mtls is default", "PA istio-system/default {}", "", "PERMISSIVE"),
    ("mesh applies to other namespaces", "@mesh-strict", "wl=other:app=x", "STRICT:istio-system/default"),
    ("mesh applies to root namespace", "@mesh-strict", "wl=istio-system:app=x", "STRICT:istio-system/default"),
    ("ns overrides mesh", "@mesh-strict ; PA shop/ns {mtls: {mode: PERMISSIVE}}", "", "PERMISSIVE:shop/ns"),
    ("ns UNSET inherits mesh", "@mesh-strict ; PA shop/ns {mtls: {mode: UNSET}}", "", "STRICT:istio-system/default"),
    ("ns without mtls inherits mesh", "@mesh-strict ; PA shop/ns {}", "", "STRICT:istio-system/default"),
    ("ns STRICT", "PA shop/ns {mtls: {mode: STRICT}}", "", "STRICT:shop/ns"),
    ("ns policy of other namespace", "PA other/ns {mtls: {mode: STRICT}}", "", "PERMISSIVE"),
    ("workload overrides ns", "PA shop/ns {mtls: {mode: STRICT}} ; PA shop/w {selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}}", "", "PERMISSIVE:shop/w"),
    ("workload UNSET inherits ns", "PA shop/ns {mtls: {mode: STRICT}} ; PA shop/w {selector: {matchLabels: {app: web}}, mtls: {mode: UNSET}}", "", "STRICT:shop/ns"),
    ("workload selector not matching", "PA shop/ns {mtls: {mode: STRICT}} ; PA shop/w {selector: {matchLabels: {app: db}}, mtls: {mode: PERMISSIVE}}", "", "STRICT:shop/ns"),
    ("workload DISABLE", "@mesh-strict ; PA shop/w {selector: {matchLabels: {app: web}}, mtls: {mode: DISABLE}}", "", "DISABLE:shop/w"),
    ("port-level overrides workload", "PA shop/w {selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {'8080': {mode: PERMISSIVE}}}", "port=8080", "PERMISSIVE:shop/w"),
    ("port-level other port", "PA shop/w {selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {'8080': {mode: PERMISSIVE}}}", "port=9090", "STRICT:shop/w"),
    ("port-level STRICT under PERMISSIVE", "PA shop/w {selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {9090: {mode: STRICT}}}", "port=9090", "STRICT:shop/w"),
    ("port-level STRICT, other port PERMISSIVE", "PA shop/w {selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {9090: {mode: STRICT}}}", "port=8080", "PERMISSIVE:shop/w"),
    ("port-level under UNSET workload, ns PERMISSIVE", "PA shop/ns {mtls: {mode: PERMISSIVE}} ; PA shop/w {selector: {matchLabels: {app: web}}, portLevelMtls: {9090: {mode: STRICT}}}", "port=9090", "STRICT:shop/w"),
    ("UNSET workload, unlisted port inherits ns", "PA shop/ns {mtls: {mode: PERMISSIVE}} ; PA shop/w {selector: {matchLabels: {app: web}}, portLevelMtls: {9090: {mode: STRICT}}}", "port=8080", "PERMISSIVE:shop/ns"),
    ("port-level PERMISSIVE under strict mesh", "@mesh-strict ; PA shop/w {selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: PERMISSIVE}}}", "port=8080", "PERMISSIVE:shop/w"),
    ("port-level DISABLE under strict mesh", "@mesh-strict ; PA shop/w {selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: DISABLE}}}", "port=8080", "DISABLE:shop/w"),
    ("port-level UNSET inherits workload", "PA shop/w {selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: UNSET}}}", "port=8080", "STRICT:shop/w"),
    ("port-level empty entry inherits", "@mesh-strict ; PA shop/w {selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {}}}", "port=8080", "STRICT:istio-system/default"),
    ("oldest ns policy wins", "PA shop/b@2024-01-01T00:00:00Z {mtls: {mode: STRICT}} ; PA shop/a@2025-01-01T00:00:00Z {mtls: {mode: PERMISSIVE}}", "", "STRICT:shop/b"),
    ("without timestamps: by name", "PA shop/b {mtls: {mode: STRICT}} ; PA shop/a {mtls: {mode: PERMISSIVE}}", "", "PERMISSIVE:shop/a"),
    ("oldest mesh policy wins", "PA istio-system/new@2025-01-01T00:00:00Z {mtls: {mode: PERMISSIVE}} ; PA istio-system/old@2020-01-01T00:00:00Z {mtls: {mode: STRICT}}", "", "STRICT:istio-system/old"),
    ("oldest workload policy wins", "PA shop/w2@2025-01-01T00:00:00Z {selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}} ; PA shop/w1@2021-01-01T00:00:00Z {selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}}", "", "PERMISSIVE:shop/w1"),
    ("root-namespace selector ignored", "PA istio-system/w {selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}", "", "PERMISSIVE"),
    ("rejected ns policy is STRICT", "PA shop/bad {mtls: {mode: STRIKT}}", "", "STRICT:shop/bad"),
    ("rejected beats older valid", "PA shop/old@2020-01-01T00:00:00Z {mtls: {mode: PERMISSIVE}} ; PA shop/bad@2025-01-01T00:00:00Z {mtls: {mode: strict}}", "", "STRICT:shop/bad"),
    ("rejected portLevel without selector", "PA shop/bad {mtls: {mode: PERMISSIVE}, portLevelMtls: {8080: {mode: PERMISSIVE}}}", "", "STRICT:shop/bad"),
    ("rejected workload policy", "PA shop/w {selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {'0': {mode: PERMISSIVE}}}", "", "STRICT:shop/w"),
    ("rejected workload policy unknown field", "PA shop/w {selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE, extra: 1}}", "wl=shop:app=db", "PERMISSIVE"),
    ("v1beta1-less kind still v1", "PA shop/ns {mtls: {mode: STRICT}}", "wl=shop:", "STRICT:shop/ns"),
];

#[test]
fn mtls_table() {
    let mut failures = Vec::new();
    for (name, policies, c, want) in MTLS {
        let (store, _) = store(policies);
        let c = conn(c);
        let w = WorkloadRef {
            namespace: &c.ns,
            labels: &c.labels,
        };
        let s = store.mtls_setting(&w, c.port);
        assert_eq!(s.mode, store.mtls_mode(&w, c.port));
        let got = match s.policy {
            Some(p) => format!("{}:{p}", s.mode),
            None => s.mode.to_string(),
        };
        if got != *want {
            failures.push(format!("{name}: want {want:?}, got {got:?}"));
        }
    }
    assert_no_failures(&failures);
}

/// (case, documents, expectations joined by ` && `: `E:<substring>` an
/// error contains it, `W:<substring>` a warning does, `!W:`/`!E:` none
/// does, `clean` no error and no warning)
#[rustfmt::skip]
const DIAGNOSTICS: &[(&str, &str, &str)] = &[
    ("valid policy is clean", "@from-a ; @deny-evil ; @mesh-strict", "clean"),
    ("bad CIDR", "AP shop/p {rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]}", "E:AuthorizationPolicy shop/p rejected: spec.rules[0].from[0].source.ipBlocks[0]: bad CIDR \"10.0.0.0/33\" && E:grants nothing"),
    ("bad IP", "AP shop/p {rules: [{from: [{source: {ipBlocks: [10.0.0.256]}}]}]}", "E:ipBlocks[0]: bad IP address \"10.0.0.256\""),
    ("bad notIpBlocks", "AP shop/p {rules: [{from: [{source: {notIpBlocks: [10.0.0.1, nope]}}]}]}", "E:spec.rules[0].from[0].source.notIpBlocks[1]: bad IP address"),
    ("bad remoteIpBlocks", "AP shop/p {rules: [{from: [{source: {remoteIpBlocks: ['1.2.3.4/']}}]}]}", "E:source.remoteIpBlocks[0]: bad CIDR"),
    ("bad notRemoteIpBlocks", "AP shop/p {rules: [{from: [{source: {notRemoteIpBlocks: ['fd00::/129']}}]}]}", "E:source.notRemoteIpBlocks[0]: bad CIDR"),
    ("port 0 is valid", "AP shop/p {rules: [{to: [{operation: {ports: ['0']}}]}]}", "clean"),
    ("notPorts 0 is valid", "AP shop/p {rules: [{to: [{operation: {notPorts: [0]}}]}]}", "clean"),
    ("when destination.port 0 is valid", "AP shop/p {rules: [{when: [{key: destination.port, values: ['0']}]}]}", "clean"),
    ("port out of range message", "AP shop/p {rules: [{to: [{operation: {ports: ['99999']}}]}]}", "E:spec.rules[0].to[0].operation.ports[0]: bad port \"99999\": expected a number in 0..65535"),
    ("port 65536", "AP shop/p {rules: [{to: [{operation: {ports: ['65536']}}]}]}", "E:bad port \"65536\""),
    ("port name", "AP shop/p {rules: [{to: [{operation: {ports: [http]}}]}]}", "E:bad port \"http\""),
    ("port with sign", "AP shop/p {rules: [{to: [{operation: {ports: ['+80']}}]}]}", "E:bad port \"+80\""),
    ("port negative", "AP shop/p {rules: [{to: [{operation: {ports: [-1]}}]}]}", "E:bad port \"-1\""),
    ("port range string", "AP shop/p {rules: [{to: [{operation: {ports: ['80-90']}}]}]}", "E:bad port \"80-90\""),
    ("bad notPorts", "AP shop/p {rules: [{to: [{operation: {notPorts: ['8080', '']}}]}]}", "E:spec.rules[0].to[0].operation.notPorts[1]: bad port"),
    ("port float", "AP shop/p {rules: [{to: [{operation: {ports: [80.5]}}]}]}", "E:spec.rules[0].to[0].operation.ports[0]"),
    ("when port bad", "AP shop/p {rules: [{when: [{key: destination.port, values: [x]}]}]}", "E:spec.rules[0].when[0].values[0]: bad port"),
    ("when port notValues bad", "AP shop/p {rules: [{when: [{key: destination.port, notValues: ['70000']}]}]}", "E:spec.rules[0].when[0].notValues[0]: bad port"),
    ("when source.ip bad", "AP shop/p {rules: [{when: [{key: source.ip, values: [x]}]}]}", "E:when[0].values[0]: bad IP address"),
    ("when destination.ip bad", "AP shop/p {rules: [{when: [{key: destination.ip, notValues: ['10.0.0.0/40']}]}]}", "E:when[0].notValues[0]: bad CIDR"),
    ("when remote.ip bad", "AP shop/p {rules: [{when: [{key: remote.ip, values: [x]}]}]}", "E:when[0].values[0]: bad IP address"),
    ("when unknown key", "AP shop/p {rules: [{when: [{key: source.ipp, values: [x]}]}]}", "E:spec.rules[0].when[0].key: unknown attribute \"source.ipp\" && E:grants nothing"),
    ("when destination.namespace", "AP shop/p {rules: [{when: [{key: destination.namespace, values: [x]}]}]}", "E:replaced by the policy's metadata.namespace"),
    ("when destination.labels", "AP shop/p {rules: [{when: [{key: 'destination.labels[app]', values: [x]}]}]}", "E:replaced by the workload selector"),
    ("when destination.user", "AP shop/p {rules: [{when: [{key: destination.user, values: [x]}]}]}", "E:deprecated attribute destination.user"),
    ("when no values", "AP shop/p {rules: [{when: [{key: source.ip}]}]}", "E:spec.rules[0].when[0]: at least one of values or notValues must be set for key source.ip"),
    ("when empty key", "AP shop/p {rules: [{when: [{values: [a]}]}]}", "E:spec.rules[0].when[0].key: must not be empty"),
    ("when null", "AP shop/p {rules: [{when: [null]}]}", "E:spec.rules[0].when[0]: must not be null"),
    ("when header bad map key", "AP shop/p {rules: [{when: [{key: request.headers, values: [a]}]}]}", "E:should have the form request.headers[name]"),
    ("when claims bad map key", "AP shop/p {rules: [{when: [{key: 'request.auth.claims[]', values: [a]}]}]}", "E:should have the form request.auth.claims[name]"),
    ("when L7 empty value", "AP shop/p {rules: [{when: [{key: connection.sni, values: ['']}]}]}", "E:spec.rules[0].when[0].values[0]: empty value"),
    ("ipBlocks v4-mapped warned", "AP shop/p {rules: [{from: [{source: {ipBlocks: ['::ffff:10.0.0.0/104']}}]}]}", "W:AuthorizationPolicy shop/p: spec.rules[0].from[0].source.ipBlocks[0]: ::ffff:10.0.0.0/104 is an IPv4-mapped IPv6 range && W:10.0.0.0/8 && !E:"),
    ("notIpBlocks v4-mapped warned", "AP shop/p {rules: [{from: [{source: {notIpBlocks: ['::ffff:10.0.0.1']}}]}]}", "W:source.notIpBlocks[0]: ::ffff:10.0.0.1 is an IPv4-mapped IPv6 && W:10.0.0.1/32"),
    ("when destination.ip v4-mapped warned", "AP shop/p {rules: [{when: [{key: destination.ip, values: ['::ffff:0:0/96']}]}]}", "W:spec.rules[0].when[0].values[0]: ::ffff:0:0/96 is an IPv4-mapped && W:0.0.0.0/0"),
    ("short v6 block covering mapped space not warned", "AP shop/p {rules: [{from: [{source: {ipBlocks: ['::/0', 'fd00::/8']}}]}]}", "clean"),
    ("when source.serviceAccount is clean", "AP shop/p {rules: [{when: [{key: source.serviceAccount, values: [a/x, y], notValues: [b/z]}]}]}", "clean"),
    ("when source.serviceAccount too many slashes", "AP shop/p {rules: [{when: [{key: source.serviceAccount, values: [a/b/c]}]}]}", "E:AuthorizationPolicy shop/p rejected: spec.rules[0].when[0].values[0]: bad service account \"a/b/c\""),
    ("when source.serviceAccount wildcard", "AP shop/p {rules: [{when: [{key: source.serviceAccount, notValues: ['a/*']}]}]}", "E:spec.rules[0].when[0].notValues[0]: bad service account"),
    ("when source.serviceAccount empty value", "AP shop/p {rules: [{when: [{key: source.serviceAccount, values: ['']}]}]}", "E:spec.rules[0].when[0].values[0]: bad service account"),
    ("when source.serviceAccount over 16 values", "AP shop/p {rules: [{when: [{key: source.serviceAccount, values: [a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p, q]}]}]}", "E:spec.rules[0].when[0].values: at most 16 service accounts"),
    ("serviceAccounts over 16 values", "AP shop/p {rules: [{from: [{source: {serviceAccounts: [a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p, q]}}]}]}", "E:spec.rules[0].from[0].source.serviceAccounts: at most 16 service accounts"),
    ("L7 when inline header", "AP shop/p {rules: [{when: [{key: 'request.experimental.inline.headers[x-user]', values: [bob]}]}]}", "W:spec.rules[0].when[0] (key request.experimental.inline.headers[x-user]) && W:never matches && !E:"),
    ("L7 DENY when inline header", "AP shop/p {action: DENY, rules: [{when: [{key: 'request.experimental.inline.headers[x-user]', values: [bob]}]}]}", "W:denies every connection to the workloads in scope && !E:"),
    ("when inline header bad map key", "AP shop/p {rules: [{when: [{key: request.experimental.inline.headers, values: [a]}]}]}", "E:should have the form request.experimental.inline.headers[name]"),
    ("when inline header empty name", "AP shop/p {rules: [{when: [{key: 'request.experimental.inline.headers[]', values: [a]}]}]}", "E:should have the form request.experimental.inline.headers[name]"),
    ("selector and targetRefs", "AP shop/t {selector: {matchLabels: {app: web}}, targetRefs: [{kind: Service, name: web}], action: DENY, rules: [{}]}", "E:AuthorizationPolicy shop/t rejected: spec: only one of selector, targetRef or targetRefs can be set && E:fail closed: every connection && !E:policies attached with targetRefs"),
    ("targetRef and targetRefs", "AP shop/t {targetRef: {kind: Gateway, name: gw}, targetRefs: [{kind: Service, name: web}]}", "E:AuthorizationPolicy shop/t rejected: spec: only one of selector, targetRef or targetRefs can be set"),
    ("empty selector with targetRefs", "AP shop/t {selector: {}, targetRefs: [{kind: Service, name: web}]}", "E:only one of selector, targetRef or targetRefs"),
    ("unknown action", "AP shop/p {action: REJECT, rules: [{}]}", "E:AuthorizationPolicy shop/p rejected: spec.action: unknown action \"REJECT\" (expected ALLOW, DENY, AUDIT or CUSTOM) && E:fail closed: every connection to the workloads in its scope is denied"),
    ("rejected AUDIT effect", "AP shop/p {action: AUDIT, rules: [{to: [{operation: {ports: [x]}}]}]}", "E:not evaluated (AUDIT never changes a decision)"),
    ("unknown source field", "AP shop/p {rules: [{from: [{source: {principal: [a]}}]}]}", "E:spec.rules[0].from[0].source.principal: unknown field `principal`"),
    ("unknown spec field", "AP shop/p {rule: []}", "E:AuthorizationPolicy shop/p rejected: spec.rule: unknown field `rule`"),
    ("unknown operation field", "AP shop/p {rules: [{to: [{operation: {port: ['80']}}]}]}", "E:spec.rules[0].to[0].operation.port: unknown field `port`"),
    ("unknown rule field", "AP shop/p {rules: [{form: []}]}", "E:spec.rules[0].form: unknown field `form`"),
    ("wrong type: string for list", "AP shop/p {rules: [{from: [{source: {principals: a}}]}]}", "E:spec.rules[0].from[0].source.principals: invalid type"),
    ("wrong type: rules a map", "AP shop/p {rules: {from: []}}", "E:spec.rules: invalid type"),
    ("empty source", "AP shop/p {rules: [{from: [{source: {}}]}]}", "E:spec.rules[0].from[0].source: must not be empty"),
    ("missing source", "AP shop/p {rules: [{from: [{}]}]}", "E:spec.rules[0].from[0].source: must not be null"),
    ("empty from", "AP shop/p {rules: [{from: []}]}", "E:spec.rules[0].from: must not be empty"),
    ("empty to", "AP shop/p {rules: [{to: []}]}", "E:spec.rules[0].to: must not be empty"),
    ("empty operation", "AP shop/p {rules: [{to: [{operation: {}}]}]}", "E:spec.rules[0].to[0].operation: must not be empty"),
    ("missing operation", "AP shop/p {rules: [{to: [null]}]}", "E:spec.rules[0].to[0].operation: must not be null"),
    ("null rule", "AP shop/p {rules: [null]}", "E:spec.rules[0]: a rule must not be null"),
    ("principal a*b", "AP shop/p {rules: [{from: [{source: {principals: ['a*b']}}]}]}", "E:spec.rules[0].from[0].source.principals[0]: bad pattern \"a*b\""),
    ("principal **", "AP shop/p {rules: [{from: [{source: {principals: ['**']}}]}]}", "E:bad pattern \"**\""),
    ("principal *a*", "AP shop/p {rules: [{from: [{source: {notPrincipals: ['*a*']}}]}]}", "E:source.notPrincipals[0]: bad pattern"),
    ("principal with spiffe://", "AP shop/p {rules: [{from: [{source: {principals: ['spiffe://cluster.local/ns/a/sa/b']}}]}]}", "E:without the spiffe:// scheme"),
    ("principal empty", "AP shop/p {rules: [{from: [{source: {principals: ['']}}]}]}", "E:source.principals[0]: empty value"),
    ("namespace bad pattern", "AP shop/p {rules: [{from: [{source: {namespaces: ['a*b']}}]}]}", "E:source.namespaces[0]: bad pattern"),
    ("notNamespaces empty", "AP shop/p {rules: [{from: [{source: {notNamespaces: ['']}}]}]}", "E:source.notNamespaces[0]: empty value"),
    ("when principal bad pattern", "AP shop/p {rules: [{when: [{key: source.principal, values: ['x*y']}]}]}", "E:spec.rules[0].when[0].values[0]: bad pattern"),
    ("service account too many slashes", "AP shop/p {rules: [{from: [{source: {serviceAccounts: [a/b/c]}}]}]}", "E:source.serviceAccounts[0]: bad service account \"a/b/c\""),
    ("service account wildcard", "AP shop/p {rules: [{from: [{source: {notServiceAccounts: ['*']}}]}]}", "E:source.notServiceAccounts[0]: bad service account"),
    ("service account empty ns", "AP shop/p {rules: [{from: [{source: {serviceAccounts: [/x]}}]}]}", "E:bad service account \"/x\""),
    ("service accounts with principals", "AP shop/p {rules: [{from: [{source: {serviceAccounts: [x], principals: [y]}}]}]}", "E:serviceAccounts cannot be set together with principals or namespaces"),
    ("provider without CUSTOM", "AP shop/p {provider: {name: x}, rules: [{}]}", "E:spec.provider: only allowed with action CUSTOM"),
    ("selector wildcard", "AP shop/p {selector: {matchLabels: {app: 'w*'}}}", "E:spec.selector.matchLabels[app]: wildcards are not supported"),
    ("selector empty key", "AP shop/p {selector: {matchLabels: {'': x}}}", "E:spec.selector.matchLabels[]: empty label key"),
    ("selector unknown field", "AP shop/p {selector: {labels: {app: x}}}", "E:spec.selector.labels: unknown field `labels`"),
    ("CUSTOM reported", "AP shop/c {action: CUSTOM, provider: {name: ext}, rules: [{}]}", "E:AuthorizationPolicy shop/c: spec.action: CUSTOM (external authorization) cannot be enforced"),
    ("CUSTOM without rules warns", "AP shop/c {action: CUSTOM, provider: {name: ext}}", "W:without rules matches nothing"),
    ("targetRefs reported", "AP shop/t {targetRefs: [{kind: Service, name: web}]}", "E:AuthorizationPolicy shop/t: spec.targetRefs: policies attached with targetRefs"),
    ("targetRef reported", "AP shop/t {targetRef: {kind: Gateway, name: gw}}", "E:spec.targetRef: policies attached"),
    ("L7 ALLOW methods", "AP shop/p {rules: [{to: [{operation: {methods: [GET]}}]}]}", "W:AuthorizationPolicy shop/p: spec.rules[0].to[0].operation.methods: L7 (HTTP) attributes && W:never matches"),
    ("L7 ALLOW several fields listed", "AP shop/p {rules: [{from: [{source: {requestPrincipals: [x]}}], to: [{operation: {paths: [/a], hosts: [h]}}]}]}", "W:spec.rules[0].from[0].source.requestPrincipals, spec.rules[0].to[0].operation.hosts, spec.rules[0].to[0].operation.paths"),
    ("L7 DENY methods only", "AP shop/p {action: DENY, rules: [{to: [{operation: {methods: [GET]}}]}]}", "W:denies more than written && W:denies every connection to the workloads in scope"),
    ("L7 DENY with L4 left", "AP shop/p {action: DENY, rules: [{from: [{source: {namespaces: [a]}}], to: [{operation: {methods: [GET]}}]}]}", "W:denies more than written && !W:denies every connection"),
    ("L7 notRequestPrincipals", "AP shop/p {action: DENY, rules: [{from: [{source: {notRequestPrincipals: ['*']}}]}]}", "W:source.notRequestPrincipals"),
    ("L7 notHosts", "AP shop/p {rules: [{to: [{operation: {notHosts: [h]}}]}]}", "W:operation.notHosts"),
    ("L7 notMethods", "AP shop/p {rules: [{to: [{operation: {notMethods: [GET]}}]}]}", "W:operation.notMethods"),
    ("L7 notPaths", "AP shop/p {rules: [{to: [{operation: {notPaths: [/x]}}]}]}", "W:operation.notPaths"),
    ("L7 when claim", "AP shop/p {rules: [{when: [{key: 'request.auth.claims[iss]', values: [x]}]}]}", "W:spec.rules[0].when[0] (key request.auth.claims[iss])"),
    ("L7 when sni", "AP shop/p {action: DENY, rules: [{when: [{key: connection.sni, values: [x]}]}]}", "W:(key connection.sni)"),
    ("L7 when audiences", "AP shop/p {rules: [{when: [{key: request.auth.audiences, values: [x]}]}]}", "W:(key request.auth.audiences)"),
    ("L7 when experimental", "AP shop/p {rules: [{when: [{key: 'experimental.envoy.filters.a[b]', values: [x]}]}]}", "W:(key experimental.envoy.filters.a[b])"),
    ("L7 empty value rejected", "AP shop/p {rules: [{to: [{operation: {methods: ['']}}]}]}", "E:operation.methods[0]: empty value"),
    ("DENY without rules", "AP shop/p {action: DENY}", "W:without rules matches nothing"),
    ("dry-run annotation as a YAML bool", "RAW:apiVersion: security.istio.io/v1\\nkind: AuthorizationPolicy\\nmetadata: {name: d, namespace: shop, annotations: {istio.io/dry-run: true}}\\nspec: {action: DENY, rules: [{}]}", "W:dry-run && !E:metadata"),
    ("dry-run invalid value reported", "AP~tRuE shop/d {action: DENY, rules: [{}]}", "E:AuthorizationPolicy shop/d: metadata.annotations[istio.io/dry-run]: invalid value \"tRuE\" && E:enforced, not dry-run && !W:dry-run:"),
    ("dry-run empty value reported", "AP~ shop/d {action: DENY, rules: [{}]}", "E:metadata.annotations[istio.io/dry-run]: invalid value \"\""),
    ("dry-run '1' warned", "AP~1 shop/d {action: DENY, rules: [{}]}", "W:metadata.annotations[istio.io/dry-run]: dry-run && !E:"),
    ("dry-run 'False' clean", "AP~False shop/d {action: DENY, rules: [{}]}", "clean"),
    ("dry-run warned", "RAW:apiVersion: security.istio.io/v1\\nkind: AuthorizationPolicy\\nmetadata: {name: d, namespace: shop, annotations: {istio.io/dry-run: 'true'}}\\nspec: {action: DENY, rules: [{}]}", "W:metadata.annotations[istio.io/dry-run]: dry-run"),
    ("duplicate", "@from-a ; @from-a", "W:AuthorizationPolicy shop/from-a: metadata.name: defined more than once"),
    ("mesh allow-nothing warned", "@mesh-allow-nothing", "W:denies every connection in the mesh"),
    ("unsupported kind", "RAW:apiVersion: v1\\nkind: Service\\nmetadata: {name: s, namespace: shop}", "E:document 1: unsupported kind v1/Service shop/s"),
    ("RequestAuthentication unsupported", "RAW:apiVersion: security.istio.io/v1\\nkind: RequestAuthentication\\nmetadata: {name: r, namespace: shop}", "E:unsupported kind security.istio.io/v1/RequestAuthentication"),
    ("wrong group", "RAW:apiVersion: networking.istio.io/v1\\nkind: AuthorizationPolicy\\nmetadata: {name: r}", "E:unsupported kind networking.istio.io/v1/AuthorizationPolicy"),
    ("unsupported version", "RAW:apiVersion: security.istio.io/v1alpha1\\nkind: AuthorizationPolicy\\nmetadata: {name: r, namespace: shop}", "E:document 1: apiVersion: AuthorizationPolicy shop/r: unsupported version"),
    ("missing name", "RAW:apiVersion: security.istio.io/v1\\nkind: AuthorizationPolicy\\nmetadata: {namespace: shop}", "E:document 1: metadata.name: AuthorizationPolicy: missing"),
    ("bad metadata type", "RAW:apiVersion: security.istio.io/v1\\nkind: AuthorizationPolicy\\nmetadata: {name: [x]}", "E:document 1: metadata.name: invalid type"),
    ("missing kind", "RAW:apiVersion: security.istio.io/v1\\nmetadata: {name: x}", "E:document 1: kind: missing"),
    ("scalar document", "RAW:hello", "E:document 1: (root): expected an object"),
    ("second document numbered", "@from-a ; RAW:kind: Nope", "E:document 2: unsupported kind /Nope"),
    ("bad YAML", "RAW:a: [b", "E:document 1: not valid YAML/JSON"),
    ("bad JSON", "RAW:{\"kind\": ", "E:document 1: not valid YAML/JSON"),
    ("JSON array of two", "RAW:[{\"apiVersion\": \"security.istio.io/v1\", \"kind\": \"PeerAuthentication\", \"metadata\": {\"name\": \"a\", \"namespace\": \"x\"}}, {\"apiVersion\": \"security.istio.io/v1\", \"kind\": \"PeerAuthentication\", \"metadata\": {\"name\": \"b\", \"namespace\": \"x\"}}]", "clean"),
    ("List of unsupported", "RAW:apiVersion: v1\\nkind: List\\nitems: [{apiVersion: v1, kind: Pod, metadata: {name: p}}]", "E:unsupported kind v1/Pod"),
    ("List item error path", "RAW:apiVersion: v1\\nkind: List\\nitems: [{apiVersion: security.istio.io/v1, kind: PeerAuthentication, metadata: {namespace: x}}]", "E:items[0].metadata.name"),
    ("namespace defaulted in messages", "RAW:apiVersion: security.istio.io/v1\\nkind: AuthorizationPolicy\\nmetadata: {name: p}\\nspec: {action: NOPE}", "E:AuthorizationPolicy default/p rejected"),
    ("PA unknown mode", "PA shop/p {mtls: {mode: STRIKT}}", "E:PeerAuthentication shop/p rejected: spec.mtls.mode: unknown mode \"STRIKT\" && E:mTLS mode STRICT for its scope"),
    ("PA portLevel without selector", "PA shop/p {portLevelMtls: {8080: {mode: STRICT}}}", "E:spec.portLevelMtls: only allowed in a policy with a workload selector"),
    ("PA portLevel empty", "PA shop/p {selector: {matchLabels: {app: web}}, portLevelMtls: {}}", "E:spec.portLevelMtls: if given, must have at least one port"),
    ("PA port 0", "PA shop/p {selector: {matchLabels: {app: web}}, portLevelMtls: {0: {mode: STRICT}}}", "E:spec.portLevelMtls[0]: bad port \"0\""),
    ("PA port name", "PA shop/p {selector: {matchLabels: {app: web}}, portLevelMtls: {http: {mode: STRICT}}}", "E:spec.portLevelMtls[http]: bad port"),
    ("PA port mode bad", "PA shop/p {selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: strict}}}", "E:spec.portLevelMtls[8080].mode: unknown mode \"strict\""),
    ("PA unknown field", "PA shop/p {mtls: {mode: STRICT}, mode: STRICT}", "E:PeerAuthentication shop/p rejected: spec.mode: unknown field `mode`"),
    ("PA selector wildcard", "PA shop/p {selector: {matchLabels: {app: '*'}}, mtls: {mode: PERMISSIVE}}", "E:PeerAuthentication shop/p rejected: spec.selector.matchLabels[app]: wildcards"),
    ("PA root selector ignored", "PA istio-system/w {selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}", "W:PeerAuthentication istio-system/w: spec.selector: a PeerAuthentication with a selector in the root namespace is ignored"),
    ("PA valid is clean", "PA shop/w {selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: PERMISSIVE}}}", "clean"),
];

#[test]
fn diagnostics_table() {
    let mut failures = Vec::new();
    for (name, policies, expect) in DIAGNOSTICS {
        let (_, report) = store(policies);
        let errors: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
        let warnings: Vec<String> = report.warnings.iter().map(ToString::to_string).collect();
        for e in expect.split(" && ") {
            let ok = if e == "clean" {
                report.is_clean()
            } else if let Some(s) = e.strip_prefix("!E:") {
                !errors.iter().any(|x| x.contains(s))
            } else if let Some(s) = e.strip_prefix("!W:") {
                !warnings.iter().any(|x| x.contains(s))
            } else if let Some(s) = e.strip_prefix("E:") {
                errors.iter().any(|x| x.contains(s))
            } else if let Some(s) = e.strip_prefix("W:") {
                warnings.iter().any(|x| x.contains(s))
            } else {
                panic!("{name}: bad expectation {e}")
            };
            if !ok {
                failures.push(format!(
                    "{name}: expected {e}\n    errors: {errors:#?}\n    warnings: {warnings:#?}"
                ));
            }
        }
    }
    assert_no_failures(&failures);
}

#[test]
fn store_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<PolicyStore>();
    assert_send_sync::<Decision>();
    assert_send_sync::<Report>();
}

#[test]
fn case_count() {
    let n = AUTHZ.len() + MTLS.len() + DIAGNOSTICS.len();
    assert!(n > 300, "{n} table cases");
}

#[test]
fn custom_root_namespace() {
    let text = expand("AP mesh-root/p {} ; AP istio-system/q {}");
    let (store, _) = PolicyStore::from_text("mesh-root", &text);
    let c = conn("wl=shop:app=web");
    assert_eq!(render(&decide(&store, &c)), "deny:no-allow");
    // istio-system is an ordinary namespace here: its policy does not apply to shop.
    assert_eq!(
        store
            .policies_for(&WorkloadRef {
                namespace: "shop",
                labels: &c.labels
            })
            .len(),
        1
    );
}

#[test]
fn decision_messages() {
    let (store, _) = store("@mesh-strict ; @deny-evil ; @from-a");
    let d = decide(&store, &conn(""));
    assert_eq!(
        d.to_string(),
        "plaintext rejected: PeerAuthentication istio-system/default requires mTLS (STRICT)"
    );
    let d = decide(&store, &conn("id=evil/x"));
    assert_eq!(
        d.to_string(),
        "denied by AuthorizationPolicy shop/deny-evil"
    );
    assert_eq!(
        d.deny_reason()
            .and_then(|r| r.policy())
            .map(ToString::to_string)
            .as_deref(),
        Some("shop/deny-evil")
    );
    let d = decide(&store, &conn("id=b/x"));
    assert_eq!(d.to_string(), "no ALLOW policy matched");
    let d = decide(&store, &conn("id=a/x"));
    assert!(d.is_allowed());
    assert_eq!(d.to_string(), "allowed by AuthorizationPolicy shop/from-a");
    assert!(MtlsMode::Permissive.accepts_plaintext() && !MtlsMode::Strict.accepts_plaintext());
}

#[test]
fn evaluation_visits_only_selecting_policies() {
    let r = bench::bench_evaluate(1000, 100);
    assert_eq!(r.policies_in_mesh, 1000);
    // 2 mesh-wide + 1 namespace-wide + the workload's own selector policy.
    assert_eq!(r.policies_selecting_workload, 4);
    let small = bench::bench_evaluate(20, 10);
    assert_eq!(small.policies_selecting_workload, 4);
}

#[test]
fn parse_multi_document_and_list() {
    let text = format!(
        "{}\n---\n---\n{}",
        expand("@from-a"),
        expand("@mesh-strict")
    );
    let parsed = parse_documents(&text);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    assert_eq!(parsed.resources.len(), 2);
    let json = "{\"apiVersion\":\"v1\",\"kind\":\"List\",\"items\":[]} {\"apiVersion\":\"security.istio.io/v1\",\"kind\":\"PeerAuthentication\",\"metadata\":{\"name\":\"a\",\"namespace\":\"b\"}}";
    let parsed = parse_documents(json);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    assert_eq!(parsed.resources.len(), 1);
}

#[test]
fn hostile_inputs_do_not_panic() {
    let deep = "[".repeat(10_000);
    let deep_map = "a: ".repeat(5_000) + "b";
    let anchors = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: [*d, *d, *d, *d, *d, *d, *d, *d, *d]";
    let inputs = [
        "",
        "---",
        "\u{feff}",
        "null",
        "[]",
        "{}",
        "[1, 2]",
        "{\"kind\": 1}",
        &deep,
        &deep_map,
        anchors,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x}\nspec: {rules: [{to: [{operation: {ports: [99999999999999999999999]}}]}]}",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x}\nspec: {selector: {matchLabels: {a: b}}, portLevelMtls: {[1]: {mode: STRICT}}}",
        "apiVersion: v1\nkind: List\nitems: [{kind: List, items: [{kind: List, items: []}]}]",
        "!!binary aGVsbG8=",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x}\nspec: {rules: [{to: [{operation: {ports: ['000000000000000000000000000000065535', '0000000000000000000000000000000000000']}}]}]}",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x}\nspec: {rules: [{from: [{source: {ipBlocks: ['::ffff:0.0.0.0/96', '::ffff:0:0/128', '::ffff:0:0/95', '::ffff:1.2.3.4/200']}}]}]}",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, annotations: {istio.io/dry-run: [a]}}\nspec: {rules: [{when: [{key: source.serviceAccount, values: ['/', 'a/', '/b', '']}]}]}",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: y}\nspec: !tag {}",
    ];
    for input in inputs {
        let (store, _) = PolicyStore::from_text(ROOT, input);
        let c = conn("id=a/x");
        let _ = decide(&store, &c);
    }
}

// ---------------------------------------------------------------------
// Waypoint (L7) policies: `targetRefs`, HTTP fields.
//
// Requests: space-separated `key=value` on top of the connection keys
// above: `m=<method>` [GET], `path=<raw path>` [/], `host=<authority>`
// [reviews], `h:<name>=<value>` (a header), `svc=<ns>/<name>`
// [shop/reviews], `wp=<ns>/<name>` [shop/waypoint], `tcp` (an opaque TCP
// stream, no request).

const SVC: &str = "targetRefs: [{kind: Service, group: '', name: reviews}]";
const GW: &str = "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]";

fn waypoint_decide(policies: &crate::WaypointPolicies, spec: &str) -> Decision {
    let (mut method, mut path, mut host) = ("GET".to_owned(), "/".to_owned(), "reviews".to_owned());
    let (mut svc, mut wp) = ("shop/reviews".to_owned(), "shop/waypoint".to_owned());
    let mut headers = Vec::new();
    let mut tcp = false;
    let mut rest = Vec::new();
    for tok in spec.split_whitespace() {
        if tok == "tcp" {
            tcp = true;
            continue;
        }
        let (k, v) = tok.split_once('=').expect("key=value");
        match k {
            "m" => method = v.to_owned(),
            "path" => path = v.to_owned(),
            "host" => host = v.to_owned(),
            "svc" => svc = v.to_owned(),
            "wp" => wp = v.to_owned(),
            _ if k.starts_with("h:") => headers.push((k[2..].to_owned(), v.to_owned())),
            _ => rest.push(tok),
        }
    }
    let c = conn(&rest.join(" "));
    let connection = Connection {
        source_principal: c.principal.as_deref(),
        source_ip: c.src,
        remote_ip: c.remote,
        destination_ip: c.dst,
        destination_port: c.port,
    };
    let (sns, sname) = svc.split_once('/').expect("svc ns/name");
    let (wns, wname) = wp.split_once('/').expect("wp ns/name");
    let target = crate::WaypointTarget {
        waypoint_namespace: wns,
        waypoint_name: wname,
        service_namespace: sns,
        service_name: sname,
    };
    let normalized = crate::normalize_path(&path).expect("a valid path");
    let request = crate::HttpRequest {
        method: &method,
        path: &normalized,
        host: &host,
        headers: &headers,
    };
    policies.evaluate(&target, &connection, (!tcp).then_some(&request))
}

/// (case, policies, request, expected decision)
#[rustfmt::skip]
const WAYPOINT: &[(&str, &str, &str, &str)] = &[
    // --- which policies apply
    ("no policy allows", "", "", "allow"),
    ("selector policy is the node agent's", "@allow-nothing", "id=a/x", "allow"),
    ("service target applies", "AP shop/p {TARGET_SVC}", "id=a/x", "deny:no-allow"),
    ("service target, other service", "AP shop/p {TARGET_SVC}", "id=a/x svc=shop/ratings", "allow"),
    ("service target, same name other namespace", "AP shop/p {TARGET_SVC}", "id=a/x svc=other/reviews", "allow"),
    ("gateway target applies", "AP shop/p {TARGET_GW}", "id=a/x svc=shop/ratings", "deny:no-allow"),
    ("gateway target, other waypoint", "AP shop/p {TARGET_GW}", "id=a/x wp=shop/other", "allow"),
    ("gateway target, wrong group", "AP shop/p {targetRefs: [{kind: Gateway, group: '', name: waypoint}]}", "id=a/x", "allow"),
    ("gatewayclass from the root namespace", "AP istio-system/p {targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}], action: DENY, rules: [{}]}", "id=a/x wp=any/w svc=any/s", "deny:istio-system/p"),
    ("gatewayclass outside the root namespace", "AP shop/p {targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}], action: DENY, rules: [{}]}", "id=a/x", "allow"),
    ("targetRef (singular)", "AP shop/p {targetRef: {kind: Service, group: '', name: reviews}, action: DENY, rules: [{}]}", "id=a/x", "deny:shop/p"),
    ("cross-namespace target rejected, fail closed", "AP shop/p {targetRefs: [{kind: Service, group: '', name: reviews, namespace: other}, {kind: Service, group: '', name: reviews}], action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]}", "id=a/x", "deny:rejected:shop/p"),
    ("unreadable DENY fails closed on its targets", "AP shop/p {TARGET_SVC, action: DENY, rules: 5}", "id=a/x", "deny:rejected:shop/p"),
    ("unreadable DENY, other service", "AP shop/p {TARGET_SVC, action: DENY, rules: 5}", "id=a/x svc=shop/ratings", "allow"),
    ("unreadable ALLOW grants nothing", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {methods: GET}}]}]}", "id=a/x", "deny:no-allow"),
    ("selector and targetRefs rejected, fail closed", "AP shop/p {selector: {matchLabels: {app: web}}, TARGET_SVC, action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]}", "id=a/x", "deny:rejected:shop/p"),
    // --- methods
    ("method allowed", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {methods: [GET, HEAD]}}]}]}", "m=HEAD", "allow:shop/p"),
    ("method not allowed", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {methods: [GET]}}]}]}", "m=POST", "deny:no-allow"),
    ("method case-sensitive", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {methods: [GET]}}]}]}", "m=get", "deny:no-allow"),
    ("method prefix wildcard", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {methods: ['P*']}}]}]}", "m=PATCH", "allow:shop/p"),
    ("method prefix wildcard, other", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {methods: ['P*']}}]}]}", "m=GET", "deny:no-allow"),
    ("method presence", "AP shop/p {TARGET_SVC, action: DENY, rules: [{to: [{operation: {methods: ['*']}}]}]}", "m=OPTIONS", "deny:shop/p"),
    ("notMethods", "AP shop/p {TARGET_SVC, action: DENY, rules: [{to: [{operation: {notMethods: [GET]}}]}]}", "m=DELETE", "deny:shop/p"),
    ("notMethods spares", "AP shop/p {TARGET_SVC, action: DENY, rules: [{to: [{operation: {notMethods: [GET]}}]}]}", "m=GET", "allow"),
    // --- paths
    ("path exact", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {paths: [/api]}}]}]}", "path=/api", "allow:shop/p"),
    ("path exact ignores the query", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {paths: [/api]}}]}]}", "path=/api?x=1", "allow:shop/p"),
    ("path exact, longer", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {paths: [/api]}}]}]}", "path=/api/x", "deny:no-allow"),
    ("path prefix", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {paths: ['/api/*']}}]}]}", "path=/api/books/1", "allow:shop/p"),
    ("path prefix needs the slash", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {paths: ['/api/*']}}]}]}", "path=/apix", "deny:no-allow"),
    ("path suffix", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {paths: ['*.html']}}]}]}", "path=/a/b.html", "allow:shop/p"),
    ("path presence", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {paths: ['*']}}]}]}", "path=/anything", "allow:shop/p"),
    ("path template one segment", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {paths: ['/books/{*}/reviews']}}]}]}", "path=/books/7/reviews", "allow:shop/p"),
    ("path template one segment only", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {paths: ['/books/{*}/reviews']}}]}]}", "path=/books/7/8/reviews", "deny:no-allow"),
    ("path template rest", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {paths: ['/books/{**}']}}]}]}", "path=/books/7/8", "allow:shop/p"),
    ("path template rest needs one", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {paths: ['/books/{**}']}}]}]}", "path=/books", "deny:no-allow"),
    ("path template rest, empty", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {paths: ['/books/{**}']}}]}]}", "path=/books/", "allow:shop/p"),
    ("path template rest then literal", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {paths: ['/foo/{**}/']}}]}]}", "path=/foo/bar/baz/", "allow:shop/p"),
    ("path template rest then literal, missing", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {paths: ['/foo/{**}/']}}]}]}", "path=/foo/bar", "deny:no-allow"),
    ("path template one then rest", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {paths: ['/foo/{*}/bar/{**}']}}]}]}", "path=/foo/buzz/bar/baz", "allow:shop/p"),
    ("path template one is not empty", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {paths: ['/foo/{*}']}}]}]}", "path=/foo/", "deny:no-allow"),
    ("path template rest not last, rejected", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {paths: ['/{**}/foo/{*}']}}]}]}", "path=/a/foo/b", "deny:no-allow"),
    ("path template text beside operator, rejected", "AP shop/p {TARGET_SVC, action: DENY, rules: [{to: [{operation: {paths: ['/foo/{*}.txt']}}]}]}", "path=/public", "deny:rejected:shop/p"),
    ("braces without operator are literal", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {paths: ['/api/{id}']}}]}]}", "path=/api/{id}", "deny:no-allow"),
    ("braces without operator match as written, normalised", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {paths: ['/api/%7Bid%7D']}}]}]}", "path=/api/{id}", "allow:shop/p"),
    ("notPaths", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {notPaths: ['/admin/*']}}]}]}", "path=/admin/x", "deny:no-allow"),
    // --- path normalisation (Istio's default BASE: RFC 3986)
    ("dot-dot cannot escape a DENY", "AP shop/p {TARGET_SVC, action: DENY, rules: [{to: [{operation: {paths: ['/admin/*']}}]}]}", "path=/public/../admin/x", "deny:shop/p"),
    ("dot segment removed", "AP shop/p {TARGET_SVC, action: DENY, rules: [{to: [{operation: {paths: [/admin/x]}}]}]}", "path=/admin/./x", "deny:shop/p"),
    ("encoded dot-dot decoded then removed", "AP shop/p {TARGET_SVC, action: DENY, rules: [{to: [{operation: {paths: ['/admin/*']}}]}]}", "path=/public/%2e%2e/admin/x", "deny:shop/p"),
    ("encoded unreserved decoded", "AP shop/p {TARGET_SVC, action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}", "path=/%61dmin", "deny:shop/p"),
    ("backslash is a slash", "AP shop/p {TARGET_SVC, action: DENY, rules: [{to: [{operation: {paths: ['/admin/*']}}]}]}", "path=/admin\\x", "deny:shop/p"),
    ("encoded slash stays encoded (BASE)", "AP shop/p {TARGET_SVC, action: DENY, rules: [{to: [{operation: {paths: [/admin/x]}}]}]}", "path=/admin%2Fx", "allow"),
    ("double slash kept (BASE)", "AP shop/p {TARGET_SVC, action: DENY, rules: [{to: [{operation: {paths: [/admin/x]}}]}]}", "path=/admin//x", "allow"),
    ("encoded dot segment", "AP shop/p {TARGET_SVC, action: DENY, rules: [{to: [{operation: {paths: [/admin/x]}}]}]}", "path=/admin/%2E/x", "deny:shop/p"),
    ("encoded letters in a DENY prefix", "AP shop/p {TARGET_SVC, action: DENY, rules: [{to: [{operation: {paths: ['/admin*']}}]}]}", "path=/%41%44min", "allow"),
    ("encoded letters, same case", "AP shop/p {TARGET_SVC, action: DENY, rules: [{to: [{operation: {paths: ['/admin*']}}]}]}", "path=/%61%64min", "deny:shop/p"),
    // --- hosts
    ("host exact, case-insensitive", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {hosts: [Reviews.Shop]}}]}]}", "host=reviews.shop", "allow:shop/p"),
    ("host with port: not the bare host (Istio)", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {hosts: [reviews.shop]}}]}]}", "host=reviews.shop:9080", "deny:no-allow"),
    ("host with port written", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {hosts: ['reviews.shop:9080']}}]}]}", "host=reviews.shop:9080", "allow:shop/p"),
    ("host any port, Istio's advice", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {hosts: [reviews.shop, 'reviews.shop:*']}}]}]}", "host=Reviews.Shop:8080", "allow:shop/p"),
    ("host any port, bare host too", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {hosts: [reviews.shop, 'reviews.shop:*']}}]}]}", "host=reviews.shop", "allow:shop/p"),
    ("DENY host with port: bare pattern misses it (Istio)", "AP shop/p {TARGET_SVC, action: DENY, rules: [{to: [{operation: {hosts: [reviews.shop]}}]}]}", "host=reviews.shop:80", "allow"),
    ("host prefix wildcard", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {hosts: ['reviews.*']}}]}]}", "host=REVIEWS.shop:80", "allow:shop/p"),
    ("host other", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {hosts: [reviews.shop]}}]}]}", "host=ratings.shop", "deny:no-allow"),
    ("host suffix wildcard", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {hosts: ['*.shop.svc.cluster.local']}}]}]}", "host=reviews.shop.svc.cluster.local", "allow:shop/p"),
    ("notHosts", "AP shop/p {TARGET_SVC, action: DENY, rules: [{to: [{operation: {notHosts: [reviews]}}]}]}", "host=evil", "deny:shop/p"),
    // --- ports and L4 parts at the waypoint
    ("ports with methods ANDed", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {ports: ['9080'], methods: [GET]}}]}]}", "port=9080 m=GET", "allow:shop/p"),
    ("ports with methods, other port", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {ports: ['9080'], methods: [GET]}}]}]}", "port=8080 m=GET", "deny:no-allow"),
    ("principal and path", "AP shop/p {TARGET_SVC, rules: [{from: [{source: {principals: [cluster.local/ns/a/sa/x]}}], to: [{operation: {paths: ['/api/*']}}]}]}", "id=a/x path=/api/1", "allow:shop/p"),
    ("principal and path, other principal", "AP shop/p {TARGET_SVC, rules: [{from: [{source: {principals: [cluster.local/ns/a/sa/x]}}], to: [{operation: {paths: ['/api/*']}}]}]}", "id=a/y path=/api/1", "deny:no-allow"),
    // --- when: request headers
    ("header exact", "AP shop/p {TARGET_SVC, action: DENY, rules: [{when: [{key: 'request.headers[x-user]', values: [bob]}]}]}", "h:x-user=bob", "deny:shop/p"),
    ("header name case-insensitive", "AP shop/p {TARGET_SVC, action: DENY, rules: [{when: [{key: 'request.headers[X-User]', values: [bob]}]}]}", "h:x-user=bob", "deny:shop/p"),
    ("header other value", "AP shop/p {TARGET_SVC, action: DENY, rules: [{when: [{key: 'request.headers[x-user]', values: [bob]}]}]}", "h:x-user=alice", "allow"),
    ("header absent", "AP shop/p {TARGET_SVC, action: DENY, rules: [{when: [{key: 'request.headers[x-user]', values: [bob]}]}]}", "", "allow"),
    ("header prefix", "AP shop/p {TARGET_SVC, rules: [{when: [{key: 'request.headers[x-env]', values: ['prod-*']}]}]}", "h:x-env=prod-eu", "allow:shop/p"),
    ("header notValues, absent", "AP shop/p {TARGET_SVC, rules: [{when: [{key: 'request.headers[x-env]', notValues: [test]}]}]}", "", "allow:shop/p"),
    // --- JWT-dependent fields without RequestAuthentication
    ("requestPrincipals never match", "AP shop/p {TARGET_SVC, rules: [{from: [{source: {requestPrincipals: ['*']}}]}]}", "id=a/x", "deny:no-allow"),
    ("notRequestPrincipals always match", "AP shop/p {TARGET_SVC, action: DENY, rules: [{from: [{source: {notRequestPrincipals: ['*']}}]}]}", "id=a/x", "deny:shop/p"),
    ("auth claims never match", "AP shop/p {TARGET_SVC, rules: [{when: [{key: 'request.auth.claims[iss]', values: [x]}]}]}", "id=a/x", "deny:no-allow"),
    ("unsupported key in DENY still denies", "AP shop/p {TARGET_SVC, action: DENY, rules: [{when: [{key: connection.sni, values: [x]}]}]}", "id=a/x", "deny:shop/p"),
    ("unsupported key in ALLOW grants nothing", "AP shop/p {TARGET_SVC, rules: [{when: [{key: connection.sni, values: [x]}]}]}", "id=a/x", "deny:no-allow"),
    // --- actions
    ("AUDIT listed, not deciding", "AP shop/p {TARGET_SVC, action: AUDIT, rules: [{to: [{operation: {methods: [GET]}}]}]}", "m=GET", "allow audit:shop/p"),
    ("CUSTOM fails closed", "AP shop/p {TARGET_SVC, action: CUSTOM, provider: {name: ext}, rules: [{to: [{operation: {paths: ['/admin/*']}}]}]}", "path=/admin/1", "deny:custom:shop/p"),
    ("CUSTOM only what it selects", "AP shop/p {TARGET_SVC, action: CUSTOM, provider: {name: ext}, rules: [{to: [{operation: {paths: ['/admin/*']}}]}]}", "path=/public", "allow"),
    // --- opaque TCP at the waypoint: HTTP fields fail safe
    ("tcp: ALLOW with methods grants nothing", "AP shop/p {TARGET_SVC, rules: [{to: [{operation: {methods: [GET]}}]}]}", "tcp id=a/x", "deny:no-allow"),
    ("tcp: DENY with methods denies", "AP shop/p {TARGET_SVC, action: DENY, rules: [{from: [{source: {namespaces: [a]}}], to: [{operation: {methods: [DELETE]}}]}]}", "tcp id=a/x", "deny:shop/p"),
    ("tcp: L4 ALLOW applies", "AP shop/p {TARGET_SVC, rules: [{from: [{source: {namespaces: [a]}}]}]}", "tcp id=a/x", "allow:shop/p"),
];

fn waypoint_policies(policies: &str) -> (crate::WaypointPolicies, Report) {
    let text = expand(&policies.replace("TARGET_SVC", SVC).replace("TARGET_GW", GW));
    crate::WaypointPolicies::from_text(ROOT, &text)
}

#[test]
fn waypoint_table() {
    let mut failures = Vec::new();
    for (case, policies, request, want) in WAYPOINT {
        let (p, _) = waypoint_policies(policies);
        let got = render(&waypoint_decide(&p, request));
        if got != *want {
            failures.push(format!("{case}: want {want}, got {got}"));
        }
    }
    assert_no_failures(&failures);
}

#[test]
fn waypoint_reports_what_it_cannot_check() {
    let (_, report) = waypoint_policies(
        "AP shop/p {TARGET_SVC, rules: [{from: [{source: {requestPrincipals: ['*']}}]}, {when: [{key: connection.sni, values: [x]}]}]} ; AP shop/q {targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: ext}]}",
    );
    let text: Vec<String> = report.warnings.iter().map(ToString::to_string).collect();
    let has = |needle: &str| text.iter().any(|w| w.contains(needle));
    assert!(has("requestPrincipals never match"), "{text:#?}");
    assert!(
        has("requestPrincipals: no RequestAuthentication: never authenticated"),
        "{text:#?}"
    );
    assert!(has("connection.sni"), "{text:#?}");
    assert!(
        has("ServiceEntry ext is not supported by the waypoint"),
        "{text:#?}"
    );
    // The node agents' compilation of the same policy: reported as the waypoint's.
    let (_, node) = store("AP shop/p {targetRefs: [{kind: Service, group: '', name: reviews}]}");
    assert!(
        node.errors
            .iter()
            .any(|e| e.to_string().contains("waypoint")),
        "{node:?}"
    );
}

#[test]
fn path_normalisation_follows_istio_base() {
    for (raw, want) in [
        ("/", Some("/")),
        ("/a/b", Some("/a/b")),
        ("/a/../b", Some("/b")),
        ("/a/./b", Some("/a/b")),
        ("/../../a", Some("/a")),
        ("/a/b/..", Some("/a/")),
        ("/a/%2e%2E/b", Some("/b")),
        ("/%41%7e", Some("/A~")),
        ("/a%2fb", Some("/a%2fb")),
        ("/a%2Fb", Some("/a%2Fb")),
        ("/a%5cb", Some("/a%5cb")),
        ("/%2e%2e/%2E/a", Some("/a")),
        ("/%7e%2D%5f", Some("/~-_")),
        ("/a%zz", Some("/a%zz")),
        ("/a%2", Some("/a%2")),
        ("/a%", Some("/a%")),
        ("/a{b}\"", Some("/a%7Bb%7D%22")),
        ("/caf\u{e9}", Some("/caf%C3%A9")),
        ("\\a\\..\\b", Some("/b")),
        ("/a//b", Some("/a//b")),
        ("/a\\b", Some("/a/b")),
        ("/a?q=/../x", Some("/a")),
        ("a/b", None),
        ("", None),
        ("/a%00", None),
        ("/a b", None),
        ("/a\tb", None),
    ] {
        assert_eq!(crate::normalize_path(raw).as_deref(), want, "{raw:?}");
    }
}

/// Fails with every table case that did not hold, one per line.
fn assert_no_failures(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

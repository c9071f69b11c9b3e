#![allow(clippy::unwrap_used)]

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    Balancer, Ejection, EndpointInput, HttpOutcome, Kind, Lb, Objects, Options, PickError, Request,
    RouteError, RouteTable, ServiceInput, Status, compile, policy::parse_duration,
};

fn yaml(text: &str) -> Vec<Value> {
    text.split("\n---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_yaml::from_str::<Value>(d).unwrap())
        .collect()
}

fn ep(ip: &str, version: &str) -> EndpointInput {
    EndpointInput {
        ip: ip.parse().unwrap(),
        ports: BTreeMap::from([("tcp".to_string(), 8080), ("admin".to_string(), 9090)]),
        labels: BTreeMap::from([("version".to_string(), version.to_string())]),
    }
}

/// `shop/web` (VIP 10.96.0.10, ports 80 and 90) over 10.0.0.1-2 (v1) and
/// 10.0.0.3 (v2); `shop/db` (VIP 10.96.0.20, port 5432) over 10.0.1.1.
fn services() -> Vec<ServiceInput> {
    vec![
        ServiceInput {
            namespace: "shop".into(),
            name: "web".into(),
            vips: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![("tcp".into(), 80), ("admin".into(), 90)],
            endpoints: vec![
                ep("10.0.0.1", "v1"),
                ep("10.0.0.2", "v1"),
                ep("10.0.0.3", "v2"),
            ],
        },
        ServiceInput {
            namespace: "shop".into(),
            name: "db".into(),
            vips: vec!["10.96.0.20".parse().unwrap()],
            ports: vec![("pg".into(), 5432)],
            endpoints: vec![EndpointInput {
                ip: "10.0.1.1".parse().unwrap(),
                ports: BTreeMap::from([("pg".to_string(), 5432)]),
                labels: BTreeMap::new(),
            }],
        },
    ]
}

fn table(drs: &str, vss: &str, trs: &str) -> RouteTable {
    table_with(drs, vss, trs, &Options::default())
}

fn table_with(drs: &str, vss: &str, trs: &str, opts: &Options) -> RouteTable {
    let (d, v, t) = (yaml(drs), yaml(vss), yaml(trs));
    compile(
        Objects {
            destination_rules: &d,
            virtual_services: &v,
            tcp_routes: &t,
        },
        services(),
        opts,
    )
}

const SUBSETS: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;

fn split(w1: u32, w2: u32) -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web-split, namespace: shop}}
spec:
  hosts: [web]
  tcp:
  - route:
    - {{destination: {{host: web, subset: v1}}, weight: {w1}}}
    - {{destination: {{host: web.shop.svc.cluster.local, subset: v2}}, weight: {w2}}}
"#
    )
}

struct Client {
    labels: BTreeMap<String, String>,
    namespace: &'static str,
    source: IpAddr,
}

impl Client {
    fn new(namespace: &'static str) -> Self {
        Self {
            labels: BTreeMap::new(),
            namespace,
            source: "10.0.9.9".parse().unwrap(),
        }
    }
    fn to(&self, dst: &str) -> Request<'_> {
        Request {
            destination: dst.parse().unwrap(),
            source: self.source,
            source_namespace: self.namespace,
            source_labels: &self.labels,
        }
    }
}

#[test]
fn an_80_20_split_over_2000_connections_is_within_five_standard_deviations() {
    let t = table(SUBSETS, &split(80, 20), "");
    assert!(t.report().is_clean(), "{:?}", t.report());
    let b = Balancer::with_seed(42);
    let c = Client::new("shop");
    let n = 2000u32;
    let mut v1 = 0u32;
    for _ in 0..n {
        let r = t
            .route(&c.to("10.96.0.10:80"), b.random())
            .unwrap()
            .unwrap();
        assert_eq!(r.route.as_deref(), Some("VirtualService/shop/web-split"));
        match r.dest.subset.as_deref() {
            Some("v1") => v1 += 1,
            Some("v2") => {}
            other => panic!("{other:?}"),
        }
    }
    // Binomial(n = 2000, p = 0.8): mean 1600, sd = sqrt(n p (1 - p)) ≈ 17.9.
    // ±5 sd (±89) leaves a false-failure probability below 1e-6 for any
    // seed; the seed makes this run deterministic anyway.
    let sd = (f64::from(n) * 0.8 * 0.2).sqrt();
    let off = (f64::from(v1) - 1600.0).abs();
    assert!(
        off <= 5.0 * sd,
        "v1 got {v1} of {n}: {off} from 1600, sd {sd}"
    );
}

#[test]
fn a_0_100_split_sends_everything_to_v2_and_a_subset_selects_by_label() {
    let t = table(SUBSETS, &split(0, 100), "");
    let b = Balancer::with_seed(1);
    let c = Client::new("shop");
    let now = Instant::now();
    for _ in 0..200 {
        let r = t
            .route(&c.to("10.96.0.10:80"), b.random())
            .unwrap()
            .unwrap();
        assert_eq!(r.dest.subset.as_deref(), Some("v2"));
        assert_eq!(r.dest.endpoints, vec!["10.0.0.3:8080".parse().unwrap()]);
        let p = b
            .pick(
                &r.dest,
                c.source,
                c.to("10.96.0.10:80").destination,
                now,
                &[],
            )
            .unwrap();
        assert_eq!(p.endpoint, "10.0.0.3:8080".parse::<SocketAddr>().unwrap());
    }
    // The v1 subset has the two v1 pods, on the target port of the service port.
    let t = table(SUBSETS, &split(100, 0), "");
    let r = t.route(&c.to("10.96.0.10:80"), 0).unwrap().unwrap();
    assert_eq!(
        r.dest.endpoints,
        vec![
            "10.0.0.1:8080".parse::<SocketAddr>().unwrap(),
            "10.0.0.2:8080".parse().unwrap()
        ]
    );
}

#[test]
fn a_pod_ip_or_outside_address_is_not_routed_and_a_plain_service_uses_its_endpoints() {
    let t = table("", "", "");
    let c = Client::new("shop");
    assert!(t.route(&c.to("10.0.0.1:8080"), 0).is_none());
    assert!(t.route(&c.to("192.0.2.1:443"), 0).is_none());
    let r = t.route(&c.to("10.96.0.10:90"), 0).unwrap().unwrap();
    assert_eq!(r.route, None);
    assert_eq!(r.dest.endpoints.len(), 3);
    assert_eq!(r.dest.endpoints[0].port(), 9090);
    assert_eq!(r.dest.policy.lb, Lb::LeastRequest, "Istio's default");
    assert!(matches!(
        t.route(&c.to("10.96.0.10:81"), 0).unwrap(),
        Err(RouteError::NoSuchPort { port: 81, .. })
    ));
}

#[test]
fn hosts_resolve_short_dotted_and_fqdn_relative_to_the_object_namespace() {
    for host in ["db", "db.shop", "db.shop.svc", "db.shop.svc.cluster.local"] {
        let vs = format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v, namespace: shop}}\nspec:\n  hosts: [web]\n  tcp:\n  - route: [{{destination: {{host: {host}}}}}]\n"
        );
        let t = table("", &vs, "");
        assert!(t.report().is_clean(), "{host}: {:?}", t.report());
        let r = t
            .route(&Client::new("shop").to("10.96.0.10:80"), 0)
            .unwrap()
            .unwrap();
        assert_eq!(&*r.dest.service, "shop/db", "{host}");
        assert_eq!(r.dest.port, 5432, "the only port of db");
    }
    // A short name in another namespace is that namespace's service.
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v, namespace: other}\nspec:\n  hosts: [web.shop]\n  tcp:\n  - route: [{destination: {host: db}}]\n";
    let t = table("", vs, "");
    let o = t.report().get(Kind::VirtualService, "other", "v").unwrap();
    assert!(
        o.warnings
            .iter()
            .any(|w| w.field == "spec.tcp[0].route[0].destination.host"),
        "{o:?}"
    );
    let err = t
        .route(&Client::new("shop").to("10.96.0.10:80"), 0)
        .unwrap()
        .unwrap_err();
    assert_eq!(err.route().map(|r| &**r), Some("VirtualService/other/v"));
    assert!(err.to_string().contains("no service other/db"), "{err}");
    // Wildcards are reported, not applied.
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: w, namespace: shop}\nspec:\n  hosts: ['*.shop.svc.cluster.local']\n  tcp:\n  - route: [{destination: {host: db}}]\n";
    let t = table("", vs, "");
    let o = t.report().get(Kind::VirtualService, "shop", "w").unwrap();
    assert!(o.warnings[0].message.contains("wildcard"), "{o:?}");
    assert_eq!(
        t.route(&Client::new("shop").to("10.96.0.10:80"), 0)
            .unwrap()
            .unwrap()
            .route,
        None
    );
}

#[test]
fn a_route_to_a_missing_subset_fails_fast_with_a_reason() {
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v, namespace: shop}\nspec:\n  hosts: [web]\n  tcp:\n  - route: [{destination: {host: web, subset: v3}}]\n";
    let c = Client::new("shop");
    let err = table(SUBSETS, vs, "")
        .route(&c.to("10.96.0.10:80"), 0)
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("subset \"v3\""), "{err}");
    let err = table("", vs, "")
        .route(&c.to("10.96.0.10:80"), 0)
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("no DestinationRule"), "{err}");
}

#[test]
fn matches_select_by_port_source_namespace_labels_and_destination_subnet() {
    let vs = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: m, namespace: shop}
spec:
  hosts: [web]
  tcp:
  - match: [{port: 90}]
    route: [{destination: {host: db}}]
  - match: [{sourceNamespace: canary}, {sourceLabels: {track: beta}}]
    route: [{destination: {host: web, subset: v2}}]
  - match: [{destinationSubnets: [10.96.0.0/24]}]
    route: [{destination: {host: web, subset: v1}}]
"#;
    let t = table(SUBSETS, vs, "");
    assert!(t.report().is_clean(), "{:?}", t.report());
    let sub = |c: &Client, dst: &str| {
        let r = t.route(&c.to(dst), 0).unwrap().unwrap();
        format!(
            "{}{}",
            r.dest.service,
            r.dest
                .subset
                .as_deref()
                .map(|s| format!("/{s}"))
                .unwrap_or_default()
        )
    };
    let plain = Client::new("shop");
    assert_eq!(sub(&plain, "10.96.0.10:90"), "shop/db");
    assert_eq!(sub(&plain, "10.96.0.10:80"), "shop/web/v1");
    assert_eq!(sub(&Client::new("canary"), "10.96.0.10:80"), "shop/web/v2");
    let mut beta = Client::new("shop");
    beta.labels.insert("track".into(), "beta".into());
    assert_eq!(sub(&beta, "10.96.0.10:80"), "shop/web/v2");
    // No rule matches (the subnet is not the VIP's): the service's default.
    let vs2 = vs.replace("10.96.0.0/24", "10.97.0.0/24");
    let t = table(SUBSETS, &vs2, "");
    let r = t.route(&plain.to("10.96.0.10:80"), 0).unwrap().unwrap();
    assert_eq!((r.route, r.dest.subset.clone()), (None, None));
}

#[test]
fn only_http_routes_need_l7_and_l7_fields_are_listed_not_applied() {
    let vs = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: h, namespace: shop}
spec:
  hosts: [web]
  http:
  - route: [{destination: {host: web, subset: v2}}]
"#;
    let dr = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL}
    loadBalancer: {consistentHash: {httpHeaderName: x-user}}
    connectionPool:
      tcp: {maxConnections: 10}
      http: {http1MaxPendingRequests: 1}
"#;
    let t = table(dr, vs, "");
    let h = t.report().get(Kind::VirtualService, "shop", "h").unwrap();
    assert!(
        matches!(&h.status, Status::NeedsL7 { reason } if reason.contains("http")),
        "{h:?}"
    );
    let r = t
        .route(&Client::new("shop").to("10.96.0.10:80"), 0)
        .unwrap()
        .unwrap();
    assert_eq!(r.route, None, "an http-only VirtualService is not applied");
    let d = t
        .report()
        .get(Kind::DestinationRule, "shop", "web")
        .unwrap();
    assert_eq!(d.status, Status::Applied);
    let fields: Vec<&str> = d.warnings.iter().map(|w| w.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.trafficPolicy.tls",
            "spec.trafficPolicy.loadBalancer.consistentHash.httpHeaderName",
            "spec.trafficPolicy.connectionPool.http"
        ]
    );
    assert!(
        d.warnings[1].message.contains("needs L7"),
        "{:?}",
        d.warnings
    );
    // The header hash is not applied: Istio's default balancing stands; the TCP limit is.
    assert_eq!(r.dest.policy.lb, Lb::LeastRequest);
    assert_eq!(r.dest.policy.max_connections, Some(10));
    let json = serde_json::to_value(t.report()).unwrap();
    assert_eq!(json["objects"][1]["status"], "needs_l7");
}

#[test]
fn invalid_objects_are_rejected_with_the_field_path_and_the_others_apply() {
    let dr = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: bad, namespace: shop}
spec:
  host: db
  trafficPolicy:
    connectionPool: {tcp: {connectTimeout: soon}}
"#;
    let vs = format!(
        "{}\n---\n{}",
        split(80, 20),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: w, namespace: shop}\nspec:\n  hosts: [db]\n  tcp:\n  - route: [{destination: {host: db}, weight: lots}]\n"
    );
    let t = table(&format!("{SUBSETS}\n---\n{dr}"), &vs, "");
    let bad = t
        .report()
        .get(Kind::DestinationRule, "shop", "bad")
        .unwrap();
    assert!(
        matches!(&bad.status, Status::Rejected { field, reason } if field == "spec.trafficPolicy.connectionPool.tcp.connectTimeout" && reason.contains("not a duration")),
        "{bad:?}"
    );
    let w = t.report().get(Kind::VirtualService, "shop", "w").unwrap();
    assert!(
        matches!(&w.status, Status::Rejected { field, .. } if field == "spec.tcp[0].route[0].weight"),
        "{w:?}"
    );
    assert_eq!(
        t.report()
            .get(Kind::VirtualService, "shop", "web-split")
            .unwrap()
            .status,
        Status::Applied
    );
}

#[test]
fn subset_and_port_level_policies_merge_like_istio() {
    let dr = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool: {tcp: {maxConnections: 100, connectTimeout: 250ms}}
    outlierDetection: {consecutive5xxErrors: 7, consecutiveGatewayErrors: 3, baseEjectionTime: 1m}
    portLevelSettings:
    - port: {number: 90}
      loadBalancer: {simple: RANDOM}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer: {consistentHash: {useSourceIp: true}}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      portLevelSettings:
      - port: {number: 80}
        connectionPool: {tcp: {maxConnections: 1}}
"#;
    let vs = |subset: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v, namespace: shop}}\nspec:\n  hosts: [web]\n  tcp:\n  - route: [{{destination: {{host: web, subset: {subset}}}}}]\n"
        )
    };
    let c = Client::new("shop");
    let policy = |subset: &str, dst: &str| {
        table(dr, &vs(subset), "")
            .route(&c.to(dst), 0)
            .unwrap()
            .unwrap()
            .dest
            .policy
            .clone()
    };
    // v1, port 80: the rule's pool and outlier detection, the subset's balancing.
    let p = policy("v1", "10.96.0.10:80");
    assert_eq!(p.lb, Lb::SourceIpHash);
    assert_eq!(p.max_connections, Some(100));
    assert_eq!(p.connect_timeout, Some(Duration::from_millis(250)));
    let od = p.outlier.unwrap();
    assert_eq!(od.consecutive_errors, 3, "the lower enabled threshold");
    assert_eq!(od.base_ejection_time, Duration::from_secs(60));
    assert_eq!(od.max_ejection_percent, 10);
    // v1, port 90: the rule's port entry replaces the rule's settings as a
    // whole, then the subset's balancing applies on top.
    let p = policy("v1", "10.96.0.10:90");
    assert_eq!(
        (p.lb, p.max_connections, p.outlier),
        (Lb::SourceIpHash, None, None)
    );
    // v2, port 80: the subset's port entry replaces everything (defaults for the rest).
    let p = policy("v2", "10.96.0.10:80");
    assert_eq!(
        (p.lb, p.max_connections, p.connect_timeout),
        (Lb::LeastRequest, Some(1), None)
    );
    // v2, port 90: no subset override: the rule's port entry.
    assert_eq!(policy("v2", "10.96.0.10:90").lb, Lb::Random);
}

#[test]
fn export_to_dot_hides_the_objects_from_other_namespaces() {
    let vs = split(0, 100).replace("  hosts: [web]", "  hosts: [web]\n  exportTo: ['.']");
    let t = table(SUBSETS, &vs, "");
    let inside = t
        .route(&Client::new("shop").to("10.96.0.10:80"), 0)
        .unwrap()
        .unwrap();
    assert_eq!(inside.dest.subset.as_deref(), Some("v2"));
    let outside = t
        .route(&Client::new("other").to("10.96.0.10:80"), 0)
        .unwrap()
        .unwrap();
    assert_eq!((outside.route, outside.dest.subset.clone()), (None, None));
    // A client-namespace route wins over the service's own.
    let mine = split(100, 0)
        .replace("web-split, namespace: shop", "mine, namespace: other")
        .replace("[web]", "[web.shop]")
        .replace("host: web,", "host: web.shop,");
    let t = table(SUBSETS, &format!("{}\n---\n{mine}", split(0, 100)), "");
    let r = t
        .route(&Client::new("other").to("10.96.0.10:80"), 0)
        .unwrap()
        .unwrap();
    assert_eq!(r.route.as_deref(), Some("VirtualService/other/mine"));
    assert_eq!(r.dest.subset.as_deref(), Some("v1"));
    let r = t
        .route(&Client::new("shop").to("10.96.0.10:80"), 0)
        .unwrap()
        .unwrap();
    assert_eq!(r.route.as_deref(), Some("VirtualService/shop/web-split"));
}

/// Istio's `defaultVirtualServiceExportTo`: with `["."]`, a tenant's
/// VirtualService without `exportTo` for another namespace's host routes
/// its own clients only, not the host's namespace nor any other; with the
/// default (`*`) it routes every client, as Istio's sidecars do.
#[test]
fn the_default_export_of_virtual_services_is_an_option() {
    let theirs = split(100, 0)
        .replace("web-split, namespace: shop", "theirs, namespace: t")
        .replace("[web]", "[web.shop]")
        .replace("host: web,", "host: web.shop,");
    let compile = |default: &[&str]| {
        let opts = Options {
            default_virtual_service_export_to: default.iter().map(|s| (*s).to_owned()).collect(),
            ..Options::default()
        };
        table_with(SUBSETS, &theirs, "", &opts)
    };
    let routed = |t: &RouteTable, ns: &'static str| {
        t.route(&Client::new(ns).to("10.96.0.10:80"), 0)
            .unwrap()
            .unwrap()
            .route
    };
    let everyone = compile(&["*"]);
    for ns in ["t", "shop", "other"] {
        assert_eq!(
            routed(&everyone, ns).as_deref(),
            Some("VirtualService/t/theirs"),
            "{ns}"
        );
    }
    let own = compile(&["."]);
    assert_eq!(
        routed(&own, "t").as_deref(),
        Some("VirtualService/t/theirs")
    );
    assert_eq!(routed(&own, "shop"), None);
    assert_eq!(routed(&own, "other"), None);
}

#[test]
fn a_tcproute_on_a_service_splits_by_backend_weight() {
    let tr = r#"
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: t, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - backendRefs:
    - {name: web, port: 90, weight: 3}
    - {name: db, port: 5432, weight: 1}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: gw, namespace: shop}
spec:
  parentRefs: [{name: my-gateway}]
  rules: [{backendRefs: [{name: db, port: 5432}]}]
"#;
    let t = table("", "", tr);
    assert_eq!(
        t.report().get(Kind::TcpRoute, "shop", "t").unwrap().status,
        Status::Applied
    );
    assert!(matches!(
        t.report().get(Kind::TcpRoute, "shop", "gw").unwrap().status,
        Status::NotApplied { .. }
    ));
    let b = Balancer::with_seed(3);
    let c = Client::new("shop");
    let mut to_db = 0;
    for _ in 0..400 {
        let r = t
            .route(&c.to("10.96.0.10:80"), b.random())
            .unwrap()
            .unwrap();
        assert_eq!(r.route.as_deref(), Some("TCPRoute/shop/t"));
        if &*r.dest.service == "shop/db" {
            to_db += 1;
        }
    }
    // Binomial(400, 0.25): mean 100, sd ≈ 8.7; ±5 sd.
    assert!((57..=143).contains(&to_db), "{to_db}");
    // Port 90 of web is not the parent's port: not routed by it.
    assert_eq!(
        t.route(&c.to("10.96.0.10:90"), 0).unwrap().unwrap().route,
        None
    );
}

fn dest_with(dr_policy: &str) -> (RouteTable, Client) {
    let dr = format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: shop}}\nspec:\n  host: web\n  trafficPolicy: {dr_policy}\n"
    );
    (table(&dr, "", ""), Client::new("shop"))
}

fn pick_seq(t: &RouteTable, c: &Client, b: &Balancer, n: usize) -> Vec<SocketAddr> {
    let now = Instant::now();
    (0..n)
        .map(|_| {
            let r = t.route(&c.to("10.96.0.10:80"), 0).unwrap().unwrap();
            b.pick(
                &r.dest,
                c.source,
                c.to("10.96.0.10:80").destination,
                now,
                &[],
            )
            .unwrap()
            .endpoint
        })
        .collect()
}

#[test]
fn round_robin_goes_in_turn_and_random_is_seeded() {
    let (t, c) = dest_with("{loadBalancer: {simple: ROUND_ROBIN}}");
    let b = Balancer::with_seed(0);
    let seq = pick_seq(&t, &c, &b, 6);
    assert_eq!(seq[0..3], seq[3..6]);
    assert_eq!(
        seq.iter().collect::<std::collections::BTreeSet<_>>().len(),
        3
    );
    let (t, c) = dest_with("{loadBalancer: {simple: RANDOM}}");
    let a = pick_seq(&t, &c, &Balancer::with_seed(9), 50);
    assert_eq!(
        a,
        pick_seq(&t, &c, &Balancer::with_seed(9), 50),
        "same seed, same picks"
    );
    assert_eq!(a.iter().collect::<std::collections::BTreeSet<_>>().len(), 3);
}

#[test]
fn least_request_picks_the_least_loaded_endpoint() {
    let (t, c) = dest_with("{loadBalancer: {simple: LEAST_REQUEST}}");
    let b = Balancer::with_seed(0);
    let now = Instant::now();
    let r = t.route(&c.to("10.96.0.10:80"), 0).unwrap().unwrap();
    let dialled = c.to("10.96.0.10:80").destination;
    // Three long-lived connections spread over the three endpoints...
    let held: Vec<_> = (0..3)
        .map(|_| b.pick(&r.dest, c.source, dialled, now, &[]).unwrap())
        .collect();
    let mut got: Vec<_> = held.iter().map(|p| p.endpoint).collect();
    got.sort();
    assert_eq!(got, r.dest.endpoints);
    // Two more (ties broken in turn), then the first three close: only
    // the two are active, and every new pick goes to the idle endpoint.
    let more: Vec<_> = (0..2)
        .map(|_| b.pick(&r.dest, c.source, dialled, now, &[]).unwrap())
        .collect();
    drop(held);
    let busy: Vec<_> = more.iter().map(|p| p.endpoint).collect();
    assert_ne!(busy[0], busy[1]);
    for _ in 0..5 {
        let p = b.pick(&r.dest, c.source, dialled, now, &[]).unwrap();
        assert!(
            !busy.contains(&p.endpoint),
            "{:?} is busy: {busy:?}",
            p.endpoint
        );
    }
}

#[test]
fn consistent_hash_on_source_ip_is_stable_per_client_and_spreads_clients() {
    let (t, mut c) = dest_with("{loadBalancer: {consistentHash: {useSourceIp: true}}}");
    let b = Balancer::with_seed(0);
    let mut seen = std::collections::BTreeSet::new();
    for i in 1..=60u8 {
        c.source = IpAddr::from([10, 1, 0, i]);
        let picks = pick_seq(&t, &c, &b, 5);
        assert!(picks.iter().all(|p| *p == picks[0]), "{picks:?}");
        seen.insert(picks[0]);
    }
    assert_eq!(
        seen.len(),
        3,
        "60 clients over 3 endpoints use every endpoint"
    );
}

#[test]
fn max_connections_refuses_the_extra_connection_until_one_closes() {
    let (t, c) = dest_with("{connectionPool: {tcp: {maxConnections: 2}}}");
    let b = Balancer::with_seed(0);
    let r = t.route(&c.to("10.96.0.10:80"), 0).unwrap().unwrap();
    let dialled = c.to("10.96.0.10:80").destination;
    let now = Instant::now();
    let a = b.pick(&r.dest, c.source, dialled, now, &[]).unwrap();
    let _b2 = b.pick(&r.dest, c.source, dialled, now, &[]).unwrap();
    let over = b.pick(&r.dest, c.source, dialled, now, &[]).unwrap_err();
    assert!(matches!(over, PickError::Overflow { max: 2, .. }), "{over}");
    assert_eq!(b.dest_active(&r.dest.key), 2);
    drop(a);
    assert!(b.pick(&r.dest, c.source, dialled, now, &[]).is_ok());
}

#[test]
fn at_l7_5xx_and_gateway_errors_are_counted_apart() {
    // consecutive5xxErrors 3, consecutiveGatewayErrors 2 (the L7 waypoint's
    // classification of responses, Envoy's counters).
    let (t, c) = dest_with(
        "{outlierDetection: {consecutive5xxErrors: 3, consecutiveGatewayErrors: 2, baseEjectionTime: 10s, maxEjectionPercent: 100}}",
    );
    let b = Balancer::with_seed(0);
    let r = t.route(&c.to("10.96.0.10:80"), 0).unwrap().unwrap();
    let d = &r.dest;
    let now = Instant::now();
    let [e1, e2, e3] = [d.endpoints[0], d.endpoints[1], d.endpoints[2]];
    assert_eq!(HttpOutcome::of_status(200), HttpOutcome::Ok);
    assert_eq!(HttpOutcome::of_status(404), HttpOutcome::Ok);
    assert_eq!(HttpOutcome::of_status(500), HttpOutcome::ServerError);
    assert_eq!(HttpOutcome::of_status(503), HttpOutcome::GatewayError);
    // Two 500s are not gateway errors; a 200 forgives both counters.
    for _ in 0..2 {
        assert_eq!(
            b.http_result(d, e1, now, HttpOutcome::ServerError),
            Ejection::None
        );
    }
    assert_eq!(b.http_result(d, e1, now, HttpOutcome::Ok), Ejection::None);
    assert_eq!(b.status(e1, now).consecutive_errors, 0);
    // 500, 503: 2 5xx, 1 gateway error; a third 5xx ejects.
    b.http_result(d, e1, now, HttpOutcome::ServerError);
    assert_eq!(
        b.http_result(d, e1, now, HttpOutcome::GatewayError),
        Ejection::None
    );
    assert_eq!(
        b.http_result(d, e1, now, HttpOutcome::ServerError),
        Ejection::Ejected
    );
    // A 500 between two 503s resets the gateway count: no ejection by it.
    b.http_result(d, e2, now, HttpOutcome::GatewayError);
    b.http_result(d, e2, now, HttpOutcome::Ok);
    b.http_result(d, e2, now, HttpOutcome::GatewayError);
    assert_eq!(
        b.http_result(d, e2, now, HttpOutcome::ServerError),
        Ejection::None
    );
    assert!(!b.status(e2, now).ejected);
    // Two gateway errors in a row eject.
    b.http_result(d, e3, now, HttpOutcome::GatewayError);
    assert_eq!(
        b.http_result(d, e3, now, HttpOutcome::GatewayError),
        Ejection::Ejected
    );
}

#[test]
fn outlier_detection_ejects_within_the_percentage_and_readmits_after_the_ejection_time() {
    let (t, c) = dest_with(
        "{loadBalancer: {simple: ROUND_ROBIN}, outlierDetection: {consecutiveGatewayErrors: 2, baseEjectionTime: 10s, maxEjectionPercent: 50}}",
    );
    let b = Balancer::with_seed(0);
    let r = t.route(&c.to("10.96.0.10:80"), 0).unwrap().unwrap();
    let d = &r.dest;
    let dialled = c.to("10.96.0.10:80").destination;
    let t0 = Instant::now();
    let [e1, e2, e3] = [d.endpoints[0], d.endpoints[1], d.endpoints[2]];
    assert_eq!(b.failure(d, e1, t0), Ejection::None);
    b.success(d, e1, t0);
    assert_eq!(
        b.failure(d, e1, t0),
        Ejection::None,
        "a success resets the count"
    );
    assert_eq!(b.failure(d, e1, t0), Ejection::Ejected);
    assert!(b.status(e1, t0).ejected);
    for _ in 0..6 {
        assert_ne!(b.pick(d, c.source, dialled, t0, &[]).unwrap().endpoint, e1);
    }
    // 50 % of 3 endpoints: one may be ejected at a time.
    b.failure(d, e2, t0);
    assert_eq!(b.failure(d, e2, t0), Ejection::None);
    assert!(!b.status(e2, t0).ejected);
    // Re-admitted after baseEjectionTime.
    let t1 = t0 + Duration::from_secs(10);
    let picks: Vec<_> = (0..3)
        .map(|_| b.pick(d, c.source, dialled, t1, &[]).unwrap().endpoint)
        .collect();
    assert!(picks.contains(&e1), "{picks:?}");
    // The second ejection lasts twice as long.
    b.failure(d, e1, t1);
    assert_eq!(b.failure(d, e1, t1), Ejection::Ejected);
    assert!(b.status(e1, t1 + Duration::from_secs(19)).ejected);
    assert!(!b.status(e1, t1 + Duration::from_secs(20)).ejected);
    assert_eq!(b.status(e1, t1).times_ejected, 2);
    // Healthy for an interval (default 10 s) after re-admission: the
    // multiplier decays by one, so the next ejection is shorter again.
    let t2 = t1 + Duration::from_secs(20) + Duration::from_secs(10);
    b.success(d, e1, t2);
    assert_eq!(b.status(e1, t2).times_ejected, 1);
    // Tried endpoints are skipped; nothing left: no endpoint.
    let err = b.pick(d, c.source, dialled, t1, &[e2, e3]).unwrap_err();
    assert!(matches!(err, PickError::AllEjected(_)), "{err}");
}

#[test]
fn balancer_state_survives_a_recompile_of_the_same_endpoints() {
    let (t, c) = dest_with("{connectionPool: {tcp: {maxConnections: 1}}}");
    let b = Balancer::with_seed(0);
    let dialled = c.to("10.96.0.10:80").destination;
    let r = t.route(&c.to("10.96.0.10:80"), 0).unwrap().unwrap();
    let held = b
        .pick(&r.dest, c.source, dialled, Instant::now(), &[])
        .unwrap();
    b.prune(&t);
    let (t2, _) = dest_with("{connectionPool: {tcp: {maxConnections: 1}}}");
    assert_ne!(t.id(), t2.id());
    b.prune(&t2);
    let r2 = t2.route(&c.to("10.96.0.10:80"), 0).unwrap().unwrap();
    assert!(
        b.pick(&r2.dest, c.source, dialled, Instant::now(), &[])
            .is_err(),
        "the open connection still counts"
    );
    assert_eq!(b.status(held.endpoint, Instant::now()).active, 1);
    drop(held);
    b.prune(&table("", "", ""));
    assert_eq!(
        b.status("10.0.0.1:8080".parse().unwrap(), Instant::now())
            .active,
        0
    );
}

#[test]
fn durations_parse_like_go() {
    assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
    assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
    assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
    for bad in ["", "10", "s", "10x", "-1s"] {
        assert!(parse_duration(bad).is_err(), "{bad}");
    }
}

#[test]
fn the_decision_cost_is_flat_in_the_number_of_routes() {
    // Not a timing assertion: the bench mesh routes as intended at any size.
    for n in [1, 10, 1000] {
        let t = crate::bench::mesh(n);
        assert!(t.report().is_clean());
        assert_eq!(crate::bench::bench_decision(n, 10).iterations, 10);
    }
}

#[test]
fn validate_checks_one_object_without_services() {
    let docs = yaml(&split(80, 20));
    assert_eq!(
        crate::validate(&docs[0]),
        Ok(()),
        "hosts need no service to be valid"
    );
    let bad = yaml(&split(80, 20).replace("weight: 20", "weight: -1"));
    let err = crate::validate(&bad[0]).unwrap_err();
    assert_eq!(err.field, "spec.tcp[0].route[1].weight");
    let dr = yaml(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec: {host: web, trafficPolicy: {outlierDetection: {interval: often}}}\n",
    );
    assert_eq!(
        crate::validate(&dr[0]).unwrap_err().field,
        "spec.trafficPolicy.outlierDetection.interval"
    );
    let http_only = yaml(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: h}\nspec: {hosts: [web], http: [{route: [{destination: {host: web}}]}]}\n",
    );
    assert_eq!(
        crate::validate(&http_only[0]),
        Ok(()),
        "reported, not invalid"
    );
    assert_eq!(
        crate::validate(&serde_json::json!({"kind": "Gateway"}))
            .unwrap_err()
            .field,
        "kind"
    );
}

#[test]
fn objects_for_one_service_are_not_merged_and_the_shadowed_ones_say_so() {
    let other = split(0, 100).replace("web-split", "web-other");
    let t = table(SUBSETS, &format!("{}\n---\n{other}", split(80, 20)), "");
    let o = t
        .report()
        .get(Kind::VirtualService, "shop", "web-other")
        .unwrap();
    assert!(
        o.warnings
            .iter()
            .any(|w| w.message.contains("takes precedence")),
        "{o:?}"
    );
    let first = t
        .report()
        .get(Kind::VirtualService, "shop", "web-split")
        .unwrap();
    assert!(first.warnings.is_empty(), "{first:?}");
    // A rule for some clients only is not applied to every client.
    let dr = SUBSETS.replace(
        "  host: web\n",
        "  host: web\n  workloadSelector: {matchLabels: {app: front}}\n",
    );
    let t = table(&dr, "", "");
    let d = t
        .report()
        .get(Kind::DestinationRule, "shop", "web")
        .unwrap();
    assert!(
        matches!(&d.status, Status::NotApplied { reason } if reason.contains("workloadSelector")),
        "{d:?}"
    );
}

/// Replaces the leaf at step `pick` of a depth-first walk with `with`.
fn mutate(v: &mut Value, pick: &mut u64, with: &Value) -> bool {
    match v {
        Value::Object(m) => m.values_mut().any(|c| mutate(c, pick, with)),
        Value::Array(a) => a.iter_mut().any(|c| mutate(c, pick, with)),
        leaf => {
            if *pick == 0 {
                *leaf = with.clone();
                return true;
            }
            *pick -= 1;
            false
        }
    }
}

#[test]
fn mutated_objects_never_panic_the_compiler_or_the_decision() {
    // Every leaf of valid objects replaced by values of other types and
    // edge values, one at a time: compile reports, never panics, and every
    // decision on the result returns.
    let base: Vec<Value> = yaml(&format!(
        "{SUBSETS}\n---\n{}\n---\n{}",
        split(80, 20),
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db, namespace: shop}
spec:
  host: db
  trafficPolicy:
    loadBalancer: {consistentHash: {useSourceIp: true}}
    connectionPool: {tcp: {maxConnections: 3, connectTimeout: 1s}}
    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 2s, maxEjectionPercent: 40}
    portLevelSettings: [{port: {number: 5432}, loadBalancer: {simple: RANDOM}}]
"#
    ));
    let weird = [
        Value::Null,
        json!(0),
        json!(-1),
        json!(u64::MAX),
        json!(""),
        json!("*"),
        json!("1e309s"),
        json!([]),
        json!({}),
        json!(true),
        json!("web.shop.svc.cluster.local"),
    ];
    let b = Balancer::with_seed(5);
    let c = Client::new("shop");
    let mut compiled = 0;
    for i in 0..base.len() {
        for step in 0..64 {
            for w in &weird {
                let mut objs = base.clone();
                let mut pick = step;
                if !mutate(&mut objs[i], &mut pick, w) {
                    continue;
                }
                let (drs, vss): (Vec<Value>, Vec<Value>) = objs
                    .into_iter()
                    .partition(|o| o["kind"] == "DestinationRule");
                let t = compile(
                    Objects {
                        destination_rules: &drs,
                        virtual_services: &vss,
                        tcp_routes: &[],
                    },
                    services(),
                    &Options::default(),
                );
                compiled += 1;
                for dst in ["10.96.0.10:80", "10.96.0.10:90", "10.96.0.20:5432"] {
                    if let Some(Ok(r)) = t.route(&c.to(dst), b.random()) {
                        let _ =
                            b.pick(&r.dest, c.source, dst.parse().unwrap(), Instant::now(), &[]);
                    }
                }
            }
        }
    }
    assert!(compiled > 300, "{compiled}");
}

#[test]
fn a_consumer_tcproute_applies_to_its_own_namespace_only() {
    let tr = r#"
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: mine, namespace: client}
spec:
  parentRefs: [{kind: Service, name: web, namespace: shop}]
  rules: [{backendRefs: [{name: web, namespace: shop, port: 90}]}]
"#;
    let t = table("", "", tr);
    let o = t.report().get(Kind::TcpRoute, "client", "mine").unwrap();
    assert_eq!(o.status, Status::Applied);
    // Its backend is in another namespace: without ReferenceGrant support it is refused, visibly.
    assert!(
        o.warnings
            .iter()
            .any(|w| w.message.contains("ReferenceGrant")),
        "{o:?}"
    );
    let err = t
        .route(&Client::new("client").to("10.96.0.10:80"), 0)
        .unwrap()
        .unwrap_err();
    assert_eq!(err.route().map(|r| &**r), Some("TCPRoute/client/mine"));
    // Clients of other namespaces do not see the consumer route.
    let r = t
        .route(&Client::new("shop").to("10.96.0.10:80"), 0)
        .unwrap()
        .unwrap();
    assert_eq!(r.route, None);
}

/// Istio looks a service's DestinationRule up in the client's namespace,
/// the service's, and the root namespace. A rule in any other namespace
/// cannot govern the service for every client (a tenant could set another
/// tenant's connection limits, timeouts or ejection): it applies to its own
/// namespace's clients only, and says so.
#[test]
fn a_destination_rule_from_a_third_namespace_applies_to_its_own_clients_only() {
    let dr = |ns: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: r, namespace: {ns}}}\nspec:\n  host: web.shop.svc.cluster.local\n  trafficPolicy: {{connectionPool: {{tcp: {{maxConnections: 1}}}}}}\n"
        )
    };
    let rule_for = |t: &RouteTable, client: &'static str| {
        let r = t
            .route(&Client::new(client).to("10.96.0.10:80"), 0)
            .unwrap()
            .unwrap();
        r.dest.rule.as_deref().map(str::to_owned)
    };
    let t = table(&dr("evil"), "", "");
    assert_eq!(rule_for(&t, "evil").as_deref(), Some("evil/r"));
    assert_eq!(rule_for(&t, "shop"), None);
    assert_eq!(rule_for(&t, "other"), None);
    let o = t.report().get(Kind::DestinationRule, "evil", "r").unwrap();
    assert!(
        o.warnings
            .iter()
            .any(|w| w.message.contains("clients of namespace evil only")),
        "{o:?}"
    );
    // From the root namespace (and the service's), for every client.
    let t = table(&dr("istio-system"), "", "");
    assert_eq!(rule_for(&t, "other").as_deref(), Some("istio-system/r"));
    let t = table(&dr("shop"), "", "");
    assert_eq!(rule_for(&t, "other").as_deref(), Some("shop/r"));
}

/// One object cannot make compilation cost grow with more than its size:
/// a VirtualService naming one service many times routes it once (one
/// shared copy of its rules, the repeats reported), and a DestinationRule
/// with more than MAX_SUBSETS subsets (each holds endpoints per port) is
/// rejected, visibly.
#[test]
fn repeated_hosts_and_too_many_subsets_cost_nothing_and_are_reported() {
    let hosts = vec!["web"; 5000].join(", ");
    let vs = split(100, 0).replace("  hosts: [web]", &format!("  hosts: [{hosts}]"));
    let t = table(SUBSETS, &vs, "");
    let o = t
        .report()
        .get(Kind::VirtualService, "shop", "web-split")
        .unwrap();
    assert_eq!(o.status, Status::Applied);
    assert_eq!(
        o.warnings
            .iter()
            .filter(|w| w.message.contains("an earlier host names"))
            .count(),
        4999
    );
    let r = t
        .route(&Client::new("shop").to("10.96.0.10:80"), 0)
        .unwrap()
        .unwrap();
    assert_eq!(r.dest.subset.as_deref(), Some("v1"));
    let subsets: Vec<String> = (0..=crate::MAX_SUBSETS)
        .map(|i| format!("  - {{name: s{i}, labels: {{version: v1}}}}"))
        .collect();
    let dr = format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: many, namespace: shop}}\nspec:\n  host: web\n  subsets:\n{}\n",
        subsets.join("\n")
    );
    let t = table(&dr, "", "");
    let o = t
        .report()
        .get(Kind::DestinationRule, "shop", "many")
        .unwrap();
    assert!(
        matches!(&o.status, Status::Rejected { reason, .. } if reason.contains("at most 256")),
        "{o:?}"
    );
}

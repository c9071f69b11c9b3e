//! Arbitrary bytes as YAML/JSON policy documents: parse, build a store,
//! evaluate a few connections against a few workloads. Must never panic.
#![no_main]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use mesh_policy::{Connection, PolicyStore, WorkloadRef};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (store, report) = PolicyStore::from_text("istio-system", &text);
    // Messages must render (Display of every error and warning).
    for e in &report.errors {
        let _ = e.to_string();
    }
    for w in &report.warnings {
        let _ = w.to_string();
    }
    let web = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
    let none = BTreeMap::new();
    let workloads = [
        WorkloadRef {
            namespace: "shop",
            labels: &web,
        },
        WorkloadRef {
            namespace: "default",
            labels: &none,
        },
        WorkloadRef {
            namespace: "istio-system",
            labels: &web,
        },
    ];
    let v4 = |a, b, c, d| IpAddr::V4(Ipv4Addr::new(a, b, c, d));
    let conns = [
        Connection {
            source_principal: Some("cluster.local/ns/shop/sa/front"),
            source_ip: v4(10, 0, 0, 1),
            remote_ip: None,
            destination_ip: v4(10, 1, 0, 1),
            destination_port: 8080,
        },
        Connection {
            source_principal: None,
            source_ip: IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped()),
            remote_ip: Some(v4(203, 0, 113, 9)),
            destination_ip: IpAddr::V6(Ipv6Addr::LOCALHOST),
            destination_port: 1,
        },
        Connection {
            source_principal: Some("spiffe://td/ns//sa/"),
            source_ip: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
            remote_ip: None,
            destination_ip: v4(0, 0, 0, 0),
            destination_port: 65535,
        },
    ];
    for w in &workloads {
        for c in &conns {
            let d = store.evaluate(c, w);
            let _ = d.to_string();
            let _ = store.mtls_mode(w, c.destination_port);
        }
        let _ = store.policies_for(w);
    }
});

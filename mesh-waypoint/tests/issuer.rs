//! The waypoint's own certificate from a CA over Istio's certificate API
//! (`mesh-agent ca serve`, real gRPC on TLS, TokenReview and pod reads
//! against the fake API server), chosen with the same issuer flags as the
//! node agent's: the waypoint holds no CA key. Root-free.

mod common;
#[path = "../../mesh-agent/tests/kube_fake/mod.rs"]
mod kube_fake;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use common::*;
use kube_fake::{FakeApiServer, TokenUser};
use mesh_agent::{
    ca_server::{self, CaServerConfig},
    identity::{IssuerArgs, IssuerChoice, LocalCa, MeshCa, Requester, SpiffeId, TrustDomain},
};
use mesh_waypoint::config::WaypointConfig;
use serde_json::json;

const AUDIENCE: &str = "istio-ca";
const CA_NAME: &str = "mesh-ca.test.svc";

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").expect("trust domain")
}

fn pod(ns: &str, name: &str, uid: &str, sa: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid},
        "spec": {"nodeName": "node-a", "serviceAccountName": sa,
                 "containers": [{"name": "waypoint", "image": "registry.example/mesh-waypoint:1"}]},
        "status": {"phase": "Running"}
    })
}

/// A temporary directory, removed on drop.
struct Tmp(PathBuf);

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waypoint_gets_its_certificate_from_the_ca_service_and_holds_no_key() {
    let tmp = Tmp(std::env::temp_dir().join(format!("mesh-wp-issuer-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&tmp.0);
    let ca_dir = tmp.0.join("ca");
    MeshCa::init_dir(&ca_dir, &td(), 30).expect("ca init");
    let ca = Arc::new(MeshCa::load_dir(&ca_dir).expect("ca load"));

    // The API server knows the waypoint's pod (service account
    // `waypoint`) and an unrelated pod; each has a bound token.
    let api = FakeApiServer::start().await;
    api.apply(pod("default", "waypoint-1", "uid-wp", "waypoint"));
    api.apply(pod("default", "other-1", "uid-other", "other"));
    api.add_token(
        "wp-token",
        TokenUser::bound(
            "default",
            "waypoint",
            "waypoint-1",
            "uid-wp",
            Some("node-a"),
            AUDIENCE,
        ),
    );
    api.add_token(
        "other-token",
        TokenUser::bound(
            "default",
            "other",
            "other-1",
            "uid-other",
            Some("node-a"),
            AUDIENCE,
        ),
    );
    let mut cfg = CaServerConfig::new(Arc::clone(&ca), td());
    cfg.listen = "127.0.0.1:0".parse().expect("address");
    cfg.dns_names = vec![CA_NAME.into()];
    cfg.api_timeout = Duration::from_secs(5);
    let server = ca_server::start(cfg, api.client())
        .await
        .expect("CA server");

    let backend = http_backend("web").await;
    let config = WaypointConfig::parse(&format!(
        "services:\n  - {{ name: web, namespace: default, addresses: [10.96.9.10], ports: [{{ port: 80, targetPort: {} }}], endpoints: [{{ address: 127.0.0.1 }}] }}\n",
        backend.port()
    ))
    .expect("config");
    // The flags `mesh-waypoint run` takes, as a cluster deployment sets them.
    let start = |token: &str| {
        let token_file = tmp.0.join(format!("{token}.jwt"));
        std::fs::write(&token_file, token).expect("token file");
        let args = IssuerArgs {
            issuer: Some(IssuerChoice::IstioCa),
            ca_dir: None,
            ca_address: Some(format!("https://{}", server.local_addr())),
            ca_root_cert: Some(ca_dir.join("ca.crt")),
            ca_server_name: Some(CA_NAME.into()),
            ca_token_file: Some(token_file),
            cluster_id: "Kubernetes".into(),
        };
        let provider = args
            .config()
            .expect("issuer flags")
            .provider(&td(), Duration::from_secs(3600), Requester::Itself, false)
            .expect("provider");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let id = SpiffeId::parse(WAYPOINT_ID).expect("id");

        mesh_waypoint::start(id, provider, &config, any, any)
    };
    // A client of the same mesh (its own certificate from the mesh CA).
    let client_ca = Arc::new(LocalCa::new(Arc::clone(&ca), td()));

    let w = start("wp-token").await.expect("waypoint starts");
    let client = MeshClient::new(Arc::clone(&client_ca), CLIENT_ID, w.hbone).await;
    let mut c = client
        .http("10.96.9.10:80".parse().expect("vip"), false)
        .await;
    let a = c.get("/", &[]).await;
    assert_eq!((a.status.as_u16(), a.body.as_str()), (200, "web / 0"));

    // A waypoint whose token is another service account's gets no
    // certificate for the waypoint identity: its tunnels are refused.
    let rogue = start("other-token")
        .await
        .expect("starts; issuance fails per handshake");
    let client = MeshClient::new(client_ca, CLIENT_ID, rogue.hbone).await;
    let refused = client.tunnel("10.96.9.10:80".parse().expect("vip")).await;
    assert!(refused.is_err(), "a tunnel without a certificate");
}

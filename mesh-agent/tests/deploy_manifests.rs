//! Every manifest in `deploy/` parses into its typed Kubernetes object (and
//! back without losing a field, so a misspelt field fails here, not in a
//! cluster), `kubectl kustomize deploy/` renders, and the rendered objects
//! keep the invariants the agent relies on: capabilities, mounts, env,
//! probe, update strategy, read-only RBAC. And the CA key's confinement
//! (issue 15), checked on the rendered objects of every kustomization in
//! deploy/: no pod but the issuer's can read the `mesh-ca` Secret, nothing
//! bound to the agent grants secrets, the agent's issuer flags match the
//! issuer's, and only the local-CA example gives the agent the key.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{
            ConfigMap, Container, Namespace, PodSpec, Secret, Service, ServiceAccount, Volume,
        },
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The typed objects of a set of manifests.
#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    daemon_sets: Vec<DaemonSet>,
    crds: Vec<CustomResourceDefinition>,
    deployments: Vec<Deployment>,
    services: Vec<Service>,
    config_maps: Vec<ConfigMap>,
    secrets: Vec<Secret>,
    /// kustomize Components: (file, document).
    components: Vec<(String, Value)>,
    /// Gateway API Gateways (the waypoint's, for Istio compatibility).
    gateways: Vec<Value>,
}

/// Removes nulls, empty objects left by them, so that a typed round trip
/// (which drops `None` fields) compares equal to the source.
fn normalize(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(normalize);
        }
        Value::Array(items) => items.iter_mut().for_each(normalize),
        _ => {}
    }
}

/// Parses `doc` as `T` and checks that serializing it back gives `doc`:
/// a field `T` does not know (a typo, a wrong level) would be dropped.
fn typed<T: DeserializeOwned + Serialize>(origin: &str, doc: &Value) -> T {
    let obj: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{origin}: does not parse as its kind: {e}\n{doc:#}"));
    let mut back = serde_json::to_value(&obj).expect("serialize");
    let mut want = doc.clone();
    normalize(&mut back);
    normalize(&mut want);
    if let Some((path, got, expected)) = first_difference(&back, &want, String::new()) {
        panic!(
            "{origin}: at {path}: the manifest has {expected} but its typed object has {got} \
             (an unknown, misspelt or misplaced field?)"
        );
    }
    obj
}

/// The first place where `got` and `want` differ: (JSON path, got, want).
fn first_difference(got: &Value, want: &Value, path: String) -> Option<(String, String, String)> {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => {
            let keys: BTreeSet<&String> = g.keys().chain(w.keys()).collect();
            keys.into_iter().find_map(|k| {
                let at = format!("{path}.{k}");
                match (g.get(k), w.get(k)) {
                    (Some(a), Some(b)) => first_difference(a, b, at),
                    (a, b) => Some((
                        at,
                        a.map_or("nothing".into(), |v| v.to_string()),
                        b.map_or("nothing".into(), |v| v.to_string()),
                    )),
                }
            })
        }
        (Value::Array(g), Value::Array(w)) if g.len() == w.len() => g
            .iter()
            .zip(w)
            .enumerate()
            .find_map(|(i, (a, b))| first_difference(a, b, format!("{path}[{i}]"))),
        (a, b) if a == b => None,
        // Typed schemas keep `minimum`/`maximum` as floats: 1 and 1.0 agree.
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => None,
        (a, b) => Some((path, a.to_string(), b.to_string())),
    }
}

fn parse_documents(origin: &str, text: &str, into: &mut Objects) {
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let mut doc: Value = serde::Deserialize::deserialize(de)
            .unwrap_or_else(|e| panic!("{origin}: document {i} is not YAML: {e}"));
        // kustomize wraps a generated Secret's base64 at 76 columns, which
        // the API server accepts (Go's decoder skips newlines) and
        // k8s-openapi does not.
        if doc["kind"] == "Secret" {
            for v in doc["data"]
                .as_object_mut()
                .into_iter()
                .flat_map(|m| m.values_mut())
            {
                if let Some(b64) = v.as_str() {
                    *v = Value::String(b64.replace(['\n', '\r'], ""));
                }
            }
        }
        if doc.is_null() {
            continue;
        }
        let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
        let api_version = doc["apiVersion"].as_str().unwrap_or_default().to_owned();
        let at = format!("{origin} #{i} ({kind})");
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "Namespace") => into.namespaces.push(typed(&at, &doc)),
            ("v1", "ServiceAccount") => into.service_accounts.push(typed(&at, &doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                into.cluster_roles.push(typed(&at, &doc))
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                into.cluster_role_bindings.push(typed(&at, &doc))
            }
            ("rbac.authorization.k8s.io/v1", "Role") => into.roles.push(typed(&at, &doc)),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                into.role_bindings.push(typed(&at, &doc))
            }
            ("apps/v1", "DaemonSet") => into.daemon_sets.push(typed(&at, &doc)),
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                into.crds.push(typed(&at, &doc))
            }
            ("apps/v1", "Deployment") => into.deployments.push(typed(&at, &doc)),
            ("v1", "Service") => into.services.push(typed(&at, &doc)),
            ("v1", "ConfigMap") => into.config_maps.push(typed(&at, &doc)),
            ("v1", "Secret") => into.secrets.push(typed(&at, &doc)),
            ("kustomize.config.k8s.io/v1beta1", "Kustomization") => {
                check_kustomization(origin, &doc)
            }
            ("gateway.networking.k8s.io/v1", "Gateway") => into.gateways.push(doc),
            ("kustomize.config.k8s.io/v1alpha1", "Component") => {
                into.components.push((origin.to_owned(), doc))
            }
            _ => panic!("{at}: unexpected kind {api_version}/{kind} in deploy/"),
        }
    }
}

/// A kustomization's `resources` all exist (files or directories).
fn check_kustomization(origin: &str, doc: &Value) {
    let dir = Path::new(origin).parent().expect("kustomization dir");
    for r in doc["resources"].as_array().into_iter().flatten() {
        let r = r.as_str().expect("resource path");
        assert!(
            dir.join(r).exists(),
            "{origin}: resource {r} does not exist"
        );
    }
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(p);
        }
    }
}

fn kustomize(dir: &Path) -> String {
    let kubectl = std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("kubectl"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "kubectl is not on PATH: the deploy test renders deploy/ with `kubectl kustomize` \
                 and does not skip; install kubectl (scripts/setup.sh) or put it on PATH"
            )
        });
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

#[test]
fn every_manifest_parses_into_its_typed_object() {
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    assert!(files.len() >= 8, "manifests found: {files:?}");
    let mut objects = Objects::default();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read manifest");
        parse_documents(&f.display().to_string(), &text, &mut objects);
    }
    assert_eq!(objects.daemon_sets.len(), 1);
    assert_eq!(objects.crds.len(), 6);
    assert_eq!(objects.components.len(), 2);
    assert_eq!(objects.namespaces.len(), 1);
    // The CA issuer (deploy/ca/) and the waypoint (deploy/waypoint/).
    assert_eq!(objects.deployments.len(), 2);
    assert_eq!(objects.gateways.len(), 1);
}

fn rendered() -> Objects {
    let text = kustomize(&deploy_dir());
    let mut objects = Objects::default();
    parse_documents("kubectl kustomize deploy/", &text, &mut objects);
    objects
}

fn container<'a>(containers: &'a [Container], name: &str) -> &'a Container {
    containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

#[test]
fn kustomize_renders_the_expected_objects() {
    let o = rendered();
    let names = |v: Vec<Option<String>>| -> Vec<String> { v.into_iter().flatten().collect() };
    assert_eq!(
        names(
            o.namespaces
                .iter()
                .map(|n| n.metadata.name.clone())
                .collect()
        ),
        ["mesh-system"]
    );
    let mut accounts = names(
        o.service_accounts
            .iter()
            .map(|a| a.metadata.name.clone())
            .collect(),
    );
    accounts.sort();
    assert_eq!(accounts, ["mesh-agent", "mesh-ca"]);
    assert_eq!(o.daemon_sets.len(), 1);
    // The issuer is in the default.
    assert_eq!(
        names(
            o.deployments
                .iter()
                .map(|d| d.metadata.name.clone())
                .collect()
        ),
        ["mesh-ca"]
    );
    assert_eq!(
        names(o.services.iter().map(|s| s.metadata.name.clone()).collect()),
        ["mesh-ca"]
    );
    // The CA's Secret and root ConfigMap are made by the operator, never
    // shipped (see README.md).
    assert!(o.secrets.is_empty() && o.config_maps.is_empty());
    let mut crds = names(o.crds.iter().map(|c| c.metadata.name.clone()).collect());
    crds.sort();
    assert_eq!(
        crds,
        [
            "authorizationpolicies.security.istio.io",
            "destinationrules.networking.istio.io",
            "httproutes.gateway.networking.k8s.io",
            "peerauthentications.security.istio.io",
            "tcproutes.gateway.networking.k8s.io",
            "virtualservices.networking.istio.io",
        ]
    );
    // The traffic-management CRDs: `routing_crds_serve_what_the_agent_watches`.
    for crd in o
        .crds
        .iter()
        .filter(|c| c.spec.group == "security.istio.io")
    {
        let spec = &crd.spec;
        assert_eq!(spec.scope, "Namespaced");
        let versions: BTreeMap<&str, (bool, bool)> = spec
            .versions
            .iter()
            .map(|v| (v.name.as_str(), (v.served, v.storage)))
            .collect();
        assert_eq!(
            versions,
            [("v1", (true, true)), ("v1beta1", (true, false))].into(),
            "{:?}",
            crd.metadata.name
        );
        for v in &spec.versions {
            let schema = v
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .expect("structural schema");
            assert_eq!(schema.type_.as_deref(), Some("object"));
            let props = schema.properties.as_ref().expect("properties");
            assert_eq!(props["spec"].type_.as_deref(), Some("object"));
        }
    }
    // The image is set by the kustomization.
    let ds = &o.daemon_sets[0];
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    assert_eq!(
        container(&pod.containers, "agent").image.as_deref(),
        Some("mesh-agent:0.1.0")
    );
    // The issuer runs the same binary: the same image.
    let ca = pod_spec_of_deployment(&o.deployments[0]);
    assert_eq!(
        container(&ca.containers, "ca").image.as_deref(),
        Some("mesh-agent:0.1.0")
    );
}

#[test]
fn daemonset_invariants() {
    let o = rendered();
    let ds = &o.daemon_sets[0];
    assert_eq!(ds.metadata.namespace.as_deref(), Some("mesh-system"));
    let spec = ds.spec.as_ref().expect("spec");
    let strategy = spec.update_strategy.as_ref().expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.as_ref().expect("rollingUpdate");
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));

    let pod = spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.service_account_name.as_deref(), Some("mesh-agent"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_ne!(
        pod.host_network,
        Some(true),
        "the agent is not on the host network"
    );
    assert_ne!(
        pod.host_pid,
        Some(true),
        "the host /proc is mounted instead"
    );
    let tolerations = pod.tolerations.as_ref().expect("tolerations");
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint: {tolerations:?}"
    );

    let agent = container(&pod.containers, "agent");
    assert_eq!(pod.containers.len(), 1);
    // Capabilities: exactly these, everything else dropped, not privileged.
    let sc = agent.security_context.as_ref().expect("securityContext");
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(
        added,
        ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN", "SYS_PTRACE"].into()
    );
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));

    // NODE_NAME from the downward API.
    let env = agent.env.as_ref().expect("env");
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("NODE_NAME from a fieldRef");
    assert_eq!(field.field_path, "spec.nodeName");
    // POD_IP from the downward API: metrics are served on the pod IP only
    // (without it, on loopback, where Prometheus cannot scrape them).
    let pod_ip = env.iter().find(|e| e.name == "POD_IP").expect("POD_IP");
    let field = pod_ip
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("POD_IP from a fieldRef");
    assert_eq!(field.field_path, "status.podIP");
    assert!(
        !env.iter().any(|e| e.name == "MESH_METRICS_ADDR"),
        "metrics follow POD_IP, not a fixed address"
    );

    // Readiness on :15021/healthz/ready.
    let http = agent
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("readiness httpGet");
    assert_eq!(http.path.as_deref(), Some("/healthz/ready"));
    assert_eq!(http.port, IntOrString::Int(15021));

    // Resources: requests and limits for CPU and memory.
    let res = agent.resources.as_ref().expect("resources");
    for (what, set) in [("requests", &res.requests), ("limits", &res.limits)] {
        let set = set.as_ref().unwrap_or_else(|| panic!("resources.{what}"));
        assert!(
            set.contains_key("cpu") && set.contains_key("memory"),
            "{what}: {set:?}"
        );
    }

    // The agent runs from the API server with the host's /proc.
    let args = agent.args.as_ref().expect("args");
    for want in ["run", "--kube", "--proc-root=/host/proc"] {
        assert!(args.iter().any(|a| a == want), "{want} in {args:?}");
    }

    // Mounts: container path -> (host path or secret, propagation, read-only).
    let volumes = pod.volumes.as_ref().expect("volumes");
    let source = |name: &str| -> String {
        let v = volumes
            .iter()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("volume {name}"));
        if let Some(h) = &v.host_path {
            format!("host:{}", h.path)
        } else if let Some(s) = &v.secret {
            format!("secret:{}", s.secret_name.as_deref().unwrap_or_default())
        } else if let Some(c) = &v.config_map {
            format!("configmap:{}", c.name)
        } else if let Some(p) = &v.projected {
            let sources: Vec<String> = p
                .sources
                .iter()
                .flatten()
                .map(|s| match &s.service_account_token {
                    Some(t) => format!("token:{}", t.path),
                    None => panic!("volume {name}: unexpected projection {s:?}"),
                })
                .collect();
            format!("projected:{}", sources.join(","))
        } else {
            panic!("volume {name}: unexpected source")
        }
    };
    let mounts: BTreeMap<String, (String, Option<String>, bool)> = agent
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| {
            (
                m.mount_path.clone(),
                (
                    source(&m.name),
                    m.mount_propagation.clone(),
                    m.read_only == Some(true),
                ),
            )
        })
        .collect();
    let want: BTreeMap<String, (String, Option<String>, bool)> = [
        (
            "/sys/fs/bpf",
            ("host:/sys/fs/bpf", Some("HostToContainer"), false),
        ),
        ("/host/sys/fs/cgroup", ("host:/sys/fs/cgroup", None, true)),
        ("/host/proc", ("host:/proc", None, true)),
        (
            "/var/run/netns",
            ("host:/var/run/netns", Some("HostToContainer"), true),
        ),
        // The CA's certificate only, and the token for the issuer: no key.
        (
            "/var/run/secrets/mesh/ca-root",
            ("configmap:mesh-ca-root", None, true),
        ),
        (
            "/var/run/secrets/tokens",
            ("projected:token:mesh-ca-token", None, true),
        ),
    ]
    .into_iter()
    .map(|(path, (src, prop, ro))| {
        (
            path.to_owned(),
            (src.to_owned(), prop.map(str::to_owned), ro),
        )
    })
    .collect();
    assert_eq!(mounts, want);

    // The only privileged piece: the init container that mounts bpffs on
    // the host (Bidirectional propagation requires privileged).
    let inits = pod.init_containers.as_ref().expect("initContainers");
    assert_eq!(inits.len(), 1);
    let init = &inits[0];
    assert_eq!(
        init.security_context.as_ref().and_then(|s| s.privileged),
        Some(true)
    );
    let init_mounts: Vec<(&str, Option<&str>)> = init
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.mount_path.as_str(), m.mount_propagation.as_deref()))
        .collect();
    assert_eq!(init_mounts, [("/sys/fs/bpf", Some("Bidirectional"))]);
    assert_eq!(source("bpffs"), "host:/sys/fs/bpf");
}

#[test]
fn agent_rbac_is_read_only() {
    let o = rendered();
    let read = ["get", "list", "watch"];
    let mut resources = BTreeSet::new();
    let agent_role = o
        .cluster_roles
        .iter()
        .find(|r| r.metadata.name.as_deref() == Some("mesh-agent"))
        .expect("ClusterRole mesh-agent");
    for rule in agent_role.rules.iter().flatten() {
        for verb in &rule.verbs {
            assert!(read.contains(&verb.as_str()), "ClusterRole verb {verb}");
        }
        assert!(rule.resource_names.is_none());
        for group in rule.api_groups.iter().flatten() {
            for r in rule.resources.iter().flatten() {
                assert_ne!(r, "*", "no wildcard resources");
                assert_ne!(r, "secrets", "no cluster-wide secrets");
                resources.insert(format!("{r}.{group}"));
            }
        }
    }
    assert_eq!(
        resources,
        [
            "authorizationpolicies.security.istio.io",
            "destinationrules.networking.istio.io",
            "endpointslices.discovery.k8s.io",
            "gateways.gateway.networking.k8s.io",
            "httproutes.gateway.networking.k8s.io",
            "namespaces.",
            "nodes.",
            "peerauthentications.security.istio.io",
            "pods.",
            "services.",
            "tcproutes.gateway.networking.k8s.io",
            "virtualservices.networking.istio.io",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect()
    );
    // The agent's only binding is to that ClusterRole (no Role: it reads
    // no Secret; see the CA-key tests below).
    let agent = ("mesh-system", "mesh-agent");
    let bound: Vec<String> = o
        .cluster_role_bindings
        .iter()
        .filter(|b| b.subjects.iter().flatten().any(|s| names_sa(s, agent)))
        .map(|b| b.role_ref.name.clone())
        .chain(
            o.role_bindings
                .iter()
                .filter(|b| b.subjects.iter().flatten().any(|s| names_sa(s, agent)))
                .map(|b| format!("{}/{}", b.role_ref.kind, b.role_ref.name)),
        )
        .collect();
    assert_eq!(bound, ["mesh-agent"]);
    let binding = o
        .cluster_role_bindings
        .iter()
        .find(|b| b.role_ref.name == "mesh-agent")
        .expect("ClusterRoleBinding mesh-agent");
    assert_eq!(binding.subjects.iter().flatten().count(), 1);
}

// ---------------------------------------------------------------------------
// The CA key's confinement (issue 15), on the rendered objects of every
// kustomization under deploy/.

/// The issuer's pod: the only one that may read the CA key.
const ISSUER: (&str, &str, &str) = ("Deployment", "mesh-system", "mesh-ca");
/// The agent's and the issuer's service accounts (namespace, name).
const AGENT_SA: (&str, &str) = ("mesh-system", "mesh-agent");
const ISSUER_SA: (&str, &str) = ("mesh-system", "mesh-ca");
/// The Secret holding the CA key.
const CA_SECRET: &str = "mesh-ca";

/// A directory that is removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("mesh-deploy-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Stand-ins for the files `mesh-agent ca init` writes, for the example
/// that generates the Secret and ConfigMap from them.
const FAKE_CA_CRT: &str =
    "-----BEGIN CERTIFICATE-----\nTEST-ROOT-CERTIFICATE\n-----END CERTIFICATE-----\n";
const FAKE_CA_KEY: &str =
    "-----BEGIN PRIVATE KEY-----\nTEST-ROOT-PRIVATE-KEY\n-----END PRIVATE KEY-----\n";

/// Whether the kustomization file `path` is a kustomize `Component`.
fn is_component(path: &Path) -> bool {
    let text = std::fs::read_to_string(path).expect("read kustomization");
    let doc: Value = serde_yaml::from_str(&text).expect("kustomization YAML");
    doc["kind"] == "Component"
}

/// Every kustomization under deploy/ (components aside), rendered: its directory relative to
/// deploy/ ("" for deploy/ itself) -> its objects. Rendered from a copy of
/// the YAML files only (a real ca.key someone made in
/// examples/ca-secret/ is never copied), with stand-in CA files where the
/// example expects them.
fn all_renders() -> &'static BTreeMap<String, Objects> {
    static RENDERS: OnceLock<BTreeMap<String, Objects>> = OnceLock::new();
    RENDERS.get_or_init(|| {
        let mut files = Vec::new();
        yaml_files(&deploy_dir(), &mut files);
        let tmp = TempDir::new("renders");
        let mut dirs = BTreeSet::new();
        for f in &files {
            let rel = f.strip_prefix(deploy_dir()).expect("under deploy/");
            let to = tmp.0.join(rel);
            std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
            std::fs::copy(f, &to).expect("copy manifest");
            // A kustomize Component renders only inside an overlay (see
            // `components_skip_the_crds_a_cluster_already_has`).
            if rel.file_name().is_some_and(|n| n == "kustomization.yaml") && !is_component(f) {
                dirs.insert(rel.parent().expect("parent").to_path_buf());
            }
        }
        let ca_secret = tmp.0.join("examples/ca-secret");
        assert!(ca_secret.is_dir(), "deploy/examples/ca-secret/ is gone");
        std::fs::write(ca_secret.join("ca.crt"), FAKE_CA_CRT).expect("write");
        std::fs::write(ca_secret.join("ca.key"), FAKE_CA_KEY).expect("write");
        dirs.into_iter()
            .map(|rel| {
                let key = rel.display().to_string();
                let text = kustomize(&tmp.0.join(&rel));
                let mut objects = Objects::default();
                parse_documents(
                    &format!("kubectl kustomize deploy/{key}"),
                    &text,
                    &mut objects,
                );
                (key, objects)
            })
            .collect()
    })
}

/// The value of `--name` in `args` (`--name=value` or `--name value`);
/// a flag given twice is a defect.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let long = format!("--{name}");
    let mut found = None;
    for (i, a) in args.iter().enumerate() {
        let value = if let Some(v) = a.strip_prefix(&format!("{long}=")) {
            Some(v)
        } else if *a == long {
            Some(args.get(i + 1).map(String::as_str).unwrap_or_default())
        } else {
            None
        };
        if let Some(v) = value {
            assert!(found.is_none(), "{long} given twice in {args:?}");
            found = Some(v);
        }
    }
    found
}

fn pod_spec_of_deployment(d: &Deployment) -> &PodSpec {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec")
}

/// Every pod template of a render: ((kind, namespace, name), pod spec).
fn pod_templates(o: &Objects) -> Vec<((&'static str, String, String), &PodSpec)> {
    let id = |kind, m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        (
            kind,
            m.namespace.clone().unwrap_or_default(),
            m.name.clone().unwrap_or_default(),
        )
    };
    o.daemon_sets
        .iter()
        .map(|d| {
            (
                id("DaemonSet", &d.metadata),
                d.spec
                    .as_ref()
                    .and_then(|s| s.template.spec.as_ref())
                    .expect("pod spec"),
            )
        })
        .chain(
            o.deployments
                .iter()
                .map(|d| (id("Deployment", &d.metadata), pod_spec_of_deployment(d))),
        )
        .collect()
}

/// The Secrets a volume projects into a pod.
fn volume_secrets(v: &Volume) -> Vec<String> {
    let direct = v
        .secret
        .as_ref()
        .map(|s| s.secret_name.clone().unwrap_or_default());
    let projected = v
        .projected
        .iter()
        .flat_map(|p| p.sources.iter().flatten())
        .filter_map(|s| s.secret.as_ref().map(|s| s.name.clone()));
    direct.into_iter().chain(projected).collect()
}

/// Every way a pod can read a Secret: (container or "<pod volume>", Secret
/// name, how). A Secret volume counts even unmounted: the kubelet still
/// writes it to the node for the pod.
fn secret_reads(pod: &PodSpec) -> Vec<(String, String, String)> {
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    let mut out: Vec<(String, String, String)> = volumes
        .iter()
        .flat_map(|v| {
            volume_secrets(v)
                .into_iter()
                .map(|s| ("<pod volume>".to_owned(), s, format!("volume {}", v.name)))
        })
        .collect();
    let containers = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten());
    let ephemeral = pod.ephemeral_containers.iter().flatten().map(|e| {
        (
            e.name.clone(),
            e.volume_mounts.clone(),
            e.env.clone(),
            e.env_from.clone(),
        )
    });
    let all = containers
        .map(|c| {
            (
                c.name.clone(),
                c.volume_mounts.clone(),
                c.env.clone(),
                c.env_from.clone(),
            )
        })
        .chain(ephemeral);
    for (name, mounts, env, env_from) in all {
        for m in mounts.iter().flatten() {
            if let Some(v) = volumes.iter().find(|v| v.name == m.name) {
                for s in volume_secrets(v) {
                    out.push((name.clone(), s, format!("mount {}", m.mount_path)));
                }
            }
        }
        for e in env.iter().flatten() {
            if let Some(r) = e
                .value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref())
            {
                out.push((name.clone(), r.name.clone(), format!("env {}", e.name)));
            }
        }
        for e in env_from.iter().flatten() {
            if let Some(r) = &e.secret_ref {
                out.push((name.clone(), r.name.clone(), "envFrom".to_owned()));
            }
        }
    }
    out
}

/// Whether `s` includes the service account `sa`: itself, its user name,
/// or a group it is in.
fn names_sa(s: &Subject, (ns, name): (&str, &str)) -> bool {
    match s.kind.as_str() {
        "ServiceAccount" => s.name == name && s.namespace.as_deref() == Some(ns),
        "User" => s.name == format!("system:serviceaccount:{ns}:{name}"),
        "Group" => [
            "system:serviceaccounts".to_owned(),
            format!("system:serviceaccounts:{ns}"),
            "system:authenticated".to_owned(),
        ]
        .contains(&s.name),
        other => panic!("unknown subject kind {other}"),
    }
}

/// One rule given to one subject by a binding, in a namespace (None:
/// cluster-wide).
struct Grant<'a> {
    binding: String,
    subject: &'a Subject,
    namespace: Option<String>,
    rule: &'a PolicyRule,
}

/// Every (binding, subject, rule) of a render. A binding to a role the
/// render does not hold (cluster-admin, view, ...) or to an aggregated
/// ClusterRole cannot be checked here, so it fails the test.
fn grants(o: &Objects) -> Vec<Grant<'_>> {
    let cluster_role = |name: &str, binding: &str| -> &ClusterRole {
        let r = o
            .cluster_roles
            .iter()
            .find(|r| r.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| {
                panic!("{binding} binds ClusterRole {name}, which deploy/ does not define")
            });
        assert!(
            r.aggregation_rule.is_none(),
            "{binding} binds the aggregated ClusterRole {name}: its rules cannot be checked"
        );
        r
    };
    let mut out = Vec::new();
    for b in &o.cluster_role_bindings {
        let at = format!("ClusterRoleBinding {:?}", b.metadata.name);
        assert_eq!(b.role_ref.kind, "ClusterRole", "{at}");
        let role = cluster_role(&b.role_ref.name, &at);
        for subject in b.subjects.iter().flatten() {
            for rule in role.rules.iter().flatten() {
                out.push(Grant {
                    binding: at.clone(),
                    subject,
                    namespace: None,
                    rule,
                });
            }
        }
    }
    for b in &o.role_bindings {
        let ns = b.metadata.namespace.clone().expect("RoleBinding namespace");
        let at = format!("RoleBinding {ns}/{:?}", b.metadata.name);
        let rules: &[PolicyRule] = match b.role_ref.kind.as_str() {
            "ClusterRole" => cluster_role(&b.role_ref.name, &at).rules.as_deref(),
            "Role" => o
                .roles
                .iter()
                .find(|r| {
                    r.metadata.name.as_deref() == Some(b.role_ref.name.as_str())
                        && r.metadata.namespace.as_deref() == Some(ns.as_str())
                })
                .unwrap_or_else(|| panic!("{at} binds Role {}, not in deploy/", b.role_ref.name))
                .rules
                .as_deref(),
            other => panic!("{at}: roleRef kind {other}"),
        }
        .unwrap_or_default();
        for subject in b.subjects.iter().flatten() {
            for rule in rules {
                out.push(Grant {
                    binding: at.clone(),
                    subject,
                    namespace: Some(ns.clone()),
                    rule,
                });
            }
        }
    }
    out
}

fn has(list: Option<&[String]>, want: &str) -> bool {
    list.unwrap_or_default()
        .iter()
        .any(|x| x == want || x == "*")
}

/// Whether `rule` touches Secrets at all (any verb, any name).
fn touches_secrets(rule: &PolicyRule) -> bool {
    has(rule.api_groups.as_deref(), "") && has(rule.resources.as_deref(), "secrets")
}

/// Whether `rule` lets its holder read the Secret `name` (get it, or list
/// or watch it: both return its data).
fn reads_secret(rule: &PolicyRule, name: &str) -> bool {
    touches_secrets(rule)
        && ["get", "list", "watch"]
            .iter()
            .any(|v| has(Some(&rule.verbs), v))
        && match rule.resource_names.as_deref() {
            None | Some([]) => true,
            Some(names) => names.iter().any(|n| n == name),
        }
}

fn subject_id(s: &Subject) -> String {
    format!(
        "{} {}/{}",
        s.kind,
        s.namespace.as_deref().unwrap_or_default(),
        s.name
    )
}

fn agent_daemon_set(o: &Objects) -> Option<&PodSpec> {
    o.daemon_sets
        .iter()
        .find(|d| d.metadata.name.as_deref() == Some("mesh-agent"))
        .map(|d| {
            d.spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .expect("pod spec")
        })
}

#[test]
fn every_kustomization_renders_and_the_default_is_node_scoped() {
    let renders = all_renders();
    let dirs: BTreeSet<&str> = renders.keys().map(String::as_str).collect();
    for want in [
        "",
        "agent",
        "ca",
        "crds",
        "examples/ca-secret",
        "examples/istiod-ca",
        "examples/local-ca",
        "waypoint",
    ] {
        assert!(dirs.contains(want), "deploy/{want} rendered: {dirs:?}");
    }
    // The default: agents with the istio-ca issuer, and the issuer itself.
    let o = &renders[""];
    let agent = agent_daemon_set(o).expect("the agent in deploy/");
    let args = container(&agent.containers, "agent")
        .args
        .as_deref()
        .unwrap_or_default();
    assert_eq!(flag(args, "issuer"), Some("istio-ca"), "{args:?}");
    assert_eq!(flag(args, "ca-dir"), None, "{args:?}");
    assert!(
        o.deployments
            .iter()
            .any(|d| d.metadata.name.as_deref() == Some(ISSUER.2)),
        "the issuer is in the default"
    );
}

#[test]
fn no_pod_but_the_issuer_reads_the_ca_secret() {
    let mut issuer_reads = 0;
    for (dir, o) in all_renders() {
        for ((kind, ns, name), pod) in pod_templates(o) {
            let is_issuer = (kind, ns.as_str(), name.as_str()) == ISSUER;
            for (who, secret, how) in secret_reads(pod) {
                if secret != CA_SECRET {
                    continue;
                }
                let local_agent = dir == "examples/local-ca" && name == "mesh-agent";
                assert!(
                    is_issuer && (who == "ca" || who == "<pod volume>") || local_agent,
                    "deploy/{dir}: {kind} {ns}/{name} ({who}) reads the CA key Secret \
                     {secret} by {how}: only the issuer's pod may"
                );
                issuer_reads += usize::from(is_issuer);
            }
            // The agent reads no Secret of any name (outside local-CA mode).
            if name == "mesh-agent" && dir != "examples/local-ca" {
                let reads = secret_reads(pod);
                assert!(reads.is_empty(), "deploy/{dir}: the agent reads {reads:?}");
            }
        }
    }
    // The check saw the issuer's own mount (it is not vacuous).
    assert!(
        issuer_reads > 0,
        "the issuer's mount of {CA_SECRET} not seen"
    );
}

#[test]
fn nothing_bound_to_the_agent_grants_secrets() {
    for (dir, o) in all_renders() {
        let agent_grants: Vec<_> = grants(o)
            .into_iter()
            .filter(|g| names_sa(g.subject, AGENT_SA))
            .collect();
        if agent_daemon_set(o).is_some() {
            assert!(
                !agent_grants.is_empty(),
                "deploy/{dir}: the agent has no RBAC"
            );
        }
        for g in agent_grants {
            assert!(
                !touches_secrets(g.rule),
                "deploy/{dir}: {} gives {} (the agent) {:?} in {:?}: the agent \
                 must have no access to secrets",
                g.binding,
                subject_id(g.subject),
                g.rule,
                g.namespace
            );
        }
    }
}

#[test]
fn only_the_issuer_can_read_the_ca_secret() {
    for (dir, o) in all_renders() {
        let readers: BTreeSet<String> = grants(o)
            .into_iter()
            .filter(|g| {
                g.namespace.as_deref().is_none_or(|ns| ns == "mesh-system")
                    && reads_secret(g.rule, CA_SECRET)
            })
            .map(|g| subject_id(g.subject))
            .collect();
        let has_issuer = o
            .deployments
            .iter()
            .any(|d| d.metadata.name.as_deref() == Some(ISSUER.2));
        let want: BTreeSet<String> = if has_issuer {
            [format!("ServiceAccount {}/{}", ISSUER_SA.0, ISSUER_SA.1)].into()
        } else {
            BTreeSet::new()
        };
        assert_eq!(
            readers, want,
            "deploy/{dir}: who can read Secret {CA_SECRET}"
        );
    }
    // Every rule of every role is read-only, but the issuer's TokenReview;
    // no wildcards, no subresources (pods/exec and the like).
    for (dir, o) in all_renders() {
        let roles = o
            .cluster_roles
            .iter()
            .map(|r| (r.metadata.name.clone(), r.rules.as_deref()))
            .chain(
                o.roles
                    .iter()
                    .map(|r| (r.metadata.name.clone(), r.rules.as_deref())),
            );
        for (role, rules) in roles {
            for rule in rules.unwrap_or_default() {
                let groups = rule.api_groups.as_deref().unwrap_or_default();
                let resources = rule.resources.as_deref().unwrap_or_default();
                for x in groups.iter().chain(resources).chain(&rule.verbs) {
                    assert!(
                        x != "*" && !x.contains('/'),
                        "deploy/{dir}: {role:?}: {rule:?}"
                    );
                }
                let token_review = role.as_deref() == Some("mesh-ca")
                    && groups == ["authentication.k8s.io"]
                    && resources == ["tokenreviews"]
                    && rule.verbs == ["create"];
                if !token_review {
                    for v in &rule.verbs {
                        assert!(
                            ["get", "list", "watch"].contains(&v.as_str()),
                            "deploy/{dir}: {role:?} grants {v}: {rule:?}"
                        );
                    }
                }
            }
        }
    }
    // The issuer's own roles: exactly what the contract says.
    let o = &all_renders()[""];
    let rules = |rules: Option<&[PolicyRule]>| -> BTreeSet<String> {
        rules
            .unwrap_or_default()
            .iter()
            .map(|r| {
                format!(
                    "{:?} {:?} {:?} {:?}",
                    r.verbs, r.api_groups, r.resources, r.resource_names
                )
            })
            .collect()
    };
    let issuer_role = o
        .cluster_roles
        .iter()
        .find(|r| r.metadata.name.as_deref() == Some("mesh-ca"))
        .expect("ClusterRole mesh-ca");
    assert_eq!(
        rules(issuer_role.rules.as_deref()),
        [
            r#"["create"] Some(["authentication.k8s.io"]) Some(["tokenreviews"]) None"#.to_owned(),
            r#"["get", "list"] Some([""]) Some(["pods"]) None"#.to_owned(),
        ]
        .into()
    );
    let secret_role = o
        .roles
        .iter()
        .find(|r| r.metadata.name.as_deref() == Some("mesh-ca-secret"))
        .expect("Role mesh-ca-secret");
    assert_eq!(
        secret_role.metadata.namespace.as_deref(),
        Some("mesh-system")
    );
    assert_eq!(
        rules(secret_role.rules.as_deref()),
        [r#"["get"] Some([""]) Some(["secrets"]) Some(["mesh-ca"])"#.to_owned()].into()
    );
}

/// The mount of `path`'s directory in `c`, and the volume behind it.
fn volume_at<'a>(pod: &'a PodSpec, c: &Container, path: &str) -> (&'a Volume, String) {
    let (dir, file) = path.rsplit_once('/').expect("a file path");
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path.trim_end_matches('/') == dir)
        .unwrap_or_else(|| panic!("{path}: no volume mounted at {dir} in {}", c.name));
    assert_eq!(m.read_only, Some(true), "{dir} is mounted read-only");
    assert!(m.sub_path.is_none(), "{dir}: no subPath");
    let v = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == m.name)
        .unwrap_or_else(|| panic!("no volume {}", m.name));
    (v, file.to_owned())
}

#[test]
fn the_agents_issuer_flags_match_the_issuer() {
    let o = &all_renders()[""];
    let agent_pod = agent_daemon_set(o).expect("agent");
    let agent = container(&agent_pod.containers, "agent");
    let agent_args = agent.args.as_deref().expect("agent args");
    let issuer = o
        .deployments
        .iter()
        .find(|d| d.metadata.name.as_deref() == Some(ISSUER.2))
        .expect("issuer");
    let issuer_pod = pod_spec_of_deployment(issuer);
    let server = container(&issuer_pod.containers, "ca");
    let server_args = server.args.as_deref().expect("issuer args");
    let arg = |args: &[String], name: &str| -> String {
        flag(args, name)
            .unwrap_or_else(|| panic!("--{name} missing in {args:?}"))
            .to_owned()
    };

    assert_eq!(arg(agent_args, "issuer"), "istio-ca");
    // The address: the issuer's Service, its port reaching the port the
    // issuer listens on, and the name in the issuer's certificate.
    let address = arg(agent_args, "ca-address");
    let host_port = address
        .strip_prefix("https://")
        .unwrap_or_else(|| panic!("--ca-address {address} is not https"));
    let (host, port) = host_port.rsplit_once(':').expect("host:port");
    let port: i32 = port.parse().expect("port");
    assert_eq!(arg(server_args, "dns-name"), host);
    let mut labels = host.split('.');
    let (svc_name, svc_ns) = (labels.next().expect("name"), labels.next().expect("ns"));
    assert_eq!(labels.collect::<Vec<_>>(), ["svc"], "{host}");
    let svc = o
        .services
        .iter()
        .find(|s| {
            s.metadata.name.as_deref() == Some(svc_name)
                && s.metadata.namespace.as_deref() == Some(svc_ns)
        })
        .unwrap_or_else(|| panic!("no Service {svc_ns}/{svc_name}"));
    let svc_spec = svc.spec.as_ref().expect("spec");
    let pod_labels = issuer
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    for (k, v) in svc_spec.selector.iter().flatten() {
        assert_eq!(pod_labels.get(k), Some(v), "the Service selects the issuer");
    }
    let svc_port = svc_spec
        .ports
        .iter()
        .flatten()
        .find(|p| p.port == port)
        .unwrap_or_else(|| panic!("Service {svc_name} has no port {port}"));
    let container_port = match svc_port.target_port.as_ref() {
        None => port,
        Some(IntOrString::Int(p)) => *p,
        Some(IntOrString::String(name)) => {
            server
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .unwrap_or_else(|| panic!("no container port named {name}"))
                .container_port
        }
    };
    let listen = arg(server_args, "listen");
    assert_eq!(listen, format!("0.0.0.0:{container_port}"));
    for probe in [&server.readiness_probe, &server.liveness_probe] {
        let tcp = probe
            .as_ref()
            .and_then(|p| p.tcp_socket.as_ref())
            .expect("tcpSocket probe");
        assert_eq!(tcp.port, IntOrString::Int(container_port));
    }

    // The root: the public certificate from the ConfigMap, nothing else.
    let root = arg(agent_args, "ca-root-cert");
    let (volume, file) = volume_at(agent_pod, agent, &root);
    let cm = volume
        .config_map
        .as_ref()
        .unwrap_or_else(|| panic!("{root}: not from a ConfigMap: {volume:?}"));
    assert_eq!(cm.name, "mesh-ca-root");
    let key = match cm.items.as_deref() {
        None => file.clone(),
        Some(items) => items
            .iter()
            .find(|i| i.path == file)
            .unwrap_or_else(|| panic!("{file} not projected from mesh-ca-root"))
            .key
            .clone(),
    };
    assert_eq!(key, "root-cert.pem");

    // The token: a projected service-account token whose audience is the
    // one the issuer accepts, short-lived.
    let token = arg(agent_args, "ca-token-file");
    let (volume, file) = volume_at(agent_pod, agent, &token);
    let sources = volume
        .projected
        .as_ref()
        .and_then(|p| p.sources.as_deref())
        .unwrap_or_else(|| panic!("{token}: not a projected volume: {volume:?}"));
    let sat = sources
        .iter()
        .filter_map(|s| s.service_account_token.as_ref())
        .find(|t| t.path == file)
        .unwrap_or_else(|| panic!("{token}: no serviceAccountToken at {file}"));
    assert_eq!(
        sat.audience.as_deref(),
        Some(arg(server_args, "audience").as_str()),
        "the agent's token audience is the issuer's --audience"
    );
    assert_eq!(arg(server_args, "audience"), "istio-ca");
    assert_eq!(sat.expiration_seconds, Some(3600));

    // The issuer trusts the agents' service account, in the same trust
    // domain.
    let agent_sa = agent_pod.service_account_name.as_deref().expect("agent SA");
    let agent_ns = o.daemon_sets[0].metadata.namespace.as_deref().expect("ns");
    assert_eq!(
        arg(server_args, "node-service-account"),
        format!("{agent_ns}/{agent_sa}")
    );
    assert_eq!(
        arg(server_args, "trust-domain"),
        flag(agent_args, "trust-domain").unwrap_or("cluster.local")
    );

    // The issuer reads its key from the Secret's mount.
    let ca_dir = arg(server_args, "ca-dir");
    let (volume, _) = volume_at(issuer_pod, server, &format!("{ca_dir}/ca.key"));
    let secret = volume.secret.as_ref().expect("the CA dir is a Secret");
    assert_eq!(secret.secret_name.as_deref(), Some(CA_SECRET));
    if let Some(items) = &secret.items {
        let files: BTreeSet<&str> = items.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(files, ["ca.crt", "ca.key"].into());
    }
}

#[test]
fn issuer_deployment_is_hardened() {
    let o = &all_renders()[""];
    let issuer = o
        .deployments
        .iter()
        .find(|d| d.metadata.name.as_deref() == Some(ISSUER.2))
        .expect("issuer");
    assert_eq!(issuer.metadata.namespace.as_deref(), Some(ISSUER.1));
    let replicas = issuer.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    assert!((1..=2).contains(&replicas), "replicas {replicas}");
    let pod = pod_spec_of_deployment(issuer);
    assert_eq!(pod.service_account_name.as_deref(), Some(ISSUER_SA.1));
    assert_eq!(pod.automount_service_account_token, Some(true));
    for (what, on) in [
        ("hostNetwork", pod.host_network),
        ("hostPID", pod.host_pid),
        ("hostIPC", pod.host_ipc),
    ] {
        assert_ne!(on, Some(true), "{what}");
    }
    for v in pod.volumes.iter().flatten() {
        assert!(v.host_path.is_none(), "no host mounts: {v:?}");
    }
    let psc = pod.security_context.as_ref().expect("pod securityContext");
    assert_eq!(psc.run_as_non_root, Some(true));
    assert!(psc.run_as_user.is_some_and(|u| u != 0));
    assert_eq!(
        psc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
        Some("RuntimeDefault")
    );
    assert!(
        pod.init_containers
            .as_deref()
            .unwrap_or_default()
            .is_empty()
    );
    assert_eq!(pod.containers.len(), 1);
    let c = container(&pod.containers, "ca");
    let args = c.args.as_deref().expect("args");
    assert_eq!(&args[..2], ["ca", "serve"]);
    assert!(
        c.command
            .as_deref()
            .is_none_or(|cmd| cmd.len() == 1 && cmd[0].ends_with("/mesh-agent")),
        "{:?}",
        c.command
    );
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_ne!(sc.privileged, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_ne!(sc.run_as_user, Some(0));
    assert_ne!(sc.run_as_non_root, Some(false));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert!(caps.add.as_deref().unwrap_or_default().is_empty());
    assert!(
        sc.seccomp_profile
            .as_ref()
            .is_none_or(|p| p.type_ == "RuntimeDefault")
    );
    let res = c.resources.as_ref().expect("resources");
    for set in [&res.requests, &res.limits] {
        let set = set.as_ref().expect("requests and limits");
        assert!(set.contains_key("cpu") && set.contains_key("memory"));
    }
    // Its one mount: the CA, read-only.
    let mounts: Vec<(&str, bool)> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.mount_path.as_str(), m.read_only == Some(true)))
        .collect();
    assert_eq!(mounts, [("/etc/mesh/ca", true)]);
}

#[test]
fn local_ca_is_the_only_overlay_giving_the_agent_the_key() {
    let renders = all_renders();
    let mut with_key = BTreeSet::new();
    for (dir, o) in renders {
        if let Some(pod) = agent_daemon_set(o)
            && secret_reads(pod).iter().any(|(_, s, _)| s == CA_SECRET)
        {
            with_key.insert(dir.as_str());
        }
    }
    assert_eq!(with_key, ["examples/local-ca"].into());

    // The overlay: the agent signs locally with the mounted Secret; the
    // rest of its flags are the default agent's.
    let local = &renders["examples/local-ca"];
    assert!(local.deployments.is_empty(), "no issuer in local-CA mode");
    let pod = agent_daemon_set(local).expect("agent");
    let agent = container(&pod.containers, "agent");
    let args = agent.args.as_deref().expect("args");
    assert_eq!(flag(args, "issuer"), Some("local"));
    let ca_dir = flag(args, "ca-dir").expect("--ca-dir");
    let (volume, _) = volume_at(pod, agent, &format!("{ca_dir}/ca.key"));
    let secret = volume.secret.as_ref().expect("the CA dir is the Secret");
    assert_eq!(secret.secret_name.as_deref(), Some(CA_SECRET));
    assert_eq!(secret.default_mode, Some(0o400));
    for f in ["ca-address", "ca-root-cert", "ca-token-file"] {
        assert_eq!(flag(args, f), None, "--{f} in local-CA mode: {args:?}");
    }
    // Neither the root ConfigMap (not created in this mode: the pod would
    // not start) nor the token.
    for v in pod.volumes.iter().flatten() {
        assert!(v.config_map.is_none() && v.projected.is_none(), "{v:?}");
    }
    let issuer_flags = [
        "issuer",
        "ca-address",
        "ca-root-cert",
        "ca-token-file",
        "ca-dir",
    ];
    let others = |args: &[String]| -> Vec<String> {
        args.iter()
            .filter(|a| {
                !issuer_flags
                    .iter()
                    .any(|f| a.starts_with(&format!("--{f}=")) || **a == format!("--{f}"))
            })
            .cloned()
            .collect()
    };
    for dir in ["examples/local-ca", "examples/istiod-ca"] {
        let pod = agent_daemon_set(&renders[dir]).expect("agent");
        assert_eq!(
            others(
                container(&pod.containers, "agent")
                    .args
                    .as_deref()
                    .unwrap_or_default()
            ),
            others(
                container(
                    &agent_daemon_set(&renders[""]).expect("agent").containers,
                    "agent"
                )
                .args
                .as_deref()
                .unwrap_or_default()
            ),
            "deploy/{dir} keeps the default agent's other flags"
        );
    }
}

#[test]
fn istiod_overlay_asks_istiod_like_ztunnel() {
    let o = &all_renders()["examples/istiod-ca"];
    assert!(o.crds.is_empty(), "Istio owns the CRDs");
    assert!(o.deployments.is_empty(), "istiod is the CA");
    let pod = agent_daemon_set(o).expect("agent");
    let agent = container(&pod.containers, "agent");
    let args = agent.args.as_deref().expect("args");
    assert_eq!(flag(args, "issuer"), Some("istio-ca"));
    assert_eq!(
        flag(args, "ca-address"),
        Some("https://istiod.istio-system.svc:15012")
    );
    let (volume, file) = volume_at(pod, agent, flag(args, "ca-root-cert").expect("root"));
    let cm = volume.config_map.as_ref().expect("root from a ConfigMap");
    assert_eq!(cm.name, "istio-ca-root-cert");
    let key = cm
        .items
        .iter()
        .flatten()
        .find(|i| i.path == file)
        .map_or(file.clone(), |i| i.key.clone());
    assert_eq!(key, "root-cert.pem");
    let (volume, file) = volume_at(pod, agent, flag(args, "ca-token-file").expect("token"));
    let sat = volume
        .projected
        .iter()
        .flat_map(|p| p.sources.iter().flatten())
        .filter_map(|s| s.service_account_token.as_ref())
        .find(|t| t.path == file)
        .expect("token");
    assert_eq!(
        sat.audience.as_deref(),
        Some("istio-ca"),
        "istiod's audience"
    );
}

#[test]
fn ca_secret_example_generates_the_key_secret_and_a_public_root() {
    let o = &all_renders()["examples/ca-secret"];
    assert_eq!(o.secrets.len(), 1);
    let secret = &o.secrets[0];
    assert_eq!(secret.metadata.name.as_deref(), Some(CA_SECRET));
    assert_eq!(secret.metadata.namespace.as_deref(), Some("mesh-system"));
    let data: BTreeMap<&str, &[u8]> = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.as_str(), v.0.as_slice()))
        .collect();
    assert_eq!(
        data,
        [
            ("ca.crt", FAKE_CA_CRT.as_bytes()),
            ("ca.key", FAKE_CA_KEY.as_bytes())
        ]
        .into()
    );
    // The root ConfigMap: the certificate, and not the key.
    assert_eq!(o.config_maps.len(), 1);
    let cm = &o.config_maps[0];
    assert_eq!(cm.metadata.name.as_deref(), Some("mesh-ca-root"));
    assert_eq!(cm.metadata.namespace.as_deref(), Some("mesh-system"));
    let data: BTreeMap<&str, &str> = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(data, [("root-cert.pem", FAKE_CA_CRT)].into());
    assert!(cm.binary_data.is_none());
    // With the rest of the default: the issuer and the agents.
    assert!(agent_daemon_set(o).is_some());
    assert_eq!(o.deployments.len(), 1);
}

/// The version of each traffic-management CRD the agent watches (its
/// `sync/kube/watches.rs` table), which must be served and stored.
const ROUTING_CRDS: [(&str, &str, &str, &[&str]); 4] = [
    (
        "destinationrules.networking.istio.io",
        "DestinationRule",
        "v1",
        &["v1", "v1alpha3", "v1beta1"],
    ),
    (
        "virtualservices.networking.istio.io",
        "VirtualService",
        "v1",
        &["v1", "v1alpha3", "v1beta1"],
    ),
    (
        "tcproutes.gateway.networking.k8s.io",
        "TCPRoute",
        "v1alpha2",
        &["v1alpha2"],
    ),
    (
        "httproutes.gateway.networking.k8s.io",
        "HTTPRoute",
        "v1",
        &["v1", "v1beta1"],
    ),
];

fn crd<'a>(o: &'a Objects, name: &str) -> &'a CustomResourceDefinition {
    o.crds
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no CRD {name}"))
}

fn schema_of(
    v: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinitionVersion,
) -> &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps {
    v.schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("structural schema")
}

#[test]
fn routing_crds_serve_what_the_agent_watches() {
    let o = rendered();
    for (name, kind, stored, served) in ROUTING_CRDS {
        let c = crd(&o, name);
        let spec = &c.spec;
        assert_eq!(format!("{}.{}", spec.names.plural, spec.group), name);
        assert_eq!(spec.names.kind, kind);
        assert_eq!(spec.scope, "Namespaced");
        let versions: BTreeMap<&str, (bool, bool)> = spec
            .versions
            .iter()
            .map(|v| (v.name.as_str(), (v.served, v.storage)))
            .collect();
        let want: BTreeMap<&str, (bool, bool)> =
            served.iter().map(|v| (*v, (true, *v == stored))).collect();
        assert_eq!(versions, want, "{name}: served versions, {stored} stored");
        // One schema for every version (no conversion webhook needed).
        let first = serde_json::to_value(schema_of(&spec.versions[0])).expect("schema");
        for v in &spec.versions {
            let schema = schema_of(v);
            assert_eq!(
                serde_json::to_value(schema).expect("schema"),
                first,
                "{name} {}",
                v.name
            );
            assert_eq!(schema.type_.as_deref(), Some("object"));
            let props = schema.properties.as_ref().expect("properties");
            let spec_schema = &props["spec"];
            assert_eq!(spec_schema.type_.as_deref(), Some("object"), "{name}");
            assert_eq!(
                spec_schema.x_kubernetes_preserve_unknown_fields,
                Some(true),
                "{name}: fields the agent does not type are kept"
            );
            assert!(
                v.subresources.as_ref().is_some_and(|s| s.status.is_some()),
                "{name}: status subresource"
            );
        }
    }
    // What the upstream CRDs require, required here too.
    let dr = schema_of(
        &crd(&o, "destinationrules.networking.istio.io")
            .spec
            .versions[0],
    );
    let dr_spec = &dr.properties.as_ref().expect("properties")["spec"];
    assert_eq!(dr_spec.required.as_deref(), Some(&["host".to_owned()][..]));
    let tcp = crd(&o, "tcproutes.gateway.networking.k8s.io");
    // A group ending in .k8s.io is refused by the API server without it.
    assert!(
        tcp.metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key("api-approved.kubernetes.io")),
        "api-approved.kubernetes.io annotation"
    );
    let route = schema_of(&tcp.spec.versions[0]);
    let route_spec = &route.properties.as_ref().expect("properties")["spec"];
    assert_eq!(
        route_spec.required.as_deref(),
        Some(&["rules".to_owned()][..])
    );
    let props = route_spec.properties.as_ref().expect("spec properties");
    let rules = &props["rules"];
    assert_eq!((rules.min_items, rules.max_items), (Some(1), Some(16)));
    let items = |p: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps| match p.items.as_ref() {
        Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(s)) => s.as_ref().clone(),
        other => panic!("items: {other:?}"),
    };
    let backend_refs = &items(rules).properties.expect("rule properties")["backendRefs"];
    assert_eq!(backend_refs.max_items, Some(16));
    let backend = items(backend_refs)
        .properties
        .expect("backendRef properties");
    // The Gateway API's defaults: a backend is a core Service of weight 1.
    let default = |p: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps| p.default.as_ref().map(|d| d.0.clone());
    assert_eq!(default(&backend["group"]), Some(serde_json::json!("")));
    assert_eq!(
        default(&backend["kind"]),
        Some(serde_json::json!("Service"))
    );
    assert_eq!(default(&backend["weight"]), Some(serde_json::json!(1)));
    assert_eq!(backend["weight"].maximum, Some(1_000_000.0));
    let parent = items(&props["parentRefs"])
        .properties
        .expect("parentRef properties");
    assert_eq!(default(&parent["kind"]), Some(serde_json::json!("Gateway")));
    assert_eq!(
        default(&parent["group"]),
        Some(serde_json::json!("gateway.networking.k8s.io"))
    );
}

#[test]
fn rbac_on_routing_objects_is_read_only() {
    let o = rendered();
    let mut verbs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for rule in o
        .cluster_roles
        .iter()
        .flat_map(|r| r.rules.iter().flatten())
    {
        for group in rule.api_groups.iter().flatten() {
            if group != "networking.istio.io" && group != "gateway.networking.k8s.io" {
                continue;
            }
            for r in rule.resources.iter().flatten() {
                verbs
                    .entry(format!("{r}.{group}"))
                    .or_default()
                    .extend(rule.verbs.iter().cloned());
            }
        }
    }
    let read: BTreeSet<String> = ["get", "list", "watch"].map(str::to_owned).into();
    // Gateways too: who may bind to a waypoint (their CRD comes with the
    // Gateway API, which a cluster with waypoints has installed).
    let want: BTreeMap<String, BTreeSet<String>> = ROUTING_CRDS
        .iter()
        .map(|(name, ..)| *name)
        .chain(["gateways.gateway.networking.k8s.io"])
        .map(|name| (name.to_owned(), read.clone()))
        .collect();
    assert_eq!(verbs, want, "exactly get/list/watch on the routing kinds");
    // Nothing else of those groups (no wildcard, no other kind).
    for role in &o.roles {
        for rule in role.rules.iter().flatten() {
            for group in rule.api_groups.iter().flatten() {
                assert!(!group.contains("networking"), "Role on {group}");
            }
        }
    }
}

/// Renders `deploy/` through an overlay (in a scratch directory) that
/// uses `components` of `deploy/components/`.
fn rendered_with(components: &[&str]) -> Objects {
    let scratch = std::env::temp_dir().join(format!(
        "mesh-deploy-overlay-{}-{}",
        std::process::id(),
        components.join("+")
    ));
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let deploy = deploy_dir().canonicalize().expect("deploy dir");
    let scratch = scratch.canonicalize().expect("scratch dir");
    // kustomize takes relative paths only: up to / from the scratch dir.
    let up = "../".repeat(scratch.components().count() - 1);
    let rel = format!(
        "{up}{}",
        deploy.display().to_string().trim_start_matches('/')
    );
    let list: Vec<String> = components
        .iter()
        .map(|c| format!("{rel}/components/{c}"))
        .collect();
    std::fs::write(
        scratch.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [{rel}]\ncomponents: [{}]\n",
            list.join(", ")
        ),
    )
    .expect("write overlay");
    let text = kustomize(&scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    let mut objects = Objects::default();
    parse_documents("overlay", &text, &mut objects);
    objects
}

#[test]
fn components_skip_the_crds_a_cluster_already_has() {
    let names = |o: &Objects| -> Vec<String> {
        let mut v: Vec<String> = o
            .crds
            .iter()
            .filter_map(|c| c.metadata.name.clone())
            .collect();
        v.sort();
        v
    };
    let full = rendered();
    let istio = rendered_with(&["istio-installed"]);
    assert_eq!(
        names(&istio),
        [
            "httproutes.gateway.networking.k8s.io",
            "tcproutes.gateway.networking.k8s.io"
        ]
    );
    let gateway = rendered_with(&["gateway-api-installed"]);
    assert_eq!(
        names(&gateway),
        [
            "authorizationpolicies.security.istio.io",
            "destinationrules.networking.istio.io",
            "peerauthentications.security.istio.io",
            "virtualservices.networking.istio.io",
        ]
    );
    let both = rendered_with(&["istio-installed", "gateway-api-installed"]);
    assert!(names(&both).is_empty(), "{:?}", names(&both));
    // The agent itself is untouched by either.
    for o in [&istio, &gateway, &both] {
        assert_eq!(o.daemon_sets.len(), full.daemon_sets.len());
        assert_eq!(o.cluster_roles.len(), full.cluster_roles.len());
        assert_eq!(o.namespaces.len(), 1);
    }
}

/// deploy/waypoint/ rendered (with its Gateway, added as an overlay would).
fn waypoint_rendered() -> Objects {
    let dir = deploy_dir().join("waypoint");
    let mut o = Objects::default();
    parse_documents(
        "kubectl kustomize deploy/waypoint",
        &kustomize(&dir),
        &mut o,
    );
    let gateway = std::fs::read_to_string(dir.join("gateway.yaml")).expect("gateway.yaml");
    parse_documents("deploy/waypoint/gateway.yaml", &gateway, &mut o);
    o
}

#[test]
fn waypoint_holds_no_ca_key_runs_non_root_and_asks_the_issuer_for_itself() {
    let o = waypoint_rendered();
    assert_eq!(o.deployments.len(), 1);
    let d = &o.deployments[0];
    let pod = pod_spec_of_deployment(d);
    assert_eq!(pod.service_account_name.as_deref(), Some("waypoint"));
    // No Secret at all: not the CA key, not anything else.
    assert!(secret_reads(pod).is_empty(), "{:?}", secret_reads(pod));
    let c = container(&pod.containers, "waypoint");
    let args = c.args.as_deref().unwrap_or_default();
    assert_eq!(flag(args, "issuer"), Some("istio-ca"), "{args:?}");
    assert_eq!(flag(args, "ca-dir"), None, "{args:?}");
    assert_eq!(flag(args, "config"), None, "Kubernetes mode: {args:?}");
    assert!(args.iter().any(|a| a == "--kube"), "{args:?}");
    // Its own projected token, for the CA's audience, at the flag's path.
    let token = flag(args, "ca-token-file").expect("--ca-token-file");
    let (volume, file) = volume_at(pod, c, token);
    let projected = volume
        .projected
        .iter()
        .flat_map(|p| p.sources.iter().flatten())
        .find_map(|s| s.service_account_token.as_ref())
        .expect("a projected service-account token");
    assert_eq!(projected.audience.as_deref(), Some("istio-ca"));
    assert_eq!(projected.path, file);
    // The root certificate only, from a ConfigMap.
    let root = flag(args, "ca-root-cert").expect("--ca-root-cert");
    let (root_volume, _) = volume_at(pod, c, root);
    assert!(root_volume.config_map.is_some(), "{root_volume:?}");
    // Non-root, read-only root filesystem, no capability.
    let pod_sc = pod.security_context.as_ref().expect("pod securityContext");
    assert_eq!(pod_sc.run_as_non_root, Some(true));
    assert!(pod_sc.run_as_user.is_some_and(|u| u != 0));
    let sc = c
        .security_context
        .as_ref()
        .expect("container securityContext");
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.privileged, None);
    assert_eq!(
        sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_owned()])
    );
    assert!(sc.capabilities.as_ref().is_some_and(|c| c.add.is_none()));
    // Probes on readiness, metrics port named, resources bounded.
    let port = |name: &str| {
        c.ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("port {name}"))
            .container_port
    };
    // The pod IP serves metrics (capped) and readiness (capped per source
    // address, for the kubelet); the configuration dump (the admin listener, its default)
    // stays on loopback.
    assert_eq!(
        flag(args, "metrics"),
        Some(format!("0.0.0.0:{}", port("metrics")).as_str())
    );
    assert_eq!(
        flag(args, "readiness"),
        Some(format!("0.0.0.0:{}", port("health")).as_str())
    );
    assert_eq!(
        flag(args, "admin"),
        None,
        "the admin listener's default is loopback"
    );
    // Both probes on the readiness listener: on the metrics port, capped
    // in all, any pod holding its 64 connections would get the
    // waypoint marked unready and restarted.
    for probe in [&c.readiness_probe, &c.liveness_probe] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("HTTP probe");
        assert_eq!(get.path.as_deref(), Some("/healthz/ready"));
        assert_eq!(get.port, IntOrString::String("health".into()));
    }
    let resources = c.resources.as_ref().expect("resources");
    assert!(resources.requests.is_some() && resources.limits.is_some());
}

#[test]
fn waypoint_service_is_named_like_its_gateway_and_rbac_is_read_only() {
    let o = waypoint_rendered();
    assert_eq!(o.services.len(), 1);
    assert_eq!(o.gateways.len(), 1);
    let svc = &o.services[0];
    let gateway = &o.gateways[0];
    assert_eq!(
        svc.metadata.name.as_deref(),
        gateway["metadata"]["name"].as_str()
    );
    assert_eq!(gateway["spec"]["gatewayClassName"], "istio-waypoint");
    // The node agents' waypoint lookup: port 15008, never itself a waypoint user.
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    assert!(ports.iter().any(|p| p.port == 15008), "{ports:?}");
    assert_eq!(
        svc.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("gateway.istio.io/managed"))
            .map(String::as_str),
        Some("istio.io-mesh-controller")
    );
    // The Service selects the Deployment's pods.
    let selector = svc
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .expect("selector");
    let pod_labels = o.deployments[0]
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .expect("pod labels");
    assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
    // RBAC: get/list/watch only, no Secret, no wildcard, bound to the SA.
    let read = ["get", "list", "watch"];
    let mut resources = BTreeSet::new();
    for rule in o
        .cluster_roles
        .iter()
        .flat_map(|r| r.rules.iter().flatten())
        .chain(o.roles.iter().flat_map(|r| r.rules.iter().flatten()))
    {
        assert!(
            rule.verbs.iter().all(|v| read.contains(&v.as_str())),
            "{rule:?}"
        );
        assert!(!touches_secrets(rule), "{rule:?}");
        for r in rule.resources.iter().flatten() {
            assert_ne!(r, "*", "no wildcard");
            resources.insert(r.clone());
        }
    }
    for want in [
        "services",
        "pods",
        "namespaces",
        "endpointslices",
        "httproutes",
    ] {
        assert!(resources.contains(want), "{want} readable: {resources:?}");
    }
    let ns = svc.metadata.namespace.clone().expect("namespace");
    assert!(o.cluster_role_bindings.iter().all(|b| {
        b.subjects
            .iter()
            .flatten()
            .all(|s| names_sa(s, (&ns, "waypoint")))
    }));
}

//! Every manifest in `deploy/` parses into its typed Kubernetes object (and
//! back without losing a field, so a misspelt field fails here, not in a
//! cluster), `kubectl kustomize deploy/` renders, and the rendered objects
//! keep the invariants the agent relies on: capabilities, mounts, env,
//! probe, update strategy, read-only RBAC.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, Namespace, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
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
    /// kustomize Components: (file, document).
    components: Vec<(String, Value)>,
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
        let doc: Value = serde::Deserialize::deserialize(de)
            .unwrap_or_else(|e| panic!("{origin}: document {i} is not YAML: {e}"));
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
            ("kustomize.config.k8s.io/v1beta1", "Kustomization") => {
                check_kustomization(origin, &doc)
            }
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
    assert_eq!(objects.crds.len(), 5);
    assert_eq!(objects.components.len(), 2);
    assert_eq!(objects.namespaces.len(), 1);
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
    assert_eq!(o.service_accounts.len(), 1);
    assert_eq!(o.daemon_sets.len(), 1);
    let mut crds = names(o.crds.iter().map(|c| c.metadata.name.clone()).collect());
    crds.sort();
    assert_eq!(
        crds,
        [
            "authorizationpolicies.security.istio.io",
            "destinationrules.networking.istio.io",
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
        ("/etc/mesh/ca", ("secret:mesh-ca", None, true)),
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
fn rbac_is_read_only_and_secrets_are_limited_to_the_mesh_ca() {
    let o = rendered();
    let read = ["get", "list", "watch"];
    let mut resources = BTreeSet::new();
    assert_eq!(o.cluster_roles.len(), 1);
    for rule in o.cluster_roles[0].rules.iter().flatten() {
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
    assert_eq!(o.roles.len(), 1);
    let role = &o.roles[0];
    assert_eq!(role.metadata.namespace.as_deref(), Some("mesh-system"));
    let rules = role.rules.as_ref().expect("rules");
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["secrets".to_owned()][..])
    );
    assert_eq!(
        rules[0].resource_names.as_deref(),
        Some(&["mesh-ca".to_owned()][..])
    );
    for verb in &rules[0].verbs {
        assert!(read.contains(&verb.as_str()), "Role verb {verb}");
    }
    // Both bindings give their role to the agent's service account only.
    let subjects: Vec<_> = o
        .cluster_role_bindings
        .iter()
        .flat_map(|b| b.subjects.iter().flatten())
        .chain(
            o.role_bindings
                .iter()
                .flat_map(|b| b.subjects.iter().flatten()),
        )
        .map(|s| {
            (
                s.kind.clone(),
                s.name.clone(),
                s.namespace.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(subjects.len(), 2);
    for s in subjects {
        assert_eq!(
            s,
            (
                "ServiceAccount".to_owned(),
                "mesh-agent".to_owned(),
                "mesh-system".to_owned()
            )
        );
    }
    assert_eq!(o.cluster_role_bindings[0].role_ref.name, "mesh-agent");
    assert_eq!(o.role_bindings[0].role_ref.name, "mesh-agent-ca");
}

/// The version of each traffic-management CRD the agent watches (its
/// `sync/kube/watches.rs` table), which must be served and stored.
const ROUTING_CRDS: [(&str, &str, &str, &[&str]); 3] = [
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
    let want: BTreeMap<String, BTreeSet<String>> = ROUTING_CRDS
        .iter()
        .map(|(name, ..)| ((*name).to_owned(), read.clone()))
        .collect();
    assert_eq!(verbs, want, "exactly get/list/watch on the three kinds");
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
    assert_eq!(names(&istio), ["tcproutes.gateway.networking.k8s.io"]);
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

//! `mesh-agent check` on workload files with policies: it compiles them as
//! the agent would and fails, naming the policy and the field, on any
//! policy error. Runs the real binary; needs no root and no lab.

use std::path::PathBuf;
use std::process::Output;

/// A scratch directory for this test binary, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("mesh-check-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }

    /// Runs `mesh-agent check` on a workload file with `policies` (YAML list items).
    fn check(&self, policies: &str) -> Output {
        let path = self.0.join("workloads.yaml");
        let text = format!(
            "node:\n  name: node-1\npods:\n  - name: web\n    namespace: shop\n    node: node-2\n    ips: [\"198.18.2.10\"]\npolicies:\n{policies}"
        );
        std::fs::write(&path, text).expect("write workload file");
        std::process::Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
            .args(["check", "--workloads"])
            .arg(&path)
            .env_remove("MESH_ROOT_NAMESPACE")
            .output()
            .expect("run mesh-agent check")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn authz(name: &str, spec: &str) -> String {
    format!(
        "  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    metadata: {{name: {name}, namespace: shop}}\n    spec: {spec}\n"
    )
}

/// A DENY with a bad CIDR at `spec.rules[0].from[0].source.ipBlocks[0]`.
fn bad_cidr() -> String {
    authz(
        "deny-bad-cidr",
        "{action: DENY, rules: [{from: [{source: {ipBlocks: ['10.0.0.0/33']}}]}]}",
    )
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn check_accepts_valid_policies() {
    let s = Scratch::new("valid");
    let out = s.check(
        &(authz(
            "web-from-front",
            "{rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/front]}}], to: [{operation: {ports: ['8080', '0']}}]}]}",
        ) + &authz(
            "deny-sa",
            "{action: DENY, rules: [{when: [{key: source.serviceAccount, values: [evil/x]}]}]}",
        )),
    );
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("ok (1 pods, 1 enrolled, 2 policies, 0 warnings)"),
        "{stdout}"
    );
}

#[test]
fn check_reports_a_malformed_policy_with_its_name_and_field() {
    let s = Scratch::new("malformed");
    let out = s.check(&(authz("fine", "{rules: [{}]}") + &bad_cidr()));
    let err = stderr(&out);
    assert!(!out.status.success(), "check passed a bad policy: {err}");
    assert!(
        err.contains("error: AuthorizationPolicy shop/deny-bad-cidr rejected: spec.rules[0].from[0].source.ipBlocks[0]: bad CIDR \"10.0.0.0/33\""),
        "{err}"
    );
    assert!(err.contains("1 policy error(s)"), "{err}");
}

#[test]
fn check_reports_an_invalid_dry_run_annotation() {
    let s = Scratch::new("dry-run");
    let out = s.check(
        "  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    metadata: {name: d, namespace: shop, annotations: {istio.io/dry-run: tRuE}}\n    spec: {action: DENY, rules: [{}]}\n",
    );
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("policies[0].metadata.annotations[istio.io/dry-run]")
            && err.contains("AuthorizationPolicy shop/d")
            && err.contains("\"tRuE\""),
        "{err}"
    );
}

#[test]
fn check_rejects_a_policy_the_api_server_would_refuse() {
    let s = Scratch::new("refused");
    // A deny-all without a name: the engine could only drop it.
    let out = s.check(
        "  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    metadata: {namespace: shop}\n    spec: {action: DENY, rules: [{}]}\n",
    );
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("policies[0].metadata.name") && err.contains("missing"),
        "{err}"
    );
    let out = s.check(&authz(
        "both",
        "{action: DENY, selector: {matchLabels: {app: web}}, targetRefs: [{kind: Service, name: web}], rules: [{}]}",
    ));
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("policies[0].spec: AuthorizationPolicy shop/both: only one of selector"),
        "{err}"
    );
}

#[test]
fn check_names_the_field_of_a_policy_error_in_the_file() {
    let s = Scratch::new("located");
    let peer = "  - apiVersion: security.istio.io/v1\n    kind: PeerAuthentication\n    metadata: {name: default, namespace: shop}\n    spec: {mtls: {mode: STRICT}}\n";
    // The bad policy is the file's third, the second AuthorizationPolicy.
    let out = s.check(&(authz("fine", "{rules: [{}]}") + peer + &bad_cidr()));
    let err = stderr(&out);
    assert!(!out.status.success(), "check passed a bad policy: {err}");
    assert!(
        err.contains("workloads.yaml: policies[2].spec.rules[0].from[0].source.ipBlocks[0]\n"),
        "{err}"
    );
}

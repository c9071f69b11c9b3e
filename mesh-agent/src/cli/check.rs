//! `mesh-agent check`: validates a workload file as the running agent would
//! read it, and compiles its policies as the running agent would enforce
//! them, so that a malformed policy is found before it fails closed in
//! production.

use std::path::Path;

use crate::{
    policy::{PolicyStore, parse_value},
    state::Policies,
    sync,
};

/// What compiling a file's policies found.
#[derive(Debug, Default)]
pub struct PolicyCheck {
    /// Policies in force (rejected ones with a fail-closed effect included).
    pub in_force: usize,
    /// Errors (rejected or not enforced policies), one line each.
    pub errors: Vec<String>,
    /// Warnings (policies enforced more strictly than written).
    pub warnings: Vec<String>,
}

/// Compiles `policies` exactly as the agent does on every update
/// (`proxy::authz`): each object through the engine's parser, then one
/// store for all of them.
pub fn compile(policies: &Policies, root_namespace: &str) -> PolicyCheck {
    let mut out = PolicyCheck::default();
    let mut resources = Vec::new();
    let docs = policies
        .authorization
        .iter()
        .chain(&policies.peer_authentication);
    for (i, doc) in docs.enumerate() {
        match serde_yaml::to_value(doc) {
            Ok(value) => {
                let parsed = parse_value(value, i + 1);
                resources.extend(parsed.resources);
                out.errors
                    .extend(parsed.errors.iter().map(ToString::to_string));
            }
            Err(e) => out
                .errors
                .push(format!("policy {}: not representable: {e}", i + 1)),
        }
    }
    let (store, report) = PolicyStore::build(root_namespace, &resources);
    out.in_force = store.authorization_policy_count() + store.peer_authentication_count();
    out.errors
        .extend(report.errors.iter().map(ToString::to_string));
    out.warnings
        .extend(report.warnings.iter().map(ToString::to_string));
    out
}

/// Runs `mesh-agent check`: prints what is wrong to stderr and fails when
/// the file does not validate or a policy has an error.
pub fn run(path: &Path, root_namespace: &str) -> anyhow::Result<()> {
    let file = sync::file::load(path)?;
    let check = compile(&file.policies, root_namespace);
    for w in &check.warnings {
        eprintln!("warning: {w}");
    }
    for e in &check.errors {
        eprintln!("error: {e}");
    }
    if !check.errors.is_empty() {
        anyhow::bail!(
            "{}: {} policy error(s): the agent would reject these policies (fail closed) \
             or not enforce them; fix the fields named above",
            path.display(),
            check.errors.len()
        );
    }
    let enrolled = file.workloads.values().filter(|w| w.enrolled).count();
    println!(
        "{}: ok ({} pods, {} enrolled, {} policies, {} warnings)",
        path.display(),
        file.workloads.len(),
        enrolled,
        check.in_force,
        check.warnings.len()
    );
    Ok(())
}

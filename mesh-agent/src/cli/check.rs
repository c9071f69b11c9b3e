//! `mesh-agent check`: validates a workload file as the running agent would
//! read it, and compiles its policies with the function the agent's state
//! compiles them with ([`state::compile_policies`]), so that a malformed
//! policy is found, with its field in the file, before it fails closed in
//! production.

use std::path::Path;

use crate::{
    state::{self, Finding},
    sync,
};

/// `  at <file>: policies[i].<field>`: where a finding is in the file, when
/// it can be tied to a policy of the file.
fn location<T>(path: &Path, file: &sync::file::WorkloadFile, f: &Finding<T>) -> Option<String> {
    let at = file.policy_field(f.document?)?;
    let at = match &f.field {
        Some(field) if field != "(root)" => format!("{at}.{field}"),
        _ => at,
    };
    Some(format!("  at {}: {at}", path.display()))
}

/// Runs `mesh-agent check`: prints what is wrong to stderr and fails when
/// the file does not validate or a policy has an error.
pub fn run(path: &Path, root_namespace: &str) -> anyhow::Result<()> {
    let file = sync::file::load(path)?;
    let compiled = state::compile_policies(&file.policies, root_namespace);
    let report = &compiled.report;
    for w in &report.warnings {
        eprintln!("warning: {w}");
        if let Some(at) = location(path, &file, w) {
            eprintln!("{at}");
        }
    }
    for e in &report.errors {
        eprintln!("error: {e}");
        if let Some(at) = location(path, &file, e) {
            eprintln!("{at}");
        }
    }
    if !report.errors.is_empty() {
        anyhow::bail!(
            "{}: {} policy error(s): the agent would reject these policies (fail closed) \
             or not enforce them; fix the fields named above",
            path.display(),
            report.errors.len()
        );
    }
    let enrolled = file.workloads.values().filter(|w| w.enrolled).count();
    println!(
        "{}: ok ({} pods, {} enrolled, {} policies, {} warnings)",
        path.display(),
        file.workloads.len(),
        enrolled,
        compiled.in_force(),
        report.warnings.len()
    );
    Ok(())
}

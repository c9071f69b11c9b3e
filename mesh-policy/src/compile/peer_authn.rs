//! Lowering of a PeerAuthentication: its mode, `portLevelMtls` and
//! selector; a rejected one is STRICT.

use std::collections::BTreeMap;

use crate::error::{PolicyName, PolicyWarning, RejectEffect, Report};
use crate::model::{Kind, MutualTls, PeerAuthentication};
use crate::rule::{CompiledPeerAuthn, Scope, WrittenMode};

use super::values::{Problems, compile_selector, port, report_rejected};

/// Lowers a PeerAuthentication; `None` when it has no effect.
pub(crate) fn compile_peer_authn(
    pa: &PeerAuthentication,
    root_namespace: &str,
    report: &mut Report,
) -> Option<(Scope, CompiledPeerAuthn)> {
    let namespace = ap_ns(pa);
    let name = PolicyName::new(namespace, pa.metadata.name.as_deref().unwrap_or_default());
    let created = pa
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.clone())
        .unwrap_or_default();
    let mut problems: Problems = Vec::new();
    let mut scope = Scope {
        namespace: namespace.to_owned(),
        labels: pa.raw_selector.clone().unwrap_or_default(),
    };
    let mut mode = WrittenMode::Strict;
    let mut ports = BTreeMap::new();
    match &pa.spec {
        Err(e) => problems.push((e.field.clone(), e.message.clone())),
        Ok(spec) => {
            match compile_selector(spec.selector.as_ref(), &mut problems) {
                Some(labels) => scope.labels = labels,
                None => scope.labels = BTreeMap::new(),
            }
            mode = written_mode("spec.mtls.mode", spec.mtls.as_ref(), &mut problems);
            if let Some(map) = &spec.port_level_mtls {
                if spec
                    .selector
                    .as_ref()
                    .is_none_or(|s| s.match_labels.is_empty())
                {
                    problems.push((
                        "spec.portLevelMtls".into(),
                        "only allowed in a policy with a workload selector".into(),
                    ));
                }
                if map.is_empty() {
                    problems.push((
                        "spec.portLevelMtls".into(),
                        "if given, must have at least one port".into(),
                    ));
                }
                for (k, v) in map {
                    let field = format!("spec.portLevelMtls[{k}]");
                    let m = written_mode(&format!("{field}.mode"), v.as_ref(), &mut problems);
                    match port(k.as_str()) {
                        Some(p) => {
                            ports.insert(p, m);
                        }
                        None => problems.push((
                            field,
                            format!("bad port {:?}: expected a number in 1..65535", k.as_str()),
                        )),
                    }
                }
            }
        }
    }
    if namespace == root_namespace && !scope.labels.is_empty() {
        report.warnings.push(PolicyWarning {
            kind: Kind::PeerAuthentication,
            policy: name,
            field: "spec.selector".into(),
            message: "a PeerAuthentication with a selector in the root namespace is ignored (as in Istio)"
                .into(),
        });
        return None;
    }
    let rejected = !problems.is_empty();
    if rejected {
        report_rejected(
            report,
            Kind::PeerAuthentication,
            &name,
            problems,
            RejectEffect::Strict,
        );
        mode = WrittenMode::Strict;
        ports.clear();
    }
    Some((
        scope,
        CompiledPeerAuthn {
            order: (!rejected, created, name.clone()),
            name,
            mode,
            ports,
        },
    ))
}

fn ap_ns(pa: &PeerAuthentication) -> &str {
    pa.metadata.namespace.as_deref().unwrap_or_default()
}

fn written_mode(field: &str, mtls: Option<&MutualTls>, problems: &mut Problems) -> WrittenMode {
    match mtls.and_then(|m| m.mode.as_deref()) {
        None | Some("UNSET") => WrittenMode::Unset,
        Some("DISABLE") => WrittenMode::Disable,
        Some("PERMISSIVE") => WrittenMode::Permissive,
        Some("STRICT") => WrittenMode::Strict,
        Some(other) => {
            problems.push((
                field.into(),
                format!("unknown mode {other:?} (expected UNSET, DISABLE, PERMISSIVE or STRICT)"),
            ));
            WrittenMode::Strict
        }
    }
}

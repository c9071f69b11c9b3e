//! Reading Kubernetes objects from YAML or JSON text: one or more
//! documents (`---`), a JSON stream or array, or a `kind: List` (what
//! `kubectl get -o yaml` prints for several objects).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_yaml::Value;

use crate::error::PolicyError;
use crate::model::{
    AuthorizationPolicy, AuthorizationPolicySpec, Kind, ObjectMeta, PeerAuthentication,
    PeerAuthenticationSpec, SpecError,
};

/// The API group of the supported kinds.
pub const API_GROUP: &str = "security.istio.io";
/// Namespace of an object that names none (what `kubectl apply` uses).
pub const DEFAULT_NAMESPACE: &str = "default";

/// One supported object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Resource {
    /// An `AuthorizationPolicy`.
    AuthorizationPolicy(AuthorizationPolicy),
    /// A `PeerAuthentication`.
    PeerAuthentication(PeerAuthentication),
}

impl Resource {
    /// Its kind.
    pub fn kind(&self) -> Kind {
        match self {
            Resource::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Resource::PeerAuthentication(_) => Kind::PeerAuthentication,
        }
    }

    /// Its metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Resource::AuthorizationPolicy(p) => &p.metadata,
            Resource::PeerAuthentication(p) => &p.metadata,
        }
    }
}

/// What [`parse_documents`] read: the supported objects, and every
/// document it could not use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    /// Supported objects, in input order (a malformed `spec` is kept inside
    /// the object and reported when the store is built).
    pub resources: Vec<Resource>,
    /// Unreadable documents, unsupported kinds and versions, objects
    /// without a name.
    pub errors: Vec<PolicyError>,
}

/// How deep `kind: List` may nest (a List of Lists is accepted, no more).
const MAX_LIST_DEPTH: usize = 2;

/// Reads every document of `text` (YAML, or JSON when the text starts
/// with `{` or `[`). Never panics; a syntax error stops the reading at that
/// document and is reported.
pub fn parse_documents(text: &str) -> Parsed {
    let mut out = Parsed::default();
    let body = text.trim_start_matches('\u{feff}');
    let first = body.trim_start().chars().next();
    if matches!(first, Some('{') | Some('[')) {
        let stream = serde_json::Deserializer::from_str(body).into_iter::<Value>();
        for (i, item) in stream.enumerate() {
            match item {
                Ok(v) => parse_top(v, i + 1, &mut out),
                Err(e) => {
                    out.errors.push(PolicyError::Syntax {
                        document: i + 1,
                        message: e.to_string(),
                    });
                    break;
                }
            }
        }
    } else {
        for (i, de) in serde_yaml::Deserializer::from_str(body).enumerate() {
            match Value::deserialize(de) {
                Ok(v) => parse_top(v, i + 1, &mut out),
                Err(e) => {
                    out.errors.push(PolicyError::Syntax {
                        document: i + 1,
                        message: e.to_string(),
                    });
                    break;
                }
            }
        }
    }
    out
}

/// Reads one already-parsed YAML value (an object, a `kind: List`, or a
/// sequence of objects), e.g. a `policies:` section of a larger file.
/// `document` numbers it in error messages.
pub fn parse_value(value: Value, document: usize) -> Parsed {
    let mut out = Parsed::default();
    parse_top(value, document, &mut out);
    out
}

fn parse_top(value: Value, document: usize, out: &mut Parsed) {
    match value {
        Value::Null => {} // an empty document (`---` twice)
        Value::Sequence(items) => {
            for (i, item) in items.into_iter().enumerate() {
                parse_object(item, document, &format!("[{i}]."), 1, out);
            }
        }
        other => parse_object(other, document, "", 0, out),
    }
}

fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn parse_object(value: Value, document: usize, prefix: &str, depth: usize, out: &mut Parsed) {
    let doc_err = |field: &str, message: String| PolicyError::Document {
        document,
        field: format!("{prefix}{field}"),
        message,
    };
    if value.is_null() {
        return;
    }
    if !value.is_mapping() {
        out.errors.push(doc_err(
            "(root)",
            "expected an object with apiVersion and kind".into(),
        ));
        return;
    }
    let Some(kind) = str_field(&value, "kind").map(str::to_owned) else {
        out.errors
            .push(doc_err("kind", "missing or not a string".into()));
        return;
    };
    let api_version = str_field(&value, "apiVersion").unwrap_or("").to_owned();

    // `kubectl get -o yaml` of several objects: `kind: List` (or `FooList`).
    if kind == "List" || (kind.ends_with("List") && value.get("items").is_some()) {
        if depth >= MAX_LIST_DEPTH {
            out.errors
                .push(doc_err("items", "Lists nested too deeply".into()));
            return;
        }
        match value.get("items") {
            None | Some(Value::Null) => {}
            Some(Value::Sequence(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let p = format!("{prefix}items[{i}].");
                    parse_object(item.clone(), document, &p, depth + 1, out);
                }
            }
            Some(_) => out
                .errors
                .push(doc_err("items", "expected a list of objects".into())),
        }
        return;
    }

    let meta_name = || -> Option<String> {
        let m = value.get("metadata")?;
        let name = str_field(m, "name")?;
        Some(match str_field(m, "namespace") {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_owned(),
        })
    };
    let (group, version) = api_version.split_once('/').unwrap_or(("", &api_version));
    let kind_enum = match kind.as_str() {
        "AuthorizationPolicy" if group == API_GROUP => Kind::AuthorizationPolicy,
        "PeerAuthentication" if group == API_GROUP => Kind::PeerAuthentication,
        _ => {
            out.errors.push(PolicyError::UnsupportedKind {
                document,
                api_version,
                kind,
                name: meta_name(),
            });
            return;
        }
    };
    if version != "v1" && version != "v1beta1" {
        out.errors.push(doc_err(
            "apiVersion",
            format!(
                "{kind} {}: unsupported version {api_version:?} (expected {API_GROUP}/v1 or {API_GROUP}/v1beta1)",
                meta_name().unwrap_or_default()
            ),
        ));
        return;
    }

    let mut metadata: ObjectMeta = match value.get("metadata") {
        None | Some(Value::Null) => ObjectMeta::default(),
        Some(m) => match serde_path_to_error::deserialize::<_, ObjectMeta>(m.clone()) {
            Ok(m) => m,
            Err(e) => {
                out.errors.push(doc_err(
                    &join_path("metadata", &e.path().to_string()),
                    e.inner().to_string(),
                ));
                return;
            }
        },
    };
    match metadata.name.as_deref() {
        Some(n) if !n.is_empty() => {}
        _ => {
            out.errors.push(doc_err(
                "metadata.name",
                format!("{kind}: missing (every policy needs a name)"),
            ));
            return;
        }
    }
    if metadata.namespace.as_deref().is_none_or(str::is_empty) {
        metadata.namespace = Some(DEFAULT_NAMESPACE.to_owned());
    }

    let spec_value = value.get("spec").cloned().unwrap_or(Value::Null);
    let raw_selector = raw_selector(&spec_value);
    match kind_enum {
        Kind::AuthorizationPolicy => {
            let raw_action = match spec_value.get("action") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(other) => Some(format!("{other:?}")),
            };
            let raw_target_refs: Box<[Value]> =
                match (spec_value.get("targetRefs"), spec_value.get("targetRef")) {
                    (Some(Value::Sequence(refs)), _) if !refs.is_empty() => refs.clone().into(),
                    (_, Some(one @ Value::Mapping(_))) => Box::new([one.clone()]),
                    _ => Box::new([]),
                };
            let spec = read_spec::<AuthorizationPolicySpec>(spec_value);
            out.resources
                .push(Resource::AuthorizationPolicy(AuthorizationPolicy {
                    metadata,
                    spec,
                    raw_action,
                    raw_selector,
                    raw_target_refs,
                }));
        }
        Kind::PeerAuthentication => {
            let spec = read_spec::<PeerAuthenticationSpec>(spec_value);
            out.resources
                .push(Resource::PeerAuthentication(PeerAuthentication {
                    metadata,
                    spec,
                    raw_selector,
                }));
        }
    }
}

fn read_spec<T: for<'de> Deserialize<'de> + Default>(spec: Value) -> Result<T, SpecError> {
    if spec.is_null() {
        return Ok(T::default());
    }
    serde_path_to_error::deserialize::<_, T>(spec).map_err(|e| SpecError {
        field: join_path("spec", &e.path().to_string()),
        message: e.inner().to_string(),
    })
}

fn join_path(root: &str, path: &str) -> String {
    if path.is_empty() || path == "." {
        root.to_owned()
    } else if path.starts_with('[') {
        format!("{root}{path}")
    } else {
        format!("{root}.{path}")
    }
}

/// `spec.selector.matchLabels` read leniently, so that a policy whose spec
/// is otherwise unreadable still has a bounded scope. `None`: no selector,
/// or an unreadable one (the scope is then the whole namespace, which is
/// wider, hence safer for a fail-closed rejection).
fn raw_selector(spec: &Value) -> Option<BTreeMap<String, String>> {
    let labels = spec.get("selector")?.get("matchLabels")?.as_mapping()?;
    let mut out = BTreeMap::new();
    for (k, v) in labels {
        let k = k.as_str()?;
        let v = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => return None,
        };
        if k.is_empty() || k.contains('*') || v.contains('*') {
            return None;
        }
        out.insert(k.to_owned(), v);
    }
    if out.is_empty() { None } else { Some(out) }
}

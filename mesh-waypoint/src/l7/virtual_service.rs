//! Istio `VirtualService` `http:` routes compiled into the route model of
//! [`super::route`]: `hosts` name the Services (short name in the
//! VirtualService's namespace, `name.namespace`, or the FQDN), the routes
//! apply in order (first match wins, Istio's semantics), on every port of
//! those Services. Supported: `match` (`uri`, `headers`, `queryParams`,
//! `method` with `exact`/`prefix`/`regex`, an empty match for presence),
//! `route` (destinations with `weight`, `port`), `timeout`, `retries`
//! (`attempts`, `perTryTimeout`, `retryOn`), `headers` (request/response
//! `set`/`add`/`remove`), `fault` (`delay.fixedDelay`, `abort.httpStatus`,
//! by `percentage`; none when it is unset, as Istio documents), `mirror`
//! with `mirrorPercentage` (all when unset). Everything else is reported with its effect.

use std::{sync::Arc, time::Duration};

use http::{HeaderName, HeaderValue, Method, StatusCode};

use super::route::{
    Backend, Effect, Entry, Fault, HeaderModifier, Match, PathMatch, PathRewrite, Redirect,
    RetryPolicy, Rewrite, RouteTable, Rule, ServiceKey, ValueMatch, WeightedBackend, find,
    full_regex, match_clone, parse_retry_on,
};
use crate::config::{
    ServiceConfig, StringMatch, VirtualService, VsHeaderOps, VsHttpRoute, VsMatch,
};

/// The Service a VirtualService host names, if it is one in the cluster domain.
fn host_service(host: &str, namespace: &str) -> Option<ServiceKey> {
    let host = host
        .strip_suffix(".svc.cluster.local")
        .or_else(|| host.strip_suffix(".svc"))
        .unwrap_or(host);
    let (name, ns) = match host.split_once('.') {
        None => (host, namespace),
        Some((name, ns)) if !ns.contains('.') => (name, ns),
        Some(_) => return None,
    };
    (!name.is_empty() && !name.contains('*')).then(|| ServiceKey {
        namespace: ns.to_owned(),
        name: name.to_owned(),
    })
}

/// Parses a protobuf/Go duration as Istio takes it (`10s`, `0.5s`, `250ms`, `1m30s`).
pub fn parse_istio_duration(s: &str) -> Option<Duration> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let n = rest
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b'.')
            .count();
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let units: [(&str, f64); 6] = [
            ("ms", 1e-3),
            ("us", 1e-6),
            ("ns", 1e-9),
            ("h", 3600.0),
            ("m", 60.0),
            ("s", 1.0),
        ];
        let (unit, scale) = units.iter().find(|(u, _)| rest.starts_with(u))?;
        rest = &rest[unit.len()..];
        total += value * scale;
    }
    (total.is_finite() && total >= 0.0).then(|| Duration::from_secs_f64(total))
}

fn string_match(m: &StringMatch, what: &str) -> Result<ValueMatch, String> {
    if let Some(k) = m.other.keys().next() {
        return Err(format!("{what} match field {k} is not supported"));
    }
    match (&m.exact, &m.prefix, &m.regex) {
        (Some(e), None, None) => Ok(ValueMatch::Exact(e.clone())),
        (None, Some(p), None) => Ok(ValueMatch::Prefix(p.clone())),
        (None, None, Some(r)) => full_regex(r).map(ValueMatch::Regex),
        (None, None, None) => Ok(ValueMatch::Present),
        _ => Err(format!(
            "{what} match sets more than one of exact, prefix, regex"
        )),
    }
}

fn compile_match(m: &VsMatch) -> Result<Match, String> {
    let fields: Vec<&String> = m.other.keys().collect();
    if let Some(k) = fields.first() {
        return Err(format!("match field {k} is not supported"));
    }
    let path = match &m.uri {
        None => PathMatch::Prefix(String::new()),
        Some(u) => match string_match(u, "uri")? {
            ValueMatch::Exact(e) => PathMatch::Exact(e),
            ValueMatch::Prefix(p) => PathMatch::StringPrefix(p),
            ValueMatch::Regex(r) => PathMatch::Regex(r),
            ValueMatch::Present => PathMatch::Prefix(String::new()),
        },
    };
    let mut headers = Vec::new();
    for (name, v) in &m.headers {
        let n = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("header name {name:?} is not valid"))?;
        headers.push((n, string_match(v, "header")?));
    }
    let mut query = Vec::new();
    for (name, v) in &m.query_params {
        query.push((name.clone(), string_match(v, "query parameter")?));
    }
    let method = match &m.method {
        None => None,
        Some(StringMatch {
            exact: Some(e),
            prefix: None,
            regex: None,
            other,
        }) if other.is_empty() => Some(
            Method::from_bytes(e.as_bytes()).map_err(|_| format!("method {e:?} is not valid"))?,
        ),
        Some(_) => return Err("only an exact method match is supported".to_owned()),
    };
    Ok(Match {
        path,
        headers,
        query,
        method,
    })
}

fn header_ops(ops: &VsHeaderOps) -> Result<HeaderModifier, String> {
    let pair = |name: &String, value: &String| {
        let n = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("header name {name:?} is not valid"))?;
        let v = HeaderValue::from_str(value)
            .map_err(|_| format!("header value {value:?} of {name} is not valid"))?;
        Ok::<_, String>((n, v))
    };
    Ok(HeaderModifier {
        set: ops
            .set
            .iter()
            .map(|(n, v)| pair(n, v))
            .collect::<Result<_, _>>()?,
        add: ops
            .add
            .iter()
            .map(|(n, v)| pair(n, v))
            .collect::<Result<_, _>>()?,
        remove: ops
            .remove
            .iter()
            .map(|n| {
                HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| format!("header name {n:?} is not valid"))
            })
            .collect::<Result<_, _>>()?,
    })
}

/// What a VirtualService's hosts and destinations resolve against: the
/// services the waypoint fronts and their destinations (the routing
/// engine's, where DestinationRule subsets are defined).
#[derive(Clone, Copy)]
pub(crate) struct Known<'a> {
    /// The services.
    pub services: &'a [ServiceConfig],
    /// Their compiled destinations.
    pub destinations: &'a mesh_routing::RouteTable,
    /// The `exportTo` of a VirtualService that sets none.
    pub default_export_to: &'a [String],
}

/// Adds `vs`'s HTTP routes to `table`.
pub(crate) fn add(table: &mut RouteTable, known: Known<'_>, vs: &VirtualService) {
    let namespace = vs
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let id = format!("{namespace}/{}", vs.metadata.name);
    let top = vs
        .other
        .iter()
        .filter(|(k, _)| k.as_str() != "status")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    table.report_other(&id, "", &top, Effect::Ignored);
    table.report_other(&id, "spec", &vs.spec.other, Effect::Ignored);
    if vs.spec.gateways.iter().any(|g| g != "mesh") {
        let reason = "the VirtualService is bound to gateways (a waypoint serves `mesh`)";
        return table.report(&id, "spec.gateways".into(), reason, Effect::RouteRejected);
    }
    let mut ports = Vec::new();
    for (i, host) in vs.spec.hosts.iter().enumerate() {
        let at = format!("spec.hosts[{i}]");
        let Some(key) = host_service(host, &namespace) else {
            let reason = format!("host {host:?} is not a Service of the cluster domain");
            table.report(&id, at, reason, Effect::ParentNotAttached);
            continue;
        };
        let Some(svc) = find(known.services, &key) else {
            let reason = format!("Service {key} is not one this waypoint serves");
            table.report(&id, at, reason, Effect::ParentNotAttached);
            continue;
        };
        ports.extend(svc.ports.iter().map(|p| (key.clone(), p.port)));
    }
    // A service named by several hosts gets the rules once.
    ports.sort();
    ports.dedup();
    if ports.is_empty() {
        let reason = "no host is a Service of this waypoint";
        return table.report(&id, "spec.hosts".into(), reason, Effect::RouteRejected);
    }
    table.accepted.push(id.clone());
    let export_to = if vs.spec.export_to.is_empty() {
        known.default_export_to
    } else {
        &vs.spec.export_to
    };
    let visible = mesh_routing::Export::parse(export_to, &namespace);
    for (index, route) in vs.spec.http.iter().enumerate() {
        let at = format!("spec.http[{index}]");
        let (rule, matches) = compile_route(table, known, &id, &namespace, &at, index, route);
        let rule = Arc::new(rule);
        for m in &matches {
            for port in &ports {
                table.ordered.entry(port.clone()).or_default().push(Entry {
                    m: match_clone(m),
                    rule: Arc::clone(&rule),
                    namespace: namespace.clone(),
                    visible: visible.clone(),
                    tie: (String::new(), id.clone(), index),
                });
            }
        }
    }
}

fn compile_route(
    table: &mut RouteTable,
    known: Known<'_>,
    id: &str,
    namespace: &str,
    at: &str,
    index: usize,
    route: &VsHttpRoute,
) -> (Rule, Vec<Match>) {
    let mut broken = Vec::new();
    let mut fail = |table: &mut RouteTable, field: String, reason: String| {
        table.report(id, field, reason.clone(), Effect::RuleFails);
        broken.push(reason);
    };
    // mirrors, directResponse, corsPolicy, ...: none can be skipped
    // without changing what the route does.
    for key in route.other.keys() {
        fail(
            table,
            format!("{at}.{key}"),
            format!("{key} is not supported by this waypoint"),
        );
    }
    let mut matches = Vec::new();
    for (i, m) in route.matches.iter().enumerate() {
        match compile_match(m) {
            Ok(m) => matches.push(m),
            Err(reason) => {
                fail(table, format!("{at}.match[{i}]"), reason);
                matches.push(Match::any());
            }
        }
    }
    if route.matches.is_empty() {
        matches.push(Match::any());
    }
    let timeout = match route.timeout.as_deref().map(parse_istio_duration) {
        None => None,
        Some(Some(d)) if d.is_zero() => None,
        Some(Some(d)) => Some(d),
        Some(None) => {
            let reason = format!("timeout {:?} is not a duration", route.timeout);
            fail(table, format!("{at}.timeout"), reason);
            None
        }
    };
    let mut fault = Fault::default();
    if let Some(f) = &route.fault {
        let fat = format!("{at}.fault");
        for key in f.other.keys() {
            fail(
                table,
                format!("{fat}.{key}"),
                format!("fault {key} is not supported"),
            );
        }
        if let Some(d) = &f.delay {
            let share = d
                .percentage
                .as_ref()
                .map(|p| p.value)
                .or(d.percent.map(f64::from))
                .unwrap_or(0.0);
            for key in d.other.keys() {
                fail(
                    table,
                    format!("{fat}.delay.{key}"),
                    format!("delay {key} is not supported"),
                );
            }
            match d.fixed_delay.as_deref().map(parse_istio_duration) {
                Some(Some(t)) => fault.delay = Some((t, (share / 100.0).clamp(0.0, 1.0))),
                _ => fail(
                    table,
                    format!("{fat}.delay.fixedDelay"),
                    "fixedDelay is missing or not a duration".into(),
                ),
            }
        }
        if let Some(a) = &f.abort {
            let share = a.percentage.as_ref().map_or(0.0, |p| p.value);
            for key in a.other.keys() {
                fail(
                    table,
                    format!("{fat}.abort.{key}"),
                    format!("abort {key} is not supported (httpStatus is)"),
                );
            }
            match a.http_status.map(StatusCode::from_u16) {
                Some(Ok(status)) => fault.abort = Some((status, (share / 100.0).clamp(0.0, 1.0))),
                _ => fail(
                    table,
                    format!("{fat}.abort.httpStatus"),
                    "httpStatus is missing or not a status".into(),
                ),
            }
        }
    }
    let mut rewrite = Rewrite::default();
    if let Some(r) = &route.rewrite {
        for key in r.other.keys() {
            fail(
                table,
                format!("{at}.rewrite.{key}"),
                format!("rewrite {key} is not supported"),
            );
        }
        if let Some(a) = &r.authority {
            match HeaderValue::from_str(a) {
                Ok(v) => rewrite.hostname = Some(v),
                Err(_) => fail(
                    table,
                    format!("{at}.rewrite.authority"),
                    format!("authority {a:?} is not valid"),
                ),
            }
        }
        if let Some(uri) = &r.uri {
            // Istio: a prefix-matched request has its matched prefix replaced,
            // any other its whole path.
            let prefixes: Vec<String> = route
                .matches
                .iter()
                .filter_map(|m| m.uri.as_ref().and_then(|u| u.prefix.clone()))
                .collect();
            rewrite.path = Some(if prefixes.is_empty() {
                PathRewrite::Full(uri.clone())
            } else {
                PathRewrite::Prefix {
                    prefixes,
                    elements: false,
                    replacement: uri.clone(),
                }
            });
        }
    }
    let mut redirect = None;
    if let Some(r) = &route.redirect {
        for key in r.other.keys() {
            fail(
                table,
                format!("{at}.redirect.{key}"),
                format!("redirect {key} is not supported"),
            );
        }
        match StatusCode::from_u16(r.redirect_code.unwrap_or(301)) {
            Ok(status) if status.is_redirection() => {
                redirect = Some(Redirect {
                    status,
                    scheme: r.scheme.clone(),
                    hostname: r.authority.clone(),
                    port: r.port,
                    path: r.uri.clone().map(PathRewrite::Full),
                });
            }
            _ => fail(
                table,
                format!("{at}.redirect.redirectCode"),
                "redirectCode is not a 3xx status".into(),
            ),
        }
    }
    let mut mirrors = Vec::new();
    if let Some(m) = &route.mirror {
        let share = route.mirror_percentage.as_ref().map_or(100.0, |p| p.value);
        let dest = crate::config::VsRouteDestination {
            destination: m.clone(),
            ..Default::default()
        };
        match resolve(known, namespace, &dest) {
            Ok(b) => mirrors.push((b, (share / 100.0).clamp(0.0, 1.0))),
            Err(reason) => fail(table, format!("{at}.mirror"), reason),
        }
    }
    let mut retry = RetryPolicy::default();
    if let Some(r) = &route.retries {
        table.report_other(id, &format!("{at}.retries"), &r.other, Effect::Ignored);
        retry.attempts = r.attempts.unwrap_or(retry.attempts);
        if let Some(p) = &r.per_try_timeout {
            match parse_istio_duration(p) {
                Some(d) if !d.is_zero() => retry.per_try_timeout = Some(d),
                Some(_) => {}
                None => fail(
                    table,
                    format!("{at}.retries.perTryTimeout"),
                    format!("perTryTimeout {p:?} is not a duration"),
                ),
            }
        }
        if let Some(on) = &r.retry_on {
            let (parsed, unsupported) = parse_retry_on(on);
            for t in unsupported {
                let reason = format!("retryOn condition {t:?} is not supported (never retried)");
                table.report(id, format!("{at}.retries.retryOn"), reason, Effect::Ignored);
            }
            retry.on = parsed;
        }
    }
    let (mut request_headers, mut response_headers) =
        (HeaderModifier::default(), HeaderModifier::default());
    if let Some(h) = &route.headers {
        for (ops, slot, name) in [
            (&h.request, &mut request_headers, "request"),
            (&h.response, &mut response_headers, "response"),
        ] {
            if let Some(ops) = ops {
                match header_ops(ops) {
                    Ok(m) => *slot = m,
                    Err(reason) => fail(table, format!("{at}.headers.{name}"), reason),
                }
            }
        }
    }
    let single = route.route.len() == 1;
    let mut backends = Vec::new();
    for (i, d) in route.route.iter().enumerate() {
        let dat = format!("{at}.route[{i}]");
        if d.headers.is_some() {
            fail(
                table,
                format!("{dat}.headers"),
                "per-destination headers are not supported (use the route's headers)".into(),
            );
        }
        let weight = d.weight.unwrap_or(if single { 100 } else { 0 });
        let backend = resolve(known, namespace, d).unwrap_or_else(|reason| {
            table.report(id, dat.clone(), reason.clone(), Effect::BackendFails);
            Backend::Invalid(reason)
        });
        backends.push(WeightedBackend { backend, weight });
    }
    if backends.is_empty() && redirect.is_none() {
        broken.push("the route has no destination".to_owned());
    }
    let rule = Rule {
        route: id.to_owned(),
        index,
        backends,
        timeout,
        request_headers,
        response_headers,
        retry,
        fault,
        rewrite,
        redirect,
        mirrors,
        broken: (!broken.is_empty()).then(|| broken.join("; ")),
    };
    (rule, matches)
}

fn resolve(
    known: Known<'_>,
    namespace: &str,
    d: &crate::config::VsRouteDestination,
) -> Result<Backend, String> {
    let dest = &d.destination;
    if let Some(k) = d.other.keys().chain(dest.other.keys()).next() {
        return Err(format!("destination field {k} is not supported"));
    }
    let key = host_service(&dest.host, namespace).ok_or_else(|| {
        format!(
            "host {:?} is not a Service of the cluster domain",
            dest.host
        )
    })?;
    let svc = find(known.services, &key)
        .ok_or_else(|| format!("destination Service {key} is not known to this waypoint"))?;
    let port = match (&dest.port, svc.ports.as_slice()) {
        (Some(p), _) => p.number,
        (None, [only]) => only.port,
        (None, _) => {
            return Err(format!(
                "destination Service {key} has several ports: name one (destination.port.number)"
            ));
        }
    };
    if !svc.ports.iter().any(|p| p.port == port) {
        return Err(format!("destination Service {key} has no port {port}"));
    }
    // The subset must be defined by the DestinationRule the route's
    // namespace sees (checked again per request with the client's).
    let subset: Option<Arc<str>> = dest.subset.as_deref().map(Into::into);
    if let Some(name) = &subset {
        known
            .destinations
            .destination(&key.to_string(), port, Some(name), namespace)
            .map_err(|e| e.to_string())?;
    }
    Ok(Backend::Service {
        service: key,
        port,
        subset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_durations() {
        assert_eq!(parse_istio_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(
            parse_istio_duration("0.5s"),
            Some(Duration::from_millis(500))
        );
        assert_eq!(parse_istio_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(
            parse_istio_duration("250ms"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_istio_duration("10"), None);
        assert_eq!(parse_istio_duration("x"), None);
    }

    #[test]
    fn hosts() {
        let k = |ns: &str, n: &str| {
            Some(ServiceKey {
                namespace: ns.into(),
                name: n.into(),
            })
        };
        assert_eq!(host_service("web", "prod"), k("prod", "web"));
        assert_eq!(host_service("web.other", "prod"), k("other", "web"));
        assert_eq!(
            host_service("web.other.svc.cluster.local", "prod"),
            k("other", "web")
        );
        assert_eq!(host_service("example.com.evil", "prod"), None);
        assert_eq!(host_service("*.other", "prod"), None);
    }
}

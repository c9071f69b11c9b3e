//! An in-process fake kube-apiserver speaking the list/watch protocol over
//! plain HTTP/1.1 on `127.0.0.1:<random port>`, for running the real kube
//! client (kube-rs) against it. Built on hyper directly (already in the tree
//! as kube-client's transport): the tests need byte-level control over the
//! response stream — chunked watch bodies written event by event, a stream
//! cut mid-flight, a response held back — which a routing framework would
//! only wrap.
//!
//! What it implements, as the real server does:
//! - `GET <collection>`: a `<Kind>List` with `metadata.resourceVersion` (the
//!   server's current one) and the items, which carry no `kind`/`apiVersion`.
//! - `GET <collection>?watch=true&resourceVersion=R`: `200` with a chunked
//!   body of JSON lines, every change after `R` (`ADDED`, `MODIFIED`,
//!   `DELETED`), then live changes; `BOOKMARK`s when asked
//!   (`allowWatchBookmarks=true`) while idle; closes after `timeoutSeconds`.
//!   A `R` older than the compaction horizon gets one `ERROR` event with a
//!   `410 Expired` Status (as the watch cache does), forcing a relist.
//! - `fieldSelector` on `spec.nodeName`, `metadata.name`,
//!   `metadata.namespace` (`=`, `==`, `!=`), including the watch semantics of
//!   an object entering (`ADDED`) or leaving (`DELETED`) the selection.
//! - `GET /version`.
//! - Namespaced pod reads: `GET /api/v1/namespaces/NS/pods` (list, with the
//!   field selectors above) and `GET /api/v1/namespaces/NS/pods/NAME`.
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews` for the tokens a
//!   test registered ([`FakeApiServer::add_token`]): authenticated when the
//!   token is known and, if the review names audiences, shares one with the
//!   token (as the real server does); `status.audiences` is the intersection.
//! - Errors as `Status` objects.
//!
//! Faults: [`FakeApiServer::drop_watches`] (cut every open watch mid-stream),
//! [`FakeApiServer::compact`] (forget history: the next watch resume gets
//! 410), [`FakeApiServer::set_outage`] (every request gets `500`, open watches
//! cut), [`FakeApiServer::set_delay`] (slow responses),
//! [`FakeApiServer::set_missing`] (a resource not served: `404`, like a CRD
//! that is not installed).
//!
//! Served kinds ([`Res`]): pods, namespaces, services, nodes, endpointslices,
//! `security.istio.io/v1` AuthorizationPolicy and PeerAuthentication,
//! `networking.istio.io/v1` DestinationRule and VirtualService,
//! `gateway.networking.k8s.io/v1alpha2` TCPRoute.
#![allow(dead_code)] // each test binary uses a different part

use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Frame, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::Notify, task::JoinHandle};

type Body = BoxBody<Bytes, std::io::Error>;

/// A resource type the server serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Res {
    /// core/v1 pods
    Pods,
    /// core/v1 namespaces
    Namespaces,
    /// core/v1 services
    Services,
    /// core/v1 nodes
    Nodes,
    /// discovery.k8s.io/v1 endpointslices
    EndpointSlices,
    /// security.istio.io/v1 authorizationpolicies
    AuthorizationPolicies,
    /// security.istio.io/v1 peerauthentications
    PeerAuthentications,
    /// networking.istio.io/v1 destinationrules
    DestinationRules,
    /// networking.istio.io/v1 virtualservices
    VirtualServices,
    /// gateway.networking.k8s.io/v1alpha2 tcproutes
    TcpRoutes,
    /// gateway.networking.k8s.io/v1 httproutes
    HttpRoutes,
    /// gateway.networking.k8s.io/v1 gateways
    Gateways,
}

impl Res {
    const ALL: [Res; 12] = [
        Res::Pods,
        Res::Namespaces,
        Res::Services,
        Res::Nodes,
        Res::EndpointSlices,
        Res::AuthorizationPolicies,
        Res::PeerAuthentications,
        Res::DestinationRules,
        Res::VirtualServices,
        Res::TcpRoutes,
        Res::HttpRoutes,
        Res::Gateways,
    ];

    fn path(self) -> &'static str {
        match self {
            Res::Pods => "/api/v1/pods",
            Res::Namespaces => "/api/v1/namespaces",
            Res::Services => "/api/v1/services",
            Res::Nodes => "/api/v1/nodes",
            Res::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
            Res::AuthorizationPolicies => "/apis/security.istio.io/v1/authorizationpolicies",
            Res::PeerAuthentications => "/apis/security.istio.io/v1/peerauthentications",
            Res::DestinationRules => "/apis/networking.istio.io/v1/destinationrules",
            Res::VirtualServices => "/apis/networking.istio.io/v1/virtualservices",
            Res::TcpRoutes => "/apis/gateway.networking.k8s.io/v1alpha2/tcproutes",
            Res::HttpRoutes => "/apis/gateway.networking.k8s.io/v1/httproutes",
            Res::Gateways => "/apis/gateway.networking.k8s.io/v1/gateways",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Res::Pods | Res::Namespaces | Res::Services | Res::Nodes => "v1",
            Res::EndpointSlices => "discovery.k8s.io/v1",
            Res::AuthorizationPolicies | Res::PeerAuthentications => "security.istio.io/v1",
            Res::DestinationRules | Res::VirtualServices => "networking.istio.io/v1",
            Res::TcpRoutes => "gateway.networking.k8s.io/v1alpha2",
            Res::HttpRoutes | Res::Gateways => "gateway.networking.k8s.io/v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Res::Pods => "Pod",
            Res::Namespaces => "Namespace",
            Res::Services => "Service",
            Res::Nodes => "Node",
            Res::EndpointSlices => "EndpointSlice",
            Res::AuthorizationPolicies => "AuthorizationPolicy",
            Res::PeerAuthentications => "PeerAuthentication",
            Res::DestinationRules => "DestinationRule",
            Res::VirtualServices => "VirtualService",
            Res::TcpRoutes => "TCPRoute",
            Res::HttpRoutes => "HTTPRoute",
            Res::Gateways => "Gateway",
        }
    }

    fn of(api_version: &str, kind: &str) -> Option<Res> {
        Res::ALL
            .into_iter()
            .find(|r| r.api_version() == api_version && r.kind() == kind)
    }
}

/// One recorded change.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    res: Res,
    old: Option<Value>,
    /// `None` for a deletion (then `old` is the deleted object, with the new rv).
    new: Option<Value>,
}

#[derive(Debug, Default)]
struct Inner {
    rv: u64,
    uid_seq: u64,
    objects: BTreeMap<(Res, String, String), Value>,
    changes: Vec<Change>,
    /// Watches resuming from a resourceVersion below this get 410.
    compacted: u64,
    outage: bool,
    delay: Duration,
    missing: BTreeSet<Res>,
    /// Bumped to cut every open watch.
    epoch: u64,
    /// `LIST <path>` / `WATCH <path> rv=<R>` / `GET /version`, in order.
    requests: Vec<String>,
    /// Tokens TokenReview authenticates.
    tokens: BTreeMap<String, TokenUser>,
}

/// Who a registered token authenticates as (TokenReview's `status.user`),
/// and the audiences it was issued for.
#[derive(Clone, Debug, Default)]
pub struct TokenUser {
    /// `system:serviceaccount:NS:SA` for a service account.
    pub username: String,
    /// The token's audiences.
    pub audiences: Vec<String>,
    /// `status.user.extra` (pod name, pod UID, node name of a bound token).
    pub extra: BTreeMap<String, Vec<String>>,
}

impl TokenUser {
    /// A service account token bound to pod `pod` (`uid`) on `node` (None:
    /// a token without the node-name claim, Kubernetes before 1.30).
    pub fn bound(
        ns: &str,
        sa: &str,
        pod: &str,
        uid: &str,
        node: Option<&str>,
        audience: &str,
    ) -> Self {
        let mut extra = BTreeMap::new();
        extra.insert(
            "authentication.kubernetes.io/pod-name".to_owned(),
            vec![pod.to_owned()],
        );
        extra.insert(
            "authentication.kubernetes.io/pod-uid".to_owned(),
            vec![uid.to_owned()],
        );
        if let Some(node) = node {
            extra.insert(
                "authentication.kubernetes.io/node-name".to_owned(),
                vec![node.to_owned()],
            );
        }
        Self {
            username: format!("system:serviceaccount:{ns}:{sa}"),
            audiences: vec![audience.to_owned()],
            extra,
        }
    }
}

struct Shared {
    inner: Mutex<Inner>,
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The fake API server; stops when dropped.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.accept.abort();
        self.drop_watches();
    }
}

impl FakeApiServer {
    /// Starts a server on `127.0.0.1:<random port>` (needs a tokio runtime).
    pub async fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake API server");
        Self::start_on(listener).await
    }

    /// Starts a server on `listener` (for example one bound inside a lab netns).
    pub async fn start_on(listener: std::net::TcpListener) -> Self {
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let listener = TcpListener::from_std(listener).expect("tokio listener");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                rv: 100,
                ..Inner::default()
            }),
            changed: Notify::new(),
        });
        let accept = {
            let shared = shared.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| {
                            let shared = shared.clone();
                            async move { Ok::<_, Infallible>(handle(shared, req).await) }
                        });
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            })
        };
        Self {
            addr,
            shared,
            accept,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for this server (plain HTTP, no authentication).
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().expect("server URL"));
        kube::Client::try_from(config).expect("kube client")
    }

    /// Creates or replaces `obj` (a full Kubernetes object with `apiVersion`
    /// and `kind`); sets its `resourceVersion` (and a `uid` if it has none).
    pub fn apply(&self, mut obj: Value) {
        let res = Res::of(
            obj["apiVersion"].as_str().unwrap_or_default(),
            obj["kind"].as_str().unwrap_or_default(),
        )
        .unwrap_or_else(|| panic!("fake API server does not serve {obj}"));
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_owned();
        {
            let mut inner = self.shared.lock();
            inner.rv += 1;
            let rv = inner.rv;
            let key = (res, ns, name);
            let old = inner.objects.get(&key).cloned();
            let meta = obj["metadata"].as_object_mut().expect("metadata object");
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
            if !meta.contains_key("uid") {
                let uid = match &old {
                    Some(o) => o["metadata"]["uid"].clone(),
                    None => {
                        inner.uid_seq += 1;
                        json!(format!("00000000-0000-4000-8000-{:012}", inner.uid_seq))
                    }
                };
                obj["metadata"]
                    .as_object_mut()
                    .expect("metadata object")
                    .insert("uid".into(), uid);
            }
            inner.objects.insert(key, obj.clone());
            inner.changes.push(Change {
                rv,
                res,
                old,
                new: Some(obj),
            });
        }
        self.shared.changed.notify_waiters();
    }

    /// Deletes an object (`DELETED` event); `ns` is `""` for cluster-scoped kinds.
    pub fn delete(&self, api_version: &str, kind: &str, ns: &str, name: &str) {
        let res = Res::of(api_version, kind).expect("served kind");
        {
            let mut inner = self.shared.lock();
            let Some(mut old) = inner.objects.remove(&(res, ns.to_owned(), name.to_owned())) else {
                panic!("delete: no {kind} {ns}/{name}");
            };
            inner.rv += 1;
            let rv = inner.rv;
            old["metadata"]["resourceVersion"] = json!(rv.to_string());
            inner.changes.push(Change {
                rv,
                res,
                old: Some(old),
                new: None,
            });
        }
        self.shared.changed.notify_waiters();
    }

    /// The stored object, if any.
    pub fn get(&self, api_version: &str, kind: &str, ns: &str, name: &str) -> Option<Value> {
        let res = Res::of(api_version, kind)?;
        self.shared
            .lock()
            .objects
            .get(&(res, ns.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Cuts every open watch mid-stream (the connection is aborted).
    pub fn drop_watches(&self) {
        self.shared.lock().epoch += 1;
        self.shared.changed.notify_waiters();
    }

    /// Forgets the history up to now: watches resuming from an older
    /// resourceVersion get `410 Gone`; open watches are cut so they resume.
    pub fn compact(&self) {
        {
            let mut inner = self.shared.lock();
            inner.compacted = inner.rv + 1;
            inner.changes.clear();
        }
        self.drop_watches();
    }

    /// Starts (every request gets `500`, open watches are cut) or ends an outage.
    pub fn set_outage(&self, outage: bool) {
        self.shared.lock().outage = outage;
        if outage {
            self.drop_watches();
        }
    }

    /// Delays every response by `delay` (slow server).
    pub fn set_delay(&self, delay: Duration) {
        self.shared.lock().delay = delay;
    }

    /// Makes the server answer `404` for `res` (`true`), as for a CRD that is
    /// not installed, or serve it again.
    pub fn set_missing(&self, res: Res, missing: bool) {
        let mut inner = self.shared.lock();
        if missing {
            inner.missing.insert(res);
        } else {
            inner.missing.remove(&res);
        }
    }

    /// The requests served so far (`LIST /api/v1/pods`, `WATCH /api/v1/pods rv=101`…),
    /// and `GONE <path> rv=<R>` for each watch answered with 410.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// Registers `token`: TokenReview authenticates it as `user`.
    pub fn add_token(&self, token: &str, user: TokenUser) {
        self.shared.lock().tokens.insert(token.to_owned(), user);
    }

    /// How many requests start with `prefix`.
    pub fn count(&self, prefix: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.starts_with(prefix))
            .count()
    }
}

fn status(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason,
        "code": code.as_u16()
    })
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    let bytes = Bytes::from(serde_json::to_vec(v).unwrap_or_default());
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(bytes).map_err(|never| match never {}).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).map_err(|n| match n {}).boxed()))
}

fn query(req: &Request<hyper::body::Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_owned(), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A parsed `fieldSelector`: `(field, equal?, value)` terms, all of which must hold.
#[derive(Clone, Debug, Default)]
struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    fn parse(s: Option<&String>) -> Result<Self, String> {
        let Some(s) = s.filter(|s| !s.is_empty()) else {
            return Ok(Self::default());
        };
        let mut terms = Vec::new();
        for term in s.split(',') {
            let (field, eq, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            if !matches!(
                field,
                "spec.nodeName" | "metadata.name" | "metadata.namespace"
            ) {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push((field.to_owned(), eq, value.to_owned()));
        }
        Ok(Self(terms))
    }

    fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(field, eq, value)| {
            let got = field
                .split('.')
                .fold(obj, |v, part| &v[part])
                .as_str()
                .unwrap_or_default();
            (got == value) == *eq
        })
    }
}

async fn handle(shared: Arc<Shared>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let q = query(&req);
    let watch = q.get("watch").is_some_and(|v| v == "true" || v == "1");
    let (delay, outage) = {
        let mut inner = shared.lock();
        let entry = if path == "/version" {
            "GET /version".to_owned()
        } else if req.method() == hyper::Method::POST {
            format!("POST {path}")
        } else if watch {
            format!(
                "WATCH {path} rv={}",
                q.get("resourceVersion").cloned().unwrap_or_default()
            )
        } else {
            format!("LIST {path}")
        };
        inner.requests.push(entry);
        (inner.delay, inner.outage)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    // Read together, after the delay: a watch accepted here is cut by any
    // later outage or drop (it compares against this epoch).
    let (outage, epoch) = {
        let inner = shared.lock();
        (outage || inner.outage, inner.epoch)
    };
    if outage {
        return json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "etcdserver: request timed out (fake outage)",
            ),
        );
    }
    if req.method() == hyper::Method::POST && path == TOKEN_REVIEWS {
        return token_review(&shared, req).await;
    }
    if req.method() != hyper::Method::GET {
        return json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "read-only fake",
            ),
        );
    }
    if path == "/version" {
        return json_response(
            StatusCode::OK,
            &json!({
                "major": "1", "minor": "33", "gitVersion": "v1.33.0-fake",
                "gitCommit": "0000000", "gitTreeState": "clean",
                "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24",
                "compiler": "gc", "platform": "linux/amd64"
            }),
        );
    }
    if let Some(rest) = path.strip_prefix("/api/v1/namespaces/")
        && let Some((ns, tail)) = rest.split_once('/')
        && (tail == "pods" || tail.starts_with("pods/"))
    {
        return namespaced_pods(&shared, ns, tail.strip_prefix("pods/"), &q);
    }
    let Some(res) = Res::ALL.into_iter().find(|r| r.path() == path) else {
        return json_response(
            StatusCode::NOT_FOUND,
            &status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    };
    if shared.lock().missing.contains(&res) {
        return json_response(
            StatusCode::NOT_FOUND,
            &status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    }
    let selector = match FieldSelector::parse(q.get("fieldSelector")) {
        Ok(s) => s,
        Err(e) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                &status(StatusCode::BAD_REQUEST, "BadRequest", &e),
            );
        }
    };
    if watch {
        watch_response(shared, res, selector, &q, epoch)
    } else {
        let inner = shared.lock();
        let items: Vec<Value> = inner
            .objects
            .iter()
            .filter(|((r, _, _), o)| *r == res && selector.matches(o))
            .map(|(_, o)| {
                let mut o = o.clone();
                if let Some(m) = o.as_object_mut() {
                    m.remove("kind");
                    m.remove("apiVersion");
                }
                o
            })
            .collect();
        json_response(
            StatusCode::OK,
            &json!({
                "kind": format!("{}List", res.kind()),
                "apiVersion": res.api_version(),
                "metadata": {"resourceVersion": inner.rv.to_string()},
                "items": items,
            }),
        )
    }
}

const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// `GET /api/v1/namespaces/NS/pods[/NAME]`.
fn namespaced_pods(
    shared: &Shared,
    ns: &str,
    name: Option<&str>,
    q: &BTreeMap<String, String>,
) -> Response<Body> {
    let inner = shared.lock();
    if let Some(name) = name {
        return match inner
            .objects
            .get(&(Res::Pods, ns.to_owned(), name.to_owned()))
        {
            Some(pod) => json_response(StatusCode::OK, pod),
            None => json_response(
                StatusCode::NOT_FOUND,
                &status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("pods \"{name}\" not found"),
                ),
            ),
        };
    }
    let selector = match FieldSelector::parse(q.get("fieldSelector")) {
        Ok(s) => s,
        Err(e) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                &status(StatusCode::BAD_REQUEST, "BadRequest", &e),
            );
        }
    };
    let items: Vec<Value> = inner
        .objects
        .iter()
        .filter(|((r, n, _), o)| *r == Res::Pods && n == ns && selector.matches(o))
        .map(|(_, o)| o.clone())
        .collect();
    json_response(
        StatusCode::OK,
        &json!({"kind": "PodList", "apiVersion": "v1",
                "metadata": {"resourceVersion": inner.rv.to_string()}, "items": items}),
    )
}

/// `POST .../tokenreviews`: the registered token's user, if its audiences
/// meet the review's.
async fn token_review(shared: &Shared, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let Ok(review) = serde_json::from_slice::<Value>(&body) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &status(StatusCode::BAD_REQUEST, "BadRequest", "not a TokenReview"),
        );
    };
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let user = shared.lock().tokens.get(token).cloned();
    let status = match user {
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
        Some(user) => {
            let audiences: Vec<String> = if wanted.is_empty() {
                user.audiences.clone()
            } else {
                wanted
                    .iter()
                    .filter(|a| user.audiences.contains(a))
                    .cloned()
                    .collect()
            };
            if audiences.is_empty() {
                json!({"authenticated": false,
                       "error": "[invalid bearer token, token audiences is invalid for the target audiences]"})
            } else {
                json!({"authenticated": true, "audiences": audiences,
                       "user": {"username": user.username, "uid": "00000000-0000-4000-8000-0000000000aa",
                                "groups": ["system:serviceaccounts", "system:authenticated"],
                                "extra": user.extra}})
            }
        }
    };
    json_response(
        StatusCode::CREATED,
        &json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": null}, "spec": review["spec"].clone(),
                "status": status}),
    )
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// The event a watcher with `selector` sees for `change`, if any.
fn visible(change: &Change, selector: &FieldSelector) -> Option<(&'static str, Value)> {
    let was = change.old.as_ref().filter(|o| selector.matches(o));
    let is = change.new.as_ref().filter(|o| selector.matches(o));
    match (was, is, &change.new) {
        (None, Some(n), _) => Some(("ADDED", n.clone())),
        (Some(_), Some(n), _) => Some(("MODIFIED", n.clone())),
        (Some(o), None, None) => Some(("DELETED", o.clone())),
        // Left the selection: a deletion for this watcher, at the new version.
        (Some(_), None, Some(n)) => Some(("DELETED", n.clone())),
        (None, None, _) => None,
    }
}

fn watch_response(
    shared: Arc<Shared>,
    res: Res,
    selector: FieldSelector,
    q: &BTreeMap<String, String>,
    epoch: u64,
) -> Response<Body> {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = Duration::from_secs(
        q.get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1800),
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(64);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        let (too_old, rv0) = {
            let mut inner = shared.lock();
            let from = if from == 0 { inner.rv } else { from };
            let too_old = from < inner.compacted;
            if too_old {
                inner
                    .requests
                    .push(format!("GONE {} rv={from}", res.path()));
            }
            (too_old, from)
        };
        if too_old {
            let gone = status(
                StatusCode::GONE,
                "Expired",
                &format!("too old resource version: {rv0}"),
            );
            let _ = tx.send(Ok(Frame::data(event_line("ERROR", &gone)))).await;
            return;
        }
        let mut sent = rv0;
        let mut bookmark_due = false;
        loop {
            // Created before looking, so a change made after the look wakes it.
            let notified = shared.changed.notified();
            let (pending, cut, now) = {
                let inner = shared.lock();
                let pending: Vec<(&'static str, Value)> = inner
                    .changes
                    .iter()
                    .filter(|c| c.res == res && c.rv > sent)
                    .filter_map(|c| visible(c, &selector))
                    .collect();
                (pending, inner.epoch != epoch, inner.rv)
            };
            if cut {
                let _ = tx
                    .send(Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "watch cut by the fake server",
                    )))
                    .await;
                return;
            }
            for (t, o) in pending {
                if tx.send(Ok(Frame::data(event_line(t, &o)))).await.is_err() {
                    return;
                }
            }
            sent = sent.max(now);
            if bookmark_due {
                bookmark_due = false;
                let bm = json!({"kind": res.kind(), "apiVersion": res.api_version(),
                                "metadata": {"resourceVersion": sent.to_string()}});
                if tx
                    .send(Ok(Frame::data(event_line("BOOKMARK", &bm))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_millis(500)), if bookmarks => bookmark_due = true,
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tx.closed() => return,
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).map_err(|n| match n {}).boxed()))
}

/// Real Kubernetes objects for the tests.
pub mod objects {
    use serde_json::{Value, json};

    /// A namespace with `labels`.
    pub fn namespace(name: &str, labels: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": name, "labels": labels},
               "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
    }

    /// A running pod on `node` with `ips`, `labels` and a fixed `uid`.
    pub fn pod(ns: &str, name: &str, uid: &str, node: &str, ips: &[&str], labels: Value) -> Value {
        let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": labels,
                         "creationTimestamp": "2026-01-01T00:00:00Z",
                         "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
            "spec": {"nodeName": node, "serviceAccountName": format!("{name}-sa"),
                     "containers": [{"name": "app", "image": "registry.example/app:1",
                                     "ports": [{"containerPort": 8080, "protocol": "TCP"}]}],
                     "restartPolicy": "Always"},
            "status": {"phase": "Running", "podIP": ips.first().copied().unwrap_or_default(),
                       "podIPs": pod_ips, "hostIP": "192.0.2.1",
                       "conditions": [{"type": "Ready", "status": "True"}]}
        })
    }

    /// A ClusterIP service with one TCP port `port` → `target`.
    pub fn service(ns: &str, name: &str, vip: &str, port: u16, target: u16) -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": ns},
               "spec": {"type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip],
                        "ipFamilies": ["IPv4"], "selector": {"app": name},
                        "ports": [{"name": "http", "port": port, "targetPort": target, "protocol": "TCP"}]},
               "status": {"loadBalancer": {}}})
    }

    /// An IPv4 EndpointSlice of service `svc`: `(address, ready, pod name)`.
    pub fn slice(
        ns: &str,
        name: &str,
        svc: &str,
        port: u16,
        endpoints: &[(&str, bool, &str)],
    ) -> Value {
        let eps: Vec<Value> = endpoints
            .iter()
            .map(|(ip, ready, pod)| {
                json!({"addresses": [ip], "conditions": {"ready": ready, "serving": ready, "terminating": false},
                       "targetRef": {"kind": "Pod", "namespace": ns, "name": pod},
                       "nodeName": "node-a"})
            })
            .collect();
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": name, "namespace": ns,
                            "labels": {"kubernetes.io/service-name": svc,
                                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
               "addressType": "IPv4", "endpoints": eps,
               "ports": [{"name": "http", "port": port, "protocol": "TCP"}]})
    }

    /// A node with an InternalIP.
    pub fn node(name: &str, ip: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
               "status": {"addresses": [{"type": "InternalIP", "address": ip},
                                        {"type": "Hostname", "address": name}]}})
    }

    /// An Istio AuthorizationPolicy.
    pub fn authorization_policy(ns: &str, name: &str, action: &str) -> Value {
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
               "metadata": {"name": name, "namespace": ns},
               "spec": {"action": action, "selector": {"matchLabels": {"app": "web"}},
                        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/cart"]}}]}]}})
    }

    /// An Istio PeerAuthentication.
    pub fn peer_authentication(ns: &str, name: &str, mode: &str) -> Value {
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
               "metadata": {"name": name, "namespace": ns},
               "spec": {"mtls": {"mode": mode}}})
    }

    /// An Istio DestinationRule for `host` with subsets `v1`/`v2` by the
    /// `version` label and a `loadBalancer.simple` policy `lb`.
    pub fn destination_rule(ns: &str, name: &str, host: &str, lb: &str) -> Value {
        json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
               "metadata": {"name": name, "namespace": ns,
                            "managedFields": [{"manager": "kubectl", "operation": "Update"}]},
               "spec": {"host": host,
                        "trafficPolicy": {"loadBalancer": {"simple": lb}},
                        "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                    {"name": "v2", "labels": {"version": "v2"}}]}})
    }

    /// An Istio VirtualService splitting TCP traffic to `host` between its
    /// subsets `v1` and `v2` with weights `w1`/`w2`.
    pub fn virtual_service(ns: &str, name: &str, host: &str, w1: u32, w2: u32) -> Value {
        json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
               "metadata": {"name": name, "namespace": ns},
               "spec": {"hosts": [host],
                        "tcp": [{"route": [
                            {"destination": {"host": host, "subset": "v1"}, "weight": w1},
                            {"destination": {"host": host, "subset": "v2"}, "weight": w2}]}]}})
    }

    /// A Gateway API TCPRoute attached to Service `parent` (the mesh
    /// attachment), weighted over Services `(name, port, weight)`.
    pub fn tcp_route(ns: &str, name: &str, parent: &str, backends: &[(&str, u16, u32)]) -> Value {
        let refs: Vec<Value> = backends
            .iter()
            .map(|(b, port, weight)| json!({"kind": "Service", "group": "", "name": b, "port": port, "weight": weight}))
            .collect();
        json!({"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TCPRoute",
               "metadata": {"name": name, "namespace": ns},
               "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent}],
                        "rules": [{"backendRefs": refs}]}})
    }
}

/// The pieces every sync test needs: a fake `/proc`, a started source, waits.
pub mod harness {
    use std::{
        path::{Path, PathBuf},
        sync::Arc,
        time::{Duration, Instant},
    };

    use mesh_agent::{
        state::{Snapshot, Store, WorkloadKey},
        sync::kube::{self, KubeConfig, KubeSource},
    };
    use tokio_util::sync::CancellationToken;

    use super::FakeApiServer;

    /// How long a test waits for the source to converge.
    pub const CONVERGE: Duration = Duration::from_secs(15);

    /// A fake `/proc` tree: `<root>/<pid>/{cgroup,stat,ns/net}`.
    pub struct FakeProc {
        /// The root to pass as `proc_root`.
        pub root: PathBuf,
    }

    impl FakeProc {
        /// An empty tree in a fresh temporary directory.
        pub fn new(tag: &str) -> Self {
            let root =
                std::env::temp_dir().join(format!("mesh-kube-proc-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&root).expect("fake proc root");
            Self { root }
        }

        /// Adds process `pid` of pod `uid` (cgroupfs layout).
        pub fn add_pod_process(&self, pid: u32, uid: &str) {
            let dir = self.root.join(pid.to_string());
            std::fs::create_dir_all(dir.join("ns")).expect("pid dir");
            std::fs::write(dir.join("ns/net"), "").expect("ns/net");
            std::fs::write(
                dir.join("cgroup"),
                format!("0::/kubepods/burstable/pod{uid}/0123456789abcdef\n"),
            )
            .expect("cgroup");
            let fields: Vec<String> = (4..=21).map(|f| f.to_string()).collect();
            std::fs::write(
                dir.join("stat"),
                format!("{pid} (pause) S {} {pid} 0 0\n", fields.join(" ")),
            )
            .expect("stat");
        }

        /// Removes process `pid`.
        pub fn remove(&self, pid: u32) {
            let _ = std::fs::remove_dir_all(self.root.join(pid.to_string()));
        }

        /// The netns path discovery reports for `pid`.
        pub fn netns(&self, pid: u32) -> PathBuf {
            self.root.join(pid.to_string()).join("ns/net")
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    /// A source config for tests: node `node`, the fake proc, fast retries.
    pub fn config(node: &str, proc_root: &Path) -> KubeConfig {
        let mut cfg = KubeConfig::new(node);
        cfg.proc_root = proc_root.to_owned();
        cfg.cgroup_root = PathBuf::from("/sys/fs/cgroup");
        cfg.rediscover_interval = Duration::from_millis(100);
        cfg.backoff_min = Duration::from_millis(50);
        cfg.backoff_max = Duration::from_millis(400);
        cfg
    }

    /// A running source publishing into `store`; cancelled on drop.
    pub struct Running {
        /// The store it publishes into.
        pub store: Store,
        /// Stops it.
        pub cancel: CancellationToken,
        /// Its tasks.
        pub source: KubeSource,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.cancel.cancel();
        }
    }

    /// Starts the source against `server` and waits for its first sync.
    pub async fn start(server: &FakeApiServer, cfg: KubeConfig) -> Running {
        let store = Store::new();
        let cancel = CancellationToken::new();
        let source = tokio::time::timeout(
            CONVERGE,
            kube::start(server.client(), cfg, store.clone(), cancel.clone()),
        )
        .await
        .expect("first sync within the timeout")
        .expect("source started");
        Running {
            store,
            cancel,
            source,
        }
    }

    /// Waits until `cond` holds for the store's snapshot; panics with the
    /// last snapshot after [`CONVERGE`].
    pub async fn wait_for(
        store: &Store,
        what: &str,
        cond: impl Fn(&Snapshot) -> bool,
    ) -> Arc<Snapshot> {
        let deadline = Instant::now() + CONVERGE;
        let mut rx = store.subscribe();
        loop {
            let snap = rx.borrow_and_update().clone();
            if cond(&snap) {
                return snap;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {what}; last snapshot: {snap:#?}"
            );
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), rx.changed()).await;
        }
    }

    /// `ns/name`.
    pub fn key(ns: &str, name: &str) -> WorkloadKey {
        WorkloadKey {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    /// Whether pod `ns/name` is in the snapshot and enrolled.
    pub fn enrolled(snap: &Snapshot, ns: &str, name: &str) -> bool {
        snap.workloads
            .get(&key(ns, name))
            .is_some_and(|w| w.enrolled)
    }

    /// Whether pod `ns/name` is in the snapshot, not enrolled.
    pub fn present_unenrolled(snap: &Snapshot, ns: &str, name: &str) -> bool {
        snap.workloads
            .get(&key(ns, name))
            .is_some_and(|w| !w.enrolled)
    }
}

//! One task per watched kind: kube's `watcher` (list, then watch from the
//! list's resourceVersion; re-watch after a dropped stream; relist after
//! `410 Gone`), with the agent's own exponential backoff after errors, its
//! events reduced to [`KindEvent`]s of compact facts and sent to the sync loop
//! as whatever message type implements [`FromWatch`] (which kinds are watched
//! is `watches.rs`'s table).

use std::{fmt::Debug, time::Duration};

use futures::StreamExt as _;
use kube::{
    Api, Resource,
    runtime::{watcher, watcher::Event},
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    cache::KindEvent,
    model::{ObjKey, obj_key},
};

/// The kinds the Kubernetes source watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Pods on this node.
    Pods,
    /// Namespaces (enrollment labels).
    Namespaces,
    /// Services (VIPs).
    Services,
    /// EndpointSlices (ready endpoints).
    EndpointSlices,
    /// This node (probe source addresses).
    Node,
    /// `security.istio.io/v1` AuthorizationPolicy.
    AuthorizationPolicies,
    /// `security.istio.io/v1` PeerAuthentication.
    PeerAuthentications,
    /// `networking.istio.io/v1` DestinationRule.
    DestinationRules,
    /// `networking.istio.io/v1` VirtualService.
    VirtualServices,
    /// `gateway.networking.k8s.io/v1alpha2` TCPRoute.
    TcpRoutes,
    /// `gateway.networking.k8s.io/v1` HTTPRoute (the waypoint's routes).
    HttpRoutes,
    /// `gateway.networking.k8s.io/v1` Gateway (who may bind to a waypoint).
    Gateways,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 12] = [
        Kind::Pods,
        Kind::Namespaces,
        Kind::Services,
        Kind::EndpointSlices,
        Kind::Node,
        Kind::AuthorizationPolicies,
        Kind::PeerAuthentications,
        Kind::DestinationRules,
        Kind::VirtualServices,
        Kind::TcpRoutes,
        Kind::HttpRoutes,
        Kind::Gateways,
    ];

    /// The resource name, as in RBAC rules and logs.
    pub fn resource(self) -> &'static str {
        match self {
            Kind::Pods => "pods",
            Kind::Namespaces => "namespaces",
            Kind::Services => "services",
            Kind::EndpointSlices => "endpointslices.discovery.k8s.io",
            Kind::Node => "nodes",
            Kind::AuthorizationPolicies => "authorizationpolicies.security.istio.io",
            Kind::PeerAuthentications => "peerauthentications.security.istio.io",
            Kind::DestinationRules => "destinationrules.networking.istio.io",
            Kind::VirtualServices => "virtualservices.networking.istio.io",
            Kind::TcpRoutes => "tcproutes.gateway.networking.k8s.io",
            Kind::HttpRoutes => "httproutes.gateway.networking.k8s.io",
            Kind::Gateways => "gateways.gateway.networking.k8s.io",
        }
    }

    /// A kind the agent can run without: when the server does not serve it
    /// (no CRD) or forbids it, it counts as empty instead of blocking start-up.
    pub fn optional(self) -> bool {
        matches!(
            self,
            Kind::Node
                | Kind::AuthorizationPolicies
                | Kind::PeerAuthentications
                | Kind::DestinationRules
                | Kind::VirtualServices
                | Kind::TcpRoutes
                | Kind::HttpRoutes
                | Kind::Gateways
        )
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.resource())
    }
}

/// A watch error, reduced to what the sync loop decides on.
#[derive(Clone, Debug)]
pub struct WatchFailure {
    /// The HTTP/Status code when the server answered (404, 403, 410, 500…).
    pub code: Option<u16>,
    /// The error, for the log.
    pub message: String,
}

impl WatchFailure {
    fn from_error(err: &watcher::Error) -> Self {
        let code = match err {
            watcher::Error::InitialListFailed(e)
            | watcher::Error::WatchStartFailed(e)
            | watcher::Error::WatchFailed(e) => match e {
                kube::Error::Api(status) => Some(status.code),
                _ => None,
            },
            watcher::Error::WatchError(status) => Some(status.code),
            watcher::Error::NoResourceVersion => None,
        };
        Self {
            code,
            message: err.to_string(),
        }
    }
}

/// Exponential backoff between retries after errors, reset by progress.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// From `min`, doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        let max = max.max(min);
        Self {
            min,
            max,
            next: min,
        }
    }

    /// The delay before the next retry.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// Progress was made: the next error waits `min` again.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// How a watch task's output becomes a message of the channel to the sync
/// loop: implemented once per facts type `T`.
pub trait FromWatch<T>: Sized {
    /// An event of `kind`'s watch.
    fn event(kind: Kind, event: KindEvent<T>) -> Self;
    /// `kind`'s watch failed; the task retries after its backoff.
    fn failed(kind: Kind, failure: WatchFailure) -> Self;
}

/// Watches `api` and sends each event, converted by `convert` (objects it
/// returns `None` for are treated as absent), as an `M` to `tx`.
/// Runs until `cancel` or until the receiver is gone.
pub async fn run<K, T, M>(
    kind: Kind,
    api: Api<K>,
    config: watcher::Config,
    mut backoff: Backoff,
    convert: impl Fn(&K) -> Option<T> + Send,
    tx: mpsc::Sender<M>,
    cancel: CancellationToken,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    T: Send,
    M: FromWatch<T> + Send,
{
    let stream = watcher(api, config);
    let mut stream = std::pin::pin!(stream);
    let key_of = |obj: &K| -> Option<ObjKey> { obj_key(obj.meta()) };
    loop {
        let item = tokio::select! {
            _ = cancel.cancelled() => return,
            item = stream.next() => item,
        };
        let Some(item) = item else { return };
        let msg = match item {
            Ok(event) => {
                if !matches!(event, Event::Init) {
                    backoff.reset();
                }
                let ev = match event {
                    Event::Init => Some(KindEvent::Init),
                    Event::InitDone => Some(KindEvent::InitDone),
                    Event::InitApply(obj) => key_of(&obj)
                        .and_then(|k| convert(&obj).map(|facts| KindEvent::InitApply(k, facts))),
                    Event::Apply(obj) => key_of(&obj).map(|k| match convert(&obj) {
                        Some(facts) => KindEvent::Apply(k, facts),
                        // An object that stopped qualifying (for example a
                        // service turned ExternalName) is gone for the agent.
                        None => KindEvent::Delete(k),
                    }),
                    Event::Delete(obj) => key_of(&obj).map(KindEvent::Delete),
                };
                match ev {
                    Some(ev) => M::event(kind, ev),
                    None => continue,
                }
            }
            Err(err) => {
                let failure = WatchFailure::from_error(&err);
                if tx.send(M::failed(kind, failure)).await.is_err() {
                    return;
                }
                let delay = backoff.next_delay();
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                continue;
            }
        };
        if tx.send(msg).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let got: Vec<u128> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, vec![100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }
}

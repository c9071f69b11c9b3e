//! Which kinds the source watches and how each is reduced to facts: one
//! [`watch::run`] task per kind, sending [`Msg`]s to the sync loop.
//!
//! The built-in kinds each have their own facts type (one line each in
//! [`spawn`]); custom resources are kept raw (their JSON, for the policy
//! compiler and the routing engine), and adding one is one row of [`RAW_KINDS`] (plus its [`Kind`]
//! and where the snapshot puts it).

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service as K8sService},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject},
    runtime::watcher,
};
use serde::de::DeserializeOwned;
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use super::{
    cache::KindEvent,
    config::KubeConfig,
    model::{self, PodFacts, ServiceFacts, SliceFacts},
    watch::{self, Backoff, FromWatch, Kind, WatchFailure},
};

/// A custom resource the source watches and keeps raw.
#[derive(Clone, Copy, Debug)]
pub struct RawKind {
    /// The kind as the sync loop knows it.
    pub kind: Kind,
    /// API group.
    pub group: &'static str,
    /// API version.
    pub version: &'static str,
    /// The resource's `kind`.
    pub name: &'static str,
    /// The resource's plural (the URL path segment).
    pub plural: &'static str,
}

impl RawKind {
    /// The resource, for a dynamic `Api`.
    pub fn resource(&self) -> ApiResource {
        ApiResource {
            group: self.group.into(),
            version: self.version.into(),
            api_version: format!("{}/{}", self.group, self.version),
            kind: self.name.into(),
            plural: self.plural.into(),
        }
    }
}

/// The custom resources kept raw: one row per kind.
pub const RAW_KINDS: [RawKind; 7] = [
    RawKind {
        kind: Kind::AuthorizationPolicies,
        group: "security.istio.io",
        version: "v1",
        name: "AuthorizationPolicy",
        plural: "authorizationpolicies",
    },
    RawKind {
        kind: Kind::PeerAuthentications,
        group: "security.istio.io",
        version: "v1",
        name: "PeerAuthentication",
        plural: "peerauthentications",
    },
    RawKind {
        kind: Kind::DestinationRules,
        group: "networking.istio.io",
        version: "v1",
        name: "DestinationRule",
        plural: "destinationrules",
    },
    RawKind {
        kind: Kind::VirtualServices,
        group: "networking.istio.io",
        version: "v1",
        name: "VirtualService",
        plural: "virtualservices",
    },
    RawKind {
        kind: Kind::TcpRoutes,
        group: "gateway.networking.k8s.io",
        version: "v1alpha2",
        name: "TCPRoute",
        plural: "tcproutes",
    },
    RawKind {
        kind: Kind::HttpRoutes,
        group: "gateway.networking.k8s.io",
        version: "v1",
        name: "HTTPRoute",
        plural: "httproutes",
    },
    RawKind {
        kind: Kind::Gateways,
        group: "gateway.networking.k8s.io",
        version: "v1",
        name: "Gateway",
        plural: "gateways",
    },
];

/// A watch event of one kind, carrying that kind's facts.
#[derive(Debug)]
pub enum Event {
    /// A pod event.
    Pod(KindEvent<PodFacts>),
    /// A namespace event (its labels).
    Namespace(KindEvent<BTreeMap<String, String>>),
    /// A service event.
    Service(KindEvent<ServiceFacts>),
    /// An EndpointSlice event.
    Slice(KindEvent<SliceFacts>),
    /// A Node event (its addresses).
    Node(KindEvent<Vec<IpAddr>>),
    /// An event of a custom resource kept raw (a [`RAW_KINDS`] row).
    Raw(Kind, KindEvent<serde_json::Value>),
}

/// Messages from the watch tasks to the sync loop.
// Events are nearly every message (failures are rare): boxing them would
// allocate per event to shrink the rare one.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Msg {
    /// An event.
    Event(Event),
    /// A watch failed; the task retries after its backoff.
    Failed(Kind, WatchFailure),
}

macro_rules! from_watch {
    ($facts:ty, |$kind:ident, $ev:ident| $event:expr) => {
        impl FromWatch<$facts> for Msg {
            fn event($kind: Kind, $ev: KindEvent<$facts>) -> Self {
                Msg::Event($event)
            }
            fn failed(kind: Kind, failure: WatchFailure) -> Self {
                Msg::Failed(kind, failure)
            }
        }
    };
}

from_watch!(PodFacts, |_k, ev| Event::Pod(ev));
from_watch!(BTreeMap<String, String>, |_k, ev| Event::Namespace(ev));
from_watch!(ServiceFacts, |_k, ev| Event::Service(ev));
from_watch!(SliceFacts, |_k, ev| Event::Slice(ev));
from_watch!(Vec<IpAddr>, |_k, ev| Event::Node(ev));
from_watch!(serde_json::Value, |kind, ev| Event::Raw(kind, ev));

/// What every watch task shares.
struct Watches<'a> {
    backoff: Backoff,
    tx: &'a mpsc::Sender<Msg>,
    cancel: &'a CancellationToken,
}

impl Watches<'_> {
    /// Spawns the task watching `api` with `config`, its objects reduced by `convert`.
    fn spawn<K, T>(
        &self,
        kind: Kind,
        api: Api<K>,
        config: watcher::Config,
        convert: impl Fn(&K) -> Option<T> + Send + 'static,
    ) -> JoinHandle<()>
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
        T: Send + 'static,
        Msg: FromWatch<T>,
    {
        tokio::spawn(watch::run(
            kind,
            api,
            config,
            self.backoff,
            convert,
            self.tx.clone(),
            self.cancel.clone(),
        ))
    }
}

/// Starts one watch task per kind, sending to `tx` until `cancel`.
pub fn spawn(
    client: &Client,
    cfg: &KubeConfig,
    tx: &mpsc::Sender<Msg>,
    cancel: &CancellationToken,
) -> Vec<JoinHandle<()>> {
    let mut base = watcher::Config::default();
    if let Some(t) = cfg.watch_timeout_secs {
        base = base.timeout(t);
    }
    let w = Watches {
        backoff: Backoff::new(cfg.backoff_min, cfg.backoff_max),
        tx,
        cancel,
    };
    let this_node = format!("metadata.name={}", cfg.node_name);
    let c = || client.clone();
    let mut tasks = vec![
        w.spawn(
            Kind::Pods,
            Api::<Pod>::all(c()),
            base.clone(),
            PodFacts::from_pod,
        ),
        w.spawn(
            Kind::Namespaces,
            Api::<Namespace>::all(c()),
            base.clone(),
            |ns: &Namespace| Some(model::namespace_labels(ns)),
        ),
        w.spawn(
            Kind::Services,
            Api::<K8sService>::all(c()),
            base.clone(),
            ServiceFacts::from_service,
        ),
        w.spawn(
            Kind::EndpointSlices,
            Api::<EndpointSlice>::all(c()),
            base.clone(),
            SliceFacts::from_slice,
        ),
        w.spawn(
            Kind::Node,
            Api::<Node>::all(c()),
            base.clone().fields(&this_node),
            |n: &Node| Some(model::node_addresses(n)),
        ),
    ];
    tasks.extend(RAW_KINDS.iter().map(|raw| {
        let resource = raw.resource();
        let api = Api::<DynamicObject>::all_with(c(), &resource);
        let (api_version, kind) = (resource.api_version, raw.name);
        w.spawn(raw.kind, api, base.clone(), move |o: &DynamicObject| {
            serde_json::to_value(o)
                .ok()
                .map(|v| model::raw_value(v, &api_version, kind))
        })
    }));
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_kinds_name_their_resources() {
        for raw in RAW_KINDS {
            let r = raw.resource();
            assert_eq!(raw.kind.resource(), format!("{}.{}", r.plural, r.group));
            assert!(raw.kind.optional(), "{}", raw.kind);
        }
        assert_eq!(RAW_KINDS[0].resource().api_version, "security.istio.io/v1");
    }
}

//! The live objects of every watched kind: one [`KindCache`] per kind, the
//! watch events applied to them, and their contents lent to the snapshot
//! builder.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use super::{
    cache::{KindCache, KindEvent},
    model::{ObjKey, PodFacts, ServiceFacts, SliceFacts},
    snapshot::Objects,
    watch::Kind,
    watches::{Event, RAW_KINDS},
};

/// One cache per watched kind.
#[derive(Debug)]
pub struct Caches {
    pods: KindCache<PodFacts>,
    namespaces: KindCache<BTreeMap<String, String>>,
    services: KindCache<ServiceFacts>,
    slices: KindCache<SliceFacts>,
    node: KindCache<Vec<IpAddr>>,
    /// The custom resources kept raw, one cache per [`RAW_KINDS`] row.
    raw: BTreeMap<Kind, KindCache<serde_json::Value>>,
}

impl Default for Caches {
    fn default() -> Self {
        Self {
            pods: KindCache::default(),
            namespaces: KindCache::default(),
            services: KindCache::default(),
            slices: KindCache::default(),
            node: KindCache::default(),
            raw: RAW_KINDS
                .iter()
                .map(|r| (r.kind, KindCache::default()))
                .collect(),
        }
    }
}

/// What applying one event did.
#[derive(Clone, Copy, Debug)]
pub struct Applied {
    /// The event's kind.
    pub kind: Kind,
    /// Whether the event shows the watch working (not just restarting).
    pub progressed: bool,
    /// Whether the kind's live objects changed.
    pub changed: bool,
}

impl Caches {
    /// Applies `event` to its kind's cache.
    pub fn apply(&mut self, event: Event) -> Applied {
        let (kind, progressed, changed) = match event {
            Event::Pod(ev) => (Kind::Pods, progress(&ev), self.pods.apply(ev)),
            Event::Namespace(ev) => (Kind::Namespaces, progress(&ev), self.namespaces.apply(ev)),
            Event::Service(ev) => (Kind::Services, progress(&ev), self.services.apply(ev)),
            Event::Slice(ev) => (Kind::EndpointSlices, progress(&ev), self.slices.apply(ev)),
            Event::Node(ev) => (Kind::Node, progress(&ev), self.node.apply(ev)),
            Event::Raw(kind, ev) => (
                kind,
                progress(&ev),
                self.raw.entry(kind).or_default().apply(ev),
            ),
        };
        Applied {
            kind,
            progressed,
            changed,
        }
    }

    /// Whether `kind` has been listed completely at least once.
    pub fn synced(&self, kind: Kind) -> bool {
        match kind {
            Kind::Pods => self.pods.synced(),
            Kind::Namespaces => self.namespaces.synced(),
            Kind::Services => self.services.synced(),
            Kind::EndpointSlices => self.slices.synced(),
            Kind::Node => self.node.synced(),
            raw => self.raw.get(&raw).is_some_and(KindCache::synced),
        }
    }

    /// Marks an optional kind synced and empty (its resource is not served
    /// or is forbidden); returns whether its live set changed. Kinds the
    /// agent cannot run without are left waiting.
    pub fn mark_absent(&mut self, kind: Kind) -> bool {
        match kind {
            Kind::Node => self.node.mark_absent(),
            Kind::Pods | Kind::Namespaces | Kind::Services | Kind::EndpointSlices => false,
            raw => self.raw.get_mut(&raw).is_some_and(KindCache::mark_absent),
        }
    }

    /// The live pods.
    pub fn pods(&self) -> &BTreeMap<ObjKey, PodFacts> {
        self.pods.live()
    }

    /// The live objects, shared (not copied) with a snapshot build that
    /// runs off the sync task.
    pub fn shared(&self) -> SharedObjects {
        SharedObjects {
            pods: self.pods.shared(),
            namespaces: self.namespaces.shared(),
            services: self.services.shared(),
            slices: self.slices.shared(),
            nodes: self.node.shared(),
            raw: self.raw.iter().map(|(k, c)| (*k, c.shared())).collect(),
        }
    }
}

/// The live objects of every kind at one moment, held by a snapshot build.
#[derive(Clone, Debug)]
pub struct SharedObjects {
    pods: Arc<BTreeMap<ObjKey, PodFacts>>,
    namespaces: Arc<BTreeMap<ObjKey, BTreeMap<String, String>>>,
    services: Arc<BTreeMap<ObjKey, ServiceFacts>>,
    slices: Arc<BTreeMap<ObjKey, SliceFacts>>,
    nodes: Arc<BTreeMap<ObjKey, Vec<IpAddr>>>,
    raw: BTreeMap<Kind, Arc<BTreeMap<ObjKey, serde_json::Value>>>,
}

impl SharedObjects {
    /// The objects, for the snapshot builder.
    pub fn objects(&self) -> Objects<'_> {
        Objects {
            pods: &self.pods,
            namespaces: &self.namespaces,
            services: &self.services,
            slices: &self.slices,
            nodes: &self.nodes,
            raw: self.raw.iter().map(|(k, m)| (*k, &**m)).collect(),
        }
    }
}

/// Whether an event shows the watch working (not just restarting).
fn progress<T>(ev: &KindEvent<T>) -> bool {
    !matches!(ev, KindEvent::Init)
}

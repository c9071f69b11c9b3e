//! The CA server's Kubernetes API calls, each under a deadline: TokenReview,
//! one pod, a namespace's pods on a node. Any failure but "not found" is
//! [`Refusal::ApiUnavailable`] (the request fails closed).

use std::time::Duration;

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus},
    core::v1::Pod,
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};

use super::authz::{PodFacts, Refusal};

/// Pods per list page, and the most pages read for one check.
const PAGE: u32 = 500;
const MAX_PAGES: usize = 20;

/// The API client and the deadline of each call.
#[derive(Clone)]
pub struct KubeApi {
    client: Client,
    timeout: Duration,
}

impl KubeApi {
    /// Calls through `client`, each bounded by `timeout`.
    pub fn new(client: Client, timeout: Duration) -> Self {
        Self { client, timeout }
    }

    async fn bounded<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, kube::Error> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(kube::Error::Service(
                format!("{what}: no answer within {:?}", self.timeout).into(),
            )),
        }
    }

    /// Asks the API server to authenticate `token` for `audience`.
    pub async fn token_review(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<TokenReviewStatus, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![audience.to_owned()]),
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let done = self
            .bounded("TokenReview", api.create(&PostParams::default(), &review))
            .await
            .map_err(|e| unavailable("TokenReview", &e))?;
        Ok(done.status.unwrap_or_default())
    }

    /// Pod `ns/name`, if it exists.
    pub async fn pod(&self, ns: &str, name: &str) -> Result<Option<PodFacts>, Refusal> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let pod = self
            .bounded("get pod", api.get_opt(name))
            .await
            .map_err(|e| unavailable("get pod", &e))?;
        Ok(pod.map(|p| facts(&p)))
    }

    /// The pods of `ns` scheduled on `node` (`fieldSelector spec.nodeName`).
    pub async fn pods_on_node(&self, ns: &str, node: &str) -> Result<Vec<PodFacts>, Refusal> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let mut params = ListParams::default()
            .fields(&format!("spec.nodeName={node}"))
            .limit(PAGE);
        let mut out = Vec::new();
        for _ in 0..MAX_PAGES {
            let list = self
                .bounded("list pods", api.list(&params))
                .await
                .map_err(|e| unavailable("list pods", &e))?;
            out.extend(list.items.iter().map(facts));
            match list.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
        Ok(out)
    }
}

fn facts(p: &Pod) -> PodFacts {
    let spec = p.spec.clone().unwrap_or_default();
    PodFacts {
        namespace: p.metadata.namespace.clone().unwrap_or_default(),
        name: p.metadata.name.clone().unwrap_or_default(),
        uid: p.metadata.uid.clone().unwrap_or_default(),
        service_account: spec.service_account_name.unwrap_or_default(),
        node_name: spec.node_name.filter(|n| !n.is_empty()),
    }
}

fn unavailable(what: &str, e: &kube::Error) -> Refusal {
    Refusal::ApiUnavailable {
        detail: format!("{what}: {e}"),
    }
}

//! `CreateCertificate`: authenticate (TokenReview), rate-limit per node,
//! authorize (own identity, or a pod on the caller's node), sign the CSR,
//! and write one audit line per issuance or refusal.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use prost_types::value::Kind;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status, metadata::MetadataMap};

use super::CaServerConfig;
use super::authz::{self, Plan, Refusal};
use super::kube_api::KubeApi;
use super::limits::RateLimiter;
use super::reviewed::{Answer, Lookup, Reviewed};
use super::tls::PeerAddr;
use crate::identity::istio_ca::IMPERSONATED_IDENTITY;
use crate::identity::istio_ca::proto::{
    IstioCertificateRequest, IstioCertificateResponse,
    istio_certificate_service_server::IstioCertificateService,
};
use crate::identity::{SignError, SignedCsr, fmt_time};

/// The service: the configuration, the API, the limits.
pub struct CaService {
    cfg: Arc<CaServerConfig>,
    api: KubeApi,
    /// Per node and account (see `Caller::limit_key`).
    limiter: RateLimiter,
    /// Failed authentications per source address.
    auth_failures: RateLimiter,
    /// Tokens reviewed a moment ago.
    reviewed: Reviewed,
    in_flight: Arc<Semaphore>,
}

/// What the audit line says about the request so far.
#[derive(Default)]
struct Audit {
    peer: Option<SocketAddr>,
    caller: String,
    node: String,
    identity: String,
    /// How the caller was authenticated: `api` (a TokenReview), `cached`
    /// (one made a moment ago for the same token) or `shared` (another
    /// request's review of the same token, made at the same time).
    review: &'static str,
}

impl CaService {
    /// A service signing with `cfg.ca`, checking with `api`.
    pub fn new(cfg: Arc<CaServerConfig>, api: KubeApi) -> Self {
        Self {
            limiter: RateLimiter::new(cfg.rate_per_node, cfg.rate_burst),
            auth_failures: RateLimiter::new(cfg.rate_per_node, cfg.rate_burst),
            reviewed: Reviewed::new(cfg.token_review_cache),
            in_flight: Arc::new(Semaphore::new(cfg.max_concurrent_requests.max(1))),
            cfg,
            api,
        }
    }

    /// The validity granted for a requested one (seconds; 0 or less: the most).
    fn ttl(&self, requested_secs: i64) -> Duration {
        let max = self.cfg.max_cert_ttl;
        let min = self.cfg.min_cert_ttl.min(max);
        match u64::try_from(requested_secs) {
            Ok(s) if s > 0 => Duration::from_secs(s).clamp(min, max),
            _ => max,
        }
    }

    fn rate_limited(&self, key: String, wait: Duration) -> Refusal {
        Refusal::RateLimited {
            key,
            rate: self.cfg.rate_per_node,
            burst: self.cfg.rate_burst,
            retry_after_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// Authenticates `token` by TokenReview. A source whose tokens keep
    /// failing authentication is paused before they cost the API server a
    /// TokenReview each: each review takes a token of its source's bucket
    /// (the per-node rate and burst) first, so concurrent ones cannot pass
    /// together, and gets it back when it authenticates.
    async fn review(&self, token: &str, audit: &Audit) -> Result<authz::Caller, Refusal> {
        let source = audit
            .peer
            .map(|p| format!("source/{}", p.ip().to_canonical()));
        if let Some(key) = &source
            && let Err(wait) = self.auth_failures.check(key, Instant::now())
        {
            return Err(self.rate_limited(key.clone(), wait));
        }
        // An API failure is not the caller's: its token comes back too.
        let give_back = || {
            if let Some(key) = &source {
                self.auth_failures.give_back(key);
            }
        };
        let review = self
            .api
            .token_review(token, &self.cfg.audience)
            .await
            .inspect_err(|_| give_back())?;
        let caller = authz::caller_from_review(&review, &self.cfg.audience)?;
        give_back();
        Ok(caller)
    }

    /// The caller `token` is: a review kept a moment ago, the answer of
    /// one another request of the same token is asking, or a review of its
    /// own (also when that other one fails: the waiters then ask each for
    /// itself, at once).
    async fn authenticate(&self, token: &str, audit: &mut Audit) -> Result<authz::Caller, Refusal> {
        let flight = match self.reviewed.lookup(token, Instant::now()) {
            Lookup::Cached(caller) => {
                audit.review = "cached";
                return Ok(caller);
            }
            Lookup::Shared(mut waiting) => {
                let answer = waiting
                    .wait_for(|a| !matches!(a, Answer::Pending))
                    .await
                    .map(|a| a.clone());
                if let Ok(Answer::Reviewed(caller)) = answer {
                    audit.review = "shared";
                    return Ok(caller);
                }
                // The shared review failed (an outage, a refused token) or
                // was given up: each waiter asks for itself, all at once,
                // not one after another (an outage would then cost the last
                // of K waiters K API deadlines).
                None
            }
            Lookup::Lead(flight) => Some(flight),
        };
        audit.review = "api";
        let asked = Instant::now();
        let caller = self.review(token, audit).await?;
        match flight {
            Some(flight) => flight.reviewed(token, &caller, asked),
            None => self.reviewed.insert(token, &caller, asked),
        }
        Ok(caller)
    }

    async fn handle(
        &self,
        token: Option<String>,
        body: &IstioCertificateRequest,
        audit: &mut Audit,
    ) -> Result<SignedCsr, Refusal> {
        let impersonate = impersonated(body)?;
        if let Some(id) = &impersonate {
            audit.identity.clone_from(id);
        }
        let token = token.ok_or(Refusal::NoToken)?;
        let _permit = Arc::clone(&self.in_flight)
            .try_acquire_owned()
            .map_err(|_| Refusal::Busy {
                limit: self.cfg.max_concurrent_requests,
            })?;
        let caller = self.authenticate(&token, audit).await?;
        audit.caller.clone_from(&caller.username);
        audit.node = caller.node().to_owned();
        let key = caller.limit_key();
        if let Err(wait) = self.limiter.check(&key, Instant::now()) {
            return Err(self.rate_limited(key, wait));
        }
        let plan = authz::plan(
            &caller,
            impersonate.as_deref(),
            &self.cfg.trust_domain,
            &self.cfg.node_service_accounts,
        )?;
        let id = match plan {
            Plan::Own(id) => id,
            Plan::Impersonate {
                id,
                pod_name,
                pod_uid,
            } => {
                let pod = self
                    .api
                    .pod(&caller.service_account.namespace, &pod_name)
                    .await?;
                let node = authz::caller_node(&caller, &pod_uid, pod.as_ref())?;
                audit.node.clone_from(&node);
                let pods = self.api.pods_on_node(id.namespace(), &node).await?;
                authz::check_node_pods(&id, &node, &pods)?;
                id
            }
        };
        audit.identity = id.to_string();
        let ttl = self.ttl(body.validity_duration);
        self.cfg
            .ca
            .sign_csr(body.csr.as_bytes(), &id, ttl)
            .map_err(|e| match e {
                SignError::CaExpired { .. } | SignError::Crypto { .. } => Refusal::CaFailure(e),
                _ => Refusal::BadCsr(e),
            })
    }
}

/// The `ImpersonatedIdentity` metadata: absent, or a non-empty string.
fn impersonated(body: &IstioCertificateRequest) -> Result<Option<String>, Refusal> {
    let Some(value) = body
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
    else {
        return Ok(None);
    };
    match &value.kind {
        Some(Kind::StringValue(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(Kind::StringValue(_)) | Some(Kind::NullValue(_)) | None => Ok(None),
        Some(_) => Err(Refusal::BadIdentity {
            input: IMPERSONATED_IDENTITY.into(),
            reason: "the metadata value must be a string (a SPIFFE ID)".into(),
        }),
    }
}

/// The token of `authorization: Bearer <token>`.
fn bearer(md: &MetadataMap) -> Option<String> {
    let value = md.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let mut audit = Audit {
            peer: request.extensions().get::<PeerAddr>().map(|p| p.0),
            ..Audit::default()
        };
        let token = bearer(request.metadata());
        let body = request.into_inner();
        match self.handle(token, &body, &mut audit).await {
            Ok(signed) => {
                tracing::info!(
                    peer = ?audit.peer,
                    caller = %audit.caller,
                    node = %audit.node,
                    identity = %audit.identity,
                    review = audit.review,
                    serial = %signed.serial_hex,
                    not_after = %fmt_time(signed.not_after),
                    "certificate issued"
                );
                Ok(Response::new(IstioCertificateResponse {
                    cert_chain: signed.chain_pem,
                }))
            }
            Err(refusal) => {
                tracing::warn!(
                    peer = ?audit.peer,
                    caller = %audit.caller,
                    node = %audit.node,
                    identity = %audit.identity,
                    review = audit.review,
                    reason_kind = refusal.kind(),
                    reason = %refusal,
                    "certificate refused"
                );
                Err(Status::new(refusal.code(), refusal.to_string()))
            }
        }
    }
}

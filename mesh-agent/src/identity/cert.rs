//! The certificate-provider seam and the workload certificates it hands out.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer},
    sign::CertifiedKey,
};

use super::ca::validity::CaValidity;
use super::clock::fmt_time;
use super::peer::parse_leaf;
use super::provider::crypto_provider;
use super::spiffe::{SpiffeId, TrustDomain};

/// What [`CertificateProvider::issue`] returns: the issuance, to be awaited.
pub type IssueFuture<'a> =
    Pin<Box<dyn Future<Output = Result<WorkloadCert, IssueError>> + Send + 'a>>;

/// Issues workload certificates. [`LocalCa`](super::LocalCa) signs them with
/// the mesh CA in this process; [`IstioCaIssuer`](super::IstioCaIssuer) asks
/// a CA over Istio's gRPC API (istiod, istio-csr or `mesh-agent ca serve`)
/// with a CSR, so that the node holds no CA key.
///
/// Issuance is asynchronous (a remote CA is a network round trip away); the
/// [`CertManager`](super::CertManager) caches the result, so rustls'
/// synchronous certificate callbacks only ever read a certificate already
/// there, and the proxy awaits [`CertManager::fetch`](super::CertManager::fetch)
/// before a handshake.
pub trait CertificateProvider: Send + Sync + 'static {
    /// A fresh certificate for `id`: a new key, the leaf and its intermediates.
    fn issue<'a>(&'a self, id: &'a SpiffeId) -> IssueFuture<'a>;

    /// The roots peers' certificates must chain to.
    fn trust_anchors(&self) -> Vec<CertificateDer<'static>>;

    /// The trust domain this provider issues for.
    fn trust_domain(&self) -> &TrustDomain;

    /// The validity of the CA it signs with, when it has one (watched for
    /// expiry). None by default (a remote issuer).
    fn ca_validity(&self) -> Option<CaValidity> {
        None
    }

    /// Which issuer this is, for `mesh-agent status`/`certs` and the logs.
    fn describe(&self) -> IssuerInfo;
}

/// Which kind of issuer signs the node's workload certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IssuerKind {
    /// The mesh CA's key is in this agent ([`LocalCa`](super::LocalCa)): for
    /// labs and single-node clusters; a compromised node owns every identity.
    Local,
    /// A CA reached over Istio's certificate API with a CSR (istiod,
    /// istio-csr, `mesh-agent ca serve`), which checks that the identity
    /// belongs to a pod on this node.
    IstioCa,
}

impl fmt::Display for IssuerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Local => "local",
            Self::IstioCa => "istio-ca",
        })
    }
}

/// An issuer, as shown to the operator.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IssuerInfo {
    /// The kind of issuer.
    pub kind: IssuerKind,
    /// Where it is: the CA's address, or the CA's subject for a local CA.
    pub endpoint: String,
}

/// Why a certificate could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The provider does not issue for that trust domain.
    #[error(
        "cannot issue a certificate for {id}: this CA issues for trust domain \"{ours}\" only (check the agent's --trust-domain)"
    )]
    ForeignTrustDomain {
        /// The identity asked for.
        id: SpiffeId,
        /// The provider's trust domain.
        ours: TrustDomain,
    },
    /// The CA certificate is no longer valid.
    #[error(
        "cannot issue a certificate for {id}: the mesh CA certificate expired at {}; install a new CA",
        fmt_time(*not_after)
    )]
    CaExpired {
        /// The identity asked for.
        id: SpiffeId,
        /// When the CA certificate expired.
        not_after: SystemTime,
    },
    /// Key generation or signing failed.
    #[error("cannot issue a certificate for {id}: key generation or signing failed: {detail}")]
    Crypto {
        /// The identity asked for.
        id: SpiffeId,
        /// What the crypto library said.
        detail: String,
    },
    /// The certificate handed out is not usable.
    #[error("the certificate issued for {id} is unusable: {reason}")]
    Invalid {
        /// The identity asked for.
        id: SpiffeId,
        /// What is wrong with it.
        reason: String,
    },
    /// The issuer could not be reached or refused the request.
    #[error("cannot get a certificate for {id} from the CA at {endpoint}: {reason}")]
    Unavailable {
        /// The identity asked for.
        id: SpiffeId,
        /// The CA's address.
        endpoint: String,
        /// What went wrong (the CA's answer, or the transport error).
        reason: String,
    },
    /// No certificate was ever issued for this identity, and the last attempt
    /// failed recently: the next attempt waits for its backoff.
    #[error(
        "no certificate for {id} yet: the last issuance failed ({last_error}); retrying in {} ms",
        retry_in.as_millis()
    )]
    Backoff {
        /// The identity asked for.
        id: SpiffeId,
        /// The last failure.
        last_error: String,
        /// When the next attempt is allowed.
        retry_in: Duration,
    },
    /// Another provider's failure.
    #[error("cannot issue a certificate for {id}: {source}")]
    Provider {
        /// The identity asked for.
        id: SpiffeId,
        /// The provider's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A workload's certificate: the chain (leaf first, then intermediates; no
/// root), its private key (in memory only), and when it expires. Ready for
/// rustls as a [`CertifiedKey`].
pub struct WorkloadCert {
    identity: SpiffeId,
    certified: Arc<CertifiedKey>,
    key: PrivateKeyDer<'static>,
    serial: Vec<u8>,
    not_before: SystemTime,
    not_after: SystemTime,
    issued_at: SystemTime,
}

impl WorkloadCert {
    /// Checks and wraps a certificate chain (leaf first) and its key: the leaf
    /// must carry exactly `identity` as its SPIFFE ID and match the key.
    pub fn new(
        identity: SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, IssueError> {
        let invalid = |reason: String| IssueError::Invalid {
            id: identity.clone(),
            reason,
        };
        let Some(leaf) = chain.first() else {
            return Err(invalid("the chain is empty".into()));
        };
        let info = parse_leaf(leaf).map_err(|e| invalid(e.to_string()))?;
        match info.identity {
            Ok(ref presented) if *presented == identity => {}
            Ok(presented) => return Err(invalid(format!("it names {presented}"))),
            Err(e) => return Err(invalid(e.to_string())),
        }
        let certified = CertifiedKey::from_der(chain, key.clone_key(), &crypto_provider())
            .map_err(|e| invalid(format!("its key does not fit: {e}")))?;
        Ok(Self {
            identity,
            certified: Arc::new(certified),
            key,
            serial: info.serial,
            not_before: info.not_before,
            not_after: info.not_after,
            issued_at: SystemTime::now(),
        })
    }

    /// The identity the certificate is for.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// Leaf first, then intermediates (never the root).
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        // The chain was checked to be non-empty in `new`.
        &self.certified.cert[0]
    }

    /// The leaf's private key (PKCS#8 for [`LocalCa`](super::LocalCa)).
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// The leaf's serial number (big-endian bytes).
    pub fn serial(&self) -> &[u8] {
        &self.serial
    }

    /// The leaf's serial number in hex, for logs.
    pub fn serial_hex(&self) -> String {
        self.serial.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Start of the leaf's validity (back-dated a little against clock skew).
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the leaf's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When this agent received the certificate.
    pub fn issued_at(&self) -> SystemTime {
        self.issued_at
    }

    /// When it should be replaced: half-way from issuance to expiry.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.issued_at)
            .unwrap_or(Duration::ZERO);
        self.issued_at + life / 2
    }

    /// Whether the leaf has expired at `now`.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// The chain and key for rustls (built once, shared).
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.certified)
    }
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial_hex())
            .field("not_before", &fmt_time(self.not_before))
            .field("not_after", &fmt_time(self.not_after))
            .field("chain_len", &self.certified.cert.len())
            .finish_non_exhaustive()
    }
}

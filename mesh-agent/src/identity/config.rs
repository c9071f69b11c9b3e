//! [`MeshTls`]: the rustls configurations of the mesh's mutual TLS (TLS 1.3
//! only, AES-GCM only, ALPN `h2`), built once as templates and cached per
//! local identity (server) or per source and expected peers (client).

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    client::Resumption,
    pki_types::ServerName,
    server::{NoServerSessionStorage, WebPkiClientVerifier},
};

use super::manager::CertManager;
use super::provider::crypto_provider;
use super::resolver::{ManagedCert, NoCert};
use super::spiffe::{SpiffeId, TrustDomain};
use super::verify::{SpiffeClientVerifier, SpiffeServerVerifier};

/// The one ALPN protocol the mesh speaks over mutual TLS (HBONE is HTTP/2).
pub const ALPN_H2: &[u8] = b"h2";

/// Client configurations cached before the cache is emptied (bounds memory
/// if destinations churn).
const MAX_CACHED_CLIENT_CONFIGS: usize = 4096;

/// The server name to dial a pod with: its IP. HBONE sends no SNI and the
/// server's identity is checked by SPIFFE ID, not by name.
pub fn server_name(ip: IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(ip.into())
}

/// Why the mesh TLS configurations could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The provider gave no roots to verify peers with.
    #[error(
        "the certificate provider has no trust anchors (root certificates) to verify peers with"
    )]
    NoTrustAnchors,
    /// A root could not be used as a trust anchor.
    #[error("a root certificate of the mesh cannot be used as a trust anchor: {0}")]
    BadTrustAnchor(#[source] rustls::Error),
    /// rustls refused the configuration.
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
}

/// A client configuration's cache key: source and (sorted) expected identities.
type ClientKey = (SpiffeId, Vec<SpiffeId>);

/// Builds (and caches) the rustls configurations of the mesh's mutual TLS,
/// with certificates from a [`CertManager`].
///
/// Both sides: TLS 1.3 only, TLS13_AES_128_GCM_SHA256 and
/// TLS13_AES_256_GCM_SHA384 only, ALPN `h2` only, no session resumption (HBONE
/// connections are pooled and long-lived, and a full handshake re-checks the
/// peer's certificate every time), certificates resolved per handshake from
/// the manager so rotation applies to new handshakes without new configs.
pub struct MeshTls {
    manager: Arc<CertManager>,
    trust_domain: TrustDomain,
    roots: Arc<RootCertStore>,
    server_template: ServerConfig,
    client_template: ClientConfig,
    servers: Mutex<HashMap<SpiffeId, Arc<ServerConfig>>>,
    clients: Mutex<HashMap<ClientKey, Arc<ClientConfig>>>,
}

impl fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshTls")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl MeshTls {
    /// Configurations trusting the manager's provider's roots and trust
    /// domain.
    pub fn new(manager: Arc<CertManager>) -> Result<Self, TlsSetupError> {
        let provider = crypto_provider();
        let trust_domain = manager.provider().trust_domain().clone();
        let anchors = manager.provider().trust_anchors();
        if anchors.is_empty() {
            return Err(TlsSetupError::NoTrustAnchors);
        }
        let mut roots = RootCertStore::empty();
        for anchor in anchors {
            roots.add(anchor).map_err(TlsSetupError::BadTrustAnchor)?;
        }
        let roots = Arc::new(roots);
        let config_err = |e: &dyn fmt::Display| TlsSetupError::Config(e.to_string());

        let webpki =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
                .build()
                .map_err(|e| config_err(&e))?;
        let client_verifier = Arc::new(SpiffeClientVerifier {
            inner: webpki,
            trust_domain: trust_domain.clone(),
        });
        let mut server_template = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_err(&e))?
            .with_client_cert_verifier(client_verifier)
            .with_cert_resolver(Arc::new(NoCert));
        server_template.alpn_protocols = vec![ALPN_H2.to_vec()];
        server_template.ignore_client_order = true;
        server_template.session_storage = Arc::new(NoServerSessionStorage {});
        server_template.send_tls13_tickets = 0;

        let placeholder = Arc::new(SpiffeServerVerifier {
            roots: Arc::clone(&roots),
            algorithms: provider.signature_verification_algorithms,
            trust_domain: trust_domain.clone(),
            expected: Vec::new(),
        });
        let mut client_template = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_err(&e))?
            .dangerous()
            .with_custom_certificate_verifier(placeholder)
            .with_client_cert_resolver(Arc::new(NoCert));
        client_template.alpn_protocols = vec![ALPN_H2.to_vec()];
        client_template.enable_sni = false;
        client_template.resumption = Resumption::disabled();

        Ok(Self {
            manager,
            trust_domain,
            roots,
            server_template,
            client_template,
            servers: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// The certificate manager.
    pub fn manager(&self) -> &Arc<CertManager> {
        &self.manager
    }

    /// The trust domain peers must be in.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The server side for local workload `local`: presents its current
    /// certificate (from the manager, per handshake), requires a client
    /// certificate chaining to the mesh root whose one URI SAN is a SPIFFE
    /// ID in our trust domain. Read the client's identity after the handshake
    /// with [`peer_identity`](super::peer::peer_identity). Cached per identity.
    pub fn server_config(&self, local: &SpiffeId) -> Arc<ServerConfig> {
        let mut servers = self.servers.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(servers.entry(local.clone()).or_insert_with(|| {
            let mut config = self.server_template.clone();
            config.cert_resolver = Arc::new(ManagedCert {
                manager: Arc::clone(&self.manager),
                id: local.clone(),
            });
            Arc::new(config)
        }))
    }

    /// The client side for local workload `source` dialling a destination
    /// that runs as one of `expected`: presents `source`'s current
    /// certificate, verifies the server's chain to the mesh root without any
    /// host name check (dial with [`server_name`] of the pod IP; no SNI is
    /// sent), and requires the server's SPIFFE ID to be one of `expected`
    /// (an empty list refuses every server). Cached per (source, expected).
    pub fn client_config(
        &self,
        source: &SpiffeId,
        mut expected: Vec<SpiffeId>,
    ) -> Arc<ClientConfig> {
        expected.sort();
        expected.dedup();
        let key = (source.clone(), expected);
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(config) = clients.get(&key) {
            return Arc::clone(config);
        }
        let mut config = self.client_template.clone();
        config.client_auth_cert_resolver = Arc::new(ManagedCert {
            manager: Arc::clone(&self.manager),
            id: source.clone(),
        });
        config
            .dangerous()
            .set_certificate_verifier(Arc::new(SpiffeServerVerifier {
                roots: Arc::clone(&self.roots),
                algorithms: crypto_provider().signature_verification_algorithms,
                trust_domain: self.trust_domain.clone(),
                expected: key.1.clone(),
            }));
        let config = Arc::new(config);
        if clients.len() >= MAX_CACHED_CLIENT_CONFIGS {
            clients.clear();
        }
        clients.insert(key, Arc::clone(&config));
        config
    }

    /// Forgets the configurations and certificates of workloads not in
    /// `local` (no longer on this node). Open connections are unaffected.
    pub fn retain<'a>(&self, local: impl IntoIterator<Item = &'a SpiffeId>) {
        let local: HashSet<&SpiffeId> = local.into_iter().collect();
        self.servers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|id, _| local.contains(&id));
        self.clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(source, _), _| local.contains(&source));
        self.manager.retain(local);
    }
}

//! The source's configuration: [`KubeConfig`], the command-line flags that
//! make it ([`KubeArgs`]), why the source cannot start ([`KubeError`]), and
//! the API-server [`client`].

use std::{collections::BTreeSet, net::IpAddr, path::PathBuf, time::Duration};

use kube::Client;

/// How the Kubernetes source runs.
#[derive(Clone, Debug)]
pub struct KubeConfig {
    /// This node's name (`NODE_NAME` from the downward API): pods with this
    /// `spec.nodeName` are local.
    pub node_name: String,
    /// The `/proc` to scan for pods' processes (`/host/proc` in the DaemonSet).
    pub proc_root: PathBuf,
    /// The host's cgroup2 mount as the agent sees it (reported pod cgroups are below it).
    pub cgroup_root: PathBuf,
    /// Addresses whose inbound connections bypass capture, besides the Node's own addresses.
    pub probe_sources: Vec<IpAddr>,
    /// Namespaces whose pods are never enrolled.
    pub excluded_namespaces: BTreeSet<String>,
    /// How often pods' processes are looked for again (new pods, re-created sandboxes).
    pub rediscover_interval: Duration,
    /// First retry delay after a watch error (doubles up to `backoff_max`).
    pub backoff_min: Duration,
    /// Longest retry delay after watch errors.
    pub backoff_max: Duration,
    /// Server-side timeout of each watch request, in seconds (`None`: kube's 290).
    pub watch_timeout_secs: Option<u32>,
    /// A change is published once no other came for this long (istiod's
    /// `PILOT_DEBOUNCE_AFTER`, 100 ms): a burst of updates is one build.
    pub debounce_quiet: Duration,
    /// ... and at most this long after the first change not yet published
    /// (istiod's `PILOT_DEBOUNCE_MAX` is 10 s; 1 s here): an object updated
    /// in a loop delays nothing longer.
    pub debounce_max: Duration,
}

/// The node name of a source that watches on no node's behalf (the
/// waypoint, [`KubeConfig::observer`]): no Node can have it (`_` is not
/// allowed in a node name), so every pod is published as a remote pod
/// (addresses, labels, service account, enrollment) and none is looked
/// for in `/proc`.
pub const NO_NODE: &str = "_mesh-no-node_";

impl KubeConfig {
    /// A source that enrolls nothing and reads the cluster's state only:
    /// every pod is remote ([`NO_NODE`]). The waypoint's.
    pub fn observer() -> Self {
        Self::new(NO_NODE)
    }

    /// Defaults for `node_name`: `/proc`, `/sys/fs/cgroup`, `kube-system`
    /// excluded, rediscovery every 2 s, backoff 800 ms to 30 s (client-go's),
    /// publications debounced 100 ms, at most 1 s.
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            proc_root: PathBuf::from("/proc"),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            probe_sources: Vec::new(),
            excluded_namespaces: ["kube-system".to_owned()].into(),
            rediscover_interval: Duration::from_secs(2),
            backoff_min: Duration::from_millis(800),
            backoff_max: Duration::from_secs(30),
            watch_timeout_secs: None,
            debounce_quiet: Duration::from_millis(100),
            debounce_max: Duration::from_secs(1),
        }
    }
}

/// The command-line flags of the Kubernetes source (`mesh-agent run --kube`).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct KubeArgs {
    /// Sync pods, services and policies from the Kubernetes API server
    /// instead of a workload file.
    #[arg(long, env = "MESH_KUBE")]
    pub kube: bool,
    /// The API server URL, spoken to in plain HTTP without authentication
    /// (`kubectl proxy`, tests). Default: the in-cluster service account, else KUBECONFIG.
    #[arg(long, env = "MESH_API_SERVER", requires = "kube")]
    pub api_server: Option<String>,
    /// This node's name (the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME", requires = "kube")]
    pub node_name: Option<String>,
    /// Where the host's /proc is: pods' processes are found there by pod UID.
    #[arg(long, env = "MESH_PROC_ROOT", default_value = "/proc")]
    pub proc_root: PathBuf,
    /// The host's cgroup2 mount as the agent sees it (pods' cgroups are reported below it).
    #[arg(long, env = "MESH_CGROUP_ROOT", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// An extra address whose inbound connections bypass capture (besides the
    /// Node's own addresses); repeatable.
    #[arg(
        long = "probe-source",
        env = "MESH_PROBE_SOURCES",
        value_delimiter = ','
    )]
    pub probe_sources: Vec<IpAddr>,
    /// A namespace whose pods are never enrolled, besides kube-system and the
    /// agent's own (POD_NAMESPACE); repeatable.
    #[arg(long = "exclude-namespace", value_delimiter = ',')]
    pub exclude_namespaces: Vec<String>,
    /// The agent's own namespace (downward API), never enrolled.
    #[arg(long, env = "POD_NAMESPACE", hide = true)]
    pub pod_namespace: Option<String>,
}

impl KubeArgs {
    /// The source configuration these flags describe.
    pub fn config(&self) -> Result<KubeConfig, KubeError> {
        let node = self
            .node_name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or(KubeError::NoNodeName)?;
        let mut cfg = KubeConfig::new(node);
        cfg.proc_root = self.proc_root.clone();
        cfg.cgroup_root = self.cgroup_root.clone();
        cfg.probe_sources = self
            .probe_sources
            .iter()
            .map(|ip| ip.to_canonical())
            .collect();
        cfg.excluded_namespaces
            .extend(self.exclude_namespaces.iter().cloned());
        cfg.excluded_namespaces
            .extend(self.pod_namespace.iter().cloned());
        Ok(cfg)
    }
}

/// Why the Kubernetes source cannot start.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// No node name.
    #[error(
        "the node name is empty: set NODE_NAME from the downward API (fieldRef spec.nodeName) or pass --node-name"
    )]
    NoNodeName,
    /// No in-cluster service account and no kubeconfig.
    #[error(
        "cannot find the Kubernetes API server: {0} (run in a pod with a service account token, set KUBECONFIG, or pass --api-server)"
    )]
    Infer(#[source] kube::config::InferConfigError),
    /// `--api-server` is not a URL.
    #[error("--api-server {url:?} is not a valid URL: {reason}")]
    BadUrl {
        /// What was given.
        url: String,
        /// Why it does not parse.
        reason: String,
    },
    /// The HTTP client cannot be built (TLS configuration).
    #[error("cannot create the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// Stopped before the first complete sync.
    #[error("stopped before the first sync from the API server completed")]
    Cancelled,
}

/// A client for `api_server` (plain, no authentication: tests, `kubectl
/// proxy`), or from the environment: the in-cluster service account, else
/// `KUBECONFIG` / `~/.kube/config`.
pub async fn client(api_server: Option<&str>) -> Result<Client, KubeError> {
    let config = match api_server {
        Some(url) => {
            let uri = url.parse::<http::Uri>().map_err(|e| KubeError::BadUrl {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
            kube::Config::new(uri)
        }
        None => kube::Config::infer().await.map_err(KubeError::Infer)?,
    };
    Client::try_from(config).map_err(KubeError::Client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_https_client_builds_with_the_single_tls_provider() {
        // Building the TLS configuration panics when rustls has more than one
        // crypto provider compiled in and none installed: catch that here,
        // without a server (nothing is sent).
        client(Some("https://127.0.0.1:6443"))
            .await
            .expect("https client");
        match client(Some("not a url")).await {
            Err(e) => assert!(e.to_string().contains("--api-server"), "{e}"),
            Ok(_) => panic!("a bad URL was accepted"),
        }
    }

    #[test]
    fn flags_make_the_config() {
        let args = KubeArgs {
            kube: true,
            node_name: Some("n1".into()),
            pod_namespace: Some("mesh-system".into()),
            exclude_namespaces: vec!["monitoring".into()],
            probe_sources: vec!["::ffff:10.0.0.1".parse().expect("ip")],
            ..KubeArgs::default()
        };
        let cfg = args.config().expect("config");
        assert_eq!(cfg.node_name, "n1");
        assert!(
            ["kube-system", "mesh-system", "monitoring"]
                .iter()
                .all(|ns| cfg.excluded_namespaces.contains(*ns))
        );
        assert_eq!(
            cfg.probe_sources,
            vec!["10.0.0.1".parse::<IpAddr>().expect("ip")]
        );
        let e = KubeArgs::default().config().expect_err("no node name");
        assert!(e.to_string().contains("NODE_NAME"), "{e}");
    }
}

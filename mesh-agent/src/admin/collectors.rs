//! The metrics `admin` adds to the telemetry registry, read at scrape time
//! from what only `admin` knows: the certificates
//! (`mesh_certificates`, `mesh_certificate_expiry_seconds{identity}`,
//! `mesh_ca_expiry_seconds`, `mesh_ca_expiring`: 1 from 30 days before the
//! CA expires) and the kernel's pinned maps
//! (`mesh_ebpf_decisions_total{decision}`, one series per kernel counter,
//! `mesh_ebpf_map_entries{map}` and `mesh_ebpf_map_capacity{map}`).

use std::{fmt, sync::Arc, time::SystemTime};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use super::{certs::Certificates, kernel::KernelSource};
use crate::telemetry::Metrics;

/// Adds the certificate metrics (from `certificates`) and the kernel
/// metrics (from `kernel`; none without it) to `metrics`.
pub fn register(
    metrics: &mut Metrics,
    kernel: Option<Arc<dyn KernelSource>>,
    certificates: Certificates,
) {
    metrics.register_collector(Box::new(CertificateCollector(certificates)));
    if let Some(kernel) = kernel {
        metrics.register_collector(Box::new(KernelCollector(kernel)));
    }
}

/// `mesh_certificates` and `mesh_certificate_expiry_seconds{identity}`, at
/// scrape time. (Collectors' help texts carry their own final period, which
/// the registry adds to registered metrics.)
#[derive(Debug)]
struct CertificateCollector(Certificates);

impl Collector for CertificateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let certs = self.0.list();
        let count = ConstGauge::new(i64::try_from(certs.len()).unwrap_or(i64::MAX));
        let m = encoder.encode_descriptor(
            "mesh_certificates",
            "Workload certificates the agent holds.",
            None,
            MetricType::Gauge,
        )?;
        count.encode(m)?;
        let now = SystemTime::now();
        if let Some(ca) = self.0.ca() {
            let m = encoder.encode_descriptor(
                "mesh_ca_expiry_seconds",
                "Seconds until the mesh CA certificate expires (negative once expired).",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(ca.expires_in(now)).encode(m)?;
            let expiring = !matches!(ca.expiry_at(now), crate::identity::CaExpiry::Valid);
            let m = encoder.encode_descriptor(
                "mesh_ca_expiring",
                "1 when the mesh CA expires within 30 days (or is not valid): install a new CA.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::from(expiring)).encode(m)?;
        }
        if let Some(issuer) = self.0.issuer() {
            let m = encoder.encode_descriptor(
                "mesh_cert_issued",
                "Workload certificates issued since start (first issuance and rotations).",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(issuer.counts.issued).encode(m)?;
            let m = encoder.encode_descriptor(
                "mesh_cert_issue_failures",
                "Certificate issuances that failed since start (issuer unreachable, refused, or a bad answer); see the agent's log or `mesh-agent certs` for the reason.",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(issuer.counts.failed).encode(m)?;
            let mut m = encoder.encode_descriptor(
                "mesh_cert_issuer_info",
                "The issuer of the workload certificates (1, labelled by kind and endpoint).",
                None,
                MetricType::Gauge,
            )?;
            let kind = issuer.info.kind.to_string();
            let labels = [
                ("kind", kind.as_str()),
                ("endpoint", issuer.info.endpoint.as_str()),
            ];
            ConstGauge::new(1).encode(m.encode_family(&labels)?)?;
        }
        if certs.is_empty() {
            return Ok(());
        }
        let mut m = encoder.encode_descriptor(
            "mesh_certificate_expiry_seconds",
            "Seconds until the workload certificate of an identity expires.",
            None,
            MetricType::Gauge,
        )?;
        for c in &certs {
            let labels = [("identity", c.identity.as_str())];
            ConstGauge::new(c.expires_in(now)).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The kernel counters and map occupancy, read at scrape time.
#[derive(Debug)]
struct KernelCollector(Arc<dyn KernelSource>);

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        match self.0.counters() {
            Ok(reading) => {
                let mut m = encoder.encode_descriptor(
                    "mesh_ebpf_decisions",
                    "Decisions of the kernel programs, by counter.",
                    None,
                    MetricType::Counter,
                )?;
                for (name, value) in reading {
                    let labels = [("decision", name)];
                    ConstCounter::new(value).encode(m.encode_family(&labels)?)?;
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the kernel counters for a scrape"),
        }
        let occupancy = self.0.occupancy();
        if occupancy.is_empty() {
            return Ok(());
        }
        let mut m = encoder.encode_descriptor(
            "mesh_ebpf_map_entries",
            "Entries in the datapath's maps.",
            None,
            MetricType::Gauge,
        )?;
        for o in &occupancy {
            let labels = [("map", o.map)];
            ConstGauge::new(i64::try_from(o.entries).unwrap_or(i64::MAX))
                .encode(m.encode_family(&labels)?)?;
        }
        let mut m = encoder.encode_descriptor(
            "mesh_ebpf_map_capacity",
            "Maximum entries of the datapath's maps.",
            None,
            MetricType::Gauge,
        )?;
        for o in &occupancy {
            let labels = [("map", o.map)];
            ConstGauge::new(i64::try_from(o.capacity).unwrap_or(i64::MAX))
                .encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        admin::{
            certs::{CertificateInfo, CertificateSource},
            kernel::{KernelPodAddr, MapOccupancy},
        },
        datapath::DatapathError,
        identity::{CertManager, LocalCa, MeshCa, TrustDomain},
        telemetry::PolicyDecision,
    };

    #[derive(Debug)]
    struct FakeKernel;

    impl KernelSource for FakeKernel {
        fn counters(&self) -> Result<Vec<(&'static str, u64)>, DatapathError> {
            Ok(vec![
                ("connect_redirected", 3),
                ("lookup_dropped_no_listener", 1),
            ])
        }
        fn occupancy(&self) -> Vec<MapOccupancy> {
            vec![MapOccupancy {
                map: "ENROLLED_NETNS",
                entries: 2,
                capacity: 1024,
            }]
        }
        fn pod_addrs(&self) -> Result<Vec<KernelPodAddr>, DatapathError> {
            Ok(Vec::new())
        }
    }

    /// A telemetry registry with the admin collectors.
    fn registry(kernel: Option<Arc<dyn KernelSource>>, certificates: Certificates) -> Metrics {
        let mut m = Metrics::new();
        register(&mut m, kernel, certificates);
        m
    }

    #[test]
    fn encodes_the_collectors_after_the_telemetry_metrics_exactly() {
        let m = registry(Some(Arc::new(FakeKernel)), Certificates::default());
        m.policy_decision(PolicyDecision::Deny);
        let text = m.encode().expect("encode");
        // Up to its last series the text is telemetry's (checked exactly there).
        let (_, collected) = text
            .split_once("mesh_policy_decisions_total{result=\"deny\"} 1\n")
            .expect("telemetry metrics first");
        let expected = "# HELP mesh_certificates Workload certificates the agent holds.\n\
# TYPE mesh_certificates gauge\n\
mesh_certificates 0\n\
# HELP mesh_ebpf_decisions Decisions of the kernel programs, by counter.\n\
# TYPE mesh_ebpf_decisions counter\n\
mesh_ebpf_decisions_total{decision=\"connect_redirected\"} 3\n\
mesh_ebpf_decisions_total{decision=\"lookup_dropped_no_listener\"} 1\n\
# HELP mesh_ebpf_map_entries Entries in the datapath's maps.\n\
# TYPE mesh_ebpf_map_entries gauge\n\
mesh_ebpf_map_entries{map=\"ENROLLED_NETNS\"} 2\n\
# HELP mesh_ebpf_map_capacity Maximum entries of the datapath's maps.\n\
# TYPE mesh_ebpf_map_capacity gauge\n\
mesh_ebpf_map_capacity{map=\"ENROLLED_NETNS\"} 1024\n\
# EOF\n";
        assert_eq!(collected, expected);
    }

    struct OneCert;
    impl CertificateSource for OneCert {
        fn certificates(&self) -> Vec<CertificateInfo> {
            let now = SystemTime::now();
            vec![CertificateInfo {
                identity: "spiffe://cluster.local/ns/default/sa/a".into(),
                serial: "0a".into(),
                not_before: now,
                not_after: now + Duration::from_secs(3600),
                chain_len: 2,
            }]
        }
    }

    #[test]
    fn certificate_metrics_are_read_at_scrape_time() {
        let certs = Certificates::default();
        let m = registry(None, certs.clone());
        assert!(
            m.encode()
                .expect("encode")
                .contains("\nmesh_certificates 0\n")
        );
        assert!(
            !m.encode()
                .expect("encode")
                .contains("mesh_certificate_expiry_seconds{")
        );
        certs.set_source(Arc::new(OneCert));
        let text = m.encode().expect("encode");
        assert!(text.contains("\nmesh_certificates 1\n"), "{text}");
        let line = text
            .lines()
            .find(|l| {
                l.starts_with(
                    "mesh_certificate_expiry_seconds{identity=\"spiffe://cluster.local/ns/default/sa/a\"} ",
                )
            })
            .expect("expiry series");
        let secs: i64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .expect("value");
        assert!((3590..=3600).contains(&secs), "{line}");
    }

    /// A manager signing with a new root CA valid for `days`.
    fn manager(days: u32) -> Arc<CertManager> {
        let td = TrustDomain::default();
        let generated = MeshCa::generate(&td, days).expect("CA");
        let ca = MeshCa::from_pem(
            generated.cert_pem.as_bytes(),
            generated.key_pem.as_bytes(),
            None,
        )
        .expect("CA");
        Arc::new(CertManager::new(Arc::new(LocalCa::new(Arc::new(ca), td))))
    }

    /// The value of an unlabelled gauge in the metrics text.
    fn gauge(text: &str, name: &str) -> i64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
            .parse()
            .expect("a number")
    }

    fn metrics_of(manager: &Arc<CertManager>) -> String {
        let certificates = Certificates::default();
        certificates.set_source(manager.clone());
        registry(None, certificates).encode().expect("encode")
    }

    #[test]
    fn a_ca_expiring_within_30_days_sets_the_metric() {
        let short = manager(10);
        let text = metrics_of(&short);
        assert_eq!(gauge(&text, "mesh_ca_expiring"), 1);
        let left = gauge(&text, "mesh_ca_expiry_seconds");
        assert!((9 * 86_400..=10 * 86_400).contains(&left), "{left}");
        assert_eq!(gauge(&metrics_of(&manager(365)), "mesh_ca_expiring"), 0);
    }
}

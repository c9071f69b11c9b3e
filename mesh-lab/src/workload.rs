//! The agent's workload file (file-mode sync), rendered from lab facts.
#![forbid(unsafe_code)]

use std::fmt::Write as _;

use crate::topology::{NodeInfo, PodInfo};

/// Renders the agent's workload YAML for `node`, listing `pods` with their
/// enrolment flag, in the given order:
///
/// ```yaml
/// node:
///   name: ml123x1-n0
///   probeSources: ["198.18.1.1", "fd18:1::1"]
/// pods:
///   - name: a
///     namespace: default
///     serviceAccount: a
///     ips: ["198.18.1.10"]
///     netns: /var/run/netns/ml123x1-n0-a
///     cgroup: /sys/fs/cgroup/unified/ml123x1/n0/a
///     enrolled: true
/// ```
///
/// `probeSources` are the node's bridge addresses: in the lab, kubelet-style
/// probes come from the node netns. With no pods it renders `pods: []`. A plain
/// function on purpose: tests may edit the text before writing it.
pub fn render_workload_yaml(node: &NodeInfo, pods: &[(&PodInfo, bool)]) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = writeln!(out, "node:");
    let _ = writeln!(out, "  name: {}", node.name());
    let _ = writeln!(
        out,
        "  probeSources: [\"{}\", \"{}\"]",
        node.bridge_v4(),
        node.bridge_v6()
    );
    if pods.is_empty() {
        let _ = writeln!(out, "pods: []");
        return out;
    }
    let _ = writeln!(out, "pods:");
    for (pod, enrolled) in pods {
        let ips = pod
            .ips()
            .iter()
            .map(|ip| format!("\"{ip}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(out, "  - name: {}", pod.name());
        let _ = writeln!(out, "    namespace: default");
        let _ = writeln!(out, "    serviceAccount: {}", pod.name());
        let _ = writeln!(out, "    ips: [{ips}]");
        let _ = writeln!(out, "    netns: {}", pod.netns_path().display());
        let _ = writeln!(out, "    cgroup: {}", pod.cgroup_dir().display());
        let _ = writeln!(out, "    enrolled: {enrolled}");
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::spec::{LabSpec, NodeSpec, PodSpec};
    use crate::topology::Topology;

    #[test]
    fn renders_the_documented_shape() {
        let spec = LabSpec::new().node(
            NodeSpec::new()
                .pod(PodSpec::new("a"))
                .pod(PodSpec::dual_stack("b")),
        );
        let t = Topology::plan("ml7x1", &spec, Path::new("/sys/fs/cgroup/unified"));
        let yaml = render_workload_yaml(&t.nodes[0], &[(&t.pods[0], true), (&t.pods[1], false)]);
        let expected = "\
node:
  name: ml7x1-n0
  probeSources: [\"198.18.1.1\", \"fd18:1::1\"]
pods:
  - name: a
    namespace: default
    serviceAccount: a
    ips: [\"198.18.1.10\"]
    netns: /var/run/netns/ml7x1-n0-a
    cgroup: /sys/fs/cgroup/unified/ml7x1/n0/a
    enrolled: true
  - name: b
    namespace: default
    serviceAccount: b
    ips: [\"198.18.1.11\", \"fd18:1::11\"]
    netns: /var/run/netns/ml7x1-n0-b
    cgroup: /sys/fs/cgroup/unified/ml7x1/n0/b
    enrolled: false
";
        assert_eq!(yaml, expected);
        let doc: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("valid YAML");
        assert_eq!(doc["pods"][1]["ips"][1].as_str(), Some("fd18:1::11"));
        assert_eq!(doc["pods"][0]["enrolled"].as_bool(), Some(true));
        assert_eq!(doc["node"]["probeSources"][0].as_str(), Some("198.18.1.1"));
        assert!(render_workload_yaml(&t.nodes[0], &[]).ends_with("pods: []\n"));
    }
}

//! What a lab should contain: nodes and the pods on them.
#![forbid(unsafe_code)]

use std::collections::HashSet;

use anyhow::{Result, bail, ensure};

/// The largest number of nodes a lab can have (node `i` uses `198.18.<i+1>.0/24`).
pub const MAX_NODES: usize = 254;
/// The largest number of pods on one node (pod `k` gets host part `10 + k`).
pub const MAX_PODS_PER_NODE: usize = 245;
/// The longest pod name accepted (it becomes part of a netns name and a cgroup directory).
pub const MAX_POD_NAME_LEN: usize = 32;

/// A whole lab: the nodes, in order (node `i` is `<lab id>-n<i>`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabSpec {
    /// The nodes; at least one.
    pub nodes: Vec<NodeSpec>,
}

/// One node ("a Kubernetes node"): a netns with a bridge for its pods.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSpec {
    /// The pods on this node, in order (pod `k` gets host part `10 + k`).
    pub pods: Vec<PodSpec>,
}

/// One pod: a netns with `eth0` on its node's bridge, and a cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// The pod's name, unique in the lab: lower-case letters, digits and `-`,
    /// starting with a letter or digit, at most [`MAX_POD_NAME_LEN`] bytes.
    pub name: String,
    /// Whether the pod also gets an IPv6 address (`fd18:<node+1>::<10+k>/64`).
    pub ipv6: bool,
}

impl LabSpec {
    /// An empty spec; add nodes with [`LabSpec::node`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a node (builder style).
    #[must_use]
    pub fn node(mut self, node: NodeSpec) -> Self {
        self.nodes.push(node);
        self
    }

    /// Checks the limits and naming rules that [`crate::Lab::new`] relies on.
    pub fn validate(&self) -> Result<()> {
        ensure!(!self.nodes.is_empty(), "a lab needs at least one node");
        ensure!(
            self.nodes.len() <= MAX_NODES,
            "a lab has at most {MAX_NODES} nodes, the spec has {}",
            self.nodes.len()
        );
        let mut seen = HashSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            ensure!(
                node.pods.len() <= MAX_PODS_PER_NODE,
                "node {i}: at most {MAX_PODS_PER_NODE} pods per node, the spec has {}",
                node.pods.len()
            );
            for pod in &node.pods {
                validate_pod_name(&pod.name)?;
                if !seen.insert(pod.name.as_str()) {
                    bail!(
                        "pod name {:?} is used twice: pod names are unique in a lab",
                        pod.name
                    );
                }
            }
        }
        Ok(())
    }
}

impl NodeSpec {
    /// A node without pods; add them with [`NodeSpec::pod`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a pod (builder style).
    #[must_use]
    pub fn pod(mut self, pod: PodSpec) -> Self {
        self.pods.push(pod);
        self
    }

    /// A node with IPv4-only pods of the given names.
    pub fn with_pods<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            pods: names.into_iter().map(PodSpec::new).collect(),
        }
    }
}

impl PodSpec {
    /// An IPv4-only pod.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ipv6: false,
        }
    }

    /// A pod with an IPv4 and an IPv6 address.
    pub fn dual_stack(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ipv6: true,
        }
    }

    /// Sets whether the pod gets an IPv6 address (builder style).
    #[must_use]
    pub fn ipv6(mut self, ipv6: bool) -> Self {
        self.ipv6 = ipv6;
        self
    }
}

fn validate_pod_name(name: &str) -> Result<()> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_start = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    ensure!(
        ok_chars && ok_start && name.len() <= MAX_POD_NAME_LEN,
        "pod name {name:?} is invalid: use 1 to {MAX_POD_NAME_LEN} of [a-z0-9-], starting with a letter or digit"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_and_validation() {
        let spec = LabSpec::new()
            .node(
                NodeSpec::new()
                    .pod(PodSpec::new("a"))
                    .pod(PodSpec::dual_stack("b")),
            )
            .node(NodeSpec::with_pods(["c"]));
        spec.validate().expect("valid spec");
        assert!(spec.nodes[0].pods[1].ipv6);
        assert!(!spec.nodes[1].pods[0].ipv6);

        assert!(LabSpec::new().validate().is_err(), "no nodes");
        let dup = LabSpec::new()
            .node(NodeSpec::with_pods(["a"]))
            .node(NodeSpec::with_pods(["a"]));
        assert!(dup.validate().is_err(), "duplicate pod names across nodes");
        for bad in [
            "",
            "-a",
            "A",
            "a_b",
            "a/b",
            &"x".repeat(MAX_POD_NAME_LEN + 1),
        ] {
            let spec = LabSpec::new().node(NodeSpec::with_pods([bad]));
            assert!(spec.validate().is_err(), "{bad:?} must be rejected");
        }
    }
}

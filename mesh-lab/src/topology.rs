//! The lab's names and addresses, computed from a [`LabSpec`] and a lab id
//! without touching the system.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use crate::spec::LabSpec;
use crate::sys::{BPFFS_DIR, NETNS_DIR};

/// Name of each node's bridge for its pods (inside the node netns).
pub const NODE_BRIDGE: &str = "br0";
/// Name of each node's inter-node link interface (inside the node netns).
pub const NODE_LINK_IFACE: &str = "eth0";
/// Name of each pod's interface (inside the pod netns).
pub const POD_IFACE: &str = "eth0";
/// Name of the bridge joining the nodes (inside the wire netns).
pub const WIRE_BRIDGE: &str = "br0";
/// Prefix length of every lab subnet, IPv4.
pub const PREFIX_V4: u8 = 24;
/// Prefix length of every lab subnet, IPv6.
pub const PREFIX_V6: u8 = 64;

/// A node's bridge IPv4 address: `198.18.<node+1>.1` (the pods' gateway).
pub fn node_bridge_v4(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, octet(node + 1), 1)
}

/// A node's bridge IPv6 address: `fd18:<node+1>::1` (the group is written with
/// the decimal digits of `node+1`, like the IPv4 octet).
pub fn node_bridge_v6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd18, dec_as_hex(node + 1), 0, 0, 0, 0, 0, 1)
}

/// A node's inter-node link IPv4 address: `198.19.0.<node+1>`.
pub fn node_link_v4(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, octet(node + 1))
}

/// A node's inter-node link IPv6 address: `fd19::<node+1>` (decimal digits).
pub fn node_link_v6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd19, 0, 0, 0, 0, 0, 0, dec_as_hex(node + 1))
}

/// Pod `k` of `node`, IPv4: `198.18.<node+1>.<10+k>`.
pub fn pod_v4(node: usize, k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, octet(node + 1), octet(10 + k))
}

/// Pod `k` of `node`, IPv6: `fd18:<node+1>::<10+k>` (decimal digits).
pub fn pod_v6(node: usize, k: usize) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd18,
        dec_as_hex(node + 1),
        0,
        0,
        0,
        0,
        0,
        dec_as_hex(10 + k),
    )
}

/// A node's pod subnet, IPv4: `198.18.<node+1>.0/24`.
pub fn pod_subnet_v4(node: usize) -> (Ipv4Addr, u8) {
    (Ipv4Addr::new(198, 18, octet(node + 1), 0), PREFIX_V4)
}

/// A node's pod subnet, IPv6: `fd18:<node+1>::/64`.
pub fn pod_subnet_v6(node: usize) -> (Ipv6Addr, u8) {
    (
        Ipv6Addr::new(0xfd18, dec_as_hex(node + 1), 0, 0, 0, 0, 0, 0),
        PREFIX_V6,
    )
}

/// Limits in [`crate::spec`] keep every value in range; saturate rather than wrap.
fn octet(v: usize) -> u8 {
    u8::try_from(v).unwrap_or(u8::MAX)
}

/// Reads the decimal digits of `v` as hex, so that `10` becomes `0x10` and an
/// IPv6 group reads like the matching IPv4 octet.
fn dec_as_hex(v: usize) -> u16 {
    u16::from_str_radix(&v.to_string(), 16).unwrap_or(u16::MAX)
}

/// Node `i`'s name (and netns name, and pin dir name): `<lab id>-n<i>`.
pub(crate) fn node_name(id: &str, i: usize) -> String {
    format!("{id}-n{i}")
}

/// A node of a running lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub(crate) index: usize,
    pub(crate) netns: String,
    pub(crate) cgroup_dir: PathBuf,
    pub(crate) wire_iface: String,
    pub(crate) pin_dir: PathBuf,
    pub(crate) pods: Vec<usize>,
}

impl NodeInfo {
    /// The node's index `i` in the spec.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The node's name, which is also its netns name: `<lab id>-n<i>`.
    pub fn name(&self) -> &str {
        &self.netns
    }

    /// The node's netns name (same as [`NodeInfo::name`]), for `ip -n`.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The node's netns file: `/var/run/netns/<lab id>-n<i>`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }

    /// The bridge's IPv4 address, `198.18.<i+1>.1` (pods' gateway and probe source).
    pub fn bridge_v4(&self) -> Ipv4Addr {
        node_bridge_v4(self.index)
    }

    /// The bridge's IPv6 address, `fd18:<i+1>::1`.
    pub fn bridge_v6(&self) -> Ipv6Addr {
        node_bridge_v6(self.index)
    }

    /// The IPv4 address on the inter-node link, `198.19.0.<i+1>`.
    pub fn link_v4(&self) -> Ipv4Addr {
        node_link_v4(self.index)
    }

    /// The IPv6 address on the inter-node link, `fd19::<i+1>`.
    pub fn link_v6(&self) -> Ipv6Addr {
        node_link_v6(self.index)
    }

    /// The inter-node link interface inside the node netns (`eth0`): capture
    /// here to see what crosses between nodes.
    pub fn link_iface(&self) -> &str {
        NODE_LINK_IFACE
    }

    /// The other end of the node's link, inside the wire netns (`n<i>`).
    pub fn wire_iface(&self) -> &str {
        &self.wire_iface
    }

    /// The pods' bridge inside the node netns (`br0`).
    pub fn bridge_iface(&self) -> &str {
        NODE_BRIDGE
    }

    /// The node's cgroup directory: `<cgroup2>/<lab id>/n<i>` (its pods are below).
    pub fn cgroup_dir(&self) -> &Path {
        &self.cgroup_dir
    }

    /// The bpffs pin dir reserved for this node's agent:
    /// `/sys/fs/bpf/<lab id>-n<i>` (not created by the lab; removed at cleanup).
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Indexes into [`crate::Lab::pods`] of this node's pods, in spec order.
    pub fn pod_indexes(&self) -> &[usize] {
        &self.pods
    }
}

/// A pod of a running lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub(crate) name: String,
    pub(crate) node: usize,
    pub(crate) k: usize,
    pub(crate) ipv6: bool,
    pub(crate) netns: String,
    pub(crate) cgroup_dir: PathBuf,
    pub(crate) host_veth: String,
}

impl PodInfo {
    /// The pod's name from the spec.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The index of the node the pod is on.
    pub fn node(&self) -> usize {
        self.node
    }

    /// The pod's IPv4 address, `198.18.<node+1>.<10+k>`.
    pub fn ipv4(&self) -> Ipv4Addr {
        pod_v4(self.node, self.k)
    }

    /// The pod's IPv6 address, `fd18:<node+1>::<10+k>`, if the spec asked for one.
    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        self.ipv6.then(|| pod_v6(self.node, self.k))
    }

    /// All the pod's addresses, IPv4 first.
    pub fn ips(&self) -> Vec<IpAddr> {
        std::iter::once(IpAddr::V4(self.ipv4()))
            .chain(self.ipv6().map(IpAddr::V6))
            .collect()
    }

    /// The pod's netns name: `<lab id>-n<node>-<pod>`.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The pod's netns file: `/var/run/netns/<lab id>-n<node>-<pod>`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }

    /// The pod's cgroup directory: `<cgroup2>/<lab id>/n<node>/<pod>`.
    pub fn cgroup_dir(&self) -> &Path {
        &self.cgroup_dir
    }

    /// The pod's interface inside its netns (`eth0`).
    pub fn iface(&self) -> &str {
        POD_IFACE
    }

    /// The node end of the pod's veth, inside the node netns (`pv<k>`, a port of `br0`).
    pub fn host_veth(&self) -> &str {
        &self.host_veth
    }
}

/// Everything the lab will create, by name.
#[derive(Debug, Clone)]
pub(crate) struct Topology {
    pub nodes: Vec<NodeInfo>,
    pub pods: Vec<PodInfo>,
    pub wire_netns: String,
    pub lab_cgroup: PathBuf,
}

impl Topology {
    pub fn plan(id: &str, spec: &LabSpec, cgroup2: &Path) -> Self {
        let lab_cgroup = cgroup2.join(id);
        let mut nodes = Vec::new();
        let mut pods = Vec::new();
        for (i, node) in spec.nodes.iter().enumerate() {
            let netns = node_name(id, i);
            let cgroup_dir = lab_cgroup.join(format!("n{i}"));
            let mut indexes = Vec::new();
            for (k, pod) in node.pods.iter().enumerate() {
                indexes.push(pods.len());
                pods.push(PodInfo {
                    name: pod.name.clone(),
                    node: i,
                    k,
                    ipv6: pod.ipv6,
                    netns: format!("{netns}-{}", pod.name),
                    cgroup_dir: cgroup_dir.join(&pod.name),
                    host_veth: format!("pv{k}"),
                });
            }
            nodes.push(NodeInfo {
                index: i,
                pin_dir: Path::new(BPFFS_DIR).join(&netns),
                netns,
                cgroup_dir,
                wire_iface: format!("n{i}"),
                pods: indexes,
            });
        }
        Self {
            nodes,
            pods,
            wire_netns: format!("{id}-wire"),
            lab_cgroup,
        }
    }

    /// Every netns name: pods, nodes, wire.
    pub fn netns_names(&self) -> Vec<String> {
        self.pods
            .iter()
            .map(|p| p.netns.clone())
            .chain(self.nodes.iter().map(|n| n.netns.clone()))
            .chain(std::iter::once(self.wire_netns.clone()))
            .collect()
    }

    /// `ip -batch` lines for the wire netns: the bridge and one veth per node,
    /// whose other end (`eth0`) is created directly inside the node netns.
    pub fn wire_batch(&self) -> Vec<String> {
        let mut lines = vec![
            "link set lo up".to_owned(),
            format!("link add {WIRE_BRIDGE} type bridge"),
            format!("link set {WIRE_BRIDGE} up"),
        ];
        for node in &self.nodes {
            let w = &node.wire_iface;
            lines.push(format!(
                "link add {w} type veth peer name {NODE_LINK_IFACE} netns {}",
                node.netns
            ));
            lines.push(format!("link set {w} master {WIRE_BRIDGE}"));
            lines.push(format!("link set {w} up"));
        }
        lines
    }

    /// `ip -batch` lines for a node netns: bridge, link addresses, routes to
    /// the other nodes' pod subnets, and one veth per pod (the pod end, `eth0`,
    /// is created directly inside the pod netns).
    pub fn node_batch(&self, i: usize) -> Vec<String> {
        let node = &self.nodes[i];
        let mut lines = vec![
            "link set lo up".to_owned(),
            format!("link add {NODE_BRIDGE} type bridge"),
            format!(
                "addr add {}/{PREFIX_V4} dev {NODE_BRIDGE}",
                node_bridge_v4(i)
            ),
            format!(
                "addr add {}/{PREFIX_V6} dev {NODE_BRIDGE} nodad",
                node_bridge_v6(i)
            ),
            format!("link set {NODE_BRIDGE} up"),
            format!(
                "addr add {}/{PREFIX_V4} dev {NODE_LINK_IFACE}",
                node_link_v4(i)
            ),
            format!(
                "addr add {}/{PREFIX_V6} dev {NODE_LINK_IFACE} nodad",
                node_link_v6(i)
            ),
            format!("link set {NODE_LINK_IFACE} up"),
        ];
        for other in self.nodes.iter().filter(|n| n.index != i) {
            let j = other.index;
            let (net4, len4) = pod_subnet_v4(j);
            let (net6, len6) = pod_subnet_v6(j);
            lines.push(format!("route add {net4}/{len4} via {}", node_link_v4(j)));
            lines.push(format!("route add {net6}/{len6} via {}", node_link_v6(j)));
        }
        for &p in &node.pods {
            let pod = &self.pods[p];
            let v = &pod.host_veth;
            lines.push(format!(
                "link add {v} type veth peer name {POD_IFACE} netns {}",
                pod.netns
            ));
            lines.push(format!("link set {v} master {NODE_BRIDGE}"));
            lines.push(format!("link set {v} up"));
        }
        lines
    }

    /// `ip -batch` lines for a pod netns: addresses and default routes via the bridge.
    pub fn pod_batch(&self, p: usize) -> Vec<String> {
        let pod = &self.pods[p];
        let mut lines = vec![
            "link set lo up".to_owned(),
            format!("addr add {}/{PREFIX_V4} dev {POD_IFACE}", pod.ipv4()),
        ];
        if let Some(v6) = pod.ipv6() {
            lines.push(format!("addr add {v6}/{PREFIX_V6} dev {POD_IFACE} nodad"));
        }
        lines.push(format!("link set {POD_IFACE} up"));
        lines.push(format!(
            "route add default via {}",
            node_bridge_v4(pod.node)
        ));
        if pod.ipv6 {
            lines.push(format!("route add ::/0 via {}", node_bridge_v6(pod.node)));
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{NodeSpec, PodSpec};

    #[test]
    fn address_plan() {
        assert_eq!(node_bridge_v4(0).to_string(), "198.18.1.1");
        assert_eq!(node_bridge_v6(0).to_string(), "fd18:1::1");
        assert_eq!(node_link_v4(1).to_string(), "198.19.0.2");
        assert_eq!(node_link_v6(1).to_string(), "fd19::2");
        assert_eq!(pod_v4(1, 0).to_string(), "198.18.2.10");
        assert_eq!(pod_v6(0, 1).to_string(), "fd18:1::11");
        assert_eq!(pod_v6(9, 0).to_string(), "fd18:10::10");
        assert_eq!(pod_subnet_v6(2).0.to_string(), "fd18:3::");
    }

    #[test]
    fn names_and_batches() {
        let spec = LabSpec::new()
            .node(
                NodeSpec::new()
                    .pod(PodSpec::new("a"))
                    .pod(PodSpec::dual_stack("b")),
            )
            .node(NodeSpec::with_pods(["c"]));
        let t = Topology::plan("ml7x1", &spec, Path::new("/cg"));
        assert_eq!(t.nodes[1].netns, "ml7x1-n1");
        assert_eq!(t.nodes[1].pin_dir, Path::new("/sys/fs/bpf/ml7x1-n1"));
        assert_eq!(t.pods[1].netns, "ml7x1-n0-b");
        assert_eq!(t.pods[2].cgroup_dir, Path::new("/cg/ml7x1/n1/c"));
        assert_eq!(t.pods[2].ipv4().to_string(), "198.18.2.10");
        assert_eq!(t.pods[0].ipv6(), None);
        assert_eq!(
            t.netns_names(),
            [
                "ml7x1-n0-a",
                "ml7x1-n0-b",
                "ml7x1-n1-c",
                "ml7x1-n0",
                "ml7x1-n1",
                "ml7x1-wire"
            ]
        );
        let n0 = t.node_batch(0);
        assert!(n0.contains(&"route add 198.18.2.0/24 via 198.19.0.2".to_owned()));
        assert!(n0.contains(&"route add fd18:2::/64 via fd19::2".to_owned()));
        assert!(n0.contains(&"link add pv1 type veth peer name eth0 netns ml7x1-n0-b".to_owned()));
        let b = t.pod_batch(1);
        assert!(b.contains(&"addr add fd18:1::11/64 dev eth0 nodad".to_owned()));
        assert!(b.contains(&"route add ::/0 via fd18:1::1".to_owned()));
        assert!(!t.pod_batch(0).iter().any(|l| l.contains("::")));
    }
}

//! Cluster files as the agent reads them (YAML or JSON, the format of `datapath check`),
//! built from a list of nodes: the tests' two or three nodes, the lab's two, the benchmark's
//! thousands.
use std::net::Ipv4Addr;

/// One node of a cluster file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNode {
    pub name: String,
    pub address: String,
    pub pod_cidr: String,
    /// `vtepMAC`, when the file gives one (else the agent derives it from the address).
    pub vtep_mac: Option<String>,
}

impl ClusterNode {
    pub fn new(name: &str, address: &str, pod_cidr: &str) -> Self {
        Self {
            name: name.into(),
            address: address.into(),
            pod_cidr: pod_cidr.into(),
            vtep_mac: None,
        }
    }
}

/// The YAML cluster file: `encapsulation`, then `extra` (more top-level lines, each ending in
/// a newline), then the nodes.
pub fn yaml(encap: &str, extra: &str, nodes: &[ClusterNode]) -> String {
    let mut s = format!("encapsulation: {encap}\n{extra}nodes:\n");
    for n in nodes {
        s += &format!(
            "  - name: {}\n    address: {}\n    podCIDR: {}\n",
            n.name, n.address, n.pod_cidr
        );
        if let Some(mac) = &n.vtep_mac {
            s += &format!("    vtepMAC: \"{mac}\"\n");
        }
    }
    s
}

/// The same cluster as JSON (what a generated or `kubectl`-made file of this size would be).
pub fn json(encap: &str, nodes: &[ClusterNode]) -> String {
    let list: Vec<serde_json::Value> = nodes
        .iter()
        .map(|n| {
            let mut v = serde_json::json!({
                "name": n.name,
                "address": n.address,
                "podCIDR": n.pod_cidr,
            });
            if let Some(mac) = &n.vtep_mac {
                v["vtepMAC"] = serde_json::json!(mac);
            }
            v
        })
        .collect();
    serde_json::json!({ "encapsulation": encap, "nodes": list }).to_string()
}

/// The two nodes of the lab and the program tests: node1 192.168.1.10 with 10.244.0.0/24,
/// node2 192.168.1.11 with 10.244.1.0/24.
pub fn two_nodes() -> Vec<ClusterNode> {
    vec![
        ClusterNode::new("node1", "192.168.1.10", "10.244.0.0/24"),
        ClusterNode::new("node2", "192.168.1.11", "10.244.1.0/24"),
    ]
}

/// Node `k` (0-based) of the benchmark's generated clusters: `node{k+1}`, at
/// `generated_addr(k)`, pod CIDR `generated_pod_cidr(k)`.
pub fn generated(k: u32) -> ClusterNode {
    let (addr, len) = generated_pod_cidr(k);
    ClusterNode::new(
        &format!("node{}", k + 1),
        &generated_addr(k).to_string(),
        &format!("{addr}/{len}"),
    )
}

/// The underlay address of generated node `k`: 192.168.1.10 and .11 for the first two (the
/// benchmark's namespace has those), then 192.168.2.1 on.
pub fn generated_addr(k: u32) -> Ipv4Addr {
    match k {
        0 => Ipv4Addr::new(192, 168, 1, 10),
        1 => Ipv4Addr::new(192, 168, 1, 11),
        _ => Ipv4Addr::new(192, 168, 2 + (k / 250) as u8, (k % 250 + 1) as u8),
    }
}

/// The pod CIDR of generated node `k`: 10.(k/256).(k%256).0/24.
pub fn generated_pod_cidr(k: u32) -> (Ipv4Addr, u8) {
    (Ipv4Addr::new(10, (k / 256) as u8, (k % 256) as u8, 0), 24)
}

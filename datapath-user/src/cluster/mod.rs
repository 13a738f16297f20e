//! The cluster state the agent works from, once validated: settings and nodes, and the
//! problems that reject or skip parts of a state (every one with its path and reason).
use std::{fmt, net::Ipv4Addr, str::FromStr};

pub mod bgp;
mod cidr;
pub mod raw;
pub mod six;
mod validate;

pub use bgp::{Bgp, BgpPeer};
pub use cidr::{Cidr, aggregate, covering, parse_cidr_list};
pub use six::{Cidr6, NodeV6};
pub use validate::{validate, validate_node};

/// How traffic to other nodes' pods is carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encap {
    Ipip,
    Vxlan,
    /// Not at all: pod packets leave as they are, toward the owning node's address as next
    /// hop; the fabric routes pod CIDRs (BGP, or one L2 segment: Flannel's host-gw).
    None,
}

impl Encap {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ipip => "ipip",
            Self::Vxlan => "vxlan",
            Self::None => "none",
        }
    }
    /// Bytes the mode adds to each packet.
    pub fn overhead(self) -> u32 {
        match self {
            Self::Ipip => maps_common::IPIP_OVERHEAD,
            Self::Vxlan => maps_common::VXLAN_OVERHEAD,
            Self::None => 0,
        }
    }
}

impl fmt::Display for Encap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Encap {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ipip" | "IPIP" => Ok(Self::Ipip),
            "vxlan" | "VXLAN" => Ok(Self::Vxlan),
            // Flannel's host-gw: native routing between nodes of one L2 segment.
            "none" | "None" | "host-gw" => Ok(Self::None),
            other => Err(format!(
                "unknown mode {other:?} (expected ipip, vxlan or none)"
            )),
        }
    }
}

/// A MAC address, parsed from `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || format!("{s:?} is not a MAC address (expected six hex bytes aa:bb:cc:dd:ee:ff)");
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("{s:?} is a multicast MAC address"));
    }
    Ok(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The VTEP MAC of a node whose file gives none: locally administered, derived from its address
/// (`0e:00:` then the four address bytes), so every node computes the same one.
pub fn derived_vtep_mac(addr: Ipv4Addr) -> [u8; 6] {
    let o = addr.octets();
    [0x0e, 0x00, o[0], o[1], o[2], o[3]]
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Position in the file, for messages.
    pub index: usize,
    pub name: String,
    /// Underlay IPv4 address.
    pub address: Ipv4Addr,
    /// Underlay prefix length when the file gives `address` as a.b.c.d/len.
    pub prefix_len: Option<u8>,
    pub pod_cidr: Cidr,
    pub vtep_mac: [u8; 6],
    /// The AS this node speaks BGP as, when it overrides the cluster's (`bgp.asNumber`).
    pub as_number: Option<u32>,
    /// A dual-stack node's IPv6 half.
    pub v6: Option<NodeV6>,
}

/// Validated cluster state: its settings (also reached through `Deref`, as `cluster.vni`) and
/// nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    pub settings: Settings,
    pub nodes: Vec<Node>,
    /// The name of this node in the state, when `Limits::own_node` asked for it: found by name,
    /// or else by one of this host's addresses (a lease flanneld wrote has no name).
    pub own: Option<String>,
    /// Flags the state overrides, and other things worth a word.
    pub warnings: Vec<String>,
    /// Nodes of live data (a NodeList, etcd) left out as incomplete or unreadable: their
    /// problem only, every other node is applied.
    pub skipped: Vec<Problem>,
    /// IPv6 halves of live data's nodes left out as incomplete or bad (the nodes are applied
    /// with IPv4 only).
    pub skipped6: Vec<Problem>,
}

/// Everything in a cluster state but its nodes: when it changes, every node is planned again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub encap: Encap,
    pub cross_subnet: bool,
    pub vni: u32,
    pub port: u16,
    /// Compute the outer UDP checksum of VXLAN packets instead of sending zero.
    pub udp_checksum: bool,
    /// The cluster's pod networks (Kubernetes' `--cluster-cidr`, Flannel's `Network`): the
    /// agent routes each toward the datapath with one route. Empty: the pod CIDRs, merged.
    pub cluster_cidrs: Vec<Cidr>,
    /// BGP: this node's pod CIDR advertised to the mesh and the peers (`bgp` block).
    pub bgp: Option<Bgp>,
    /// The cluster's IPv6 pod networks (`clusterCIDRv6`, Flannel's `IPv6Network`): one route
    /// each toward the datapath. Empty: the IPv6 pod CIDRs, merged.
    pub cluster_cidrs6: Vec<Cidr6>,
}

impl std::ops::Deref for Cluster {
    type Target = Settings;
    fn deref(&self) -> &Settings {
        &self.settings
    }
}

impl Cluster {
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// One problem in a cluster file: where and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// A rejected cluster file: every problem found.
#[derive(Debug, thiserror::Error)]
#[error("invalid cluster state ({} problem(s)):\n  {}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
pub struct Invalid(pub Vec<Problem>);

impl Invalid {
    /// Whether the state was rejected for not naming this node (it left the cluster).
    pub fn lacks_own_node(&self) -> bool {
        self.0
            .iter()
            .any(|p| p.path == "nodes" && p.reason.starts_with(validate::NOT_IN_STATE))
    }
}

/// Settings from the command line (`datapath run` and `check`) for cluster states that do
/// not carry them. A state's own value wins (with a warning when a flag says otherwise); a
/// flag wins over the defaults of where the state came from: Flannel's VNI 1 and port 8472
/// for Flannel's data, Calico's 4096 and 4789 otherwise.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct Defaults {
    /// Encapsulation: ipip, vxlan or none (native routing; the fabric routes pod CIDRs,
    /// e.g. from BGP) [default: vxlan].
    #[arg(long = "encapsulation")]
    pub encap: Option<Encap>,
    /// Reach same-subnet peers natively (Calico CrossSubnet, Flannel DirectRouting).
    #[arg(long)]
    pub cross_subnet: bool,
    /// VXLAN network identifier [default: 4096 (Calico); 1 for Flannel's data].
    #[arg(long)]
    pub vni: Option<u32>,
    /// VXLAN UDP port [default: 4789 (IANA, Calico); 8472 for Flannel's data].
    #[arg(long = "vxlan-port")]
    pub port: Option<u16>,
    /// Compute the outer UDP checksum of VXLAN packets (default zero, as Calico and Cilium).
    #[arg(long = "vxlan-udp-checksum")]
    pub udp_checksum: bool,
    /// The cluster's pod network(s), comma-separated (Kubernetes' --cluster-cidr): one route
    /// each toward the datapath. Default: the nodes' pod CIDRs, merged.
    #[arg(long = "cluster-cidr", value_parser = parse_cidr_list)]
    pub cluster_cidrs: Option<Vec<Cidr>>,
}

/// Limits the file must fit in.
#[derive(Clone, Debug, Default)]
pub struct Limits {
    pub max_nodes: u32,
    /// Name of this node, which must be in the file (by name, or by one of `own_addrs`).
    pub own_node: Option<String>,
    /// This host's own addresses.
    pub own_addrs: Vec<Ipv4Addr>,
}

//! Cluster state as a source states it, before validation: strings and numbers with where
//! each came from. Every source (the cluster file, a NodeList, etcd's leases) produces this;
//! `validate` is the one step that turns it into a `Cluster`.
use super::{Problem, bgp::RawBgp};

/// Flannel's annotations on a Node.
pub const FLANNEL_BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
pub const FLANNEL_BACKEND_TYPE: &str = "flannel.alpha.coreos.com/backend-type";
pub const FLANNEL_PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
/// A dual-stack node's IPv6 public address, and its IPv6 VTEP (`{"VNI":1,"VtepMAC":...}`).
pub const FLANNEL_PUBLIC_IPV6: &str = "flannel.alpha.coreos.com/public-ipv6";
pub const FLANNEL_BACKEND_V6_DATA: &str = "flannel.alpha.coreos.com/backend-v6-data";
/// Calico's annotation of a node's own AS number.
pub const CALICO_AS_NUMBER: &str = "projectcalico.org/ASNumber";

/// Where a state came from, as far as defaults and strictness go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A cluster file: strict, a bad node rejects the file.
    File,
    /// A NodeList: live data, a node that is incomplete is skipped.
    NodeList,
    /// A NodeList whose nodes carry Flannel's annotations: Flannel's defaults apply.
    FlannelNodeList,
    /// Flannel's leases in etcd: live data, settings from Flannel's network configuration.
    Etcd,
}

impl Origin {
    /// Live data skips a bad node (unless it is this one); a file is rejected whole.
    pub fn lenient(self) -> bool {
        self != Self::File
    }
}

/// Settings as the source states them; `None` where it is silent.
#[derive(Clone, Debug, Default)]
pub struct RawSettings {
    pub encap: Option<String>,
    pub cross_subnet: Option<bool>,
    pub cluster_cidr: Option<String>,
    pub vni: Option<u32>,
    pub port: Option<u16>,
    pub udp_checksum: Option<bool>,
    pub bgp: Option<RawBgp>,
    /// The cluster's IPv6 pod network (`clusterCIDRv6`, Flannel's `IPv6Network`).
    pub cluster_cidr6: Option<String>,
}

/// Where a node is in its source, for messages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodeAt {
    /// `nodes[i]` of a cluster file.
    #[default]
    File,
    /// `items[i]` of a NodeList.
    Item,
    /// A lease in etcd, by its key.
    Lease(String),
}

/// One node as the source states it.
#[derive(Clone, Debug, Default)]
pub struct RawNode {
    /// Position in the source; increasing along `RawState::nodes`.
    pub index: usize,
    pub at: NodeAt,
    pub name: Option<String>,
    pub address: Option<String>,
    pub pod_cidr: Option<String>,
    pub vtep_mac: Option<String>,
    pub as_number: Option<u32>,
    /// The IPv6 half of a dual-stack node: underlay address, pod CIDR, VTEP MAC.
    pub address6: Option<String>,
    pub pod_cidr6: Option<String>,
    pub vtep_mac6: Option<String>,
}

/// A node's fields, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeField {
    Name,
    Address,
    PodCidr,
    VtepMac,
    AsNumber,
    Address6,
    PodCidr6,
    VtepMac6,
}

impl NodeField {
    fn file_name(self) -> &'static str {
        match self {
            Self::Name => "name",
            Self::Address => "address",
            Self::PodCidr => "podCIDR",
            Self::VtepMac => "vtepMAC",
            Self::AsNumber => "asNumber",
            Self::Address6 => "addressV6",
            Self::PodCidr6 => "podCIDRv6",
            Self::VtepMac6 => "vtepMACv6",
        }
    }
}

/// The path of a node's field, for messages; made only when one is needed (a large cluster
/// has 40,000 of them).
pub fn node_path(index: usize, at: &NodeAt, field: NodeField) -> String {
    match (at, field) {
        (NodeAt::File, f) => format!("nodes[{index}].{}", f.file_name()),
        (NodeAt::Item, NodeField::Name) => format!("items[{index}].metadata.name"),
        (NodeAt::Item, NodeField::Address) => format!("items[{index}].status.addresses"),
        (NodeAt::Item, NodeField::PodCidr) => format!("items[{index}].spec.podCIDR"),
        (NodeAt::Item, NodeField::VtepMac) => {
            format!("items[{index}].metadata.annotations[{FLANNEL_BACKEND_DATA}]")
        }
        (NodeAt::Item, NodeField::AsNumber) => {
            format!("items[{index}].metadata.annotations[{CALICO_AS_NUMBER}]")
        }
        (NodeAt::Item, NodeField::Address6) => {
            format!("items[{index}].status.addresses (IPv6 InternalIP, or {FLANNEL_PUBLIC_IPV6})")
        }
        (NodeAt::Item, NodeField::PodCidr6) => format!("items[{index}].spec.podCIDRs"),
        (NodeAt::Item, NodeField::VtepMac6) => {
            format!("items[{index}].metadata.annotations[{FLANNEL_BACKEND_V6_DATA}]")
        }
        (NodeAt::Lease(key), NodeField::Address6) => format!("{key} PublicIPv6"),
        (NodeAt::Lease(key), NodeField::PodCidr6) => key.clone(),
        (NodeAt::Lease(key), NodeField::VtepMac6) => format!("{key} BackendV6Data.VtepMAC"),
        (NodeAt::Lease(key), NodeField::Name) => format!("{key} NodeName"),
        (NodeAt::Lease(key), NodeField::Address) => format!("{key} PublicIP"),
        (NodeAt::Lease(key), NodeField::PodCidr) => key.clone(),
        (NodeAt::Lease(key), NodeField::VtepMac) => format!("{key} BackendData.VtepMAC"),
        (NodeAt::Lease(key), NodeField::AsNumber) => format!("{key} asNumber"),
    }
}

/// A whole state as a source read it.
#[derive(Clone, Debug)]
pub struct RawState {
    pub origin: Origin,
    pub settings: RawSettings,
    pub nodes: Vec<RawNode>,
    /// Problems of shape: any rejects the state.
    pub problems: Vec<Problem>,
    /// Entries of live data the source could not read as a node at all (an unreadable
    /// lease): left out and reported, every other node is applied.
    pub skipped: Vec<Problem>,
}

impl RawState {
    /// A state that is one problem: the source holds no cluster at all.
    pub fn unusable(path: &str, reason: String) -> Self {
        Self {
            origin: Origin::File,
            settings: RawSettings::default(),
            nodes: Vec::new(),
            problems: vec![Problem {
                path: path.into(),
                reason,
            }],
            skipped: Vec::new(),
        }
    }

    /// The path of field `field` of the node at `index`.
    pub fn node_path(&self, index: usize, field: NodeField) -> String {
        let at = self
            .nodes
            .binary_search_by_key(&index, |n| n.index)
            .map(|i| &self.nodes[i].at)
            .unwrap_or(&NodeAt::File);
        node_path(index, at, field)
    }
}

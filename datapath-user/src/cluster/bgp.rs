//! The `bgp` block of a cluster state, after Calico's BGPConfiguration and BGPPeer: the
//! cluster's AS, the node-to-node mesh and explicit peers, checked like the rest of the state.
use std::{collections::HashSet, net::Ipv4Addr};

use serde::Deserialize;

use super::{Node, Problem};

/// Calico's default AS number, used when the block names none.
pub const DEFAULT_AS: u32 = 64512;
/// AS_TRANS (RFC 6793): stands in for a 4-byte AS on old speakers, never a real AS.
const AS_TRANS: u32 = 23456;

/// BGP as the cluster state configures it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bgp {
    /// The cluster's AS; a node's own `asNumber` overrides it for that node.
    pub as_number: u32,
    /// Every node peers with every other node (Calico's default; its docs put the limit near
    /// 100 nodes, beyond which route reflectors take over).
    pub node_to_node_mesh: bool,
    pub peers: Vec<BgpPeer>,
}

/// An explicit peer: a top-of-rack router or route reflector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BgpPeer {
    pub address: Ipv4Addr,
    pub as_number: u32,
    /// Only this node peers with it (Calico's per-node BGPPeer); every node when `None`.
    pub node: Option<String>,
}

impl Bgp {
    /// The AS `node` speaks as.
    pub fn as_of(&self, node: &Node) -> u32 {
        node.as_number.unwrap_or(self.as_number)
    }

    /// The explicit peers of node `name`.
    pub fn peers_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a BgpPeer> + 'a {
        self.peers
            .iter()
            .filter(move |p| p.node.as_deref().is_none_or(|n| n == name))
    }
}

/// The block as the source states it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawBgp {
    pub as_number: Option<u32>,
    pub node_to_node_mesh: Option<bool>,
    #[serde(default)]
    pub peers: Vec<RawPeer>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawPeer {
    pub address: Option<String>,
    pub as_number: Option<u32>,
    pub node: Option<String>,
}

/// Why `asn` cannot be an AS number, if it cannot.
pub fn as_number_problem(asn: u32) -> Option<String> {
    match asn {
        0 => Some("AS 0 is reserved (RFC 7607)".into()),
        AS_TRANS => Some("AS 23456 is AS_TRANS (RFC 6793), not a real AS".into()),
        65535 | 4_294_967_295 => Some(format!("AS {asn} is reserved (RFC 7300)")),
        _ => None,
    }
}

/// The block checked against the nodes: every problem at its path.
pub fn validate(raw: &RawBgp, nodes: &[Node], problems: &mut Vec<Problem>) -> Bgp {
    let mut report = |path: String, reason: String| problems.push(Problem { path, reason });
    let as_number = raw.as_number.unwrap_or(DEFAULT_AS);
    if let Some(r) = as_number_problem(as_number) {
        report("bgp.asNumber".into(), r);
    }
    let mesh = raw.node_to_node_mesh.unwrap_or(true);
    let names: HashSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    let mut seen = HashSet::new();
    let mut peers = Vec::new();
    for (i, p) in raw.peers.iter().enumerate() {
        let at = |f: &str| format!("bgp.peers[{i}].{f}");
        let address = match p.address.as_deref().map(str::parse::<Ipv4Addr>) {
            None => {
                report(at("address"), "missing".into());
                None
            }
            Some(Err(_)) => {
                report(at("address"), format!("{:?} is not an IPv4 address", p.address.as_deref().unwrap_or("")));
                None
            }
            Some(Ok(a)) if a.is_unspecified() || a.is_multicast() || a.is_broadcast() => {
                report(at("address"), format!("{a} cannot be a BGP peer"));
                None
            }
            Some(Ok(a)) => Some(a),
        };
        let asn = match p.as_number {
            None => {
                report(at("asNumber"), "missing".into());
                None
            }
            Some(n) => match as_number_problem(n) {
                Some(r) => {
                    report(at("asNumber"), r);
                    None
                }
                None => Some(n),
            },
        };
        if let Some(n) = &p.node
            && !names.contains(n.as_str())
        {
            report(at("node"), format!("no node {n:?} in the cluster state"));
        }
        let (Some(address), Some(as_number)) = (address, asn) else {
            continue;
        };
        if !seen.insert((address, p.node.clone())) {
            report(at("address"), format!("peer {address} is listed twice"));
        }
        if let Some(n) = nodes.iter().find(|n| n.address == address).filter(|_| mesh) {
            report(
                at("address"),
                format!("{address} is node {:?}, which the node-to-node mesh already peers with", n.name),
            );
        }
        peers.push(BgpPeer {
            address,
            as_number,
            node: p.node.clone(),
        });
    }
    Bgp {
        as_number,
        node_to_node_mesh: mesh,
        peers,
    }
}

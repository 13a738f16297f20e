//! The `bgp` block of a cluster state, after Calico's BGPConfiguration and BGPPeer: the
//! cluster's AS, the node-to-node mesh and explicit peers, checked like the rest of the state.
use std::{collections::HashSet, net::IpAddr};

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

/// An explicit peer: a top-of-rack router or route reflector. An IPv6 one carries the IPv6
/// pod CIDRs (a session from the node's IPv6 address), an IPv4 one the IPv4 pod CIDRs, as
/// Calico's BGPPeer `peerIP` of either family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BgpPeer {
    pub address: IpAddr,
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
pub fn validate(
    raw: &RawBgp,
    nodes: &[Node],
    problems: &mut Vec<Problem>,
    warnings: &mut Vec<String>,
) -> Bgp {
    let as_number = raw.as_number.unwrap_or(DEFAULT_AS);
    if let Some(r) = as_number_problem(as_number) {
        problems.push(Problem {
            path: "bgp.asNumber".into(),
            reason: r,
        });
    }
    let mesh = raw.node_to_node_mesh.unwrap_or(true);
    let names: HashSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    let mut seen = HashSet::new();
    let mut peers = Vec::new();
    for (i, p) in raw.peers.iter().enumerate() {
        let at = |f: &str| format!("bgp.peers[{i}].{f}");
        // As Calico's BGPPeer for a node that is gone: inert, worth a word.
        if let Some(n) = &p.node
            && !names.contains(n.as_str())
        {
            warnings.push(format!(
                "{}: no node {n:?} in the cluster state; the peer applies to no node",
                at("node")
            ));
        }
        let Some(peer) = read_peer(p, &at, problems) else {
            continue;
        };
        let clash = if !seen.insert((peer.address, p.node.clone())) {
            Some(format!("peer {} is listed twice", peer.address))
        } else {
            let node = nodes.iter().find(|n| {
                IpAddr::V4(n.address) == peer.address
                    || n.v6.is_some_and(|h| IpAddr::V6(h.address) == peer.address)
            });
            node.filter(|_| mesh).map(|n| {
                format!(
                    "{} is node {:?}, which the node-to-node mesh already peers with",
                    peer.address, n.name
                )
            })
        };
        if let Some(reason) = clash {
            problems.push(Problem {
                path: at("address"),
                reason,
            });
        }
        if let Some(w) = without_ipv6(&peer, nodes) {
            warnings.push(format!("{}: {w}", at("address")));
        }
        peers.push(peer);
    }
    Bgp {
        as_number,
        node_to_node_mesh: mesh,
        peers,
    }
}

/// For an IPv6 peer, the nodes it applies to that have no IPv6 half (they cannot peer with it).
fn without_ipv6(peer: &BgpPeer, nodes: &[Node]) -> Option<String> {
    let applies = |n: &&Node| peer.node.as_ref().is_none_or(|p| *p == n.name);
    let missing: Vec<&str> = (nodes.iter().filter(applies))
        .filter(|n| n.v6.is_none())
        .map(|n| n.name.as_str())
        .collect();
    (peer.address.is_ipv6() && !missing.is_empty()).then(|| {
        format!("an IPv6 peer, but node(s) {missing:?} have no IPv6 half: they do not peer with it")
    })
}

/// One peer's address and AS checked; the peer when both are good.
fn read_peer(
    p: &RawPeer,
    at: &dyn Fn(&str) -> String,
    problems: &mut Vec<Problem>,
) -> Option<BgpPeer> {
    let mut report = |f: &str, reason: String| {
        problems.push(Problem {
            path: at(f),
            reason,
        })
    };
    let address = match p.address.as_deref().map(str::parse::<IpAddr>) {
        None => Err("missing".to_string()),
        Some(Err(_)) => Err(format!(
            "{:?} is not an IP address",
            p.address.as_deref().unwrap_or("")
        )),
        Some(Ok(a)) if a.is_unspecified() || a.is_multicast() || a == IpAddr::from([255; 4]) => {
            Err(format!("{a} cannot be a BGP peer"))
        }
        Some(Ok(a)) => Ok(a),
    };
    let asn = match p.as_number {
        None => Err("missing".to_string()),
        Some(n) => as_number_problem(n).map_or(Ok(n), Err),
    };
    let address = address.map_err(|r| report("address", r)).ok();
    let as_number = asn.map_err(|r| report("asNumber", r)).ok()?;
    Some(BgpPeer {
        address: address?,
        as_number,
        node: p.node.clone(),
    })
}

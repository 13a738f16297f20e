//! The IPv6 half of a dual-stack cluster: a node's IPv6 underlay address, pod CIDR and VTEP
//! MAC, read and checked beside its IPv4 half, and the conflicts and warnings of the whole.
use std::{collections::HashMap, fmt, net::Ipv6Addr, str::FromStr};

use ipnet::Ipv6Net;

use super::{Encap, Node, Problem, Settings, parse_mac, raw::NodeField, raw::RawNode};

/// An IPv6 prefix, host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr6 {
    pub addr: Ipv6Addr,
    pub len: u8,
}

impl Cidr6 {
    /// The prefix of length `len` that holds `addr`.
    pub fn of(addr: Ipv6Addr, len: u8) -> Self {
        let net = Ipv6Net::new(addr, len.min(128))
            .expect("length capped")
            .trunc();
        Self {
            addr: net.addr(),
            len: net.prefix_len(),
        }
    }
    fn net(&self) -> Ipv6Net {
        Ipv6Net::new(self.addr, self.len).expect("prefix length checked when made")
    }
    /// First and last address, as numbers.
    pub fn range(&self) -> (u128, u128) {
        let n = self.net();
        (u128::from(n.network()), u128::from(n.broadcast()))
    }
    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        self.net().contains(&ip)
    }
}

impl fmt::Display for Cidr6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Cidr6 {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let net: Ipv6Net = s
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv6 CIDR (expected e.g. fd00:10:244:1::/64)"))?;
        if net.network() != net.addr() {
            return Err(format!("{s:?} has host bits set"));
        }
        Ok(Self {
            addr: net.addr(),
            len: net.prefix_len(),
        })
    }
}

/// Merges IPv6 prefixes into the fewest that cover exactly them.
pub fn aggregate6(cidrs: &[Cidr6]) -> Vec<Cidr6> {
    let nets: Vec<Ipv6Net> = cidrs.iter().map(Cidr6::net).collect();
    Ipv6Net::aggregate(&nets)
        .into_iter()
        .map(|n| Cidr6 {
            addr: n.network(),
            len: n.prefix_len(),
        })
        .collect()
}

/// A node's IPv6 half.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeV6 {
    /// Underlay IPv6 address.
    pub address: Ipv6Addr,
    /// Its prefix length when the source gives `address/len` (else 64, IPv6's subnet size):
    /// crossSubnet reaches the peers inside it natively.
    pub prefix_len: Option<u8>,
    pub pod_cidr: Cidr6,
    /// VTEP MAC of its IPv6 VXLAN device (Flannel's `flannel-v6.<VNI>`, Calico's
    /// `vxlan-v6.calico`).
    pub vtep_mac: [u8; 6],
}

/// The IPv6 VTEP MAC of a node that names none: locally administered, `0e:06:` then the
/// address's last four bytes, so every node computes the same one.
pub fn derived_vtep_mac6(addr: Ipv6Addr) -> [u8; 6] {
    let o = addr.octets();
    [0x0e, 0x06, o[12], o[13], o[14], o[15]]
}

/// A node's IPv6 half as its source states it: `None` when it has none or it is bad, with a
/// problem for each bad field and for a half with a pod CIDR but no address or the reverse.
pub fn read_half(rn: &RawNode) -> (Option<NodeV6>, Vec<(NodeField, String)>) {
    let (addr, cidr) = (rn.address6.as_deref(), rn.pod_cidr6.as_deref());
    let mut problems = Vec::new();
    if addr.is_none() && cidr.is_none() {
        return (None, problems);
    }
    let address = required6(
        addr.map(parse_address6),
        (
            NodeField::Address6,
            "the node has an IPv6 pod CIDR but no IPv6 address",
        ),
        &mut problems,
    );
    let pod_cidr = required6(
        cidr.map(str::parse::<Cidr6>),
        (
            NodeField::PodCidr6,
            "the node has an IPv6 address but no IPv6 pod CIDR",
        ),
        &mut problems,
    );
    let mac = match rn.vtep_mac6.as_deref().map(parse_mac) {
        Some(Err(r)) => {
            problems.push((NodeField::VtepMac6, r));
            None
        }
        Some(Ok(m)) => Some(m),
        None => None,
    };
    let half = match (address, pod_cidr) {
        (Some((address, prefix_len)), Some(pod_cidr)) if problems.is_empty() => Some(NodeV6 {
            address,
            prefix_len,
            pod_cidr,
            vtep_mac: mac.unwrap_or_else(|| derived_vtep_mac6(address)),
        }),
        _ => None,
    };
    (half, problems)
}

/// A field the half needs: its value, or a problem at `field` (why it is wrong, or `missing`
/// when the other field is there without it).
fn required6<T>(
    parsed: Option<Result<T, String>>,
    (field, missing): (NodeField, &str),
    problems: &mut Vec<(NodeField, String)>,
) -> Option<T> {
    match parsed {
        Some(Ok(v)) => Some(v),
        Some(Err(reason)) => {
            problems.push((field, reason));
            None
        }
        None => {
            problems.push((field, format!("missing: {missing}")));
            None
        }
    }
}

fn parse_address6(s: &str) -> Result<(Ipv6Addr, Option<u8>), String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => {
            let len = (l.parse::<u8>().ok().filter(|l| *l <= 128))
                .ok_or_else(|| format!("{s:?}: prefix length must be 0-128"))?;
            (a, Some(len))
        }
        None => (s, None),
    };
    let a: Ipv6Addr = addr
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv6 address"))?;
    if a.is_unspecified() || a.is_multicast() || a.is_loopback() {
        return Err(format!("{a} cannot be a node address"));
    }
    Ok((a, len))
}

/// IPv6 addresses two nodes claim, IPv6 pod CIDRs that overlap, and IPv6 pod CIDRs that hold
/// a node's IPv6 address: each rejects the state, as their IPv4 counterparts do.
pub fn conflicts6(nodes: &[Node], path: &dyn Fn(usize, NodeField) -> String) -> Vec<Problem> {
    let halves: Vec<(&Node, &NodeV6)> = nodes
        .iter()
        .filter_map(|n| n.v6.as_ref().map(|h| (n, h)))
        .collect();
    let mut out = Vec::new();
    let mut addrs: HashMap<Ipv6Addr, &Node> = HashMap::new();
    for (n, h) in &halves {
        if let Some(first) = addrs.insert(h.address, n) {
            out.push(Problem {
                path: path(n.index, NodeField::Address6),
                reason: format!(
                    "duplicate IPv6 address {} (also node {:?})",
                    h.address, first.name
                ),
            });
        }
    }
    let mut by_start = halves.clone();
    by_start.sort_by_key(|(n, h)| (h.pod_cidr.range().0, n.index));
    for pair in by_start.windows(2) {
        let ((a, ha), (b, hb)) = (pair[0], pair[1]);
        if hb.pod_cidr.range().0 <= ha.pod_cidr.range().1 {
            let ((first, hf), (later, hl)) = if a.index < b.index {
                ((a, ha), (b, hb))
            } else {
                ((b, hb), (a, ha))
            };
            out.push(Problem {
                path: path(later.index, NodeField::PodCidr6),
                reason: format!(
                    "{} overlaps {} of node {:?}",
                    hl.pod_cidr, hf.pod_cidr, first.name
                ),
            });
        }
    }
    for (owner, ho) in &halves {
        if let Some((n, h)) = halves.iter().find(|(_, h)| ho.pod_cidr.contains(h.address)) {
            out.push(Problem {
                path: path(owner.index, NodeField::PodCidr6),
                reason: format!(
                    "{} holds the IPv6 underlay address {} of node {:?}",
                    ho.pod_cidr, h.address, n.name
                ),
            });
        }
    }
    out
}

/// Why IPv6 data in a valid state will carry no IPv6 pod: said in the log and by `check`,
/// never dropped without a word. `own`: this node, when known.
pub fn warnings6(set: &Settings, nodes: &[Node], own: Option<&Node>) -> Vec<String> {
    let with_v6 = nodes.iter().filter(|n| n.v6.is_some()).count();
    if with_v6 == 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    if set.encap == Encap::Ipip {
        out.push(format!(
            "{with_v6} node(s) carry IPv6 pod CIDRs, but IPIP is IPv4 only (IPv6 pods travel in VXLAN or natively, with encapsulation vxlan or none): IPv6 pods get no route"
        ));
    }
    if let Some(me) = own.filter(|m| m.v6.is_none()) {
        out.push(format!(
            "{with_v6} node(s) carry IPv6 pod CIDRs, but this node {:?} has no IPv6 address and pod CIDR in the cluster state (no IPv6 underlay): its pods get no IPv6 route",
            me.name
        ));
    }
    let without = nodes.len() - with_v6;
    if without > 0 && own.is_some_and(|m| m.v6.is_some()) {
        out.push(format!(
            "{without} node(s) have no IPv6 half: their pods are reached over IPv4 only"
        ));
    }
    out
}

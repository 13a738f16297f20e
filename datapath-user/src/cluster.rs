//! Cluster state: the YAML/JSON cluster file or a Kubernetes NodeList, parsed and validated
//! whole into a `Cluster`. Every problem is reported with its field path and reason.
use std::{collections::HashMap, fmt, net::Ipv4Addr, str::FromStr};

use crate::clusterdoc::{self, ADDRESS, NAME, Origin, POD_CIDR, RawNode, node_path};

/// How traffic to other nodes' pods is carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encap {
    Ipip,
    Vxlan,
}

impl Encap {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ipip => "ipip",
            Self::Vxlan => "vxlan",
        }
    }
    /// Bytes the mode adds to each packet.
    pub fn overhead(self) -> u32 {
        match self {
            Self::Ipip => maps_common::IPIP_OVERHEAD,
            Self::Vxlan => maps_common::VXLAN_OVERHEAD,
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
            other => Err(format!("unknown mode {other:?} (expected ipip or vxlan)")),
        }
    }
}

/// An IPv4 prefix, host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    pub fn mask(len: u8) -> u32 {
        if len == 0 { 0 } else { u32::MAX << (32 - len) }
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.len) == u32::from(self.addr)
    }
    /// First and last address, host order.
    pub fn range(&self) -> (u32, u32) {
        let start = u32::from(self.addr);
        (start, start | !Self::mask(self.len))
    }
    pub fn overlaps(&self, other: &Cidr) -> bool {
        let len = self.len.min(other.len);
        u32::from(self.addr) & Self::mask(len) == u32::from(other.addr) & Self::mask(len)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (expected a.b.c.d/len)"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR ({addr:?} is not an IPv4 address)"))?;
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| format!("{s:?} is not a CIDR (prefix length must be 0-32)"))?;
        if u32::from(addr) & !Self::mask(len) != 0 {
            return Err(format!("{s:?} has host bits set"));
        }
        Ok(Self { addr, len })
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

/// Settings from the command line. A cluster state's own value wins over a flag (with a
/// warning naming both); a flag wins over the defaults of where the state came from
/// (Flannel's VNI 1 and port 8472 for Flannel's data, Calico's 4096 and 4789 otherwise).
#[derive(Clone, Debug, Default)]
pub struct Defaults {
    pub encap: Option<Encap>,
    pub cross_subnet: Option<bool>,
    pub vni: Option<u32>,
    pub port: Option<u16>,
    pub udp_checksum: Option<bool>,
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

/// The value a setting takes: the state's, else the flag's, else `fallback`; a warning when a
/// flag is overridden by a different value in the state.
fn setting<T: PartialEq + fmt::Display>(
    flag: &str,
    field: &str,
    state: Option<T>,
    given: Option<T>,
    fallback: T,
    warnings: &mut Vec<String>,
) -> T {
    match (state, given) {
        (Some(s), Some(g)) if s != g => {
            warnings.push(format!(
                "--{flag} {g} is overridden by the cluster state's {field} {s}"
            ));
            s
        }
        (Some(s), _) => s,
        (None, Some(g)) => g,
        (None, None) => fallback,
    }
}

/// The settings a cluster state resolves to. An encapsulation this datapath does not have is
/// recorded as a problem (the state is rejected) and stands as VXLAN meanwhile.
fn resolve_settings(
    raw: &clusterdoc::RawState,
    defaults: &Defaults,
    problems: &mut Vec<Problem>,
    warnings: &mut Vec<String>,
) -> Settings {
    let s = &raw.settings;
    let flannel = raw.origin == Origin::FlannelNodeList;
    let (vni_field, encap_field) = if raw.origin == Origin::File {
        ("vxlan.vni", "encapsulation")
    } else {
        ("Flannel backend-data VNI", "Flannel backend-type")
    };
    let stated = match s.encap.as_deref().map(str::parse::<Encap>) {
        Some(Err(reason)) => {
            problems.push(Problem {
                path: encap_field.into(),
                reason,
            });
            None
        }
        other => other.and_then(Result::ok),
    };
    let encap = setting(
        "encapsulation",
        encap_field,
        stated,
        defaults.encap,
        Encap::Vxlan,
        warnings,
    );
    let (vni0, port0) = if flannel {
        (1, maps_common::VXLAN_PORT_LINUX)
    } else {
        (4096, maps_common::VXLAN_PORT_IANA)
    };
    let mut cluster_cidrs = defaults.cluster_cidrs.clone().unwrap_or_default();
    if let Some(list) = &s.cluster_cidr {
        match parse_cidr_list(list) {
            Ok(c) => cluster_cidrs = c,
            Err(reason) => problems.push(Problem {
                path: "clusterCIDR".into(),
                reason,
            }),
        }
    }
    Settings {
        encap,
        cross_subnet: setting(
            "cross-subnet",
            "crossSubnet",
            s.cross_subnet,
            defaults.cross_subnet,
            false,
            warnings,
        ),
        vni: setting("vni", vni_field, s.vni, defaults.vni, vni0, warnings),
        port: setting(
            "vxlan-port",
            "vxlan.port",
            s.port,
            defaults.port,
            port0,
            warnings,
        ),
        udp_checksum: setting(
            "vxlan-udp-checksum",
            "vxlan.udpChecksum",
            s.udp_checksum,
            defaults.udp_checksum,
            false,
            warnings,
        ),
        cluster_cidrs,
    }
}

/// Parses and validates a cluster text whole: every problem is reported with its path. A bad
/// node rejects a cluster file; in live data (a NodeList) an incomplete node is skipped, unless
/// it is this node. Conflicts (two nodes claiming an address or overlapping pod CIDRs, a pod
/// CIDR holding node addresses) always reject the state.
pub fn parse(text: &str, defaults: &Defaults, limits: &Limits) -> Result<Cluster, Invalid> {
    let raw = clusterdoc::read(text);
    let mut problems = raw.problems.clone();
    let mut warnings = Vec::new();
    let set = resolve_settings(&raw, defaults, &mut problems, &mut warnings);
    if set.vni == 0 || set.vni > 0xff_ffff {
        problems.push(Problem {
            path: "vxlan.vni".into(),
            reason: format!("{} is outside 1-16777215", set.vni),
        });
    }
    if set.port == 0 {
        problems.push(Problem {
            path: "vxlan.port".into(),
            reason: "port 0 is not a valid UDP port".into(),
        });
    }
    let lenient = raw.origin != Origin::File;
    let mut skipped = Vec::new();
    let mut nodes: Vec<Node> = Vec::new();
    let in_nodelist = raw.origin != Origin::File;
    let path = |index: usize, field: usize| node_path(index, in_nodelist, field);
    for rn in &raw.nodes {
        let (node, node_problems) = read_node(rn);
        match node {
            Some(n) if node_problems.is_empty() => nodes.push(n),
            _ if lenient && !is_own(rn, limits) => skipped.extend(node_problems),
            _ => problems.extend(node_problems),
        }
    }
    if raw.nodes.is_empty() && raw.problems.is_empty() {
        problems.push(Problem {
            path: "nodes".into(),
            reason: "no nodes".into(),
        });
    }
    if nodes.len() > limits.max_nodes as usize {
        problems.push(Problem {
            path: "nodes".into(),
            reason: format!(
                "{} nodes do not fit in maps sized for {} (raise --max-nodes)",
                nodes.len(),
                limits.max_nodes
            ),
        });
    }
    problems.extend(conflicts(&nodes, &path));
    problems.extend(cidrs_holding_nodes(&nodes, &set.cluster_cidrs, &path));
    let own = own_node(&nodes, limits);
    if let Some(name) = &limits.own_node
        && own.is_none()
        && problems.is_empty()
    {
        // The address fallback adopts only nodes without a name (flanneld's leases): a named
        // node at one of this host's addresses is most likely this node under another name.
        let named_here = nodes
            .iter()
            .find(|n| !n.name.is_empty() && limits.own_addrs.contains(&n.address));
        let also = if let Some(n) = named_here {
            format!(
                "; node {:?} has this host's address {}: run with --node {} (the address fallback adopts only nodes without a name, as flanneld's leases are)",
                n.name, n.address, n.name
            )
        } else if limits.own_addrs.is_empty() {
            String::new()
        } else {
            let addrs: Vec<String> = limits.own_addrs.iter().map(ToString::to_string).collect();
            format!(
                ", nor an unnamed node (a flanneld lease) with one of this host's addresses ({}): give --node the name the cluster state uses for this host",
                addrs.join(", ")
            )
        };
        problems.push(Problem {
            path: "nodes".into(),
            reason: format!("this node {name:?} is not in the cluster state{also}"),
        });
    }
    if !problems.is_empty() {
        return Err(Invalid(problems));
    }
    Ok(Cluster {
        settings: set,
        nodes,
        own,
        warnings,
        skipped,
    })
}

/// Whether a raw node is this node (by name or address), whose problems reject the state.
fn is_own(rn: &RawNode, limits: &Limits) -> bool {
    let by_name = rn.name.is_some() && rn.name == limits.own_node;
    let by_addr = rn
        .address
        .as_deref()
        .and_then(|a| parse_address(a).ok())
        .is_some_and(|(a, _)| limits.own_addrs.contains(&a));
    by_name || by_addr
}

/// This node's name in the state: by name, else, among nodes that have no name of their own
/// (a lease flanneld wrote is named by its public IP), by one of this host's addresses.
fn own_node(nodes: &[Node], limits: &Limits) -> Option<String> {
    let name = limits.own_node.as_ref()?;
    let unnamed = |n: &&Node| n.name == n.address.to_string();
    nodes
        .iter()
        .find(|n| &n.name == name)
        .or_else(|| {
            nodes
                .iter()
                .filter(unnamed)
                .find(|n| limits.own_addrs.contains(&n.address))
        })
        .map(|n| n.name.clone())
}

/// One node's fields checked; the node when all are good, and every problem found.
fn read_node(rn: &RawNode) -> (Option<Node>, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut problem = |field: usize, reason: String| {
        problems.push(Problem {
            path: node_path(rn.index, rn.in_nodelist, field),
            reason,
        });
    };
    let name = rn.name.clone().filter(|n| !n.is_empty());
    if name.is_none() {
        problem(0, "missing".into());
    }
    let address = required(rn.address.as_deref().map(parse_address), |r| {
        problem(ADDRESS, r)
    });
    let pod_cidr = required(rn.pod_cidr.as_deref().map(str::parse::<Cidr>), |r| {
        problem(POD_CIDR, r)
    });
    let vtep_mac = match (rn.vtep_mac.as_deref().map(parse_mac), address) {
        (Some(Err(reason)), _) => {
            problem(3, reason);
            None
        }
        (Some(Ok(m)), _) => Some(m),
        (None, Some((a, _))) => Some(derived_vtep_mac(a)),
        (None, None) => None,
    };
    let node = match (name, address, pod_cidr, vtep_mac) {
        (Some(name), Some((address, prefix_len)), Some(pod_cidr), Some(vtep_mac)) => Some(Node {
            index: rn.index,
            name,
            address,
            prefix_len,
            pod_cidr,
            vtep_mac,
        }),
        _ => None,
    };
    (node, problems)
}

/// A required field's value, or `None` after reporting it missing or why it is wrong.
fn required<T>(parsed: Option<Result<T, String>>, mut problem: impl FnMut(String)) -> Option<T> {
    match parsed {
        None => {
            problem("missing".into());
            None
        }
        Some(Err(reason)) => {
            problem(reason);
            None
        }
        Some(Ok(v)) => Some(v),
    }
}

/// Names, addresses and pod CIDRs that two nodes claim, each reported at the later node.
/// O(n log n): a cluster of 10,000 nodes is checked in milliseconds.
fn conflicts(nodes: &[Node], path: &dyn Fn(usize, usize) -> String) -> Vec<Problem> {
    let mut problems: Vec<(usize, Problem)> = Vec::new();
    let mut report = |n: &Node, field: usize, reason: String| {
        let path = path(n.index, field);
        problems.push((n.index, Problem { path, reason }));
    };
    let mut names: HashMap<&str, &Node> = HashMap::new();
    let mut addrs: HashMap<Ipv4Addr, &Node> = HashMap::new();
    for n in nodes {
        if let Some(first) = names.get(n.name.as_str()) {
            let reason = format!("duplicate node {:?} (also nodes[{}])", n.name, first.index);
            report(n, NAME, reason);
        } else {
            names.insert(&n.name, n);
        }
        if let Some(first) = addrs.get(&n.address) {
            let reason = format!(
                "duplicate address {} (also node {:?})",
                n.address, first.name
            );
            report(n, ADDRESS, reason);
        } else {
            addrs.insert(n.address, n);
        }
    }
    // Sorted by first address, a CIDR overlaps an earlier one iff it starts before the
    // furthest end seen so far.
    let mut by_start: Vec<&Node> = nodes.iter().collect();
    by_start.sort_by_key(|n| (n.pod_cidr.range().0, n.index));
    let mut furthest: Option<&Node> = None;
    for n in by_start {
        if let Some(f) = furthest {
            if n.pod_cidr.range().0 <= f.pod_cidr.range().1 {
                let (first, later) = if f.index < n.index { (f, n) } else { (n, f) };
                let reason = format!(
                    "{} overlaps {} of node {:?}",
                    later.pod_cidr, first.pod_cidr, first.name
                );
                report(later, POD_CIDR, reason);
            }
            if n.pod_cidr.range().1 <= f.pod_cidr.range().1 {
                continue;
            }
        }
        furthest = Some(n);
    }
    problems.sort_by_key(|(i, _)| *i);
    problems.into_iter().map(|(_, p)| p).collect()
}

/// Pod CIDRs and cluster CIDRs that hold a node's underlay address: routing them toward the
/// datapath would capture the underlay's own traffic.
fn cidrs_holding_nodes(
    nodes: &[Node],
    cluster_cidrs: &[Cidr],
    path: &dyn Fn(usize, usize) -> String,
) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut by_start: Vec<(u32, u32, &Node)> = nodes
        .iter()
        .map(|n| {
            let (a, b) = n.pod_cidr.range();
            (a, b, n)
        })
        .collect();
    by_start.sort_by_key(|(a, _, _)| *a);
    let mut reported = std::collections::HashSet::new();
    for n in nodes {
        let addr = u32::from(n.address);
        let i = by_start.partition_point(|(a, _, _)| *a <= addr);
        // Pod CIDRs do not overlap (or that was reported): the one starting last before the
        // address is the only candidate.
        if let Some((_, end, owner)) = i.checked_sub(1).map(|i| by_start[i])
            && addr <= end
            && reported.insert(owner.index)
        {
            out.push(Problem {
                path: path(owner.index, POD_CIDR),
                reason: format!(
                    "{} holds the underlay address {} of node {:?}",
                    owner.pod_cidr, n.address, n.name
                ),
            });
        }
        for c in cluster_cidrs.iter().filter(|c| c.contains(n.address)) {
            out.push(Problem {
                path: "clusterCIDR".into(),
                reason: format!(
                    "{c} holds the underlay address {} of node {:?}",
                    n.address, n.name
                ),
            });
        }
    }
    out
}

/// `a.b.c.d/len[,a.b.c.d/len...]`.
pub fn parse_cidr_list(s: &str) -> Result<Vec<Cidr>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::parse)
        .collect()
}

fn parse_address(s: &str) -> Result<(Ipv4Addr, Option<u8>), String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (
            a,
            Some(
                l.parse::<u8>()
                    .ok()
                    .filter(|l| *l <= 32)
                    .ok_or_else(|| format!("{s:?}: prefix length must be 0-32"))?,
            ),
        ),
        None => (s, None),
    };
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 address"))?;
    if addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast() {
        return Err(format!("{addr} cannot be a node address"));
    }
    Ok((addr, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(own: Option<&str>) -> Limits {
        Limits {
            max_nodes: 5000,
            own_node: own.map(String::from),
            own_addrs: Vec::new(),
        }
    }

    fn errors(text: &str) -> Vec<String> {
        parse(text, &Defaults::default(), &limits(Some("node1")))
            .unwrap_err()
            .0
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    const GOOD: &str = "encapsulation: vxlan
crossSubnet: false
vxlan: { vni: 4096, port: 4789 }
nodes:
  - name: node1
    address: 192.168.1.10
    podCIDR: 10.244.0.0/24
    vtepMAC: \"66:00:00:00:00:01\"
  - name: node2
    address: 192.168.1.11
    podCIDR: 10.244.1.0/24
";

    #[test]
    fn parses_the_documented_example() {
        let c = parse(GOOD, &Defaults::default(), &limits(Some("node1"))).unwrap();
        assert_eq!(c.encap, Encap::Vxlan);
        assert_eq!((c.vni, c.port), (4096, 4789));
        assert_eq!(c.nodes[0].vtep_mac, [0x66, 0, 0, 0, 0, 1]);
        assert_eq!(c.nodes[1].vtep_mac, [0x0e, 0, 192, 168, 1, 11]);
        assert_eq!(c.nodes[1].pod_cidr.to_string(), "10.244.1.0/24");
    }

    #[test]
    fn each_class_of_bad_file_is_rejected_with_its_message() {
        assert!(errors("nodes: [")[0].starts_with("(file): not parsable as YAML or JSON"));
        // (replace this in GOOD, by this, the one message expected)
        let cases = [
            (
                "encapsulation: vxlan",
                "encapsulation: gre",
                "encapsulation: unknown mode \"gre\" (expected ipip or vxlan)",
            ),
            (
                "10.244.1.0/24",
                "10.244.1.0/33",
                "nodes[1].podCIDR: \"10.244.1.0/33\" is not a CIDR (prefix length must be 0-32)",
            ),
            (
                "10.244.1.0/24",
                "10.244.1.1/24",
                "nodes[1].podCIDR: \"10.244.1.1/24\" has host bits set",
            ),
            (
                "10.244.1.0/24",
                "10.244.1.0",
                "nodes[1].podCIDR: \"10.244.1.0\" is not a CIDR (expected a.b.c.d/len)",
            ),
            (
                "66:00:00:00:00:01",
                "66:00:00:00:01",
                "nodes[0].vtepMAC: \"66:00:00:00:01\" is not a MAC address (expected six hex bytes aa:bb:cc:dd:ee:ff)",
            ),
            (
                "66:00:00:00:00:01",
                "67:00:00:00:00:01",
                "nodes[0].vtepMAC: \"67:00:00:00:00:01\" is a multicast MAC address",
            ),
            (
                "name: node2",
                "name: node1",
                "nodes[1].name: duplicate node \"node1\" (also nodes[0])",
            ),
            (
                "10.244.1.0/24",
                "10.244.0.0/16",
                "nodes[1].podCIDR: 10.244.0.0/16 overlaps 10.244.0.0/24 of node \"node1\"",
            ),
            (
                "name: node1",
                "name: node9",
                "nodes: this node \"node1\" is not in the cluster state",
            ),
            (
                "address: 192.168.1.11",
                "address: 192.168.1.300",
                "nodes[1].address: \"192.168.1.300\" is not an IPv4 address",
            ),
            (
                "address: 192.168.1.11",
                "address: 192.168.1.10",
                "nodes[1].address: duplicate address 192.168.1.10 (also node \"node1\")",
            ),
            (
                "address: 192.168.1.11",
                "address: 224.0.0.1",
                "nodes[1].address: 224.0.0.1 cannot be a node address",
            ),
            (
                "    address: 192.168.1.11\n",
                "",
                "nodes[1].address: missing",
            ),
            (
                "    podCIDR: 10.244.1.0/24\n",
                "",
                "nodes[1].podCIDR: missing",
            ),
            (
                "vni: 4096",
                "vni: 16777216",
                "vxlan.vni: 16777216 is outside 1-16777215",
            ),
            ("vni: 4096", "vni: 0", "vxlan.vni: 0 is outside 1-16777215"),
            (
                "port: 4789",
                "port: 0",
                "vxlan.port: port 0 is not a valid UDP port",
            ),
        ];
        for (from, to, want) in cases {
            assert_eq!(
                errors(&GOOD.replace(from, to)),
                [want],
                "{from:?} -> {to:?}"
            );
        }
        let no_nodes = GOOD.split("nodes:").next().unwrap().to_string() + "nodes: []\n";
        assert_eq!(
            parse(&no_nodes, &Defaults::default(), &limits(None))
                .unwrap_err()
                .0
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["nodes: no nodes"]
        );
    }

    #[test]
    fn every_problem_is_reported_not_just_the_first() {
        let bad = GOOD
            .replace("10.244.1.0/24", "10.244.1.0/33")
            .replace("66:00:00:00:00:01", "zz");
        assert_eq!(errors(&bad).len(), 2);
    }

    #[test]
    fn too_many_nodes_for_the_maps() {
        let l = Limits {
            max_nodes: 1,
            own_node: None,
            own_addrs: Vec::new(),
        };
        let e = parse(GOOD, &Defaults::default(), &l).unwrap_err();
        assert_eq!(
            e.0[0].to_string(),
            "nodes: 2 nodes do not fit in maps sized for 1 (raise --max-nodes)"
        );
    }

    #[test]
    fn every_problem_of_a_file_at_once_with_its_path() {
        let bad = GOOD
            .replace("    podCIDR: 10.244.1.0/24", "    podCidr: 10.244.1.0/24")
            .replace("vni: 4096", "vnii: 4096")
            .replace("crossSubnet: false", "crossSubnet: maybe");
        let e = errors(&bad);
        for want in [
            "crossSubnet: expected true or false",
            "vxlan.vnii: unknown field, did you mean vni",
            "nodes[1].podCidr: unknown field, did you mean podCIDR",
            "nodes[1].podCIDR: missing",
        ] {
            assert!(e.contains(&want.to_string()), "{want:?} not in {e:#?}");
        }
    }

    #[test]
    fn a_single_node_and_a_cidr_holding_node_addresses_are_explained() {
        let node = r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"node1"}}"#;
        assert!(errors(node)[0].contains("a single Node object"));
        let e = errors(&GOOD.replace("10.244.1.0/24", "192.168.0.0/16"));
        assert!(
            e.iter()
                .any(|p| p
                    .starts_with("nodes[1].podCIDR: 192.168.0.0/16 holds the underlay address")),
            "{e:#?}"
        );
    }

    #[test]
    fn flags_the_state_overrides_are_named() {
        let d = Defaults {
            vni: Some(7),
            ..Defaults::default()
        };
        let c = parse(GOOD, &d, &limits(Some("node1"))).unwrap();
        assert_eq!(c.vni, 4096);
        assert_eq!(
            c.warnings,
            ["--vni 7 is overridden by the cluster state's vxlan.vni 4096"]
        );
    }

    fn nodelist(nodes: &[(&str, &str, Option<&str>)], flannel: bool) -> String {
        let items: Vec<serde_json::Value> = nodes
            .iter()
            .map(|(name, addr, cidr)| {
                let mut n = serde_json::json!({
                    "metadata": {"name": name, "annotations": {}},
                    "spec": {},
                    "status": {"addresses": [{"type": "InternalIP", "address": addr}]},
                });
                if let Some(c) = cidr {
                    n["spec"]["podCIDR"] = serde_json::json!(c);
                }
                if flannel {
                    n["metadata"]["annotations"] = serde_json::json!({
                        "flannel.alpha.coreos.com/backend-type": "vxlan",
                        "flannel.alpha.coreos.com/backend-data": r#"{"VNI":1,"VtepMAC":"66:00:00:00:00:01"}"#,
                    });
                }
                n
            })
            .collect();
        serde_json::json!({"apiVersion": "v1", "kind": "NodeList", "items": items}).to_string()
    }

    #[test]
    fn a_nodelist_skips_a_joining_node_but_not_this_one() {
        let text = nodelist(
            &[
                ("node1", "192.168.1.10", Some("10.244.0.0/24")),
                ("node2", "192.168.1.11", None),
            ],
            true,
        );
        let c = parse(&text, &Defaults::default(), &limits(Some("node1"))).unwrap();
        assert_eq!(c.nodes.len(), 1);
        assert_eq!(
            (c.vni, c.port),
            (1, 8472),
            "Flannel's defaults for Flannel's data"
        );
        assert_eq!(c.skipped[0].to_string(), "items[1].spec.podCIDR: missing");
        let e = parse(&text, &Defaults::default(), &limits(Some("node2"))).unwrap_err();
        assert_eq!(e.0[0].to_string(), "items[1].spec.podCIDR: missing");
        let plain = nodelist(&[("node1", "192.168.1.10", Some("10.244.0.0/24"))], false);
        let c = parse(&plain, &Defaults::default(), &limits(Some("node1"))).unwrap();
        assert_eq!((c.vni, c.port), (4096, 4789));
    }

    #[test]
    fn an_unnamed_node_is_found_by_address() {
        let l = Limits {
            max_nodes: 10,
            own_node: Some("host-a".into()),
            own_addrs: vec!["192.168.1.11".parse().unwrap()],
        };
        let unnamed = GOOD.replace("name: node2", "name: 192.168.1.11");
        let c = parse(&unnamed, &Defaults::default(), &l).unwrap();
        assert_eq!(c.own.as_deref(), Some("192.168.1.11"));
        // A node with a name of its own is this node only by that name.
        assert!(parse(GOOD, &Defaults::default(), &l).is_err());
    }
}

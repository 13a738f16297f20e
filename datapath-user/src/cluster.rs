//! Cluster state: the YAML/JSON cluster file or a Kubernetes NodeList, parsed and validated
//! whole into a `Cluster`. Every problem is reported with its field path and reason.
use std::{collections::HashMap, fmt, net::Ipv4Addr, str::FromStr};

use serde::Deserialize;

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

/// Validated cluster state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    pub encap: Encap,
    pub cross_subnet: bool,
    pub vni: u32,
    pub port: u16,
    /// Compute the outer UDP checksum of VXLAN packets instead of sending zero.
    pub udp_checksum: bool,
    /// The cluster's pod networks (Kubernetes' `--cluster-cidr`, Flannel's `Network`): the
    /// agent routes each toward the datapath with one route. Empty: the pod CIDRs, merged.
    pub cluster_cidrs: Vec<Cidr>,
    pub nodes: Vec<Node>,
}

/// Everything in a cluster state but its nodes: when it changes, every node is planned again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub encap: Encap,
    pub cross_subnet: bool,
    pub vni: u32,
    pub port: u16,
    pub udp_checksum: bool,
    pub cluster_cidrs: Vec<Cidr>,
}

impl Cluster {
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn settings(&self) -> Settings {
        Settings {
            encap: self.encap,
            cross_subnet: self.cross_subnet,
            vni: self.vni,
            port: self.port,
            udp_checksum: self.udp_checksum,
            cluster_cidrs: self.cluster_cidrs.clone(),
        }
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

/// Settings a NodeList does not carry: they come from the command line.
#[derive(Clone, Debug)]
pub struct Defaults {
    pub encap: Encap,
    pub cross_subnet: bool,
    pub vni: u32,
    pub port: u16,
    pub udp_checksum: bool,
    pub cluster_cidrs: Vec<Cidr>,
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            encap: Encap::Vxlan,
            cross_subnet: false,
            vni: 4096,
            port: maps_common::VXLAN_PORT_IANA,
            udp_checksum: false,
            cluster_cidrs: Vec::new(),
        }
    }
}

/// Limits the file must fit in.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_nodes: u32,
    /// Name of this node, which must be in the file.
    pub own_node: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileDoc {
    encapsulation: Option<String>,
    cross_subnet: Option<bool>,
    /// One CIDR, or several separated by commas, as Kubernetes' `--cluster-cidr`.
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<String>,
    vxlan: Option<FileVxlan>,
    nodes: Option<Vec<FileNode>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileVxlan {
    vni: Option<u32>,
    port: Option<u16>,
    udp_checksum: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileNode {
    name: Option<String>,
    address: Option<String>,
    #[serde(rename = "podCIDR")]
    pod_cidr: Option<String>,
    #[serde(rename = "vtepMAC")]
    vtep_mac: Option<String>,
}

const FLANNEL_BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
const FLANNEL_PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";

/// Parses and validates cluster state from text (YAML, JSON, or a `kubectl get nodes -o json`
/// NodeList). Returns the cluster, or every problem found.
pub fn parse(text: &str, defaults: &Defaults, limits: &Limits) -> Result<Cluster, Invalid> {
    let mut cluster_cidrs = defaults.cluster_cidrs.clone();
    let (raw_nodes, mut problems, encap, cross_subnet, (vni, port, udp_checksum)) =
        match read_doc(text)? {
            Doc::NodeList(value) => {
                let (nodes, problems) = from_nodelist(&value);
                (
                    nodes,
                    problems,
                    Some(defaults.encap),
                    defaults.cross_subnet,
                    (defaults.vni, defaults.port, defaults.udp_checksum),
                )
            }
            Doc::File(doc) => {
                let mut problems = Vec::new();
                let encap = match doc.encapsulation.as_deref() {
                    None => Some(defaults.encap),
                    Some(s) => match s.parse() {
                        Ok(e) => Some(e),
                        Err(reason) => {
                            problems.push(Problem {
                                path: "encapsulation".into(),
                                reason,
                            });
                            None
                        }
                    },
                };
                if let Some(list) = &doc.cluster_cidr {
                    match parse_cidr_list(list) {
                        Ok(c) => cluster_cidrs = c,
                        Err(reason) => problems.push(Problem {
                            path: "clusterCIDR".into(),
                            reason,
                        }),
                    }
                }
                let vx = doc.vxlan.unwrap_or(FileVxlan {
                    vni: None,
                    port: None,
                    udp_checksum: None,
                });
                let nodes = doc
                    .nodes
                    .unwrap_or_default()
                    .into_iter()
                    .map(|n| (n.name, n.address, n.pod_cidr, n.vtep_mac))
                    .collect();
                (
                    nodes,
                    problems,
                    encap,
                    doc.cross_subnet.unwrap_or(defaults.cross_subnet),
                    (
                        vx.vni.unwrap_or(defaults.vni),
                        vx.port.unwrap_or(defaults.port),
                        vx.udp_checksum.unwrap_or(defaults.udp_checksum),
                    ),
                )
            }
        };

    if vni == 0 || vni > 0xff_ffff {
        problems.push(Problem {
            path: "vxlan.vni".into(),
            reason: format!("{vni} is outside 1-16777215"),
        });
    }
    if port == 0 {
        problems.push(Problem {
            path: "vxlan.port".into(),
            reason: "port 0 is not a valid UDP port".into(),
        });
    }
    if raw_nodes.is_empty() {
        problems.push(Problem {
            path: "nodes".into(),
            reason: "no nodes".into(),
        });
    }
    if raw_nodes.len() > limits.max_nodes as usize {
        problems.push(Problem {
            path: "nodes".into(),
            reason: format!(
                "{} nodes do not fit in maps sized for {} (raise --max-nodes)",
                raw_nodes.len(),
                limits.max_nodes
            ),
        });
    }

    let mut nodes: Vec<Node> = Vec::new();
    for (i, (name, address, pod_cidr, vtep_mac)) in raw_nodes.into_iter().enumerate() {
        let at = |field: &str| format!("nodes[{i}].{field}");
        let mut ok = true;
        let mut problem = |path: String, reason: String| {
            problems.push(Problem { path, reason });
            ok = false;
        };
        let name = name.filter(|n| !n.is_empty()).unwrap_or_else(|| {
            problem(at("name"), "missing".into());
            String::new()
        });
        let (address, prefix_len) = match address.as_deref() {
            None => {
                problem(at("address"), "missing".into());
                (Ipv4Addr::UNSPECIFIED, None)
            }
            Some(s) => match parse_address(s) {
                Ok(a) => a,
                Err(reason) => {
                    problem(at("address"), reason);
                    (Ipv4Addr::UNSPECIFIED, None)
                }
            },
        };
        let pod_cidr = match pod_cidr.as_deref().map(str::parse::<Cidr>) {
            None => {
                problem(at("podCIDR"), "missing".into());
                None
            }
            Some(Err(reason)) => {
                problem(at("podCIDR"), reason);
                None
            }
            Some(Ok(c)) => Some(c),
        };
        let vtep_mac = match vtep_mac.as_deref().map(parse_mac) {
            None => Some(derived_vtep_mac(address)),
            Some(Err(reason)) => {
                problem(at("vtepMAC"), reason);
                None
            }
            Some(Ok(m)) => Some(m),
        };
        if let (true, Some(pod_cidr), Some(vtep_mac)) = (ok, pod_cidr, vtep_mac) {
            nodes.push(Node {
                index: i,
                name,
                address,
                prefix_len,
                pod_cidr,
                vtep_mac,
            });
        }
    }
    problems.extend(conflicts(&nodes));
    if let Some(own) = &limits.own_node
        && problems.is_empty()
        && !nodes.iter().any(|n| &n.name == own)
    {
        problems.push(Problem {
            path: "nodes".into(),
            reason: format!("this node {own:?} is not in the cluster state"),
        });
    }
    match (problems.is_empty(), encap) {
        (true, Some(encap)) => Ok(Cluster {
            encap,
            cross_subnet,
            vni,
            port,
            udp_checksum,
            cluster_cidrs,
            nodes,
        }),
        _ => Err(Invalid(problems)),
    }
}

/// A cluster text, read: the cluster-file format, or a Kubernetes NodeList.
enum Doc {
    File(FileDoc),
    NodeList(serde_yaml::Value),
}

/// Reads YAML or JSON. JSON is YAML, but serde_json reads a large cluster file (10,000 nodes)
/// many times faster, straight into the file format; anything it cannot read so goes the
/// general way, and YAML's parser has the last word on errors.
fn read_doc(text: &str) -> Result<Doc, Invalid> {
    let whole = |reason: String| {
        Invalid(vec![Problem {
            path: "(file)".into(),
            reason,
        }])
    };
    let json = text.trim_start().starts_with('{');
    if json && let Ok(doc) = serde_json::from_str::<FileDoc>(text) {
        return Ok(Doc::File(doc));
    }
    let value: serde_yaml::Value = json
        .then(|| serde_json::from_str(text).ok())
        .flatten()
        .map_or_else(|| serde_yaml::from_str(text), Ok)
        .map_err(|e| whole(format!("not parsable as YAML or JSON: {e}")))?;
    let is_nodelist = value.get("kind").and_then(|k| k.as_str()) == Some("NodeList")
        || (value.get("items").is_some() && value.get("nodes").is_none());
    if is_nodelist {
        return Ok(Doc::NodeList(value));
    }
    serde_yaml::from_value(value)
        .map(Doc::File)
        .map_err(|e| whole(format!("unexpected shape: {e}")))
}

/// Names, addresses and pod CIDRs that two nodes claim, each reported at the later node.
/// O(n log n): a cluster of 10,000 nodes is checked in milliseconds.
fn conflicts(nodes: &[Node]) -> Vec<Problem> {
    let mut problems: Vec<(usize, Problem)> = Vec::new();
    let mut report = |n: &Node, field: &str, reason: String| {
        let path = format!("nodes[{}].{field}", n.index);
        problems.push((n.index, Problem { path, reason }));
    };
    let mut names: HashMap<&str, &Node> = HashMap::new();
    let mut addrs: HashMap<Ipv4Addr, &Node> = HashMap::new();
    for n in nodes {
        if let Some(first) = names.get(n.name.as_str()) {
            let reason = format!("duplicate node {:?} (also nodes[{}])", n.name, first.index);
            report(n, "name", reason);
        } else {
            names.insert(&n.name, n);
        }
        if let Some(first) = addrs.get(&n.address) {
            let reason = format!(
                "duplicate address {} (also node {:?})",
                n.address, first.name
            );
            report(n, "address", reason);
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
                report(later, "podCIDR", reason);
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

type RawNode = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// Reads the nodes of a `kubectl get nodes -o json` NodeList: name, `spec.podCIDR`, the
/// InternalIP address, and Flannel's `public-ip` and `backend-data` VtepMAC annotations.
fn from_nodelist(v: &serde_yaml::Value) -> (Vec<RawNode>, Vec<Problem>) {
    let mut problems = Vec::new();
    let Some(items) = v.get("items").and_then(|i| i.as_sequence()) else {
        problems.push(Problem {
            path: "items".into(),
            reason: "missing or not a list".into(),
        });
        return (Vec::new(), problems);
    };
    let nodes = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let s = |v: Option<&serde_yaml::Value>| v.and_then(|x| x.as_str()).map(String::from);
            let name = s(item.get("metadata").and_then(|m| m.get("name")));
            let annotations = item.get("metadata").and_then(|m| m.get("annotations"));
            let public_ip = s(annotations.and_then(|a| a.get(FLANNEL_PUBLIC_IP)));
            let internal_ip = item
                .get("status")
                .and_then(|st| st.get("addresses"))
                .and_then(|a| a.as_sequence())
                .and_then(|addrs| {
                    addrs.iter().find(|a| {
                        a.get("type").and_then(|t| t.as_str()) == Some("InternalIP")
                            && a.get("address")
                                .and_then(|x| x.as_str())
                                .is_some_and(|x| x.parse::<Ipv4Addr>().is_ok())
                    })
                })
                .and_then(|a| s(a.get("address")));
            let pod_cidr = s(item.get("spec").and_then(|sp| sp.get("podCIDR")));
            let vtep_mac = match annotations.and_then(|a| a.get(FLANNEL_BACKEND_DATA)) {
                None => None,
                Some(bd) => {
                    match bd
                        .as_str()
                        .map(serde_json::from_str::<HashMap<String, serde_json::Value>>)
                    {
                        Some(Ok(m)) => m.get("VtepMAC").and_then(|x| x.as_str()).map(String::from),
                        _ => {
                            problems.push(Problem {
                                path: format!(
                                    "items[{i}].metadata.annotations[{FLANNEL_BACKEND_DATA}]"
                                ),
                                reason: "not a JSON object".into(),
                            });
                            None
                        }
                    }
                }
            };
            (name, public_ip.or(internal_ip), pod_cidr, vtep_mac)
        })
        .collect();
    (nodes, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(own: Option<&str>) -> Limits {
        Limits {
            max_nodes: 5000,
            own_node: own.map(String::from),
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
        };
        let e = parse(GOOD, &Defaults::default(), &l).unwrap_err();
        assert_eq!(
            e.0[0].to_string(),
            "nodes: 2 nodes do not fit in maps sized for 1 (raise --max-nodes)"
        );
    }
}

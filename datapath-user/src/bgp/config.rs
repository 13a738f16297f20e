//! The BIRD configuration a node's state asks for: its pod CIDRs advertised to the mesh and the
//! peers (the IPv4 one over IPv4 sessions, the IPv6 one over sessions between IPv6 addresses,
//! as Calico's BIRD and BIRD6 do), learned routes for prefixes the cluster does not own
//! installed in the kernel, graceful restart on every session.
use std::{collections::HashSet, fmt::Write as _, net::Ipv4Addr, path::Path};

use crate::cluster::{Bgp, Cidr, Cidr6, Node};

/// Everything the configuration is written from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    pub bgp: Bgp,
    pub me: Node,
    /// Every other node of the state.
    pub peers: Vec<Node>,
    /// The cluster's pod networks: routes learned inside them are never installed (the
    /// datapath's maps route pod CIDRs).
    pub networks: Vec<Cidr>,
    /// The same for IPv6 (empty while this node carries no IPv6 pods).
    pub networks6: Vec<Cidr6>,
    pub router_id: Ipv4Addr,
    /// Address the sessions are made from.
    pub local: Ipv4Addr,
    /// The underlay interface: its subnet resolves the next hops of learned routes.
    pub iface: String,
    /// Whether this node's pod CIDR is advertised: not once the state no longer names it.
    pub advertise: bool,
}

/// Names of the BGP protocols for the mesh's nodes and the explicit peers, as BIRD shows them.
pub const MESH_PREFIX: &str = "node_";
pub const PEER_PREFIX: &str = "peer_";
/// The static protocols holding this node's pod CIDRs: what the sessions advertise.
const PODS: &str = "dp_pods";
const PODS6: &str = "dp_pods6";

/// A BIRD symbol for `name`: letters, digits and `_` only.
fn symbol(prefix: &str, name: &str) -> String {
    let body: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{prefix}{body}")
}

/// BIRD's configuration text for `v`, logging to `log`.
pub fn render(v: &View, log: &Path) -> String {
    let mut out = String::new();
    let six = v.me.v6.is_some();
    let _ = writeln!(
        out,
        "# Written by the datapath agent from the cluster state; rewritten on every change.\n\
         # The log is kept under 10 MB, the one before it beside it.\n\
         log \"{log}\" 10000000 \"{log}.old\" {{ info, remote, warning, error, auth, fatal, bug }};\n\
         router id {};\n",
        v.router_id,
        log = log.display(),
    );
    out.push_str("protocol device {\n  scan time 10;\n}\n\n");
    let _ = writeln!(
        out,
        "# Next hops of learned routes resolve through the underlay's subnet.\n\
         protocol direct dp_underlay {{\n  ipv4;\n{}  interface \"{}\";\n}}\n",
        if six { "  ipv6;\n" } else { "" },
        v.iface
    );
    out.push_str(&pods(PODS, "ipv4", v.me.pod_cidr, v.advertise));
    out.push_str(&kernel("dp_kernel", "ipv4", &v.networks));
    if let Some(h) = v.me.v6 {
        out.push_str(&pods(PODS6, "ipv6", h.pod_cidr, v.advertise));
        out.push_str(&kernel("dp_kernel6", "ipv6", &v.networks6));
    }
    let _ = writeln!(
        out,
        "filter dp_advertise {{\n  if proto = \"{PODS}\" || proto = \"{PODS6}\" then accept;\n  reject;\n}}\n"
    );
    let asn = v.bgp.as_of(&v.me);
    out.push_str(&template("dp_peer", &v.local.to_string(), asn, "ipv4"));
    if let Some(h) = v.me.v6 {
        out.push_str(&template("dp_peer6", &h.address.to_string(), asn, "ipv6"));
    }
    let mut used = HashSet::new();
    if v.bgp.node_to_node_mesh {
        mesh(&mut out, v, &mut used);
    }
    explicit_peers(&mut out, v, &mut used);
    out
}

/// A static protocol holding `cidr` (`advertise` false: withdrawn).
fn pods<C: std::fmt::Display>(name: &str, channel: &str, cidr: C, advertise: bool) -> String {
    let route = if advertise {
        format!("  route {cidr} blackhole;\n")
    } else {
        "  # withdrawn: the cluster state no longer names this node\n".into()
    };
    format!(
        "# This node's pod CIDR: the one route of its family the sessions advertise.\n\
         protocol static {name} {{\n  {channel};\n{route}}}\n\n"
    )
}

/// The template of the sessions of one family, made from `local`.
fn template(name: &str, local: &str, asn: u32, channel: &str) -> String {
    format!(
        "template bgp {name} {{\n  local {local} as {asn};\n  graceful restart on;\n  \
         connect delay time 2;\n  connect retry time 5;\n  error wait time 5, 30;\n  \
         {channel} {{\n    import all;\n    export filter dp_advertise;\n    next hop self;\n  }};\n}}\n\n"
    )
}

/// The node-to-node mesh: a session to every other node, and one between the IPv6 addresses
/// of every pair of nodes that both have an IPv6 half.
fn mesh(out: &mut String, v: &View, used: &mut HashSet<String>) {
    for n in &v.peers {
        let node = n.name.replace('"', "");
        let name = unique(symbol(MESH_PREFIX, &n.name), used);
        let asn = v.bgp.as_of(n);
        let _ = writeln!(
            out,
            "protocol bgp {name} from dp_peer {{\n  description \"node {node}\";\n  neighbor {} as {asn};\n}}\n",
            n.address
        );
        let Some(h) = n.v6.filter(|_| v.me.v6.is_some()) else {
            continue;
        };
        let name = unique(symbol(MESH_PREFIX, &format!("{}_v6", n.name)), used);
        let _ = writeln!(
            out,
            "protocol bgp {name} from dp_peer6 {{\n  description \"node {node} (IPv6)\";\n  neighbor {} as {asn};\n}}\n",
            h.address
        );
    }
}

/// This node's explicit peers; an IPv6 one only when this node has an IPv6 half to peer from.
fn explicit_peers(out: &mut String, v: &View, used: &mut HashSet<String>) {
    let asn = v.bgp.as_of(&v.me);
    for p in v.bgp.peers_of(&v.me.name) {
        let template = match p.address.is_ipv6() {
            true if v.me.v6.is_none() => continue,
            true => "dp_peer6",
            false => "dp_peer",
        };
        let name = unique(symbol(PEER_PREFIX, &p.address.to_string()), used);
        // Over an eBGP router, the other nodes' routes carry this node's own AS: accepted, as
        // the nodes of one AS behind top-of-rack routers need.
        let local_as = if p.as_number == asn {
            ""
        } else {
            "  allow local as;\n"
        };
        let _ = writeln!(
            out,
            "protocol bgp {name} from {template} {{\n  description \"peer\";\n  neighbor {} as {};\n{local_as}}}\n",
            p.address, p.as_number
        );
    }
}

/// A kernel protocol of one family: routes learned over BGP, but for the cluster's own pod
/// networks.
fn kernel<C: std::fmt::Display>(name: &str, channel: &str, networks: &[C]) -> String {
    let own = if networks.is_empty() {
        String::new()
    } else {
        let set: Vec<String> = networks.iter().map(|c| format!("{c}+")).collect();
        format!("      if net ~ [ {} ] then reject;\n", set.join(", "))
    };
    format!(
        "# Routes learned for what the cluster does not own (another cluster's pods, a load\n\
         # balancer's range) go to the kernel; pod CIDRs are the datapath's.\n\
         protocol kernel {name} {{\n  {channel} {{\n    import none;\n    export filter {{\n\
         {own}      if source = RTS_BGP then accept;\n      reject;\n    }};\n  }};\n  \
         graceful restart;\n  merge paths on;\n}}\n\n"
    )
}

/// `name`, or `name_2`, `name_3`... when two nodes' names map to the same symbol.
fn unique(name: String, used: &mut HashSet<String>) -> String {
    let mut candidate = name.clone();
    let mut i = 2;
    while !used.insert(candidate.clone()) {
        candidate = format!("{name}_{i}");
        i += 1;
    }
    candidate
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::BgpPeer;

    fn node(name: &str, addr: [u8; 4], cidr: &str) -> Node {
        Node {
            index: 0,
            name: name.into(),
            address: addr.into(),
            prefix_len: None,
            pod_cidr: cidr.parse().unwrap(),
            vtep_mac: [0; 6],
            as_number: None,
            v6: None,
        }
    }

    #[test]
    fn mesh_peers_and_filters() {
        let v = View {
            bgp: Bgp {
                as_number: 64512,
                node_to_node_mesh: true,
                peers: vec![
                    BgpPeer {
                        address: [10, 0, 1, 1].into(),
                        as_number: 65001,
                        node: Some("a".into()),
                    },
                    BgpPeer {
                        address: [10, 0, 2, 1].into(),
                        as_number: 65001,
                        node: Some("b.x".into()),
                    },
                ],
            },
            me: node("a", [10, 0, 1, 10], "10.244.1.0/24"),
            peers: vec![
                node("b.x", [10, 0, 2, 10], "10.244.2.0/24"),
                node("b-x", [10, 0, 2, 11], "10.244.3.0/24"),
            ],
            networks: vec!["10.244.0.0/16".parse().unwrap()],
            networks6: Vec::new(),
            router_id: [10, 0, 1, 10].into(),
            local: [10, 0, 1, 10].into(),
            iface: "eth0".into(),
            advertise: true,
        };
        let text = render(&v, Path::new("/run/x/bird.log"));
        assert!(text.contains("route 10.244.1.0/24 blackhole;"), "{text}");
        assert!(
            text.contains("if net ~ [ 10.244.0.0/16+ ] then reject;"),
            "{text}"
        );
        assert!(
            text.contains("protocol bgp node_b_x from dp_peer"),
            "{text}"
        );
        assert!(
            text.contains("protocol bgp node_b_x_2 from dp_peer"),
            "{text}"
        );
        assert!(text.contains("neighbor 10.0.1.1 as 65001;"), "{text}");
        // Another node's peer is not this node's.
        assert!(!text.contains("10.0.2.1 as"), "{text}");
        assert!(text.contains("local 10.0.1.10 as 64512;"), "{text}");
        assert!(!text.contains("ipv6"), "no IPv6 half, no IPv6: {text}");
    }

    #[test]
    fn ipv6_halves_peer_over_ipv6() {
        let half = |addr: &str, cidr: &str| crate::cluster::NodeV6 {
            address: addr.parse().unwrap(),
            prefix_len: None,
            pod_cidr: cidr.parse().unwrap(),
            vtep_mac: [0; 6],
        };
        let mut me = node("a", [10, 0, 1, 10], "10.244.1.0/24");
        me.v6 = Some(half("fd00:1::10", "fd00:10:244:1::/64"));
        let mut b = node("b", [10, 0, 2, 10], "10.244.2.0/24");
        b.v6 = Some(half("fd00:2::10", "fd00:10:244:2::/64"));
        let v = View {
            bgp: Bgp {
                as_number: 64512,
                node_to_node_mesh: true,
                peers: vec![BgpPeer {
                    address: "fd00:1::1".parse().unwrap(),
                    as_number: 65001,
                    node: None,
                }],
            },
            me,
            peers: vec![b, node("c", [10, 0, 3, 10], "10.244.3.0/24")],
            networks: vec!["10.244.0.0/16".parse().unwrap()],
            networks6: vec!["fd00:10:244::/56".parse().unwrap()],
            router_id: [10, 0, 1, 10].into(),
            local: [10, 0, 1, 10].into(),
            iface: "eth0".into(),
            advertise: true,
        };
        let text = render(&v, Path::new("/run/x/bird.log"));
        for want in [
            "protocol static dp_pods6 {\n  ipv6;\n  route fd00:10:244:1::/64 blackhole;",
            "if net ~ [ fd00:10:244::/56+ ] then reject;",
            "template bgp dp_peer6 {\n  local fd00:1::10 as 64512;",
            "protocol bgp node_b_v6 from dp_peer6 {\n  description \"node b (IPv6)\";\n  neighbor fd00:2::10 as 64512;",
            "protocol bgp peer_fd00_1__1 from dp_peer6 {",
            "protocol direct dp_underlay {\n  ipv4;\n  ipv6;",
        ] {
            assert!(text.contains(want), "{want}\n{text}");
        }
        // c has no IPv6 half: one session to it, over IPv4.
        assert!(!text.contains("node_c_v6"), "{text}");
        assert!(text.contains("protocol bgp node_c from dp_peer"), "{text}");
    }
}

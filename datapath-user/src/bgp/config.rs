//! The BIRD configuration a node's state asks for: its pod CIDR advertised to the mesh and the
//! peers, learned routes for prefixes the cluster does not own installed in the kernel, graceful
//! restart on every session.
use std::{collections::HashSet, fmt::Write as _, net::Ipv4Addr, path::Path};

use crate::cluster::{Bgp, Cidr, Node};

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
/// The static protocol holding this node's pod CIDR: what the sessions advertise.
const PODS: &str = "dp_pods";

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
    let asn = v.bgp.as_of(&v.me);
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
         protocol direct dp_underlay {{\n  ipv4;\n  interface \"{}\";\n}}\n",
        v.iface
    );
    let route = if v.advertise {
        format!("  route {} blackhole;\n", v.me.pod_cidr)
    } else {
        "  # withdrawn: the cluster state no longer names this node\n".into()
    };
    let _ = writeln!(
        out,
        "# This node's pod CIDR: the one route the sessions advertise.\n\
         protocol static {PODS} {{\n  ipv4;\n{route}}}\n"
    );
    out.push_str(&kernel(&v.networks));
    let _ = writeln!(
        out,
        "filter dp_advertise {{\n  if proto = \"{PODS}\" then accept;\n  reject;\n}}\n\n\
         template bgp dp_peer {{\n  local {} as {asn};\n  graceful restart on;\n  \
         connect delay time 2;\n  connect retry time 5;\n  error wait time 5, 30;\n  \
         ipv4 {{\n    import all;\n    export filter dp_advertise;\n    next hop self;\n  }};\n}}\n",
        v.local
    );
    let mut used = HashSet::new();
    if v.bgp.node_to_node_mesh {
        for n in &v.peers {
            let name = unique(symbol(MESH_PREFIX, &n.name), &mut used);
            let _ = writeln!(
                out,
                "protocol bgp {name} from dp_peer {{\n  description \"node {}\";\n  neighbor {} as {};\n}}\n",
                n.name.replace('"', ""),
                n.address,
                v.bgp.as_of(n)
            );
        }
    }
    for p in v.bgp.peers_of(&v.me.name) {
        let name = unique(symbol(PEER_PREFIX, &p.address.to_string()), &mut used);
        // Over an eBGP router, the other nodes' routes carry this node's own AS: accepted, as
        // the nodes of one AS behind top-of-rack routers need.
        let local_as = if p.as_number == asn {
            ""
        } else {
            "  allow local as;\n"
        };
        let _ = writeln!(
            out,
            "protocol bgp {name} from dp_peer {{\n  description \"peer\";\n  neighbor {} as {};\n{local_as}}}\n",
            p.address, p.as_number
        );
    }
    out
}

/// The kernel protocol: routes learned over BGP, but for the cluster's own pod networks.
fn kernel(networks: &[Cidr]) -> String {
    let own = if networks.is_empty() {
        String::new()
    } else {
        let set: Vec<String> = networks.iter().map(|c| format!("{c}+")).collect();
        format!("      if net ~ [ {} ] then reject;\n", set.join(", "))
    };
    format!(
        "# Routes learned for what the cluster does not own (another cluster's pods, a load\n\
         # balancer's range) go to the kernel; pod CIDRs are the datapath's.\n\
         protocol kernel dp_kernel {{\n  ipv4 {{\n    import none;\n    export filter {{\n\
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
    }
}

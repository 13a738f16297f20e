//! The IPv6 half of a dual-stack topology: node i gets fd00:1::<10+i>/64 on its underlay
//! (beside 192.168.1.<10+i>), pod CIDR fd00:10:244:<i>::/64, its pod fd00:10:244:<i>::2
//! behind `pod0` (fd00:10:244:<i>::1 on the node's side), routed as the IPv4 half is.
use crate::Topology;

/// Node `i`'s IPv6 underlay address (nodes on subnet 0, hosts 10, 11, ...).
pub fn node_addr6(i: usize) -> String {
    format!("fd00:1::{}", 10 + i)
}

/// Node `i`'s IPv6 pod CIDR, as the agent writes it (`fd00:10:244::/64` for node 0).
pub fn pod_cidr6(i: usize) -> String {
    let net = std::net::Ipv6Addr::new(0xfd00, 0x10, 0x244, i as u16, 0, 0, 0, 0);
    format!("{net}/64")
}

pub fn pod_ip6(i: usize) -> String {
    std::net::Ipv6Addr::new(0xfd00, 0x10, 0x244, i as u16, 0, 0, 0, 2).to_string()
}

/// Adds the IPv6 half to every node with a hand-made pod (addresses without duplicate address
/// detection, so they work at once) and turns IPv6 forwarding on, as a dual-stack node has it.
pub fn add_ipv6(t: &Topology) {
    add_ipv6_underlay(t);
    for (i, n) in t.nodes.iter().enumerate() {
        let pod = pod_ip6(i);
        n.ns.exec(&format!(
            "ip -6 addr add fd00:10:244:{i}::1/128 dev pod0 nodad && ip -6 route add {pod}/128 dev pod0"
        ));
        n.pod.exec(&format!(
            "ip -6 addr add {pod}/64 dev eth0 nodad && ip -6 route add fd00:10:244:{i}::1/128 dev eth0 && \
             ip -6 route add default via fd00:10:244:{i}::1"
        ));
    }
}

/// The underlay's IPv6 half only (for nodes whose pods the CNI plugins make): node addresses,
/// IPv6 forwarding on.
pub fn add_ipv6_underlay(t: &Topology) {
    t.underlay.exec("ip -6 addr add fd00:1::1/64 dev br0 nodad");
    for (i, n) in t.nodes.iter().enumerate() {
        n.ns.exec(&format!(
            "sysctl -qw net.ipv6.conf.all.forwarding=1 && ip -6 addr add {}/64 dev eth0 nodad",
            node_addr6(i)
        ));
    }
}

/// A VXLAN cluster file of the topology's nodes, each with its IPv6 half (VTEP MACs derived).
pub fn dual_cluster_yaml(t: &Topology) -> String {
    let mut s = "encapsulation: vxlan\nnodes:\n".to_string();
    for (i, n) in t.nodes.iter().enumerate() {
        s += &format!(
            "  - name: {}\n    address: {}\n    podCIDR: {}\n{}",
            n.name,
            n.addr,
            n.pod_cidr,
            node_yaml6(i, None)
        );
    }
    s
}

/// Two dual-stack nodes on one subnet with hand-made pods of both families, each running an
/// agent (with `flags`) on the dual-stack cluster file whose first line is replaced by `head`
/// (e.g. `encapsulation: none\nbgp: ...\n`).
pub fn two_dual_nodes(tag: &str, head: &str, flags: &str) -> Topology {
    let mut t = Topology::two_nodes(tag);
    add_ipv6(&t);
    let yaml = dual_cluster_yaml(&t).replacen("encapsulation: vxlan\n", head, 1);
    let cluster = t.write_cluster(&yaml);
    for i in 0..2 {
        t.start_agent(i, &cluster, flags);
    }
    t
}

/// The cluster-file lines of node `i`'s IPv6 half (indented for a `nodes:` entry), with
/// `vtep` as its IPv6 VTEP MAC when given.
pub fn node_yaml6(i: usize, vtep: Option<&str>) -> String {
    let mut s = format!(
        "    addressV6: \"{}\"\n    podCIDRv6: \"{}\"\n",
        node_addr6(i),
        pod_cidr6(i)
    );
    if let Some(m) = vtep {
        s += &format!("    vtepMACv6: \"{m}\"\n");
    }
    s
}

impl Topology {
    /// Pings pod `to`'s IPv6 address from pod `from`; returns the number of replies.
    pub fn ping6(&self, from: usize, to: usize, count: u32) -> u32 {
        let out = self.nodes[from]
            .pod
            .exec_out(&format!("ping -6 -c {count} -i 0.2 -W 1 {}", pod_ip6(to)));
        crate::ping_received(&String::from_utf8_lossy(&out.stdout))
    }

    /// Sets node `i` up as flanneld sets up its IPv6 VXLAN device (`flannel-v6.<vni>`, or
    /// Calico's `vxlan-v6.calico`: `dev`), VNI `vni`, port `port`, MAC `mac`, MTU 1430, over
    /// the node's IPv6 address; and programs `peer` (node index) as flanneld would: neighbour
    /// and FDB entries for `peer_mac`, the onlink route to its IPv6 pod CIDR.
    pub fn linux_vxlan6(
        &self,
        i: usize,
        dev: &str,
        (vni, port): (u32, u16),
        mac: &str,
        peer: (usize, &str),
    ) {
        let (p, peer_mac) = peer;
        let net = format!("fd00:10:244:{p}::");
        self.nodes[i].ns.exec(&format!(
            "ip link add {dev} type vxlan id {vni} dstport {port} local {} dev eth0 nolearning && \
             ip link set {dev} address {mac} mtu 1430 up && \
             ip -6 addr add fd00:10:244:{i}::/128 dev {dev} nodad && \
             ip -6 neigh replace {net} lladdr {peer_mac} dev {dev} nud permanent && \
             bridge fdb append {peer_mac} dev {dev} dst {} && \
             ip -6 route replace {} via {net} dev {dev} onlink",
            node_addr6(i),
            node_addr6(p),
            pod_cidr6(p),
        ));
    }
}

/// Packets node `i`'s kernel VXLAN device (`dp-vxcsum`, which carries IPv6 GSO packets) has
/// sent, as the kernel counts them.
pub fn vxcsum_tx(t: &Topology, i: usize) -> u64 {
    let out = t.nodes[i]
        .ns
        .exec("cat /sys/class/net/dp-vxcsum/statistics/tx_packets");
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("no dp-vxcsum on node {i}: {out}"))
}

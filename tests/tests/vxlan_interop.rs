//! Interoperation with the Linux VXLAN device, set up on node2 the way Flannel sets up
//! `flannel.1`, while node1 runs this datapath.
//!
//! ```text
//!   pod1 10.244.0.2                                   pod2 10.244.1.2
//!     |                                                 |
//!   node1: datapath (TC encap, XDP decap)             node2: flannel.1 (vxlan id VNI dstport PORT
//!     eth0 192.168.1.10 ──── u0 ─ br0 ─ u1 ──── eth0    nolearning), 10.244.1.0/32,
//!                                                     neigh 10.244.0.0 lladdr <node1 VtepMAC> permanent,
//!                                                     fdb <node1 VtepMAC> dst 192.168.1.10,
//!                                                     route 10.244.0.0/24 via 10.244.0.0 onlink
//! ```
//! Traffic crosses both ways with Flannel's defaults (VNI 1, port 8472) and Calico's (VNI 4096,
//! port 4789).
use integration_tests::Topology;

const NODE1_VTEP: &str = "0e:00:c0:a8:01:0a";
const NODE2_VTEP: &str = "66:00:00:00:00:02";

fn interop(vni: u32, port: u16) {
    let mut t = Topology::two_nodes(&format!("fl{vni}"));
    let yaml = format!(
        "encapsulation: vxlan\nvxlan: {{ vni: {vni}, port: {port} }}\nnodes:\n  - name: node1\n    address: 192.168.1.10\n    podCIDR: 10.244.0.0/24\n  - name: node2\n    address: 192.168.1.11\n    podCIDR: 10.244.1.0/24\n    vtepMAC: \"{NODE2_VTEP}\"\n"
    );
    let cluster = t.write_cluster(&yaml);
    t.start_agent(0, &cluster, "");
    t.flannel_device(1, vni, port, NODE2_VTEP);
    t.flannel_peer(1, "192.168.1.10", "10.244.0.0/24", NODE1_VTEP);
    assert_eq!(
        t.ping(0, 1, 5),
        5,
        "datapath pod -> Linux VXLAN pod (vni {vni}, port {port})"
    );
    assert_eq!(
        t.ping(1, 0, 5),
        5,
        "Linux VXLAN pod -> datapath pod (vni {vni}, port {port})"
    );
    for (from, to) in [(0, 1), (1, 0)] {
        let (sent, got) = t.tcp_transfer(from, to, 20);
        assert_eq!(
            sent, got,
            "20 MiB over TCP {from}->{to} with the Linux VXLAN peer"
        );
    }
    assert!(
        t.counter(0, "decap", "vxlan") > 0,
        "node1 decapsulated nothing"
    );
    assert_eq!(t.drops(0, "wrong_vni") + t.drops(0, "unknown_peer"), 0);
}

#[test]
fn flannel_defaults_vni_1_port_8472() {
    interop(1, 8472);
}

#[test]
fn calico_defaults_vni_4096_port_4789() {
    interop(4096, 4789);
}

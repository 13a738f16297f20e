//! crossSubnet (Calico CrossSubnet, Flannel DirectRouting): a same-subnet peer is reached
//! natively, a peer behind a router is encapsulated toward the router's MAC (FIB next hop).
//!
//! ```text
//!   node1 192.168.1.10 ─ u0 ─┐                       ┌─ u2 ─ node3 192.168.2.10 (pod 10.244.2.2)
//!   node2 192.168.1.11 ─ u1 ─┴ br0 192.168.1.1 [router] br1 192.168.2.1
//!   pod1 → pod2: plain IPv4 on u0 (route 10.244.1.0/24 via 192.168.1.11)
//!   pod1 → pod3: IPIP on u0, outer 192.168.1.10 → 192.168.2.10, L2 next hop the router
//! ```
use integration_tests::{Capture, Topology, tshark_fields};

#[test]
fn same_subnet_native_other_subnet_encapsulated() {
    let mut t = Topology::three_nodes("xsub", 1);
    let cluster = t.write_cluster(&t.cluster_yaml("ipip", "crossSubnet: true\n"));
    for i in 0..3 {
        t.start_agent(i, &cluster, "");
    }
    let cap = Capture::start(
        &t.underlay,
        "u0",
        "icmp or ip proto 4",
        &t.workdir.join("u0.pcap"),
    );
    assert_eq!(t.ping(0, 1, 3), 3, "same subnet, native");
    assert_eq!(t.ping(0, 2, 3), 3, "other subnet, IPIP through the router");
    assert_eq!(t.ping(2, 0, 3), 3, "other subnet, reverse");
    let pcap = cap.stop();
    let frames = tshark_fields(&pcap, "", &["ip.proto", "ip.src", "ip.dst"]);
    let (mut native, mut encap) = (0, 0);
    for f in &frames {
        let protos: Vec<&str> = f[0].split(',').collect();
        let dsts: Vec<&str> = f[2].split(',').collect();
        let inner_dst = *dsts.last().unwrap();
        if inner_dst == "10.244.1.2" || (dsts.len() == 1 && f[1] == "10.244.1.2") {
            assert_eq!(
                protos,
                ["1"],
                "same-subnet traffic must be plain ICMP: {f:?}"
            );
            native += 1;
        } else {
            assert_eq!(
                protos,
                ["4", "1"],
                "cross-subnet traffic must be IPIP: {f:?}"
            );
            assert!(
                f[1].starts_with("192.168.") && dsts[0].starts_with("192.168."),
                "outer header between node addresses: {f:?}"
            );
            encap += 1;
        }
    }
    assert_eq!(native, 6, "3 requests and 3 replies natively: {frames:?}");
    assert_eq!(encap, 12, "6 requests and 6 replies in IPIP: {frames:?}");
    assert!(t.counter(0, "native", "none") >= 3);
}

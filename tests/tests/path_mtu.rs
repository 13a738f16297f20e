//! Path MTU over VXLAN: pods keep MTU 1500, the agent's route to the peer's pod CIDR carries
//! MTU 1450, so the kernel answers oversized DF packets with ICMP "fragmentation needed" (MTU
//! 1450) and TCP adapts instead of black-holing.
//!
//! ```text
//!   pod1 (mtu 1500) ── node1: route 10.244.1.0/24 via 192.168.1.11 mtu 1450 ── VXLAN ── node2 ── pod2
//!        ◄── ICMP 3/4 "fragmentation needed, next-hop MTU 1450" (captured on pod1's eth0)
//! ```
use integration_tests::{Capture, Topology, tshark_fields};

#[test]
fn tcp_from_a_1500_mtu_pod_completes_over_vxlan() {
    let (t, _) = Topology::two_nodes_running("pmtu", "vxlan", "", "");
    assert!(
        t.nodes[0]
            .pod
            .exec("ip link show eth0")
            .contains("mtu 1500")
    );
    let cap = Capture::start(
        &t.nodes[0].pod,
        "eth0",
        "icmp[0] == 3 and icmp[1] == 4",
        &t.workdir.join("icmp.pcap"),
    );
    let (sent, got) = t.tcp_transfer(0, 1, 10);
    assert_eq!(sent, got, "10 MiB over TCP from a 1500-MTU pod");
    let pcap = cap.stop();
    let icmp = tshark_fields(&pcap, "", &["icmp.type", "icmp.code", "icmp.mtu"]);
    assert!(
        !icmp.is_empty(),
        "no ICMP fragmentation-needed reached the pod"
    );
    assert_eq!(icmp[0], ["3", "4", "1450"], "ICMP must carry MTU 1450");
    assert_eq!(
        t.drops(0, "too_big"),
        0,
        "the route MTU, not a drop, must do the work"
    );
}

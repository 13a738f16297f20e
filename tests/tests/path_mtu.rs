//! Packet sizes against the MTU.
//!
//! Path MTU over VXLAN: pods keep MTU 1500, the agent's aggregate route toward the pod CIDRs
//! carries MTU 1450, so the kernel answers oversized DF packets with ICMP "fragmentation needed" (MTU
//! 1450) and TCP adapts instead of black-holing.
//!
//! ```text
//!   pod1 (mtu 1500) ── node1: route 10.244.0.0/23 via 169.254.0.1 onlink mtu 1450 ── VXLAN ── node2 ── pod2
//!        ◄── ICMP 3/4 "fragmentation needed, next-hop MTU 1450" (captured on pod1's eth0)
//! ```
//!
//! Segments: pods at the pod MTU, as the CNI configures them, send TCP that node1 segments in
//! software (TSO and GSO off on its eth0), so the capture on the underlay shows every segment:
//! they must fill the underlay MTU, not fall short by the tunnel's overhead. Node2 merges them
//! again (GRO on its eth0, fed by a veth without TSO), so TC decapsulation sees merged packets;
//! node2's stack must forward them to its pod rather than refuse them as too big.
use integration_tests::{Capture, Topology, snmp, tshark_fields};

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

fn segments_fill_the_mtu_and_merged_packets_forward(encap: &str, pod_mtu: u32) {
    let (t, _) = Topology::two_nodes_running(&format!("seg{encap}"), encap, "", "--decap tc");
    for n in &t.nodes {
        n.ns.exec(&format!("ip link set pod0 mtu {pod_mtu}"));
        n.pod.exec(&format!("ip link set eth0 mtu {pod_mtu}"));
    }
    t.nodes[0].ns.exec("ethtool -K eth0 tso off gso off");
    t.underlay.exec("ethtool -K u1 tso off gso off");
    t.nodes[1].ns.exec("ethtool -K eth0 gro on");
    let filter = if encap == "ipip" {
        "ip proto 4"
    } else {
        "udp port 4789"
    };
    let cap = Capture::start(
        &t.underlay,
        "u0",
        &format!("{filter} and src host 192.168.1.10"),
        &t.workdir.join("segments.pcap"),
    );
    let decap_before = (
        t.counter(1, "decap", encap),
        t.counter_bytes(1, "decap", encap),
    );
    let frag_fails = snmp(&t.nodes[1].ns, "Ip", "FragFails");

    let (sent, got) = t.tcp_transfer(0, 1, 20);
    assert_eq!(sent, got, "20 MiB over TCP arrived altered or short");

    let pcap = cap.stop();
    // The outer header's total length comes first.
    let lens: Vec<u32> = tshark_fields(&pcap, "", &["ip.len"])
        .iter()
        .filter_map(|f| f[0].split(',').next()?.parse().ok())
        .collect();
    let full = lens.iter().filter(|&&l| l == 1500).count();
    assert_eq!(
        lens.iter().max(),
        Some(&1500),
        "segments must fill the underlay MTU"
    );
    // Only a transfer's last segments and its handshake may be short.
    assert!(
        full > 1000 && full * 10 >= lens.len() * 9,
        "only {full} of {} segments filled the MTU",
        lens.len()
    );
    if encap == "ipip" {
        // The kernel merges IPIP always; VXLAN only for a port it has a socket on.
        let packets = t.counter(1, "decap", encap) - decap_before.0;
        let bytes = t.counter_bytes(1, "decap", encap) - decap_before.1;
        assert!(
            bytes / packets.max(1) > 3000,
            "node2's GRO merged nothing ({bytes} bytes in {packets} packets): the test proves nothing"
        );
    }
    assert_eq!(
        snmp(&t.nodes[1].ns, "Ip", "FragFails") - frag_fails,
        0,
        "node2 refused decapsulated packets as larger than the pod MTU"
    );
}

#[test]
fn ipip_segments_fill_the_mtu_and_merged_packets_forward() {
    segments_fill_the_mtu_and_merged_packets_forward("ipip", 1480);
}

#[test]
fn vxlan_segments_fill_the_mtu_and_merged_packets_forward() {
    segments_fill_the_mtu_and_merged_packets_forward("vxlan", 1450);
}

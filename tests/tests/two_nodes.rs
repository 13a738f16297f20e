//! Pod-to-pod traffic between two nodes running the datapath, in IPIP and in VXLAN mode.
//!
//! ```text
//!   pod1 10.244.0.2                                        pod2 10.244.1.2
//!     | eth0                                                    | eth0
//!     | pod0 (node1 routes 10.244.0.2/32)                       | pod0
//!   node1 ── TC egress: encap ──► eth0 192.168.1.10 ─┐   ┌─ eth0 192.168.1.11 ── XDP: decap ──► node2
//!                                             u0 ── br0 ── u1   (underlay netns; tcpdump on u0)
//! ```
//! A packet from pod1 is routed by node1 (the agent's aggregate route `10.244.0.0/23 via
//! 169.254.0.1 onlink proto 199`) to eth0, encapsulated at TC egress, decapsulated by node2's
//! XDP or TC program, routed to pod2. Replies take the mirror path. The capture on br0 is checked by scapy
//! (`tests/wire_check.py`) against the pod's own capture.
use integration_tests::{Capture, Topology, script, sh, wire_captures, wire_check};
use testkit::net::NodeSpec;

fn two_nodes_carry_traffic(encap: &str, decap: &str) {
    carry_traffic(encap, decap, false, false);
}

/// Two nodes running the agent with `--decap decap`; with `cni`, their pods made through the
/// agent's CNI list, so the default host routing (accepted flows) carries them.
fn running(encap: &str, decap: &str, extra: &str, cni: bool) -> Topology {
    let tag = format!("{encap}{decap}");
    let args = format!("--decap {decap}");
    if !cni {
        return Topology::two_nodes_running(&tag, encap, extra, &args).0;
    }
    let mut t = Topology::with_cni(&tag, &[10, 11].map(|host| NodeSpec { subnet: 0, host }));
    let cluster = t.write_cluster(&t.cluster_yaml(encap, extra));
    for i in 0..2 {
        t.start_agent(i, &cluster, &args);
    }
    for i in 0..2 {
        t.cni_add(i);
    }
    t
}

fn carry_traffic(encap: &str, decap: &str, udp_csum: bool, cni: bool) {
    let extra = if udp_csum {
        "vxlan: { udpChecksum: true }\n"
    } else {
        ""
    };
    let t = running(encap, decap, extra, cni);

    let (ul, pod) = wire_captures(&t, encap);

    assert_eq!(t.ping(0, 1, 5), 5, "ping pod1 -> pod2 over {encap}");
    assert_eq!(t.ping(1, 0, 5), 5, "ping pod2 -> pod1 over {encap}");
    assert_eq!(
        t.udp_exchange(0, 1, 100),
        100,
        "UDP pod1 -> pod2 over {encap}"
    );
    assert_eq!(
        t.udp_exchange(1, 0, 100),
        100,
        "UDP pod2 -> pod1 over {encap}"
    );

    let ul = ul.stop();
    let pod = pod.stop();
    let check = wire_check(encap, &pod, &ul, if udp_csum { "udpcsum" } else { "" });
    println!("{check}");
    if udp_csum {
        gso_segments_carry_outer_checksums(&t);
    }

    for (from, to) in [(0, 1), (1, 0)] {
        let (sent, got) = t.tcp_transfer(from, to, 100);
        assert!(sent.ends_with(" 104857600"), "sender printed {sent:?}");
        assert_eq!(
            sent, got,
            "100 MiB over TCP {from}->{to} arrived altered or short"
        );
    }

    // Counted per skb: a GSO packet counts once with all its bytes.
    let encap_bytes = t.counter_bytes(0, "encap", encap);
    assert!(
        encap_bytes > 100 << 20,
        "node1 encapsulated only {encap_bytes} bytes"
    );
    assert!(
        t.counter(1, "decap", encap) > 0,
        "node2 decapsulated nothing"
    );
    let stats = t.stats(0);
    let drops: u64 = stats["drops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["packets"].as_u64().unwrap())
        .sum();
    assert_eq!(drops, 0, "node1 dropped packets: {stats}");
    if cni {
        // The transfers left pod1's veth straight for the underlay (BPF host routing).
        let routed = t.counter_bytes(0, "host_route_out", "bpf");
        assert!(
            routed > 100 << 20,
            "BPF host routing carried only {routed} bytes"
        );
    }
}

/// TCP from a pod leaves it as GSO packets, which the datapath hands to the kernel's
/// metadata-mode VXLAN device so that each segment gets its own outer UDP checksum. With
/// node1's transmit checksum offload off, segmentation and every checksum happen in software
/// before the wire, where scapy checks them.
fn gso_segments_carry_outer_checksums(t: &Topology) {
    t.nodes[0].ns.exec("ethtool -K eth0 tx off");
    let pcap = t.workdir.join("segments.pcap");
    let cap = Capture::start(
        &t.underlay,
        "u0",
        "udp port 4789 and src host 192.168.1.10",
        &pcap,
    );
    let (sent, got) = t.tcp_transfer(0, 1, 4);
    assert_eq!(sent, got, "4 MiB over TCP arrived altered or short");
    let pcap = cap.stop();
    let check = sh(&format!(
        "/usr/bin/python3 {} segments - {} 4096 4789 1500",
        script("wire_check.py").display(),
        pcap.display()
    ));
    println!("{check}");
    assert!(check.contains("wire check ok"), "{check}");
    t.nodes[0].ns.exec("ethtool -K eth0 tx on");
}

#[test]
fn ipip_xdp_decap() {
    two_nodes_carry_traffic("ipip", "xdp");
}

#[test]
fn vxlan_xdp_decap() {
    two_nodes_carry_traffic("vxlan", "xdp");
}

#[test]
fn vxlan_tc_decap() {
    two_nodes_carry_traffic("vxlan", "tc");
}

#[test]
fn ipip_tc_decap() {
    two_nodes_carry_traffic("ipip", "tc");
}

/// Outer UDP checksums computed (for middleboxes that reject zero): scapy recomputes each one.
#[test]
fn vxlan_with_outer_udp_checksum() {
    carry_traffic("vxlan", "xdp", true, false);
}

/// The same with pods made through the CNI list: the default host routing encapsulates at the
/// pod's veth, checksums and GSO segments included.
#[test]
fn vxlan_with_outer_udp_checksum_through_cni_pods() {
    carry_traffic("vxlan", "tc", true, true);
}

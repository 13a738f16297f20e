//! The underlay as the datapath finds it: a peer with no route does not stop a node, the
//! kernel's routing table holds a few aggregate routes rather than one per peer, and a change
//! of the underlay gateway is followed under a running transfer with no agent action.
//!
//! ```text
//!   node1 192.168.1.10 ─ u0 ─┐                                     ┌─ u2 ─ node3 192.168.2.10
//!   node2 192.168.1.11 ─ u1 ─┴ br0 ─ .1 [router 1] .1 ─ br1 ───────┘        (pod 10.244.2.2)
//!                              └──── .2 [router 2] .2 ──┘
//!   node1: 10.244.0.0/23 and 10.244.2.0/24 via 169.254.0.1 onlink (the encap program's next
//!   hop); the program picks the outer next hop (router 1 or 2) from the FIB per packet.
//! ```
use std::{thread, time::Duration};

use integration_tests::{Netns, Topology, sh, wait_for};

fn peer_state(t: &Topology, i: usize, peer: &str) -> String {
    t.stats(i)["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node"] == peer)
        .map(|r| r["state"].as_str().unwrap().to_string())
        .unwrap_or_else(|| "absent".into())
}

#[test]
fn a_peer_without_a_route_is_unreachable_until_one_appears() {
    let mut t = Topology::three_nodes("noroute", 1);
    // node1 knows its own subnet only: node3, behind the router, has no route.
    t.nodes[0].ns.exec("ip route del default");
    let all = t.cluster_yaml("ipip", "");
    let two = all.replace(
        "  - name: node3\n    address: 192.168.2.10\n    podCIDR: 10.244.2.0/24\n",
        "",
    );
    let cluster = t.write_cluster(&two);
    let full = t.workdir.join("all.yaml");
    std::fs::write(&full, &all).unwrap();
    for i in 0..2 {
        t.start_agent(i, &cluster, "");
    }
    t.start_agent(2, &full, "");
    // The unreachable peer arrives by a live reload: applied, not rejected.
    t.write_cluster(&all);
    let known = wait_for(Duration::from_secs(5), || {
        peer_state(&t, 0, "192.168.2.10") != "absent"
    });
    assert!(known, "node1 did not take node3 in");
    assert_eq!(t.ping(0, 1, 3), 3, "the reachable peer carries traffic");
    assert_eq!(t.ping(0, 2, 2), 0, "no route toward node3 yet");
    let flagged = wait_for(Duration::from_secs(5), || {
        peer_state(&t, 0, "192.168.2.10") == "unreachable"
    });
    assert!(flagged, "node3 not shown as unreachable");
    assert!(t.drops(0, "peer_unreachable") >= 2);
    let row = t.stats(0)["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node"] == "192.168.2.10")
        .cloned()
        .unwrap();
    assert!(row["unreachable_packets"].as_u64().unwrap() >= 2, "{row}");
    let log = std::fs::read_to_string(&t.agents[0].log).unwrap();
    assert!(!log.contains("rejected"), "a reload was rejected:\n{log}");

    // A handful of aggregate routes, none per peer, all toward the encap program's next hop.
    let routes = t.nodes[0].ns.exec("ip route show proto 199");
    assert_eq!(
        routes.trim(),
        "10.244.0.0/23 via 169.254.0.1 dev eth0 onlink mtu 1480 \n10.244.2.0/24 via 169.254.0.1 dev eth0 onlink mtu 1480",
    );
    let metrics = t.datapath(0, &format!("routes --pin-dir {}", t.pin_dir(0).display()));
    assert!(
        String::from_utf8_lossy(&metrics.stdout).contains("unreachable"),
        "{metrics:?}"
    );

    t.nodes[0]
        .ns
        .exec("ip route add 192.168.2.0/24 via 192.168.1.1");
    let back = wait_for(Duration::from_secs(5), || {
        peer_state(&t, 0, "192.168.2.10") == "reachable"
    });
    assert!(back, "node3 not reachable after its route appeared");
    assert_eq!(
        t.ping(0, 2, 3),
        3,
        "node3 works once the underlay reaches it"
    );
}

/// A second router between br0 and br1 at 192.168.1.2 / 192.168.2.2.
fn second_router(t: &Topology) -> Netns {
    let r2 = Netns::new(&format!("{}-r2", t.prefix));
    for (leg, br, addr) in [
        ("a", "br0", "192.168.1.2/24"),
        ("b", "br1", "192.168.2.2/24"),
    ] {
        sh(&format!(
            "ip link add r2{leg} netns {} type veth peer name v2{leg} netns {}",
            r2.name, t.underlay.name
        ));
        t.underlay
            .exec(&format!("ip link set v2{leg} master {br} up"));
        r2.exec(&format!(
            "ip addr add {addr} dev r2{leg} && ip link set r2{leg} up"
        ));
    }
    r2.exec("sysctl -qw net.ipv4.ip_forward=1");
    r2
}

/// Bytes received on `dev` (veth counts a GSO packet once, so packets say little).
fn rx_bytes(ns: &Netns, dev: &str) -> u64 {
    ns.exec(&format!("cat /sys/class/net/{dev}/statistics/rx_bytes"))
        .trim()
        .parse()
        .unwrap_or(0)
}

#[test]
fn the_underlay_gateway_moves_under_a_running_transfer() {
    let mut t = Topology::new(
        "gwmove",
        &[
            integration_tests::NodeSpec {
                subnet: 0,
                host: 10,
            },
            integration_tests::NodeSpec {
                subnet: 1,
                host: 10,
            },
        ],
    );
    let r2 = second_router(&t);
    let cluster = t.write_cluster(&t.cluster_yaml("vxlan", ""));
    t.start_agent(0, &cluster, "--decap tc");
    t.start_agent(1, &cluster, "--decap tc");
    assert_eq!(t.ping(0, 1, 2), 2);
    // Slow node1's underlay so the move lands in the middle of the transfer.
    t.nodes[0]
        .ns
        .exec("tc qdisc add dev eth0 root tbf rate 200mbit burst 256k latency 100ms");
    let before = (rx_bytes(&t.underlay, "u0"), rx_bytes(&r2, "r2a"));
    let (sent, received) = thread::scope(|s| {
        let transfer = s.spawn(|| t.tcp_transfer(0, 1, 60));
        thread::sleep(Duration::from_millis(1200));
        t.nodes[0]
            .ns
            .exec("ip route replace default via 192.168.1.2");
        transfer.join().expect("transfer thread")
    });
    assert_eq!(sent, received, "the transfer across the gateway move");
    // node1's port on the bridge saw all of it; router 2 a good part: the part after the move.
    let via_bridge = rx_bytes(&t.underlay, "u0") - before.0;
    let via_r2 = rx_bytes(&r2, "r2a") - before.1;
    assert!(
        via_r2 > 10 << 20 && via_bridge - via_r2 > 10 << 20,
        "{via_r2} of {via_bridge} bytes through router 2: the transfer did not move to the new gateway"
    );
    let routes = t.nodes[0].ns.exec("ip route show proto 199");
    assert!(
        !routes.contains("192.168."),
        "no route names a gateway: {routes}"
    );
    t.nodes[0].ns.exec("tc qdisc del dev eth0 root");
}

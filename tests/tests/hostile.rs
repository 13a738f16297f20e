//! An attacker host on the underlay sends crafted IPIP and VXLAN packets (scapy) at a pod while
//! legitimate pod traffic flows.
//!
//! ```text
//!   pod1 ── node1 192.168.1.10 ─┐                  ┌─ node2 192.168.1.11 ── pod2 10.244.1.2
//!                               u0 ── br0 ── u1 ───┘        (XDP decap)     (listens on UDP 7777)
//!                                      │
//!                               u9 ── attacker 192.168.1.66 (tests/attack.py)
//! ```
//! Each attack (unknown source, wrong VNI, spoofed inner source, wrong port, outer destination
//! not node2) must not reach pod2 (checked inside the pod) and must be counted by node2 under
//! its reason, exactly once per packet; control packets that a datapath has to admit do arrive,
//! so the listener is shown working; a 20 MiB TCP transfer pod1 -> pod2 meanwhile is intact.
use std::{thread, time::Duration};

use integration_tests::{Netns, NodeSpec, Topology, script, sh};

const COUNT: u64 = 20;

#[test]
fn crafted_tunnel_packets_never_reach_the_pod_and_are_counted() {
    let (t, _) = Topology::two_nodes_running("hostile", "vxlan", "", "");
    attack_and_check(&t);
}

/// The same with the defaults a cluster runs: pods made through the agent's CNI
/// configuration list (endpoints, BPF host routing of accepted flows), so that the delivery
/// branch (`bpf_redirect_peer` into the pod) is what the attack meets.
#[test]
fn crafted_tunnel_packets_never_reach_a_cni_pod_with_default_settings() {
    let mut t = Topology::with_cni(
        "hostcni",
        &[10, 11].map(|host| NodeSpec { subnet: 0, host }),
    );
    let cluster = t.write_cluster(&t.cluster_yaml("vxlan", ""));
    for i in 0..2 {
        t.start_agent(i, &cluster, "");
    }
    for i in 0..2 {
        t.cni_add(i);
    }
    attack_and_check(&t);
    // The legitimate traffic took the fast path: the default is in effect.
    assert!(
        t.counter(1, "host_route_in", "bpf") > 0,
        "nothing was delivered by BPF host routing: {}",
        t.stats(1)
    );
}

/// Crafted packets at node2's pod while pod1 sends it 20 MiB: none reaches the pod, each is
/// counted under its reason once, the control packets arrive.
fn attack_and_check(t: &Topology) {
    let attacker = Netns::new(&format!("{}-att", t.prefix));
    sh(&format!(
        "ip link add eth0 netns {} type veth peer name u9 netns {}",
        attacker.name, t.underlay.name
    ));
    t.underlay.exec("ip link set u9 master br0 up");
    attacker.exec("ip addr add 192.168.1.66/24 dev eth0 && ip link set eth0 up");
    let node_mac = t.nodes[1].ns.exec("cat /sys/class/net/eth0/address");

    let heard = t.workdir.join("pod2-heard.txt");
    let mut listener = t.nodes[1].pod.spawn(
        &format!(
            "/usr/bin/python3 {} listen 7777 {} 25",
            script("attack.py").display(),
            heard.display()
        ),
        &t.workdir.join("listener.log"),
    );
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        t.ping(0, 1, 2),
        2,
        "pods reach each other before the attack"
    );

    let attack_log = t.workdir.join("attack.log");
    let mut attack = attacker.spawn(
        &format!(
            "/usr/bin/python3 {} send eth0 {} 192.168.1.11 192.168.1.10 {} {} 4096 4789 {COUNT}",
            script("attack.py").display(),
            node_mac.trim(),
            t.nodes[1].pod_ip,
            t.nodes[0].pod_ip
        ),
        &attack_log,
    );
    let (sent, got) = t.tcp_transfer(0, 1, 20);
    assert_eq!(
        sent, got,
        "20 MiB pod1 -> pod2 during the attack arrived altered or short"
    );
    assert!(
        attack.wait().expect("attacker").success(),
        "attacker failed: {}",
        std::fs::read_to_string(&attack_log).unwrap_or_default()
    );
    println!(
        "{}",
        std::fs::read_to_string(&attack_log).unwrap_or_default()
    );
    assert_eq!(t.ping(0, 1, 3), 3, "pods reach each other after the attack");
    thread::sleep(Duration::from_millis(500));
    let _ = listener.kill();
    let _ = listener.wait();

    let heard = std::fs::read_to_string(&heard).unwrap_or_default();
    let lines: Vec<&str> = heard.lines().collect();
    let attacks: Vec<&&str> = lines.iter().filter(|l| !l.ends_with("CONTROL")).collect();
    assert!(
        attacks.is_empty(),
        "pod2 received crafted packets: {attacks:?}"
    );
    let controls = lines.len() as u64;
    assert_eq!(
        controls,
        2 * COUNT,
        "pod2 should hear every control packet (the listener works): {heard}"
    );

    for (reason, want) in [
        ("unknown_peer", 2 * COUNT),
        ("wrong_vni", COUNT),
        ("inner_src_spoofed", 2 * COUNT),
        ("wrong_port", COUNT),
        ("not_for_this_node", COUNT),
    ] {
        assert_eq!(t.drops(1, reason), want, "node2 drops under {reason}");
    }
    let other: u64 = t.stats(1)["drops"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| {
            ![
                "unknown_peer",
                "wrong_vni",
                "inner_src_spoofed",
                "wrong_port",
                "not_for_this_node",
            ]
            .contains(&d["reason"].as_str().unwrap_or_default())
        })
        .map(|d| d["packets"].as_u64().unwrap())
        .sum();
    assert_eq!(other, 0, "node2 dropped legitimate traffic: {}", t.stats(1));
}

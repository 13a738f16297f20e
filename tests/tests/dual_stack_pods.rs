//! Dual-stack pods made by the real CNI plugins (ptp, host-local with a range of each family,
//! the datapath plugin) on two datapath nodes with default settings: both families by BPF host
//! routing, and the nodes' IPv6 netfilter (ip6tables, nftables) judging every new IPv6 flow
//! as it judges IPv4 ones.
//!
//! ```text
//!  pod1 10.244.0.2, fd00:10:244::2 ═ veth (tc_pod_ingress) ─► node1 eth0 ─► dp-vxcsum (VXLAN/IPv6)
//!    ──► node2 eth0 TC decap (accepted flow? redirect_peer : the stack, FORWARD) ─► pod2
//!  node1 fd00:1::10 ── eth0 ── u0 ── br0 ── u1 ── eth0 ── fd00:1::11 node2
//! ```
use std::{thread, time::Duration};

use integration_tests::{
    Capture, NodeSpec, Topology,
    dual::{add_ipv6_underlay, dual_cluster_yaml, pod_cidr6, pod_ip6, vxcsum_tx},
    sh, traffic_py, tshark_fields, wait_for,
};

/// Two nodes with IPv6 underlays, agents with default settings (and metrics), a CNI pod on
/// each.
fn dual_pods(tag: &str) -> Topology {
    let nodes = [10, 11].map(|host| NodeSpec { subnet: 0, host });
    let mut t = Topology::with_cni(tag, &nodes);
    add_ipv6_underlay(&t);
    let cluster = t.write_cluster(&dual_cluster_yaml(&t));
    for i in 0..2 {
        // Each node's metrics on its own namespace's loopback.
        t.start_agent(i, &cluster, "--metrics 127.0.0.1:9464");
    }
    for i in 0..2 {
        let conf = std::fs::read_to_string(t.cni_dir(i).join("net.d/05-datapath.conflist"))
            .expect("conflist");
        let conf: serde_json::Value = serde_json::from_str(&conf).expect("conflist JSON");
        let ranges = &conf["plugins"][0]["ipam"]["ranges"];
        assert_eq!(ranges[1][0]["subnet"], pod_cidr6(i), "{conf}");
        assert_eq!(
            conf["plugins"][0]["mtu"], 1430,
            "pods get the IPv6 tunnel's MTU"
        );
        let result = t.cni_add(i);
        let ips: Vec<&str> = (result["ips"].as_array().expect("ips").iter())
            .filter_map(|ip| ip["address"].as_str())
            .collect();
        assert!(
            ips.contains(&format!("{}/64", pod_ip6(i)).as_str()),
            "{result}"
        );
    }
    let up = wait_for(Duration::from_secs(10), || t.ping6(0, 1, 1) == 1);
    assert!(up, "no IPv6 between the CNI pods");
    t
}

/// Node `i`'s BPF host routing counters: (out at its pods' veths, in straight to its pods).
fn host_routed(t: &Topology, i: usize) -> (u64, u64) {
    (
        t.counter(i, "host_route_out", "bpf"),
        t.counter(i, "host_route_in", "bpf"),
    )
}

/// An address of each family, ping and 8 MiB of TCP by hash in each, both ways; IPv6 alone
/// first, which must take BPF host routing (after its first packets) on both nodes; `datapath
/// endpoints` lists both of each pod's addresses.
#[test]
fn cni_pods_get_both_families_and_talk_in_each() {
    let t = dual_pods("v6cni");
    for (from, to) in [(0, 1), (1, 0)] {
        let (out0, in0) = (host_routed(&t, from).0, host_routed(&t, to).1);
        let device_tx = vxcsum_tx(&t, from);
        assert_eq!(t.ping6(from, to, 5), 5, "IPv6 ping {from}->{to}");
        // Pings are no GSO packets: the program writes their tunnel, the device sends none.
        assert_eq!(
            vxcsum_tx(&t, from),
            device_tx,
            "IPv6 pings took the kernel device"
        );
        let (sent, got) = t.tcp_transfer_via(from, to, &pod_ip6(to), 5001, 8);
        assert_eq!(sent, got, "TCP/IPv6 {from}->{to}");
        let (out, inn) = (host_routed(&t, from).0 - out0, host_routed(&t, to).1 - in0);
        assert!(
            out > 100 && inn > 100,
            "IPv6 {from}->{to} not by BPF host routing: out {out}, in {inn}"
        );
    }
    for (from, to) in [(0, 1), (1, 0)] {
        assert_eq!(t.ping(from, to, 5), 5, "IPv4 ping {from}->{to}");
        let (sent, got) = t.tcp_transfer(from, to, 8);
        assert_eq!(sent, got, "TCP/IPv4 {from}->{to}");
    }
    let pins = t.pin_dir(1);
    let out = t.datapath(1, &format!("endpoints --json --pin-dir {}", pins.display()));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("endpoints JSON");
    let ips: Vec<&str> = (rows.as_array().expect("rows").iter())
        .filter_map(|r| r["pod_ip"].as_str())
        .collect();
    assert_eq!(ips, [t.nodes[1].pod_ip.as_str(), &pod_ip6(1)], "{rows}");
    inspect_ipv6(&t);
}

/// What an operator reads of the IPv6 half: the metrics (peers with IPv6, the IPv6 share of
/// VXLAN) and bpftool's dump of the IPv6 endpoints, with BTF field names.
fn inspect_ipv6(t: &Topology) {
    let metrics = t.nodes[0].ns.exec("curl -s http://127.0.0.1:9464/metrics");
    assert!(metrics.contains("datapath_ipv6_nodes_known 1"), "{metrics}");
    let encap6 = metrics
        .lines()
        .find(|l| l.starts_with("datapath_packets_total{direction=\"encap_ipv6\",mode=\"vxlan\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    assert!(
        encap6.is_some_and(|n| n > 100),
        "no IPv6 encapsulation counted:\n{metrics}"
    );
    // The health probe's IPv6 half (probed every 10 s).
    let probed = wait_for(Duration::from_secs(15), || {
        let m = t.nodes[0].ns.exec("curl -s http://127.0.0.1:9464/metrics");
        m.contains("datapath_peer_underlay_up{peer=\"fd00:1::11\"} 1")
    });
    assert!(probed, "no health of node2's IPv6 half in the metrics");
    let dump = sh(&format!(
        "bpftool map dump pinned {}/maps/DP_ENDPOINTS6",
        t.pin_dir(0).display()
    ));
    for f in ["ifindex", "pod_mac", "host_mac"] {
        assert!(
            dump.contains(&format!("\"{f}\"")),
            "DP_ENDPOINTS6: no {f} in\n{dump}"
        );
    }
}

/// An IPv6 stream carried by BPF host routing meets an ip6tables-legacy rule on node2 that
/// drops its every packet (legacy tables announce nothing; the agent reads them): no echo
/// comes back later than a second after the rule.
fn established_flow_meets_legacy_rule(t: &Topology, pod1: &str, pod2: &str) {
    let log = t.workdir.join("stream6.json");
    let mut client = t.nodes[0]
        .pod
        .spawn(&format!("{} stream {pod2} 8083 5", traffic_py()), &log);
    thread::sleep(Duration::from_secs(2));
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let rule = format!("FORWARD -s {pod1} -d {pod2} -p tcp --dport 8083 -j DROP");
    let at = now();
    t.nodes[1].ns.exec(&format!("ip6tables-legacy -I {rule}"));
    let status = client.wait().unwrap();
    t.nodes[1].ns.exec(&format!("ip6tables-legacy -D {rule}"));
    assert!(status.success(), "stream client failed: {status}");
    let text = std::fs::read_to_string(&log).unwrap();
    let echoes: Vec<f64> = serde_json::from_str(text.lines().last().unwrap_or("[]")).unwrap();
    assert!(
        echoes.first().is_some_and(|e| *e < at),
        "the stream carried nothing before the rule: {echoes:?}"
    );
    let late: Vec<f64> = echoes.iter().map(|e| e - at).filter(|d| *d > 1.0).collect();
    assert!(
        late.is_empty(),
        "ip6tables-legacy drop let an established IPv6 flow through: echoes {late:?} s after"
    );
}

/// Whether a new TCP connection from pod1 to pod2's `addr`:`port` is answered.
fn connects(t: &Topology, addr: &str, port: u16) -> bool {
    t.connects(0, addr, port)
}

/// The nodes' IPv6 NetworkPolicy holds with default settings: an ip6tables FORWARD drop of new
/// connections on the destination node, the same in a native nftables table, and an egress
/// drop on the source node each stop new IPv6 connections to that port while another port (and
/// the same port over IPv4) connects, and a hashed 10 MiB over IPv6 to an allowed port takes
/// BPF host routing after its first packets; rules removed, connections pass again.
#[test]
fn ipv6_netfilter_verdicts_hold_for_bpf_host_routed_pods() {
    let t = dual_pods("v6pol");
    let (pod1, pod2, pod2v4) = (pod_ip6(0), pod_ip6(1), t.nodes[1].pod_ip.clone());
    for n in &t.nodes {
        n.ns.exec("ip6tables -A FORWARD -m conntrack --ctstate INVALID -j DROP");
    }
    let mut servers = t.echo_servers(1, &[8080, 8083], 60);
    assert!(
        connects(&t, &pod2, 8080) && connects(&t, &pod2, 8083),
        "no policy yet"
    );

    let drop_new = format!("-d {pod2} -p tcp --dport 8080 -m conntrack --ctstate NEW -j DROP");
    t.nodes[1]
        .ns
        .exec(&format!("ip6tables -I FORWARD {drop_new}"));
    assert!(
        !connects(&t, &pod2, 8080),
        "ip6tables FORWARD drop on node2 ignored"
    );
    assert!(connects(&t, &pod2, 8083), "another port stays open");
    assert!(connects(&t, &pod2v4, 8080), "an IPv6 rule keeps IPv4 open");
    let (out0, in1) = (host_routed(&t, 0).0, host_routed(&t, 1).1);
    let (sent, got) = t.tcp_transfer_via(0, 1, &pod2, 5001, 10);
    assert!(sent.ends_with(" 10485760"), "sender printed {sent:?}");
    assert_eq!(sent, got, "10 MiB to an allowed port");
    let (out, inn) = (host_routed(&t, 0).0 - out0, host_routed(&t, 1).1 - in1);
    assert!(
        out > 100 && inn > 100,
        "accepted IPv6 flow not on the fast path: out {out}, in {inn}"
    );
    t.nodes[1]
        .ns
        .exec(&format!("ip6tables -D FORWARD {drop_new}"));
    assert!(
        connects(&t, &pod2, 8080),
        "rule removed, new connections must pass"
    );

    t.nodes[1].ns.exec(&format!(
        "nft add table inet pol6 && nft add chain inet pol6 pol '{{ type filter hook forward priority 0 ; }}' && nft add rule inet pol6 pol ip6 daddr {pod2} tcp dport 8080 ct state new drop"
    ));
    assert!(
        !connects(&t, &pod2, 8080),
        "nftables forward drop on node2 ignored"
    );
    t.nodes[1].ns.exec("nft delete table inet pol6");
    assert!(
        connects(&t, &pod2, 8080),
        "table removed, new connections must pass"
    );

    let egress = format!("-s {pod1} -p tcp --dport 8083 -m conntrack --ctstate NEW -j DROP");
    t.nodes[0]
        .ns
        .exec(&format!("ip6tables -I FORWARD {egress}"));
    assert!(
        !connects(&t, &pod2, 8083),
        "ip6tables egress drop on node1 ignored"
    );
    assert!(connects(&t, &pod2, 8080), "egress rule for 8083 only");
    t.nodes[0]
        .ns
        .exec(&format!("ip6tables -D FORWARD {egress}"));
    assert!(connects(&t, &pod2, 8083), "egress rule removed");
    established_flow_meets_legacy_rule(&t, &pod1, &pod2);
    for s in &mut servers {
        let _ = s.kill();
        let _ = s.wait();
    }
}

/// Crafted IPv6 VXLAN toward a CNI pod on a node with default settings (BPF host routing
/// delivers IPv6 straight into pods): an inner source outside the sender's IPv6 pod CIDR, an
/// unknown outer source, another VNI; none reaches the pod (tcpdump in it sees only the one
/// legitimate frame sent beside them), each is counted under its reason.
#[test]
fn crafted_ipv6_tunnel_packets_never_reach_a_cni_pod() {
    let t = dual_pods("v6spoof");
    let frame = |outer_src: &str, inner_src: &str, vni: u32| {
        format!(
            "IPv6(src='{outer_src}',dst='fd00:1::11')/UDP(sport=40000,dport=4789)/VXLAN(vni={vni},flags=8)/\
             Ether(dst='0e:06:00:00:00:11',src='0e:06:00:00:00:10')/IPv6(src='{inner_src}',dst='{}')/\
             ICMPv6EchoRequest(id=0x4242)",
            pod_ip6(1)
        )
    };
    let pod1 = pod_ip6(0);
    let sends = [
        frame("fd00:1::10", "fd00:10:244:9::5", 4096),
        frame("fd00:1::99", &pod1, 4096),
        frame("fd00:1::10", &pod1, 4097),
    ];
    let mut script = "from scapy.all import *\nfrom scapy.layers.vxlan import VXLAN\n".to_string();
    for f in &sends {
        script += &format!("send({f}, count=3, verbose=0)\n");
    }
    script += &format!("send({}, verbose=0)\n", frame("fd00:1::10", &pod1, 4096));
    let path = t.workdir.join("hostile6.py");
    std::fs::write(&path, script).expect("script");
    let pcap = t.workdir.join("pod2-crafted.pcap");
    let cap = Capture::start(
        &t.nodes[1].pod,
        "eth0",
        "icmp6 and ip6[40] == 128 and ip6[44:2] == 0x4242",
        &pcap,
    );
    t.nodes[0]
        .ns
        .exec(&format!("/usr/bin/python3 {}", path.display()));
    let frames = tshark_fields(&cap.stop(), "", &["ipv6.src"]);
    assert_eq!(
        frames,
        [vec![pod1.clone()]],
        "pod2 must see the legitimate frame and nothing crafted"
    );
    for reason in ["inner_src_spoofed", "unknown_peer", "wrong_vni"] {
        assert_eq!(t.drops(1, reason), 3, "{reason}: not refused and counted");
    }
}

/// A peer this node has no IPv6 route toward (a blackhole for its IPv6 address) is unreachable
/// over IPv6 only: its IPv6 pods' packets are dropped and counted as `peer_unreachable` at the
/// pod's veth, the log names it, IPv4 keeps working; the route gone, IPv6 comes back.
#[test]
fn a_peer_without_an_ipv6_route_is_unreachable_over_ipv6_only() {
    let t = dual_pods("v6unr");
    let blackhole = "blackhole fd00:1::11/128";
    t.nodes[0].ns.exec(&format!("ip -6 route add {blackhole}"));
    let before = t.drops(0, "peer_unreachable");
    let cut = wait_for(Duration::from_secs(5), || {
        t.ping6(0, 1, 1) == 0 && t.drops(0, "peer_unreachable") > before
    });
    let pins = t.pin_dir(0);
    let status = t.datapath(0, &format!("status --pin-dir {}", pins.display()));
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    let ipv4 = t.ping(0, 1, 3);
    t.nodes[0].ns.exec(&format!("ip -6 route del {blackhole}"));
    assert!(
        cut,
        "IPv6 toward a peer without an IPv6 route was not dropped and counted"
    );
    assert_eq!(ipv4, 3, "IPv4 must not suffer from the IPv6 route");
    assert!(
        status.contains("1 peers with IPv6 (VXLAN over IPv6), 1 unreachable over IPv6"),
        "{status}"
    );
    let log = std::fs::read_to_string(&t.agents[0].log).expect("agent log");
    assert!(log.contains("peer unreachable over IPv6"), "{log}");
    let back = wait_for(Duration::from_secs(5), || t.ping6(0, 1, 1) == 1);
    assert!(back, "IPv6 did not come back once the route was gone");
}

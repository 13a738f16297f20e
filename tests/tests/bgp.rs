//! BGP native routing (issue 23) against FRR as the fabric, another implementation than the
//! agents' BIRD: two nodes in two subnets behind a router that is their route reflector (or,
//! in eBGP, a top-of-rack router of another AS), a host behind the router, and a mesh of two
//! nodes with no router.
//!
//! ```text
//!   pod1 ─ node1 192.168.1.10 ─ u0 ─ br0 192.168.1.1 ┐
//!                                                     [router: FRR, AS 64512 or 65000]── uh 192.168.3.1 ─ host 192.168.3.10
//!   pod2 ─ node2 192.168.2.10 ─ u1 ─ br1 192.168.2.1 ┘
//! ```
use std::{
    fs,
    path::PathBuf,
    thread,
    time::{Duration, SystemTime},
};

use integration_tests::{
    Capture, Topology,
    dual::{pod_cidr6, pod_ip6, two_dual_nodes},
    fabric::{Frr, frr_config, host_behind},
    ping_log_spanned, ping_log_summary, tshark_fields, wait_for,
};
use testkit::net::{Netns, NodeSpec};

const NODE1: &str = "192.168.1.10";
const NODE2: &str = "192.168.2.10";

/// Two nodes in two subnets behind the router; their pods come through CNI once the agents
/// run (`plug`), so BPF host routing has its programs on the pods' veths.
fn two_subnets(tag: &str) -> Topology {
    Topology::with_cni(
        tag,
        &[
            NodeSpec {
                subnet: 0,
                host: 10,
            },
            NodeSpec {
                subnet: 1,
                host: 10,
            },
        ],
    )
}

/// The router as each node's peer (node-specific BGPPeers), the mesh off: Calico's
/// route-reflector layout.
fn peers_block(router_as: u32) -> String {
    format!(
        "bgp:\n  asNumber: 64512\n  nodeToNodeMesh: false\n  peers:\n    - {{ address: 192.168.1.1, asNumber: {router_as}, node: node1 }}\n    - {{ address: 192.168.2.1, asNumber: {router_as}, node: node2 }}\n"
    )
}

fn bgp_dir(t: &Topology, i: usize) -> PathBuf {
    t.workdir.join(format!("bird-{}", t.nodes[i].name))
}

/// Starts node `i`'s agent on `cluster` with its BIRD files in the test's directory.
fn start(t: &mut Topology, i: usize, cluster: &std::path::Path) {
    let args = format!("--bgp-dir {}", bgp_dir(t, i).display());
    t.start_agent(i, cluster, &args);
}

/// Makes each node's pod through the CNI plugins of its agent's list.
fn plug(t: &mut Topology) {
    for i in 0..t.nodes.len() {
        t.cni_add(i);
    }
}

/// The router for these tests, advertising the host's subnet.
fn router(t: &Topology, asn: u32) -> Frr {
    let cfg = frr_config(
        asn,
        "192.168.1.1",
        &[(NODE1, 64512), (NODE2, 64512)],
        &["192.168.3.0/24"],
    );
    Frr::start(&t.underlay, &t.workdir.join("frr"), &cfg)
}

fn status_json(t: &Topology, i: usize) -> serde_json::Value {
    let out = t.datapath(
        i,
        &format!(
            "status --json --pin-dir {} --bgp-dir {}",
            t.pin_dir(i).display(),
            bgp_dir(t, i).display()
        ),
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("status: {e}: {out:?}"))
}

/// The mode `datapath routes` shows for `cidr` on node `i`.
fn route_mode(t: &Topology, i: usize, cidr: &str) -> String {
    let rows = t.routes(i);
    let row = rows.iter().find(|r| r["pod_cidr"] == cidr);
    row.and_then(|r| r["mode"].as_str())
        .unwrap_or("")
        .to_string()
}

/// Waits until both nodes reach each other's pods natively (the fabric has the routes).
fn wait_native(t: &Topology) {
    let ok = wait_for(Duration::from_secs(30), || {
        route_mode(t, 0, "10.244.1.0/24") == "native"
            && route_mode(t, 1, "10.244.0.0/24") == "native"
    });
    assert!(
        ok,
        "peers did not go native: node1 {:?}, node2 {:?}\n{}",
        route_mode(t, 0, "10.244.1.0/24"),
        route_mode(t, 1, "10.244.0.0/24"),
        fs::read_to_string(&t.agents[0].log).unwrap_or_default()
    );
}

/// Pings `pod` from the host, every 10 ms for `secs` seconds, into `log`.
fn host_ping(h: &Netns, pod: &str, secs: u32, log: &std::path::Path) -> std::process::Child {
    h.spawn(&format!("ping -D -i 0.01 -w {secs} -W 1 {pod}"), log)
}

/// (sent, received) from ping's summary in `log`, and whether replies came before `a` and after `b`.
fn ping_result(log: &std::path::Path, a: SystemTime, b: SystemTime) -> (u32, u32, bool) {
    let (sent, got) = ping_log_summary(log);
    (sent, got, ping_log_spanned(log, a, b))
}

/// Pod traffic between the nodes crosses the router's link as plain IPv4 between pod
/// addresses: no IPIP, no VXLAN.
fn assert_native_on_wire(t: &Topology) {
    let cap = Capture::start(
        &t.underlay,
        "u0",
        "icmp or ip proto 4 or udp port 4789 or tcp port 5001",
        &t.workdir.join("u0.pcap"),
    );
    assert_eq!(t.ping(0, 1, 5), 5, "pod1 -> pod2");
    assert_eq!(t.ping(1, 0, 5), 5, "pod2 -> pod1");
    let (out0, in1) = (
        direction(t, 0, "host_route_out", "bytes"),
        direction(t, 1, "host_route_in", "bytes"),
    );
    let (sent, got) = t.tcp_transfer(0, 1, 8);
    assert_eq!(sent, got, "hashed TCP transfer pod1 -> pod2");
    // BPF host routing carried the accepted flow natively both ways: pod1's veth straight to
    // the underlay, the underlay straight into pod2 (bytes: GSO packets carry up to 64 KiB).
    let carried = |i, d: &str, before| direction(t, i, d, "bytes") - before;
    assert!(
        carried(0, "host_route_out", out0) > 4 << 20,
        "node1 sent past its stack: {}",
        t.stats(0)
    );
    assert!(
        carried(1, "host_route_in", in1) > 4 << 20,
        "node2 delivered past its stack: {}",
        t.stats(1)
    );
    let pcap = cap.stop();
    let frames = tshark_fields(&pcap, "", &["ip.proto", "ip.src", "ip.dst"]);
    assert!(
        frames.len() >= 20,
        "traffic seen on the router's link: {frames:?}"
    );
    for f in &frames {
        assert!(
            !f[0].contains(',') && f[0] != "4" && f[0] != "17",
            "a tunnel header on the router's link: {f:?}"
        );
        assert!(
            f[1].starts_with("10.244.") && f[2].starts_with("10.244."),
            "pod addresses, no outer header: {f:?}"
        );
    }
}

/// Node `i`'s counter for `direction` in `unit` (packets or bytes), whatever the mode.
fn direction(t: &Topology, i: usize, direction: &str, unit: &str) -> u64 {
    t.stats(i)["counters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["direction"] == direction)
        .filter_map(|c| c[unit].as_u64())
        .sum()
}

#[test]
fn route_reflector_fabric_routes_pods_natively() {
    let mut t = two_subnets("bgprr");
    let h = host_behind(&t.underlay, &t.prefix);
    let frr = router(&t, 64512);
    let cluster = t.write_cluster(&t.cluster_yaml("none", &peers_block(64512)));
    start(&mut t, 0, &cluster);
    start(&mut t, 1, &cluster);
    plug(&mut t);

    // The router's own RIB has each pod CIDR via its node.
    for (cidr, via) in [("10.244.0.0/24", NODE1), ("10.244.1.0/24", NODE2)] {
        assert!(
            frr.wait_route(cidr, via, Duration::from_secs(30)),
            "router has no {cidr} via {via}:\n{}\n{}",
            frr.vtysh("show bgp ipv4 unicast"),
            frr.logs()
        );
    }
    // What the fabric advertises beyond the cluster reaches the node's kernel.
    let learned = wait_for(Duration::from_secs(20), || {
        t.nodes[0]
            .ns
            .exec("ip route show 192.168.3.0/24 proto bird")
            .contains("via 192.168.1.1")
    });
    assert!(learned, "node1 did not install the fabric's 192.168.3.0/24");
    wait_native(&t);
    assert_native_on_wire(&t);

    // A host outside the cluster reaches the pods directly.
    for to in [0, 1] {
        let pod = &t.nodes[to].pod_ip;
        let out = h.exec_out(&format!("ping -c 3 -i 0.2 -W 1 {pod}"));
        assert!(out.status.success(), "host -> pod{}: {out:?}", to + 1);
    }

    // status lists the session as calicoctl node status does.
    let st = status_json(&t, 0);
    let s = &st["bgp"]["sessions"][0];
    assert_eq!(s["peer"], "192.168.1.1", "{st}");
    assert_eq!(s["state"], "Established", "{st}");
    assert_eq!(s["peer_as"], 64512, "{st}");
    assert_eq!(s["advertised"], 1, "{st}");
    assert!(
        s["received"].as_u64().unwrap() >= 2,
        "the host subnet and node2's pods: {st}"
    );

    // The agent restarted under a 100 pps ping from the host: nothing lost.
    let log = t.workdir.join("host-ping-restart.log");
    let ping = host_ping(&h, &t.nodes[1].pod_ip, 8, &log);
    thread::sleep(Duration::from_secs(2));
    let stopped = SystemTime::now();
    t.stop_agents(1);
    start(&mut t, 1, &cluster);
    let restarted = SystemTime::now();
    let _ = { ping }.wait();
    let (sent, got, spanned) = ping_result(&log, stopped, restarted);
    assert!(spanned, "the ping spanned the restart");
    assert_eq!(got, sent, "packets lost across the agent's restart");

    // The speaker itself killed: the agent starts it again, graceful restart keeps the
    // router's route meanwhile.
    let log = t.workdir.join("host-ping-speaker.log");
    let ping = host_ping(&h, &t.nodes[1].pod_ip, 10, &log);
    thread::sleep(Duration::from_secs(2));
    let killed = SystemTime::now();
    let pid = fs::read_to_string(bgp_dir(&t, 1).join("bird.pid")).unwrap();
    t.nodes[1].ns.exec(&format!("kill -9 {}", pid.trim()));
    let back = wait_for(Duration::from_secs(20), || {
        status_json(&t, 1)["bgp"]["sessions"][0]["state"] == "Established"
    });
    assert!(back, "the speaker came back: {}", status_json(&t, 1));
    let _ = { ping }.wait();
    let (sent, got, spanned) = ping_result(&log, killed, killed);
    assert!(spanned, "the ping spanned the speaker's restart");
    assert_eq!(got, sent, "packets lost across the speaker's restart");

    // A node removed from the cluster state is withdrawn.
    let one = t.cluster_yaml("none", &peers_block(64512));
    let without = one.split("  - name: node2").next().unwrap().to_string();
    t.write_cluster(&without);
    assert!(
        frr.wait_route("10.244.1.0/24", "", Duration::from_secs(30)),
        "node2's pod CIDR still routed: {}",
        frr.kernel_routes()
    );
    assert!(frr.kernel_routes().contains("10.244.0.0/24"), "node1 stays");
}

#[test]
fn ebgp_to_top_of_rack_router() {
    let mut t = two_subnets("bgptor");
    let h = host_behind(&t.underlay, &t.prefix);
    let frr = router(&t, 65000);
    // Besides the ToR, a peer every node has that refuses the session (nothing listens on the
    // host's port 179): its problem alone.
    let block = peers_block(65000) + "    - { address: 192.168.3.10, asNumber: 65099 }\n";
    let cluster = t.write_cluster(&t.cluster_yaml("none", &block));
    for i in 0..2 {
        let args = format!(
            "--bgp-dir {} --metrics 127.0.0.1:9464",
            bgp_dir(&t, i).display()
        );
        t.start_agent(i, &cluster, &args);
    }
    plug(&mut t);
    for (cidr, via) in [("10.244.0.0/24", NODE1), ("10.244.1.0/24", NODE2)] {
        assert!(
            frr.wait_route(cidr, via, Duration::from_secs(30)),
            "ToR has no {cidr} via {via}:\n{}",
            frr.vtysh("show bgp ipv4 unicast")
        );
    }
    let st = status_json(&t, 1);
    let sessions = st["bgp"]["sessions"].as_array().expect("sessions").clone();
    let by_peer = |p: &str| sessions.iter().find(|s| s["peer"] == p).cloned().unwrap();
    assert_eq!(sessions.len(), 2, "{st}");
    assert_eq!(by_peer("192.168.2.1")["peer_as"], 65000, "{st}");
    assert_eq!(by_peer("192.168.2.1")["state"], "Established", "{st}");
    assert_ne!(by_peer("192.168.3.10")["state"], "Established", "{st}");
    let logged = wait_for(Duration::from_secs(10), || {
        fs::read_to_string(&t.agents[1].log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("BGP session not established") && l.contains("192.168.3.10"))
    });
    assert!(
        logged,
        "the refusing peer was not logged with BIRD's reason: {}",
        status_json(&t, 1)
    );
    wait_native(&t);
    assert_native_on_wire(&t);
    let out = h.exec_out(&format!("ping -c 3 -i 0.2 -W 1 {}", t.nodes[1].pod_ip));
    assert!(
        out.status.success(),
        "host -> pod2 through the ToR: {out:?}"
    );
    // A pod reaches what the ToR advertised.
    let out = t.nodes[0]
        .pod
        .exec_out("ping -c 2 -i 0.2 -W 1 192.168.3.10");
    assert!(out.status.success(), "pod1 -> host: {out:?}");
    // Per-peer metrics: the ToR's session up, the refusing peer's down.
    let metrics = t.nodes[0].ns.exec("curl -s http://127.0.0.1:9464/metrics");
    for line in [
        "datapath_bgp_session_established{peer=\"192.168.1.1\"} 1",
        "datapath_bgp_session_established{peer=\"192.168.3.10\"} 0",
        "datapath_bgp_prefixes_advertised{peer=\"192.168.1.1\"} 1",
        "datapath_bgp_speaker_running 1",
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }
}

/// A mesh of two dual-stack nodes in one subnet, no router: a session between their IPv4
/// addresses and one between their IPv6 addresses, each with one prefix each way; pods reached
/// natively in both families.
#[test]
fn node_to_node_mesh_without_router() {
    let head = "encapsulation: none\nbgp:\n  asNumber: 64512\n";
    let t = two_dual_nodes("bgpmesh", head, "");
    // The default --bgp-dir: derived from the pin directory, one per node.
    let session = |i: usize, peer: &str| {
        let st = status_json_default(&t, i);
        let all = st["bgp"]["sessions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        all.into_iter()
            .find(|s| s["peer"] == peer)
            .unwrap_or_default()
    };
    let ok = wait_for(Duration::from_secs(30), || {
        ["192.168.1.11", "fd00:1::11"].iter().all(|p| {
            let s = session(0, p);
            s["state"] == "Established" && s["received"] == 1
        })
    });
    assert!(ok, "mesh sessions: {}", status_json_default(&t, 0));
    let s = session(1, "192.168.1.10");
    assert_eq!(s["kind"], "node-to-node mesh", "{s}");
    assert_eq!(session(1, "fd00:1::10")["kind"], "node-to-node mesh");
    let text = String::from_utf8_lossy(
        &t.datapath(0, &format!("status --pin-dir {}", t.pin_dir(0).display()))
            .stdout,
    )
    .into_owned();
    assert!(
        text.contains("node-to-node mesh") && text.contains("Established"),
        "{text}"
    );
    assert_eq!(route_mode(&t, 0, "10.244.1.0/24"), "native");
    assert_eq!(route_mode(&t, 0, &pod_cidr6(1)), "native");
    let cap = Capture::start(
        &t.underlay,
        "u0",
        "icmp or ip proto 4 or udp or icmp6[0] == 128 or icmp6[0] == 129",
        &t.workdir.join("m.pcap"),
    );
    assert_eq!(t.ping(0, 1, 5), 5);
    assert_eq!(t.ping6(0, 1, 5), 5);
    let frames = tshark_fields(&cap.stop(), "", &["ip.proto", "ipv6.nxt"]);
    let plain = |f: &Vec<String>| f[0] == "1" || (f[0].is_empty() && f[1] == "58");
    assert!(frames.len() >= 20, "pings on the wire: {frames:?}");
    assert!(
        frames.iter().all(plain),
        "plain ICMP and ICMPv6: {frames:?}"
    );
}

fn status_json_default(t: &Topology, i: usize) -> serde_json::Value {
    let out = t.datapath(
        i,
        &format!("status --json --pin-dir {}", t.pin_dir(i).display()),
    );
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// Writes node `i`'s own copy of the cluster file (each node sees a change when its copy
/// changes: the nodes a second apart).
fn write_node_cluster(t: &Topology, i: usize, text: &str) -> PathBuf {
    let p = t.workdir.join(format!("cluster-{i}.yaml"));
    let tmp = t.workdir.join(format!("cluster-{i}.yaml.tmp"));
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, &p).unwrap();
    p
}

#[test]
fn vxlan_to_none_to_ipip_live_loses_nothing() {
    let mut t = two_subnets("bgpswitch");
    let frr = router(&t, 64512);
    let vxlan = t.cluster_yaml("vxlan", &peers_block(64512));
    let state =
        |encap: &str| vxlan.replace("encapsulation: vxlan", &format!("encapsulation: {encap}"));
    let files: Vec<PathBuf> = (0..2)
        .map(|i| write_node_cluster(&t, i, &state("vxlan")))
        .collect();
    start(&mut t, 0, &files[0]);
    start(&mut t, 1, &files[1]);
    plug(&mut t);
    // In overlay mode the pod CIDRs are advertised too: the fabric has them before the switch.
    for (cidr, via) in [("10.244.0.0/24", NODE1), ("10.244.1.0/24", NODE2)] {
        assert!(
            frr.wait_route(cidr, via, Duration::from_secs(30)),
            "{cidr} via {via}"
        );
    }
    assert_eq!(t.ping(0, 1, 3), 3, "vxlan before the switch");
    let secs = 16;
    let ping = t.flood_ping(0, 1, secs);
    let iperf_log = t.workdir.join("iperf.json");
    let mut server = t.nodes[1]
        .pod
        .spawn("iperf3 -s -1 -p 5201", &t.workdir.join("iperf-s.log"));
    thread::sleep(Duration::from_millis(300));
    let mut client = t.nodes[0].pod.spawn(
        &format!(
            "iperf3 -c {} -p 5201 -t {} -i 1 -J",
            t.nodes[1].pod_ip,
            secs - 2
        ),
        &iperf_log,
    );
    thread::sleep(Duration::from_secs(2));
    let first = SystemTime::now();
    for encap in ["none", "ipip"] {
        write_node_cluster(&t, 0, &state(encap));
        thread::sleep(Duration::from_secs(1));
        write_node_cluster(&t, 1, &state(encap));
        if encap == "none" {
            wait_native(&t);
            thread::sleep(Duration::from_secs(2));
            assert!(
                t.counter(0, "native", "none") > 0,
                "pod1's packets went natively"
            );
        }
        thread::sleep(Duration::from_secs(3));
    }
    let last = SystemTime::now();
    assert_eq!(route_mode(&t, 0, "10.244.1.0/24"), "ipip");
    let _ = client.wait();
    let _ = server.wait();
    let (sent, got) = t.flood_ping_result(0, 1, ping);
    assert!(
        t.ping_spanned(0, 1, first, last),
        "the ping spanned both switches"
    );
    assert_eq!(got, sent, "ping lost packets across vxlan -> none -> ipip");
    let report: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&iperf_log).unwrap_or_default())
            .unwrap_or_else(|e| panic!("iperf3's report: {e}"));
    let seconds: Vec<f64> = report["intervals"]
        .as_array()
        .expect("intervals")
        .iter()
        .map(|i| i["sum"]["bytes"].as_f64().unwrap_or(0.0))
        .collect();
    assert!(seconds.len() >= (secs - 3) as usize, "{report}");
    assert!(
        seconds.iter().all(|b| *b > 0.0),
        "a second without TCP progress: {seconds:?}"
    );
}

/// The nodes' IPv6 underlay addresses in `two_subnets`.
const NODES6: [&str; 2] = ["fd00:1::10", "fd00:2::10"];

/// Dual-stack BGP native routing, as Calico peers each family: the router is each node's
/// route reflector over IPv4 and over IPv6 (a BGPPeer of each family). Before the router runs,
/// the IPv6 halves (in another IPv6 subnet, so not native at once) go in VXLAN over IPv6. Once
/// it runs, the router learns each node's IPv6 pod CIDR over the IPv6 session, the nodes take
/// each other's IPv6 halves native, and the pods' IPv6 packets cross the router's link as they
/// are (no VXLAN), both ways, with IPv4 native beside them.
#[test]
fn ipv6_pod_cidrs_are_advertised_over_ipv6_sessions_and_routed_natively() {
    let mut t = two_subnets("bgp6");
    t.underlay.exec(
        "sysctl -qw net.ipv6.conf.all.forwarding=1 && ip -6 addr add fd00:1::1/64 dev br0 nodad && ip -6 addr add fd00:2::1/64 dev br1 nodad",
    );
    for (n, addr) in t.nodes.iter().zip(NODES6) {
        let gw = addr.replace("::10", "::1");
        n.ns.exec(&format!(
            "sysctl -qw net.ipv6.conf.all.forwarding=1 && ip -6 addr add {addr}/64 dev eth0 nodad && ip -6 route add default via {gw}"
        ));
    }
    let neighbours = [
        (NODE1, 64512),
        (NODE2, 64512),
        (NODES6[0], 64512),
        (NODES6[1], 64512),
    ];
    let mut yaml = t.cluster_yaml(
        "none",
        &(peers_block(64512)
            + "    - { address: \"fd00:1::1\", asNumber: 64512, node: node1 }\n    - { address: \"fd00:2::1\", asNumber: 64512, node: node2 }\n"),
    );
    for (i, addr) in NODES6.iter().enumerate() {
        let line = format!("    podCIDR: 10.244.{i}.0/24\n");
        let half = format!(
            "{line}    addressV6: \"{addr}\"\n    podCIDRv6: \"{}\"\n",
            pod_cidr6(i)
        );
        yaml = yaml.replace(&line, &half);
    }
    let cluster = t.write_cluster(&yaml);
    start(&mut t, 0, &cluster);
    start(&mut t, 1, &cluster);
    plug(&mut t);
    ipv6_goes_in_vxlan_until_the_fabric_routes_it(&t);

    let cfg = frr_config(64512, "192.168.1.1", &neighbours, &["192.168.3.0/24"]);
    let frr = Frr::start(&t.underlay, &t.workdir.join("frr"), &cfg);
    for (i, via) in NODES6.iter().enumerate() {
        assert!(
            frr.wait_route(&pod_cidr6(i), via, Duration::from_secs(30)),
            "router has no {} via {via}:\n{}\n{}",
            pod_cidr6(i),
            frr.vtysh("show bgp ipv6 unicast"),
            frr.logs()
        );
    }
    let native = wait_for(Duration::from_secs(30), || {
        route_mode(&t, 0, &pod_cidr6(1)) == "native" && route_mode(&t, 1, &pod_cidr6(0)) == "native"
    });
    assert!(
        native,
        "IPv6 halves did not go native: {:?} {:?}",
        route_mode(&t, 0, &pod_cidr6(1)),
        route_mode(&t, 1, &pod_cidr6(0))
    );
    let st = status_json(&t, 0);
    let sessions = st["bgp"]["sessions"].as_array().unwrap();
    let v6 = sessions
        .iter()
        .find(|s| s["peer"] == "fd00:1::1")
        .expect("IPv6 session");
    assert_eq!(v6["state"], "Established", "{st}");
    assert_eq!(v6["advertised"], 1, "this node's IPv6 pod CIDR: {st}");

    let cap = Capture::start(
        &t.underlay,
        "u0",
        "(ip6 and not icmp6 and not tcp port 179) or udp",
        &t.workdir.join("v6.pcap"),
    );
    ping6_both_ways(&t, 5, "natively");
    let (sent, got) = t.tcp_transfer_via(0, 1, &pod_ip6(1), 5001, 8);
    assert_eq!(sent, got, "hashed TCP/IPv6 transfer pod1 -> pod2");
    let frames = tshark_fields(&cap.stop(), "", &["ipv6.src", "ipv6.dst", "udp.dstport"]);
    assert!(
        frames.len() >= 20,
        "IPv6 traffic on the router's link: {frames:?}"
    );
    for f in &frames {
        assert!(f[2].is_empty(), "UDP (VXLAN) on the router's link: {f:?}");
        assert!(
            f[0].starts_with("fd00:10:244:") && f[1].starts_with("fd00:10:244:"),
            "pod addresses, no outer header: {f:?}"
        );
    }
    assert_eq!(t.ping(0, 1, 3), 3, "IPv4 beside it");
}

/// Under `encapsulation: none`, before any BGP peer has advertised them: the peer's IPv6 half,
/// in another IPv6 subnet, is `vxlan`, and the pods' IPv6 ping crosses the router's link in
/// VXLAN over IPv6 (outer node addresses, port 4789, the pods' addresses inside).
fn ipv6_goes_in_vxlan_until_the_fabric_routes_it(t: &Topology) {
    assert_eq!(
        route_mode(t, 0, &pod_cidr6(1)),
        "vxlan",
        "before the fabric"
    );
    assert_eq!(
        route_mode(t, 1, &pod_cidr6(0)),
        "vxlan",
        "before the fabric"
    );
    let cap = Capture::start(
        &t.underlay,
        "u0",
        "ip6 and udp",
        &t.workdir.join("vx6.pcap"),
    );
    ping6_both_ways(t, 3, "in VXLAN over IPv6");
    let fields = ["ipv6.src", "udp.dstport", "vxlan.vni", "ipv6.dst"];
    let frames = tshark_fields(&cap.stop(), "", &fields);
    assert!(frames.len() >= 6, "VXLAN over IPv6 on the link: {frames:?}");
    for f in &frames {
        let outer = f[0].split(',').next().unwrap_or("");
        assert!(NODES6.contains(&outer), "outer source a node: {f:?}");
        assert_eq!(f[1], "4789", "{f:?}");
        assert!(f[3].contains("fd00:10:244:"), "inner pod address: {f:?}");
    }
}

/// Once IPv6 is up between the pods, `n` pings each way all answered.
fn ping6_both_ways(t: &Topology, n: u32, how: &str) {
    let up = wait_for(Duration::from_secs(10), || t.ping6(0, 1, 1) == 1);
    assert!(up, "no IPv6 between the pods {how}");
    assert_eq!(t.ping6(0, 1, n), n, "pod1 -> pod2 {how}");
    assert_eq!(t.ping6(1, 0, n), n, "pod2 -> pod1 {how}");
}

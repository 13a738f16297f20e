//! Dual-stack pods: IPv6 in VXLAN over the IPv6 underlay beside IPv4, interoperating with the
//! Linux VXLAN device set up on node2 as flanneld sets up `flannel-v6.1` (VNI 1, port 8472) and
//! as Calico sets up `vxlan-v6.calico` (VNI 4096, port 4789), while node1 runs this datapath.
//!
//! ```text
//!   pod1 10.244.0.2, fd00:10:244::2                 pod2 10.244.1.2, fd00:10:244:1::2
//!     |                                               |
//!   node1: datapath                                 node2: flannel.1 (IPv4) and
//!     eth0 192.168.1.10 ─── u0 ─ br0 ─ u1 ─── eth0    flannel-v6.1 / vxlan-v6.calico over
//!          fd00:1::10                   fd00:1::11    fd00:1::11, fdb/neigh/route for node1
//! ```
//! The wire is read by tshark: outer IPv6, a valid UDP checksum on every frame (GSO segments
//! included: node1's transmit offloads are off so the segments are made and summed in
//! software), 70 bytes of overhead, the VNI, the VTEP MACs.
use std::{thread, time::Duration};

use integration_tests::{
    Capture, Etcd, NodeSpec, Topology, datapath_bin,
    dual::{
        add_ipv6, add_ipv6_underlay, dual_cluster_yaml, node_addr6, node_yaml6, pod_ip6,
        two_dual_nodes, vxcsum_tx,
    },
    ping_log_summary, release_bin, sh, wait_for,
};

/// Flannel's network configuration of a dual-stack cluster.
const DUAL_CONFIG: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;
const PREFIX: &str = "/coreos.com/network";

/// The last release of map ABI 6 (BPF host routing for IPv6 pods, no IPv6 health maps).
const ABI6: &str = "87da242";

const NODE1_VTEP: &str = "0e:00:c0:a8:01:0a";
const NODE2_VTEP: &str = "66:00:00:00:00:02";
/// Node1's IPv6 VTEP MAC, derived from fd00:1::10 (the file names none).
const NODE1_VTEP6: &str = "0e:06:00:00:00:10";
const NODE2_VTEP6: &str = "66:00:00:00:00:06";

fn cluster_yaml(vni: u32, port: u16) -> String {
    format!(
        "encapsulation: vxlan\nvxlan: {{ vni: {vni}, port: {port} }}\nnodes:\n  - name: node1\n    address: 192.168.1.10\n    podCIDR: 10.244.0.0/24\n{}  - name: node2\n    address: 192.168.1.11\n    podCIDR: 10.244.1.0/24\n    vtepMAC: \"{NODE2_VTEP}\"\n{}",
        node_yaml6(0, None),
        node_yaml6(1, Some(NODE2_VTEP6)),
    )
}

fn interop6(dev: &str, vni: u32, port: u16) {
    let mut t = Topology::two_nodes(&format!("v6{vni}"));
    add_ipv6(&t);
    let cluster = t.write_cluster(&cluster_yaml(vni, port));
    t.start_agent(0, &cluster, "");
    t.flannel_device(1, vni, port, NODE2_VTEP);
    t.flannel_peer(1, "192.168.1.10", "10.244.0.0/24", NODE1_VTEP);
    t.linux_vxlan6(1, dev, (vni, port), NODE2_VTEP6, (0, NODE1_VTEP6));
    t.nodes[0].ns.exec("ethtool -K eth0 tso off gso off tx off");
    let cap = Capture::start(
        &t.underlay,
        "u0",
        &format!("ip6 and udp port {port} and src host fd00:1::10"),
        &t.workdir.join("v6.pcap"),
    );

    // The first packets may wait for neighbour discovery on both sides.
    let warm = (0..10).any(|_| t.ping6(0, 1, 1) == 1);
    if !warm && std::env::var_os("DP_PAUSE").is_some() {
        std::thread::sleep(std::time::Duration::from_secs(300));
    }
    assert!(
        warm,
        "no IPv6 ping came back from the Linux VXLAN pod ({dev})"
    );
    // Packets other than GSO are the program's own work, never the kernel device's: five
    // pings and their replies leave node1 through the BPF path (fib lookup, neighbour).
    let (device_tx, encap6) = (vxcsum_tx(&t, 0), t.counter(0, "encap_ipv6", "vxlan"));
    assert_eq!(t.ping6(0, 1, 5), 5, "datapath pod -> {dev} pod over IPv6");
    assert_eq!(
        vxcsum_tx(&t, 0),
        device_tx,
        "pings went through the kernel VXLAN device"
    );
    assert!(
        t.counter(0, "encap_ipv6", "vxlan") >= encap6 + 5,
        "the pings were not counted as IPv6 encapsulation"
    );
    assert_eq!(t.ping6(1, 0, 5), 5, "{dev} pod -> datapath pod over IPv6");
    for (from, to) in [(0, 1), (1, 0)] {
        let (sent, got) = t.tcp_transfer_via(from, to, &pod_ip6(to), 5001, 20);
        assert_eq!(sent, got, "20 MiB over TCP/IPv6 {from}->{to} with {dev}");
    }
    assert_eq!(t.ping(0, 1, 3), 3, "IPv4 beside IPv6: node1 -> node2");
    assert_eq!(t.ping(1, 0, 3), 3, "IPv4 beside IPv6: node2 -> node1");
    check_wire(&cap.stop(), vni, port);

    let check = t.datapath(
        0,
        &format!("check --cluster {} --node node1", cluster.display()),
    );
    let check = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.starts_with("ok: 2 nodes, dual-stack (2 with IPv6)"),
        "{check}"
    );
    let routes = t.datapath(0, &format!("routes --pin-dir {}", t.pin_dir(0).display()));
    let routes = String::from_utf8_lossy(&routes.stdout);
    for want in [
        "fd00:10:244:1::/64",
        "fd00:1::11",
        NODE2_VTEP6,
        "10.244.1.0/24",
    ] {
        assert!(routes.contains(want), "routes lacks {want}:\n{routes}");
    }
    let status = t.datapath(0, &format!("status --pin-dir {}", t.pin_dir(0).display()));
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("ipv6      node fd00:1::10  pod CIDR fd00:10:244::/64  1 peers with IPv6"),
        "{status}"
    );
    assert!(
        t.counter(0, "decap_ipv6", "vxlan") > 0,
        "node1 decapsulated no IPv6"
    );
    assert!(
        t.counter(0, "encap_ipv6", "vxlan") > 0,
        "node1 encapsulated no IPv6"
    );
    for reason in [
        "wrong_vni",
        "unknown_peer",
        "bad_inner_header",
        "inner_src_spoofed",
    ] {
        assert_eq!(t.drops(0, reason), 0, "{reason} drops");
    }
    hostile6(&t, vni, port);
}

/// IPv6 VXLAN from node2 that node1 must refuse, each counted under its reason: an inner
/// source outside node2's IPv6 pod CIDR (the spoof probe), an outer source that is no node,
/// another VNI. Sent with scapy from node2's namespace.
fn hostile6(t: &Topology, vni: u32, port: u16) {
    let reasons = ["inner_src_spoofed", "unknown_peer", "wrong_vni"];
    let frame = |outer_src: &str, inner_src: &str, vni: u32| {
        format!(
            "IPv6(src='{outer_src}',dst='fd00:1::10')/UDP(sport=40000,dport={port})/VXLAN(vni={vni},flags=8)/\
             Ether(dst='{NODE1_VTEP6}',src='{NODE2_VTEP6}')/IPv6(src='{inner_src}',dst='{}')/ICMPv6EchoRequest()",
            pod_ip6(0)
        )
    };
    let sends = [
        frame("fd00:1::11", "fd00:10:244:9::5", vni),
        frame("fd00:1::99", "fd00:10:244:1::2", vni),
        frame("fd00:1::11", "fd00:10:244:1::2", vni + 1),
    ];
    let script = format!(
        "from scapy.all import *\nfrom scapy.layers.vxlan import VXLAN\n{}",
        sends
            .iter()
            .map(|f| format!("send({f}, count=3, verbose=0)\n"))
            .collect::<String>()
    );
    let path = t.workdir.join("hostile6.py");
    std::fs::write(&path, script).expect("script");
    let out = t.workdir.join("monitor6.jsonl");
    let monitor = t.nodes[0].ns.spawn(
        &format!(
            "{} monitor --json --count 9 --duration 10 --pin-dir {}",
            datapath_bin().display(),
            t.pin_dir(0).display()
        ),
        &out,
    );
    thread::sleep(Duration::from_millis(500));
    t.nodes[1]
        .ns
        .exec(&format!("/usr/bin/python3 {}", path.display()));
    for reason in reasons {
        assert_eq!(
            t.drops(0, reason),
            3,
            "{reason}: IPv6 VXLAN not refused and counted"
        );
    }
    let _ = { monitor }.wait();
    monitor6(&out, vni);
}

/// `datapath monitor --json` showed `hostile6`'s drops with their IPv6 headers: outer
/// addresses, VNI, the inner (spoofed) source, the sender's name.
fn monitor6(out: &std::path::Path, vni: u32) {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let evs: Vec<serde_json::Value> = (text.lines())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let spoofed = evs
        .iter()
        .find(|e| e["reason"] == "inner_src_spoofed")
        .unwrap_or_else(|| panic!("no spoof event:\n{text}"));
    assert_eq!(spoofed["outer"]["src"], "fd00:1::11", "{spoofed}");
    assert_eq!(spoofed["outer"]["dst"], "fd00:1::10", "{spoofed}");
    assert_eq!(spoofed["outer"]["proto"], "udp", "{spoofed}");
    assert_eq!(spoofed["vni"], vni, "{spoofed}");
    assert_eq!(spoofed["inner"]["src"], "fd00:10:244:9::5", "{spoofed}");
    assert_eq!(spoofed["inner"]["proto"], "icmpv6", "{spoofed}");
    assert_eq!(spoofed["peer"], "fd00:1::11", "{spoofed}");
    assert!(
        evs.iter()
            .any(|e| e["reason"] == "unknown_peer" && e["outer"]["src"] == "fd00:1::99"),
        "{text}"
    );
}

/// Every captured frame node1 sent: outer IPv6 to node2, UDP to `port` with a checksum tshark
/// finds good, VNI `vni`, 70 bytes between the outer and inner IPv6 payloads, the VTEP MACs.
fn check_wire(pcap: &std::path::Path, vni: u32, port: u16) {
    let out = sh(&format!(
        "tshark -r {} -o udp.check_checksum:TRUE -d udp.port=={port},vxlan -T fields -E separator=/t \
         -e ipv6.dst -e udp.checksum.status -e vxlan.vni -e ipv6.plen -e eth.src -e eth.dst -e frame.len 2>/dev/null",
        pcap.display()
    ));
    let frames: Vec<Vec<&str>> = out.lines().map(|l| l.split('\t').collect()).collect();
    assert!(
        frames.len() > 1000,
        "only {} IPv6 VXLAN frames captured",
        frames.len()
    );
    let mut full = 0;
    for (n, f) in frames.iter().enumerate() {
        let what = format!("frame {} {f:?}", n + 1);
        assert_eq!(
            f[0].split(',').next(),
            Some("fd00:1::11"),
            "{what}: outer destination"
        );
        assert_eq!(
            f[1], "1",
            "{what}: UDP checksum not good (tshark: 1 = good, 0 bad, 2 unverified)"
        );
        assert_eq!(f[2], vni.to_string(), "{what}: VNI");
        let plen: Vec<u32> = f[3].split(',').filter_map(|p| p.parse().ok()).collect();
        assert_eq!(plen.len(), 2, "{what}: not IPv6 in IPv6");
        assert_eq!(plen[0] - plen[1], 70, "{what}: overhead is not 70 bytes");
        let macs: Vec<&str> = f[4].split(',').chain(f[5].split(',')).collect();
        assert_eq!(
            (macs[1], macs[3]),
            ("0e:06:00:00:00:10", NODE2_VTEP6),
            "{what}: inner MACs"
        );
        assert!(
            f[6].parse::<u32>().unwrap() <= 1514,
            "{what}: larger than the underlay MTU"
        );
        full += usize::from(f[6] == "1514");
    }
    assert!(
        full > 500,
        "only {full} full-size segments: the GSO path was not exercised"
    );
}

#[test]
fn flannel_v6_vni_1_port_8472() {
    interop6("flannel-v6.1", 1, 8472);
}

#[test]
fn calico_v6_vni_4096_port_4789() {
    interop6("vxlan-v6.calico", 4096, 4789);
}

/// Two dual-stack nodes on the last release of map ABI 6 (IPv6 pods with BPF host routing, no
/// IPv6 health map) upgraded one after the other to this build under a 5 ms ping of each
/// family: the pins migrate to ABI 7 with nothing lost in either; then 8 MiB over TCP/IPv6 by
/// hash. (Pins of ABI 5 and before are upgraded in `upgrade.rs` from earlier releases.)
#[test]
fn pins_of_map_abi_6_migrate_under_ping_of_both_families() {
    let old = release_bin(ABI6);
    let mut t = Topology::two_nodes("v6up");
    add_ipv6(&t);
    let cluster = t.write_cluster(&dual_cluster_yaml(&t));
    let source = format!("--cluster {} --watch-ms 100", cluster.display());
    for i in 0..2 {
        let log = t.spawn_agent_bin(i, &old, "", &source);
        t.wait_agent(i, &log);
    }
    let up = wait_for(Duration::from_secs(10), || t.ping6(0, 1, 1) == 1);
    assert!(up && t.ping(0, 1, 2) == 2, "{ABI6} carries both families");
    let ping = t.flood_ping(0, 1, 12);
    let log6 = t.workdir.join("ping6-1-0.log");
    let ping6 = t.nodes[1].pod.spawn(
        &format!("ping -6 -D -i 0.005 -w 12 -W 1 {}", pod_ip6(0)),
        &log6,
    );
    thread::sleep(Duration::from_millis(800));
    for i in 0..2 {
        t.stop_agents(i);
        t.start_agent(i, &cluster, "");
    }
    let mut pings = [ping, ping6];
    assert!(
        pings.iter_mut().all(|p| p.try_wait().unwrap().is_none()),
        "a ping ended before both agents were upgraded"
    );
    let [ping, mut ping6] = pings;
    let (sent, received) = t.flood_ping_result(0, 1, ping);
    assert!(sent >= 1000, "ping sent only {sent}");
    assert_eq!(
        sent, received,
        "IPv4 packets lost in the upgrade to map ABI 7"
    );
    let _ = ping6.wait();
    let (sent, received) = ping_log_summary(&log6);
    assert!(sent >= 1000, "ping -6 sent only {sent}");
    assert_eq!(
        sent, received,
        "IPv6 packets lost in the upgrade to map ABI 7"
    );
    let (sent, got) = t.tcp_transfer_via(1, 0, &pod_ip6(0), 5001, 8);
    assert_eq!(sent, got, "8 MiB over TCP/IPv6 between datapath nodes");
}

/// Flannel's dual-stack layout in a real etcd: a config with `EnableIPv6` and `IPv6Network`,
/// `&`-keyed leases with `PublicIPv6` and `BackendV6Data`; two agents read it, route the IPv6
/// network toward the datapath and carry IPv6 pods; a lease's new IPv6 VTEP MAC is applied.
#[test]
fn flannels_dual_stack_leases_in_etcd_carry_ipv6_pods() {
    let mut t = Topology::two_nodes("v6etcd");
    add_ipv6(&t);
    let etcd = Etcd::start(&t);
    let prefix = PREFIX;
    etcd.put(&format!("{prefix}/config"), DUAL_CONFIG);
    let lease = |i: usize, mac6: &str| {
        format!(
            r#"{{"PublicIP":"192.168.1.{}","PublicIPv6":"fd00:1::{}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"0e:00:c0:a8:01:{:02x}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6}"}},"NodeName":"node{}"}}"#,
            10 + i,
            10 + i,
            10 + i,
            i + 1
        )
    };
    let key = |i: usize| format!("{prefix}/subnets/10.244.{i}.0-24&fd00:10:244:{i}::-64");
    etcd.put(&key(0), &lease(0, "66:00:00:00:06:00"));
    etcd.put(&key(1), &lease(1, "66:00:00:00:06:01"));
    for i in 0..2 {
        t.start_agent_with(i, &format!("--etcd-endpoints {}", Etcd::URL));
    }
    let up = wait_for(Duration::from_secs(10), || t.ping6(0, 1, 1) == 1);
    assert!(
        up,
        "no IPv6 between the nodes of Flannel's dual-stack leases"
    );
    assert_eq!(t.ping6(1, 0, 5), 5);
    let routes = t.nodes[0].ns.exec("ip -6 route show proto 199");
    assert!(
        routes.starts_with("fd00:10:244::/56 via fe80::d9:1 dev eth0"),
        "the IPv6Network is the aggregate route: {routes}"
    );
    // A lease event is applied as a change of that node: node2's new IPv6 VTEP MAC.
    etcd.put(&key(1), &lease(1, "66:00:00:00:06:11"));
    let applied = wait_for(Duration::from_secs(10), || {
        let r = t.datapath(0, &format!("routes --pin-dir {}", t.pin_dir(0).display()));
        String::from_utf8_lossy(&r.stdout).contains("66:00:00:00:06:11")
    });
    assert!(applied, "node2's new IPv6 VTEP MAC not in node1's maps");
    let up = wait_for(Duration::from_secs(10), || t.ping6(0, 1, 1) == 1);
    assert!(up, "IPv6 after the lease change");
}

/// `--register --public-ipv6` on a config with `EnableIPv6`, as flanneld registers a dual-stack
/// node: each agent claims a free subnet of each family in one `&`-keyed lease (one etcd
/// transaction), the CNI list gets both, and pods made from it talk over both families.
#[test]
fn register_claims_a_subnet_of_each_family_in_one_lease() {
    let nodes = [10, 11].map(|host| NodeSpec { subnet: 0, host });
    let mut t = Topology::with_cni("v6reg", &nodes);
    add_ipv6_underlay(&t);
    let etcd = Etcd::start(&t);
    let prefix = PREFIX;
    etcd.put(&format!("{prefix}/config"), DUAL_CONFIG);
    for i in 0..2 {
        t.start_agent_with(
            i,
            &format!(
                "--etcd-endpoints {} --register --iface eth0 --public-ipv6 fd00:1::{}",
                Etcd::URL,
                10 + i
            ),
        );
    }
    let keys = etcd.ctl(&format!("get --prefix --keys-only {prefix}/subnets/"));
    let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(
        keys.iter().all(|k| k.contains('&')),
        "one key of both halves each: {keys:?}"
    );
    let mut addrs6 = Vec::new();
    for i in 0..2 {
        let result = t.cni_add(i);
        let v6 = (result["ips"].as_array().expect("ips").iter())
            .filter_map(|ip| ip["address"].as_str()?.split('/').next())
            .find(|a| a.contains(':'))
            .map(String::from);
        addrs6.push(v6.unwrap_or_else(|| panic!("no IPv6 address for pod{}: {result}", i + 1)));
    }
    let ping6 = |from: usize, to: usize| {
        let out = t.nodes[from]
            .pod
            .exec_out(&format!("ping -6 -c 1 -W 1 {}", addrs6[to]));
        out.status.success()
    };
    let up = wait_for(Duration::from_secs(15), || ping6(0, 1) && ping6(1, 0));
    assert!(
        up,
        "no IPv6 between pods of the registered subnets {addrs6:?}"
    );
    assert_eq!(
        t.ping(0, 1, 3),
        3,
        "IPv4 between pods of the registered subnets"
    );
}

/// crossSubnet with IPv6: two datapath nodes on one IPv6 subnet reach each other's IPv6 pods
/// natively, by a route via the peer: the underlay carries the pods' own packets, no VXLAN.
#[test]
fn cross_subnet_reaches_a_same_subnet_peers_ipv6_pods_natively() {
    let head = "encapsulation: vxlan\ncrossSubnet: true\n";
    let t = two_dual_nodes("v6cross", head, "");
    let routes = t.nodes[0].ns.exec("ip -6 route show proto 199");
    assert!(
        routes.contains("fd00:10:244:1::/64 via fd00:1::11 dev eth0"),
        "no native route to node2's IPv6 pods: {routes}"
    );
    let cap = Capture::start(&t.underlay, "u0", "ip6", &t.workdir.join("cross6.pcap"));
    let up = wait_for(Duration::from_secs(10), || t.ping6(0, 1, 1) == 1);
    assert!(up, "no IPv6 between the same-subnet nodes' pods");
    assert_eq!(t.ping6(0, 1, 5), 5);
    assert_eq!(t.ping6(1, 0, 5), 5);
    let out = sh(&format!(
        "tshark -r {} -T fields -E separator=/t -e ipv6.src -e ipv6.dst -e udp.dstport -e icmpv6.type 2>/dev/null",
        cap.stop().display()
    ));
    let frames: Vec<Vec<&str>> = out.lines().map(|l| l.split('\t').collect()).collect();
    assert!(
        frames.iter().all(|f| f[2].is_empty()),
        "UDP (VXLAN) on the underlay: {out}"
    );
    let echoes = frames
        .iter()
        .filter(|f| f[0] == pod_ip6(0) && f[1] == pod_ip6(1) && f[3] == "128")
        .count();
    assert!(
        echoes >= 6,
        "pod1's echo requests not on the wire as they are: {out}"
    );
    assert!(
        t.counter(0, "native", "none") > 0,
        "nothing counted as native"
    );
    assert_eq!(t.ping(0, 1, 3), 3, "IPv4 beside it");
}

/// `datapath status --json` of node `i`.
fn status_json(t: &Topology, i: usize) -> serde_json::Value {
    let out = t.datapath(
        i,
        &format!("status --json --pin-dir {}", t.pin_dir(i).display()),
    );
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// The health probe in each family: a dual-stack peer answers through the tunnel over both
/// underlays; a firewall on the underlay dropping VXLAN over IPv6 names the peer's IPv6 half as
/// unreachable through the tunnel while its IPv6 address answers, its IPv4 half still healthy;
/// the rule gone, both halves answer again.
#[test]
fn the_health_probe_checks_both_halves_of_a_dual_stack_peer() {
    let t = two_dual_nodes("v6health", "encapsulation: vxlan\n", "--health-interval 2");
    let both_ok = |t: &Topology| {
        let st = status_json(t, 0);
        st["health"]["ok"] == 1 && st["health"]["ipv6"]["ok"] == 1
    };
    let healthy = wait_for(Duration::from_secs(25), || both_ok(&t));
    assert!(
        healthy,
        "not healthy in both families: {}",
        status_json(&t, 0)
    );
    let routes = t.routes(0);
    let row = routes.iter().find(|r| r["node"] == node_addr6(1)).unwrap();
    assert_eq!(row["health"]["state"], "ok", "{row}");
    assert!(
        row["health"]["tunnel_rtt_ms"].as_f64().unwrap() > 0.0,
        "{row}"
    );
    let lo = t.nodes[0].ns.exec("ip -6 addr show dev lo");
    assert!(
        lo.contains("fd00:10:244::/128"),
        "no IPv6 probe address: {lo}"
    );

    // The underlay drops VXLAN over IPv6 (the bridge's own filter): ICMPv6 still passes.
    t.underlay.exec(
        "nft add table bridge dpv6h && \
         nft add chain bridge dpv6h drop6 '{ type filter hook forward priority 0; }' && \
         nft add rule bridge dpv6h drop6 ip6 nexthdr udp udp dport '{ 4789, 8472 }' drop",
    );
    let named = wait_for(Duration::from_secs(25), || {
        let st = status_json(&t, 0);
        st["health"]["ipv6"]["tunnel_down"] == serde_json::json!([node_addr6(1)])
            && st["health"]["ok"] == 1
    });
    let text = String::from_utf8_lossy(
        &t.datapath(0, &format!("status --pin-dir {}", t.pin_dir(0).display()))
            .stdout,
    )
    .to_string();
    t.underlay.exec("nft delete table bridge dpv6h");
    assert!(named, "the IPv6 half's broken tunnel is not named: {text}");
    assert!(
        text.contains("over IPv6 0 of 1 peers answer through the tunnel; unreachable through the tunnel while the underlay answers")
            && text.contains(&node_addr6(1)),
        "{text}"
    );
    let back = wait_for(Duration::from_secs(25), || both_ok(&t));
    assert!(
        back,
        "the IPv6 half did not come back: {}",
        status_json(&t, 0)
    );
}

//! The node agent: live reload as a diff, rejection of bad files with the last good state kept,
//! hitless restart, bpftool-readable maps, metrics, detach, and `check` on a NodeList.
//!
//! ```text
//!   pod1 ── node1 (agent) ── u0 ─ br0 ─ u1 ── node2 (agent) ── pod2
//!                                  └─ u2 ── node3 (agent) ── pod3   (three-node tests)
//!   flow under test: ping pod1 → pod2 at 100 packets per second, loss counted by ping itself
//! ```
use std::{fs, thread, time::Duration};

use integration_tests::{Topology, datapath_bin, sh, sh_out, wait_for};

fn flood_ping(t: &Topology, secs: u32) -> std::process::Child {
    t.flood_ping(0, 1, secs)
}

fn ping_result(t: &Topology, child: std::process::Child) -> (u32, u32) {
    t.flood_ping_result(0, 1, child)
}

fn routes_json(t: &Topology, i: usize) -> serde_json::Value {
    t.stats(i)["routes"].clone()
}

#[test]
fn adding_and_removing_a_node_under_traffic_loses_nothing() {
    let mut t = Topology::three_nodes("addrm", 0);
    let two = t.cluster_yaml("vxlan", "").replace(
        "  - name: node3\n    address: 192.168.1.12\n    podCIDR: 10.244.2.0/24\n",
        "",
    );
    let cluster = t.write_cluster(&two);
    t.start_agent(0, &cluster, "");
    t.start_agent(1, &cluster, "");
    assert_eq!(t.ping(0, 2, 1), 0, "node3 is not in the cluster yet");
    let ping = flood_ping(&t, 12);
    let flowing = wait_for(Duration::from_secs(3), || t.ping_replies(0, 1) > 0);
    assert!(flowing, "the ping never got a reply");
    let added = std::time::SystemTime::now();
    t.write_cluster(&t.cluster_yaml("vxlan", ""));
    t.start_agent(2, &cluster, "");
    let node3_known = wait_for(Duration::from_secs(5), || {
        routes_json(&t, 0).as_array().unwrap().len() == 3
    });
    assert!(node3_known, "node1 did not learn node3");
    assert_eq!(t.ping(0, 2, 3), 3, "pod1 -> pod3 after node3 was added");
    t.write_cluster(&two);
    let node3_gone = wait_for(Duration::from_secs(5), || {
        routes_json(&t, 0).as_array().unwrap().len() == 2
    });
    assert!(node3_gone, "node1 did not forget node3");
    let removed = std::time::SystemTime::now();
    let (sent, received) = ping_result(&t, ping);
    assert!(
        t.ping_spanned(0, 1, added, removed),
        "the ping did not span the node's addition and removal"
    );
    assert!(sent >= 200, "ping sent only {sent}");
    assert_eq!(
        sent, received,
        "the flow to the unchanged node lost packets"
    );
    let routes = t.nodes[0].ns.exec("ip route show proto 199");
    assert!(
        !routes.contains("10.244.2.0"),
        "route to node3 left behind: {routes}"
    );
}

#[test]
fn restarting_the_agent_under_traffic_loses_nothing() {
    let (mut t, cluster) = Topology::two_nodes_running("restart", "ipip", "", "");
    let ping = flood_ping(&t, 5);
    thread::sleep(Duration::from_millis(500));
    let stopped = std::time::SystemTime::now();
    t.stop_agents(0);
    thread::sleep(Duration::from_millis(1000));
    // Stopped agent: the pinned datapath keeps forwarding.
    let during = t.counter(0, "encap", "ipip");
    thread::sleep(Duration::from_millis(300));
    assert!(
        t.counter(0, "encap", "ipip") > during,
        "no forwarding while the agent was down"
    );
    t.start_agent(0, &cluster, "");
    let log = fs::read_to_string(&t.agents.last().unwrap().log).unwrap();
    assert!(
        log.contains("adopted=true"),
        "restart did not adopt the pins:\n{log}"
    );
    let restarted = std::time::SystemTime::now();
    let (sent, received) = ping_result(&t, ping);
    assert!(sent >= 200, "ping sent only {sent}");
    assert_eq!(sent, received, "packets lost across the restart");
    assert!(
        t.ping_spanned(0, 1, stopped, restarted),
        "the ping did not run from before the stop to after the restart"
    );
}

/// The same with pods made through the CNI list (the default host routing): the pinned pod
/// hooks carry the flow past the host's stack while the agent is down, and after the new agent
/// adopted them.
#[test]
fn restarting_the_agent_with_cni_pods_keeps_bpf_host_routing() {
    let mut t = Topology::with_cni(
        "restartcni",
        &[10, 11].map(|host| testkit::net::NodeSpec { subnet: 0, host }),
    );
    let cluster = t.write_cluster(&t.cluster_yaml("vxlan", ""));
    for i in 0..2 {
        t.start_agent(i, &cluster, "");
    }
    for i in 0..2 {
        t.cni_add(i);
    }
    let routed = |t: &Topology| t.counter(0, "host_route_out", "bpf");
    let ping = flood_ping(&t, 10);
    let bypassing = wait_for(Duration::from_secs(4), || routed(&t) > 50);
    assert!(
        bypassing,
        "BPF host routing never carried the ping: {}",
        t.stats(0)
    );
    let stopped = std::time::SystemTime::now();
    t.stop_agents(0);
    let down = routed(&t);
    let moved = wait_for(Duration::from_secs(3), || routed(&t) > down + 50);
    assert!(moved, "no BPF host routing while the agent was down");
    t.start_agent(0, &cluster, "");
    let restarted = std::time::SystemTime::now();
    let up = routed(&t);
    let moved = wait_for(Duration::from_secs(3), || routed(&t) > up + 50);
    assert!(moved, "no BPF host routing after the restart");
    let (sent, received) = ping_result(&t, ping);
    assert_eq!(sent, received, "packets lost across the restart");
    assert!(
        t.ping_spanned(0, 1, stopped, restarted),
        "the ping did not run from before the stop to after the restart"
    );
}

#[test]
fn bad_files_are_rejected_and_the_last_good_state_stays() {
    let mut t = Topology::two_nodes("badfile");
    let good = t.cluster_yaml("vxlan", "");
    let cluster = t.write_cluster(&good);
    // Maps sized for two nodes: a third does not fit and must be refused whole.
    t.start_agent(0, &cluster, "--max-nodes 2");
    let before = routes_json(&t, 0);
    let kernel_routes = t.nodes[0].ns.exec("ip route show proto 199");
    let cases = [
        (
            "too many nodes for the maps",
            format!(
                "{good}  - name: node3\n    address: 192.168.1.12\n    podCIDR: 10.244.2.0/24\n"
            ),
            "nodes: 3 nodes do not fit in maps sized for 2 (raise --max-nodes)",
        ),
        ("unparsable", "nodes: [".to_string(), "(file): not parsable"),
        (
            "unknown mode",
            good.replace("encapsulation: vxlan", "encapsulation: gre"),
            "encapsulation: unknown mode \"gre\"",
        ),
        (
            "bad CIDR",
            good.replace("10.244.1.0/24", "10.244.1.0/33"),
            "nodes[1].podCIDR: \"10.244.1.0/33\" is not a CIDR",
        ),
        (
            "bad MAC",
            good.replace(
                "podCIDR: 10.244.1.0/24",
                "podCIDR: 10.244.1.0/24\n    vtepMAC: \"66:00:zz:00:00:01\"",
            ),
            "nodes[1].vtepMAC: \"66:00:zz:00:00:01\" is not a MAC address",
        ),
        (
            "duplicate node",
            good.replace("name: node2", "name: node1"),
            "nodes[1].name: duplicate node \"node1\"",
        ),
        (
            "overlapping pod CIDRs",
            good.replace("10.244.1.0/24", "10.244.0.0/16"),
            "nodes[1].podCIDR: 10.244.0.0/16 overlaps 10.244.0.0/24",
        ),
        (
            "own node missing",
            good.replace("name: node1", "name: node9"),
            "this node \"node1\" is not in the cluster state",
        ),
    ];
    let log = t.agents[0].log.clone();
    for (n, (class, text, message)) in cases.iter().enumerate() {
        t.write_cluster(text);
        let rejected = wait_for(Duration::from_secs(5), || {
            let l = fs::read_to_string(&log).unwrap();
            l.matches("cluster state rejected").count() > n && l.contains(message)
        });
        assert!(
            rejected,
            "{class}: no rejection with {message:?}:\n{}",
            fs::read_to_string(&log).unwrap()
        );
        assert_eq!(routes_json(&t, 0), before, "{class}: maps changed");
        assert_eq!(
            t.nodes[0].ns.exec("ip route show proto 199"),
            kernel_routes,
            "{class}: kernel routes changed"
        );
        let out = sh_out(&format!(
            "{} check --cluster {} --node node1 --max-nodes 2",
            datapath_bin().display(),
            cluster.display()
        ));
        assert!(!out.status.success(), "{class}: check accepted it");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(message),
            "{class}: check output"
        );
    }
}

#[test]
fn maps_dump_with_field_names_metrics_scrape_and_detach_leaves_nothing() {
    let mut t = Topology::two_nodes("inspect");
    let cluster = t.write_cluster(&t.cluster_yaml("vxlan", ""));
    t.start_agent(0, &cluster, "--metrics 127.0.0.1:9464");
    t.start_agent(1, &cluster, "");
    assert_eq!(t.ping(0, 1, 3), 3);
    let pins = t.pin_dir(0);
    for (map, fields) in [
        (
            "DP_CONFIG",
            &["node_addr", "vni", "vtep_mac", "vxlan_port"][..],
        ),
        (
            "DP_POD_CIDRS",
            &["prefix_len", "node_addr", "vtep_mac", "mode", "peer_idx"][..],
        ),
        ("DP_NODES", &["peer_idx", "mode"][..]),
        ("DP_COUNTERS", &["packets", "bytes"][..]),
        ("DP_DROPS", &["packets", "bytes"][..]),
        ("DP_PEER_STATS", &["tx_packets", "rx_bytes"][..]),
    ] {
        let dump = sh(&format!(
            "bpftool map dump pinned {}/maps/{map}",
            pins.display()
        ));
        for f in fields {
            assert!(
                dump.contains(&format!("\"{f}\"")),
                "{map}: no field {f} in\n{dump}"
            );
        }
    }
    let metrics = t.nodes[0].ns.exec("curl -s http://127.0.0.1:9464/metrics");
    for needle in [
        "datapath_packets_total{direction=\"encap\",mode=\"vxlan\"}",
        "datapath_drops_total{reason=\"unknown_peer\"} 0",
        "datapath_nodes_known 1",
        "datapath_last_reload_success 1",
        "datapath_peer_packets_total{peer=\"192.168.1.11\",direction=\"tx\"}",
    ] {
        assert!(
            metrics.contains(needle),
            "metrics lack {needle}:\n{metrics}"
        );
    }

    t.stop_agents(0);
    let out = t.datapath(0, &format!("detach --pin-dir {}", pins.display()));
    assert!(out.status.success());
    assert!(!pins.exists(), "pins left under {}", pins.display());
    assert_eq!(
        t.nodes[0].ns.exec("ip route show proto 199"),
        "",
        "routes left"
    );
    let links = t.nodes[0].ns.exec("ip -d link show eth0");
    assert!(!links.contains("prog/xdp"), "XDP still attached: {links}");
    let tcx = t.nodes[0].ns.exec("bpftool net show dev eth0");
    assert!(
        !tcx.contains("tc_encap"),
        "TC program still attached: {tcx}"
    );
    assert_eq!(
        t.ping(0, 1, 1),
        0,
        "traffic still encapsulated after detach"
    );
}

#[test]
fn check_reads_a_kubectl_nodelist() {
    let dir = std::env::temp_dir().join(integration_tests::unique("nodelist"));
    fs::create_dir_all(&dir).unwrap();
    let file = dir.join("nodes.json");
    fs::write(&file, NODELIST).unwrap();
    let check = |args: &str| {
        sh_out(&format!(
            "{} check --cluster {} {args}",
            datapath_bin().display(),
            file.display()
        ))
    };
    let out = check("--node minikube --encapsulation vxlan --vni 1 --vxlan-port 8472");
    let _ = fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok: 2 nodes, vxlan (vni 1, port 8472), crossSubnet false"
    );
}

/// `check` tells a clean state, one accepted with nodes left out, and one rejected apart, by
/// its exit status (0, 3, 1), its first line and `--json`; IPIP names no VNI or port.
#[test]
fn check_exit_status_and_json_tell_ok_warnings_and_errors_apart() {
    let dir = std::env::temp_dir().join(integration_tests::unique("checkjson"));
    fs::create_dir_all(&dir).unwrap();
    let run = |name: &str, text: &str, args: &str| {
        let file = dir.join(name);
        fs::write(&file, text).unwrap();
        let out = sh_out(&format!(
            "{} check --cluster {} {args}",
            datapath_bin().display(),
            file.display()
        ));
        let json = sh_out(&format!(
            "{} check --json --cluster {} {args}",
            datapath_bin().display(),
            file.display()
        ));
        let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        assert_eq!(
            out.status.code(),
            json.status.code(),
            "{name}: --json changed the status"
        );
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            report,
        )
    };
    let mut partial: serde_json::Value = serde_json::from_str(NODELIST).unwrap();
    let spec = partial["items"][1]["spec"].as_object_mut().unwrap();
    spec.remove("podCIDR");
    spec.remove("podCIDRs");
    let ipip = "encapsulation: ipip\nnodes:\n  - { name: a, address: 192.168.1.10, podCIDR: 10.244.0.0/24 }\n  - { name: b, address: 192.168.1.11, podCIDR: 10.244.1.0/24 }\n";
    let overlapping = "encapsulation: vxlan\nnodes:\n  - { name: a, address: 192.168.1.10, podCIDR: 10.244.0.0/16 }\n  - { name: b, address: 192.168.1.11, podCIDR: 10.244.1.0/24 }\n";
    let cases = [
        run("ipip.yaml", ipip, ""),
        run("partial.json", &partial.to_string(), "--node minikube"),
        run("overlap.yaml", overlapping, ""),
    ];
    let _ = fs::remove_dir_all(&dir);

    let (code, text, report) = &cases[0];
    assert_eq!(*code, Some(0), "{text}");
    assert_eq!(text.trim(), "ok: 2 nodes, ipip, crossSubnet false");
    assert_eq!(report["verdict"], "ok");
    assert_eq!(report["vni"], serde_json::Value::Null, "{report}");

    let (code, text, report) = &cases[1];
    assert_eq!(*code, Some(3), "skipped nodes must not exit 0: {text}");
    assert!(
        text.starts_with("accepted with warnings: 1 of 2 nodes in use"),
        "{text}"
    );
    assert!(
        text.contains("skipped: items[1].spec.podCIDR: missing"),
        "{text}"
    );
    assert_eq!(report["verdict"], "warnings");
    assert_eq!(report["nodes"], 1);
    assert_eq!(
        report["skipped"][0]["path"], "items[1].spec.podCIDR",
        "{report}"
    );

    let (code, text, report) = &cases[2];
    assert_eq!(*code, Some(1), "{text}");
    assert!(text.starts_with("invalid: "), "{text}");
    assert_eq!(report["verdict"], "invalid");
    let errors = report["errors"].as_array().unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e["path"].as_str().unwrap().starts_with("nodes[")),
        "{report}"
    );
}

/// Trimmed from `kubectl get nodes -o json` of a two-node cluster running Flannel.
const NODELIST: &str = r#"{
    "apiVersion": "v1",
    "items": [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "annotations": {
                    "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"a2:5b:0c:3d:11:01\"}",
                    "flannel.alpha.coreos.com/backend-type": "vxlan",
                    "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                    "flannel.alpha.coreos.com/public-ip": "192.168.49.2",
                    "node.alpha.kubernetes.io/ttl": "0"
                },
                "labels": { "kubernetes.io/hostname": "minikube" },
                "name": "minikube",
                "resourceVersion": "1042",
                "uid": "7d4f4c1e-2a8e-4c6b-9a53-0c1f4f5d1a01"
            },
            "spec": { "podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"] },
            "status": {
                "addresses": [
                    { "address": "192.168.49.2", "type": "InternalIP" },
                    { "address": "minikube", "type": "Hostname" }
                ]
            }
        },
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "annotations": {
                    "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"a2:5b:0c:3d:11:02\"}",
                    "flannel.alpha.coreos.com/public-ip": "192.168.49.3"
                },
                "name": "minikube-m02"
            },
            "spec": { "podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"] },
            "status": {
                "addresses": [
                    { "address": "192.168.49.3", "type": "InternalIP" },
                    { "address": "minikube-m02", "type": "Hostname" }
                ]
            }
        }
    ],
    "kind": "List",
    "metadata": { "resourceVersion": "" }
}"#;

/// node2's row in node1's `datapath routes`: (counter slot, packets sent to it).
fn node2_row(t: &Topology) -> Option<(u64, u64)> {
    t.stats(0)["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node"] == t.nodes[1].addr)
        .map(|r| {
            (
                r["peer_slot"].as_u64().unwrap(),
                r["tx_packets"].as_u64().unwrap(),
            )
        })
}

/// A peer absent from the first state after a restart (its lease gone a while, a NodeList
/// caught mid-change) and back later keeps its counter slot and its counts, as a peer that
/// moved does; a node that was never there gets a slot no departed peer holds.
#[test]
fn a_peer_that_leaves_and_returns_keeps_its_counters() {
    let mut t = Topology::three_nodes("peerback", 0);
    let all = t.cluster_yaml("ipip", "");
    let cluster = t.write_cluster(&all);
    t.start_agent(0, &cluster, "");
    t.start_agent(1, &cluster, "");
    assert_eq!(t.ping(0, 1, 5), 5);
    let (slot, sent) = node2_row(&t).expect("node2 known");
    assert!(sent >= 5, "node2's counter: {sent}");

    t.stop_agents(0);
    let without_node2: String = all
        .split("  - name: ")
        .filter(|n| !n.starts_with("node2\n"))
        .collect::<Vec<_>>()
        .join("  - name: ");
    t.write_cluster(&without_node2);
    t.start_agent(0, &cluster, "");
    assert_eq!(node2_row(&t), None, "node2 is not in the state");
    t.write_cluster(&all);
    assert!(
        wait_for(Duration::from_secs(5), || node2_row(&t).is_some()),
        "node2 not back after the reload"
    );
    let (slot_back, sent_back) = node2_row(&t).unwrap();
    assert_eq!(slot_back, slot, "node2's counter slot moved");
    assert!(
        sent_back >= sent,
        "node2's counts were lost: {sent} before it left, {sent_back} after it came back"
    );
    assert_eq!(t.ping(0, 1, 3), 3);
}

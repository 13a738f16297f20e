//! Replacing flanneld node by node: leases as flanneld writes them, the agent registering
//! without a pod CIDR or a node name (claiming or reusing subnets), a Flannel node migrated
//! under traffic, a NodeList with Flannel's annotations, a joining node without a pod CIDR,
//! `subnet.env`, and `--ip-masq`.
//!
//! ```text
//!   node1 192.168.1.10  flannel.1 (Linux VXLAN, VNI 1, port 8472) ── then this agent
//!   node2 192.168.1.11  agent --register            ─┐
//!   node3 192.168.1.12  agent --register            ─┴─ etcd 192.168.1.1:2379 (underlay netns)
//!   pods 10.244.{0,1,2}.2; the underlay namespace (192.168.1.1) stands for the internet
//! ```
use std::{fs, thread, time::Duration};

use integration_tests::{Capture, Etcd, NodeSpec, Topology, tshark_fields, wait_for};

const PREFIX: &str = "/coreos.com/network";
const CONFIG: &str =
    r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":1,"Port":8472}}"#;
const NODE1_VTEP: &str = "66:00:00:00:00:01";

/// A lease exactly as flanneld writes it (no NodeName).
fn flanneld_lease(ip: &str, mac: &str) -> String {
    format!(
        r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    )
}

fn leases(etcd: &Etcd) -> Vec<(String, String)> {
    let out = etcd.ctl(&format!("get --prefix {PREFIX}/subnets/"));
    out.lines()
        .collect::<Vec<_>>()
        .chunks(2)
        .filter(|kv| kv.len() == 2)
        .map(|kv| (kv[0].to_string(), kv[1].to_string()))
        .collect()
}

/// The subnet key of the lease whose PublicIP is `ip`, once there is one.
fn lease_of(etcd: &Etcd, ip: &str) -> Option<String> {
    leases(etcd)
        .into_iter()
        .find(|(_, v)| v.contains(&format!(r#""PublicIP":"{ip}""#)))
        .map(|(k, _)| k)
}

fn register_args() -> String {
    format!(
        "NONODE --etcd-endpoints {} --register --iface eth0",
        Etcd::URL
    )
}

#[test]
fn a_flannel_cluster_is_migrated_node_by_node() {
    let mut t = Topology::three_nodes("flmig", 0);
    let etcd = Etcd::start(&t);
    etcd.put(&format!("{PREFIX}/config"), CONFIG);
    etcd.put(
        &format!("{PREFIX}/subnets/10.244.0.0-24"),
        &flanneld_lease("192.168.1.10", NODE1_VTEP),
    );
    t.flannel_device(0, 1, 8472, NODE1_VTEP);
    // node2 and node3 claim the first free subnets, in turn (no --pod-cidr, no --node).
    for (i, ip) in [(1, "192.168.1.11"), (2, "192.168.1.12")] {
        t.start_agent_with(i, &register_args());
        let key = format!("{PREFIX}/subnets/10.244.{i}.0-24");
        let claimed = wait_for(Duration::from_secs(10), || {
            lease_of(&etcd, ip).as_deref() == Some(key.as_str())
        });
        assert!(
            claimed,
            "node{} did not claim {key}: {:?}",
            i + 1,
            leases(&etcd)
        );
        let env = fs::read_to_string(t.cni_dir(i).join("subnet.env")).unwrap_or_default();
        assert!(
            env.contains(&format!("FLANNEL_SUBNET=10.244.{i}.1/24"))
                && env.contains("FLANNEL_NETWORK=10.244.0.0/16")
                && env.contains("FLANNEL_MTU=1450"),
            "subnet.env of node{}: {env}",
            i + 1
        );
    }
    // flanneld on node1 programs the peers from their leases (VtepMAC as they wrote it).
    for (ip, cidr) in [
        ("192.168.1.11", "10.244.1.0/24"),
        ("192.168.1.12", "10.244.2.0/24"),
    ] {
        let mac = format!(
            "0e:00:{}",
            ip.split('.')
                .map(|o| format!("{:02x}", o.parse::<u8>().unwrap()))
                .collect::<Vec<_>>()
                .join(":")
        );
        t.flannel_peer(0, ip, cidr, &mac);
    }
    for (a, b) in [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2)] {
        assert_eq!(
            t.ping(a, b, 2),
            2,
            "pod{} -> pod{} before the migration",
            a + 1,
            b + 1
        );
    }

    let flow = t.flood_ping(1, 2, 6);
    thread::sleep(Duration::from_millis(500));
    t.nodes[0].ns.exec("ip link del flannel.1");
    t.start_agent_with(0, &register_args());
    let key = lease_of(&etcd, "192.168.1.10");
    assert_eq!(
        key.as_deref(),
        Some(format!("{PREFIX}/subnets/10.244.0.0-24").as_str()),
        "node1 kept its subnet"
    );
    let node1_known = wait_for(Duration::from_secs(10), || {
        leases(&etcd)
            .iter()
            .any(|(_, v)| v.contains("192.168.1.10") && v.contains("0e:00:c0:a8:01:0a"))
    });
    assert!(
        node1_known,
        "node1's lease was not taken over: {:?}",
        leases(&etcd)
    );
    let back = wait_for(Duration::from_secs(10), || t.ping(0, 1, 1) == 1);
    assert!(back, "pod1 -> pod2 after the migration");
    for (a, b) in [(1, 0), (0, 2), (2, 0)] {
        assert_eq!(
            t.ping(a, b, 2),
            2,
            "pod{} -> pod{} after the migration",
            a + 1,
            b + 1
        );
    }
    let (sent, received) = t.flood_ping_result(1, 2, flow);
    assert!(sent > 500, "ping sent only {sent}");
    assert_eq!(
        sent, received,
        "node2 -> node3 lost packets during the migration"
    );
    assert_eq!(leases(&etcd).len(), 3, "{:?}", leases(&etcd));
}

#[test]
fn agents_racing_for_subnets_never_share_one() {
    let mut t = Topology::new(
        "flrace",
        &[10, 11, 12, 13].map(|host| NodeSpec { subnet: 0, host }),
    );
    let etcd = Etcd::start(&t);
    etcd.put(
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.0.0","Backend":{"Type":"vxlan"}}"#,
    );
    let args = register_args();
    let spawned: Vec<_> = (0..4).map(|i| t.spawn_agent(i, &args)).collect();
    for (i, log) in spawned.into_iter().enumerate() {
        t.wait_agent(i, &log);
    }
    let all = leases(&etcd);
    let mut keys: Vec<&String> = all.iter().map(|(k, _)| k).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 4, "four nodes, four subnets: {all:?}");
    for ip in [
        "192.168.1.10",
        "192.168.1.11",
        "192.168.1.12",
        "192.168.1.13",
    ] {
        assert!(lease_of(&etcd, ip).is_some(), "no lease for {ip}: {all:?}");
    }
}

/// A NodeList as `kubectl get nodes -o json` prints it for a Flannel cluster.
fn flannel_nodelist(nodes: &[(&str, &str, Option<&str>, &str)]) -> String {
    let items: Vec<serde_json::Value> = nodes
        .iter()
        .map(|(name, addr, cidr, mac)| {
            let mut n = serde_json::json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "annotations": {
                    "flannel.alpha.coreos.com/backend-type": "vxlan",
                    "flannel.alpha.coreos.com/public-ip": addr,
                    "flannel.alpha.coreos.com/backend-data":
                        format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#),
                }},
                "spec": {},
                "status": {"addresses": [{"type": "InternalIP", "address": addr}]},
            });
            if let Some(c) = cidr {
                n["spec"]["podCIDR"] = serde_json::json!(c);
            }
            n
        })
        .collect();
    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

#[test]
fn a_flannel_nodelist_runs_flannels_vni_and_port_and_waits_for_a_joining_node() {
    let mut t = Topology::three_nodes("flnl", 0);
    let mac = |i: u8| format!("0e:00:c0:a8:01:{:02x}", 10 + i);
    let joining = flannel_nodelist(&[
        ("node1", "192.168.1.10", Some("10.244.0.0/24"), &mac(0)),
        ("node2", "192.168.1.11", Some("10.244.1.0/24"), NODE1_VTEP),
        ("node3", "192.168.1.12", None, &mac(2)),
    ]);
    let cluster = t.write_cluster(&joining);
    let check = t.datapath(0, &format!("check --cluster {}", cluster.display()));
    let said = String::from_utf8_lossy(&check.stdout).to_string();
    assert!(
        said.contains("vxlan (vni 1, port 8472)")
            && said.contains("skipped: items[2].spec.podCIDR: missing"),
        "{said}"
    );
    t.start_agent(0, &cluster, "");
    // node2 runs flanneld's device, with the same VNI and port.
    t.flannel_device(1, 1, 8472, NODE1_VTEP);
    t.flannel_peer(1, "192.168.1.10", "10.244.0.0/24", &mac(0));
    assert_eq!(t.ping(0, 1, 3), 3, "datapath pod -> flannel.1 pod");
    assert_eq!(t.ping(1, 0, 3), 3, "flannel.1 pod -> datapath pod");
    let stats = t.stats(0);
    assert_eq!(stats["vni"], 1);
    assert_eq!(stats["vxlan_port"], 8472);
    let log = fs::read_to_string(&t.agents[0].log).unwrap();
    assert!(
        log.contains("skipping node items[2].spec.podCIDR: missing"),
        "{log}"
    );

    // node3 gets its pod CIDR: node1 applies it with no restart; node3's agent starts then.
    t.write_cluster(&flannel_nodelist(&[
        ("node1", "192.168.1.10", Some("10.244.0.0/24"), &mac(0)),
        ("node2", "192.168.1.11", Some("10.244.1.0/24"), NODE1_VTEP),
        ("node3", "192.168.1.12", Some("10.244.2.0/24"), &mac(2)),
    ]));
    t.start_agent(2, &cluster, "");
    let joined = wait_for(Duration::from_secs(5), || {
        t.stats(0)["routes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["pod_cidr"] == "10.244.2.0/24")
    });
    assert!(joined, "node3 not applied once its podCIDR appeared");
    let up = wait_for(Duration::from_secs(5), || t.ping(0, 2, 1) == 1);
    assert!(up, "pod1 -> pod3 once node3 joined");
}

#[test]
fn ip_masq_rewrites_only_traffic_leaving_the_cluster() {
    let (mut t, _) = Topology::two_nodes_running(
        "flmasq",
        "ipip",
        "clusterCIDR: 10.244.0.0/16\n",
        "--ip-masq",
    );
    let env = fs::read_to_string(t.cni_dir(0).join("subnet.env")).unwrap();
    assert!(env.contains("FLANNEL_IPMASQ=true"), "{env}");
    // The underlay namespace stands for the internet: it has no route to the pods.
    let cap = Capture::start(
        &t.underlay,
        "u0",
        "icmp or ip proto 4",
        &t.workdir.join("u0.pcap"),
    );
    let out = t.nodes[0].pod.exec_out("ping -c 2 -i 0.2 -W 1 192.168.1.1");
    assert!(out.status.success(), "pod1 -> outside: {out:?}");
    assert_eq!(t.ping(0, 1, 2), 2, "pod1 -> pod2");
    let pcap = cap.stop();
    let frames = tshark_fields(&pcap, "", &["ip.src", "ip.dst", "icmp.type"]);
    let outside: Vec<_> = frames
        .iter()
        .filter(|f| f[1] == "192.168.1.1" && f[2] == "8")
        .collect();
    assert!(!outside.is_empty(), "{frames:?}");
    assert!(
        outside.iter().all(|f| f[0] == "192.168.1.10"),
        "traffic leaving the cluster keeps a pod source: {outside:?}"
    );
    let pod_to_pod: Vec<_> = frames
        .iter()
        .filter(|f| f[1].contains("10.244.1.2"))
        .collect();
    assert!(
        !pod_to_pod.is_empty() && pod_to_pod.iter().all(|f| f[0].ends_with("10.244.0.2")),
        "pod-to-pod traffic must keep the pod's source: {pod_to_pod:?}"
    );

    // Flushed by someone: put back within flanneld's 5 s.
    t.nodes[0].ns.exec("iptables -t nat -F DATAPATH-POSTRTG");
    let back = wait_for(Duration::from_secs(10), || {
        t.nodes[0]
            .ns
            .exec("iptables -t nat -S DATAPATH-POSTRTG")
            .contains("MASQUERADE")
    });
    assert!(back, "masquerade rules not re-created");
    t.stop_agents(0);
    t.detach(0);
    let nat = t.nodes[0].ns.exec("iptables -t nat -S");
    assert!(
        !nat.contains("DATAPATH-POSTRTG"),
        "rules left after detach: {nat}"
    );
}

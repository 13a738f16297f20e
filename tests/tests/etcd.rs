//! The agent on a real etcd server (Debian's etcd-server, in the underlay namespace on its
//! loopback and on 192.168.1.1), in Flannel's subnet-lease layout.
//!
//! ```text
//!   node1 agent ─┐                       ┌─ node2 agent
//!                └── 192.168.1.1:2379 ───┘   etcd in the underlay netns; etcdctl on its loopback
//! ```
use std::{
    fs,
    time::{Duration, SystemTime},
};

use integration_tests::{Etcd, Topology, wait_for, wait_for_text};

const PREFIX: &str = "/coreos.com/network";
const CONFIG: &str =
    r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":1,"Port":8472}}"#;

fn lease(ip: &str, mac: &str, name: Option<&str>) -> String {
    let name = name
        .map(|n| format!(r#","NodeName":"{n}""#))
        .unwrap_or_default();
    format!(
        r#"{{"PublicIP":"{ip}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}{name}}}"#
    )
}

fn subnet_key(cidr: &str) -> String {
    format!("{PREFIX}/subnets/{}", cidr.replace('/', "-"))
}

/// The route row of `cidr` in node `i`'s maps, if any.
fn route(t: &Topology, i: usize, cidr: &str) -> Option<serde_json::Value> {
    t.stats(i)["routes"]
        .as_array()?
        .iter()
        .find(|r| r["pod_cidr"] == cidr)
        .cloned()
}

fn etcd_args() -> String {
    format!("--etcd-endpoints {} --metrics 127.0.0.1:9464", Etcd::URL)
}

fn metric(t: &Topology, i: usize, name: &str) -> f64 {
    let body = t.nodes[i].ns.exec("curl -s http://127.0.0.1:9464/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(-1.0)
}

#[test]
fn a_lease_added_changed_and_deleted_shows_up_in_the_maps() {
    let mut t = Topology::two_nodes("etcdlease");
    let etcd = Etcd::start(&t);
    etcd.put(&format!("{PREFIX}/config"), CONFIG);
    etcd.put(
        &subnet_key("10.244.0.0/24"),
        &lease("192.168.1.10", "0e:00:c0:a8:01:0a", Some("node1")),
    );
    t.start_agent_with(0, &etcd_args());
    let soon = |f: &mut dyn FnMut() -> bool| wait_for(Duration::from_secs(10), f);

    // Added, as flanneld writes it (no NodeName: named by its PublicIP).
    etcd.put(
        &subnet_key("10.244.1.0/24"),
        &lease("192.168.1.11", "66:00:00:00:00:11", None),
    );
    assert!(
        soon(&mut || route(&t, 0, "10.244.1.0/24")
            .is_some_and(|r| r["node"] == "192.168.1.11" && r["vtep_mac"] == "66:00:00:00:00:11")),
        "added lease not in the maps: {}",
        t.stats(0)
    );
    // One route toward the encap program, for the config's Network, covers every lease.
    let routes = t.nodes[0].ns.exec("ip route show proto 199");
    assert_eq!(
        routes.trim(),
        "10.244.0.0/16 via 169.254.0.1 dev eth0 onlink mtu 1450"
    );

    // Changed.
    etcd.put(
        &subnet_key("10.244.1.0/24"),
        &lease("192.168.1.11", "66:00:00:00:00:22", None),
    );
    assert!(
        soon(&mut || route(&t, 0, "10.244.1.0/24")
            .is_some_and(|r| r["vtep_mac"] == "66:00:00:00:00:22")),
        "changed lease not in the maps: {}",
        t.stats(0)
    );

    // A lease that is not one is refused whole: the maps keep the last good state.
    etcd.put(&subnet_key("10.244.2.0/24"), "{not json");
    let log = t.agents[0].log.clone();
    assert!(
        soon(&mut || fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("/coreos.com/network/subnets/10.244.2.0-24: not a Flannel subnet lease")),
        "bad lease not reported:\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(route(&t, 0, "10.244.1.0/24").is_some());
    etcd.del(&subnet_key("10.244.2.0/24"));

    // Deleted.
    etcd.del(&subnet_key("10.244.1.0/24"));
    assert!(
        soon(&mut || route(&t, 0, "10.244.1.0/24").is_none()),
        "deleted lease still in the maps: {}",
        t.stats(0)
    );
    assert!(
        soon(&mut || !t.nodes[0]
            .ns
            .exec("ip route show proto 199")
            .contains("10.244.1.0/24")),
        "route of the deleted lease remains"
    );
    assert_eq!(metric(&t, 0, "datapath_etcd_connected"), 1.0);
}

#[test]
fn registered_agents_find_each_other_and_survive_an_etcd_restart() {
    let mut t = Topology::three_nodes("etcdreg", 0);
    let mut etcd = Etcd::start(&t);
    etcd.put(&format!("{PREFIX}/config"), CONFIG);
    for i in 0..2 {
        let cidr = t.nodes[i].pod_cidr.clone();
        t.start_agent_with(
            i,
            &format!(
                "{} --register --pod-cidr {cidr} --iface eth0 --lease-ttl 10",
                etcd_args()
            ),
        );
    }
    let found = wait_for(Duration::from_secs(10), || {
        route(&t, 0, "10.244.1.0/24").is_some() && route(&t, 1, "10.244.0.0/24").is_some()
    });
    assert!(found, "agents did not find each other: {}", t.stats(0));
    assert_eq!(t.ping(0, 1, 3), 3, "pod1 -> pod2 over registered leases");
    assert_eq!(t.ping(1, 0, 3), 3, "pod2 -> pod1 over registered leases");
    let (sent, got) = t.tcp_transfer(0, 1, 10);
    assert_eq!(sent, got, "10 MiB over TCP between registered nodes");

    // etcd crashes while a ping flows every 5 ms; the datapath keeps forwarding from its maps.
    let ping = t.flood_ping(0, 1, 6);
    let flowing = wait_for(Duration::from_secs(3), || t.ping_replies(0, 1) > 0);
    assert!(flowing, "the ping never got a reply");
    let killed = SystemTime::now();
    etcd.kill();
    std::thread::sleep(Duration::from_secs(2));
    // A node joins while the agents cannot see etcd: written once etcd is back.
    etcd.restart();
    let restarted = SystemTime::now();
    etcd.put(
        &subnet_key("10.244.2.0/24"),
        &lease("192.168.1.12", "66:00:00:00:00:33", Some("node3")),
    );
    let (sent, got) = t.flood_ping_result(0, 1, ping);
    assert!(
        t.ping_spanned(0, 1, killed, restarted),
        "the ping did not span etcd's outage"
    );
    assert_eq!(got, sent, "packets lost while etcd was down");
    for i in 0..2 {
        let caught_up = wait_for(Duration::from_secs(20), || {
            route(&t, i, "10.244.2.0/24").is_some()
        });
        assert!(caught_up, "node{} missed the change made meanwhile", i + 1);
        assert!(
            wait_for(Duration::from_secs(10), || metric(
                &t,
                i,
                "datapath_etcd_connected"
            ) == 1.0),
            "node{} did not reconnect",
            i + 1
        );
        let log = fs::read_to_string(&t.agents[i].log).unwrap_or_default();
        assert!(
            log.contains("etcd connection lost") && log.contains("resynced"),
            "node{} did not say it lost and resynced etcd:\n{log}",
            i + 1
        );
        assert!(metric(&t, i, "datapath_etcd_resyncs_total") >= 1.0);
    }
    assert_eq!(t.ping(0, 1, 3), 3, "pod1 -> pod2 after the restart");
}

#[test]
fn tls_client_certificates_are_used() {
    let mut t = Topology::two_nodes("etcdtls");
    let etcd = Etcd::start_tls(&t);
    let d = etcd.tls.clone().expect("tls dir");
    etcd.put(&format!("{PREFIX}/config"), CONFIG);
    etcd.put(
        &subnet_key("10.244.0.0/24"),
        &lease("192.168.1.10", "0e:00:c0:a8:01:0a", Some("node1")),
    );
    etcd.put(
        &subnet_key("10.244.1.0/24"),
        &lease("192.168.1.11", "0e:00:c0:a8:01:0b", Some("node2")),
    );
    let tls = |name: &str| {
        format!(
            "--etcd-endpoints {} --etcd-cafile {d}/ca.pem --etcd-certfile {d}/{name}.pem --etcd-keyfile {d}/{name}.key",
            Etcd::TLS_URL,
            d = d.display()
        )
    };
    t.start_agent_with(0, &tls("client"));
    assert!(
        route(&t, 0, "10.244.1.0/24").is_some(),
        "state over TLS not applied: {}",
        t.stats(0)
    );
    // Without a client certificate the server refuses: the agent waits and says why.
    let log = t.workdir.join("no-cert.log");
    let mut child = t.nodes[1].ns.spawn(
        &format!(
            "{} run --node node2 --pin-dir {} --etcd-endpoints {} --etcd-cafile {}/ca.pem",
            integration_tests::datapath_bin().display(),
            t.pin_dir(1).display(),
            Etcd::TLS_URL,
            d.display()
        ),
        &log,
    );
    let refused = wait_for_text(&log, "etcd unreachable", Duration::from_secs(10));
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        refused,
        "agent without a client certificate was not refused:\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        !fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("programs attached")
    );
}

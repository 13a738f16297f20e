//! Upgrades that drop nothing: node1 upgraded from the previous release (commit b0238e2, built
//! from this repository's history) to this build under a 200 pps ping, for IPIP and VXLAN with
//! XDP and TC decapsulation; the same killed with SIGKILL at each step of the migration;
//! `--max-nodes` raised under ping; and a second agent beside a running one, which waits and
//! takes over.
//!
//! ```text
//!   pod1 ── node1 (b0238e2 agent → this build) ── u0 ─ br0 ─ u1 ── node2 (b0238e2 agent) ── pod2
//!   flow under test: ping pod1 → pod2 every 5 ms, losses counted by ping itself
//! ```
use std::{
    fs,
    path::Path,
    thread,
    time::{Duration, SystemTime},
};

use integration_tests::{NodeSpec, Topology, release_bin, wait_for, wait_for_text};

const PREVIOUS: &str = "b0238e2";
/// The last release of map ABI 2, whose default host routing was `bpf` (no flow verdicts, no
/// pod egress hook, no next-hop cache).
const ABI2: &str = "400d98e";

fn start_previous(t: &mut Topology, i: usize, bin: &Path, cluster: &Path, decap: &str) {
    let log = t.workdir.join(format!("old-agent-{}.log", t.agents.len()));
    let cmd = format!(
        "{} run --cluster {} --node node{} --pin-dir {} --decap {decap} --watch-ms 100",
        bin.display(),
        cluster.display(),
        i + 1,
        t.pin_dir(i).display()
    );
    t.spawn_raw(i, &cmd, &log);
    t.wait_agent(i, &log);
}

/// Two nodes running the previous release.
fn previous_cluster(tag: &str, encap: &str, decap: &str) -> (Topology, std::path::PathBuf) {
    let old = release_bin(PREVIOUS);
    let mut t = Topology::new(tag, &[10, 11].map(|host| NodeSpec { subnet: 0, host }));
    let cluster = t.write_cluster(&t.cluster_yaml(encap, ""));
    for i in 0..2 {
        start_previous(&mut t, i, &old, &cluster, decap);
    }
    assert_eq!(t.ping(0, 1, 2), 2, "the previous release carries traffic");
    (t, cluster)
}

/// Nothing of the previous release or of the migration is left on node `i`.
fn clean_after_migration(t: &Topology, i: usize) {
    let pins = t.pin_dir(i);
    for gone in ["maps-pending", "maps-old"] {
        assert!(!pins.join(gone).exists(), "{gone} left behind");
    }
    let mut maps: Vec<String> = fs::read_dir(pins.join("maps"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    maps.sort();
    let mut want: Vec<String> = maps_common::map_names::ALL
        .iter()
        .map(|m| m.to_string())
        .collect();
    want.sort();
    assert_eq!(maps, want, "pinned maps");
    let routes = t.nodes[i].ns.exec("ip route show proto 199");
    assert!(
        routes.lines().all(|l| l.contains("via 169.254.0.1")),
        "per-peer routes of the previous release left: {routes}"
    );
    let links = t.nodes[i].ns.exec("ip link show");
    assert!(!links.contains("dp-vxcsum"), "{links}");
}

#[test]
fn upgrading_from_the_previous_release_under_ping_loses_nothing() {
    for (encap, decap) in [
        ("ipip", "xdp"),
        ("ipip", "tc"),
        ("vxlan", "xdp"),
        ("vxlan", "tc"),
    ] {
        let (mut t, cluster) = previous_cluster(&format!("up{encap}{decap}"), encap, decap);
        let ping = t.flood_ping(0, 1, 5);
        thread::sleep(Duration::from_millis(500));
        let stopped = SystemTime::now();
        t.stop_agents(0);
        t.start_agent(
            0,
            &cluster,
            &format!("--decap {decap} --metrics 127.0.0.1:9464"),
        );
        let upgraded = SystemTime::now();
        let (sent, received) = t.flood_ping_result(0, 1, ping);
        assert!(sent >= 500, "ping sent only {sent}");
        assert_eq!(
            sent, received,
            "{encap}/{decap}: packets lost in the upgrade"
        );
        assert!(
            t.ping_spanned(0, 1, stopped, upgraded),
            "{encap}/{decap}: the ping did not span the upgrade"
        );
        let log = fs::read_to_string(&t.agents.last().unwrap().log).unwrap();
        assert!(log.contains("migration complete"), "{log}");
        clean_after_migration(&t, 0);
        // The new agent serves from the migrated pins, counters carried over.
        let encapsulated = t.counter(0, "encap", encap);
        assert!(
            encapsulated >= u64::from(sent),
            "counters not carried: {encapsulated}"
        );
        let routes = t.datapath(0, &format!("routes --pin-dir {}", t.pin_dir(0).display()));
        assert!(String::from_utf8_lossy(&routes.stdout).contains("10.244.1.0/24"));
        let metrics = t.nodes[0].ns.exec("curl -s http://127.0.0.1:9464/metrics");
        assert!(metrics.contains("datapath_packets_total"), "{metrics}");
        assert_eq!(t.ping(0, 1, 2), 2, "{encap}/{decap}: after the upgrade");
    }
}

#[test]
fn a_migration_killed_at_each_step_completes_on_the_next_start() {
    for fault in ["after-fill", "after-swap", "after-rename"] {
        let (mut t, cluster) = previous_cluster(&format!("kill{}", &fault[6..]), "vxlan", "tc");
        t.stop_agents(0);
        let log = t.spawn_agent_env(
            0,
            &format!("DATAPATH_FAULT={fault}"),
            &format!("--cluster {} --decap tc", cluster.display()),
        );
        let killed = wait_for_text(&log, "DATAPATH_FAULT", Duration::from_secs(20));
        assert!(killed, "{fault}: the fault point was not reached");
        thread::sleep(Duration::from_millis(300));
        t.start_agent(0, &cluster, "--decap tc");
        let up = wait_for(Duration::from_secs(5), || t.ping(0, 1, 1) == 1);
        assert!(up, "{fault}: traffic did not recover");
        assert_eq!(t.ping(0, 1, 3), 3, "{fault}");
        clean_after_migration(&t, 0);
    }
}

#[test]
fn raising_max_nodes_under_ping_loses_nothing() {
    let (mut t, cluster) = Topology::two_nodes_running("upmax", "vxlan", "", "--max-nodes 64");
    let ping = t.flood_ping(0, 1, 5);
    thread::sleep(Duration::from_millis(500));
    let stopped = SystemTime::now();
    t.stop_agents(0);
    t.start_agent(0, &cluster, "--max-nodes 128");
    let migrated = SystemTime::now();
    let (sent, received) = t.flood_ping_result(0, 1, ping);
    assert!(sent >= 500, "ping sent only {sent}");
    assert_eq!(sent, received, "packets lost raising --max-nodes");
    assert!(
        t.ping_spanned(0, 1, stopped, migrated),
        "the ping did not span the migration"
    );
    let info = t.nodes[0].ns.exec(&format!(
        "bpftool -j map show pinned {}/maps/DP_NODES",
        t.pin_dir(0).display()
    ));
    assert!(info.contains("\"max_entries\":128"), "{info}");
    clean_after_migration(&t, 0);
    // Every map sized by --max-nodes is: a restart with the same size adopts the pins as they
    // are, with no migration.
    t.stop_agents(0);
    let log = t.spawn_agent(
        0,
        &format!("--cluster {} --max-nodes 128", cluster.display()),
    );
    t.wait_agent(0, &log);
    let text = fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("adopted=true") && !text.contains("building new maps"),
        "{text}"
    );
}

#[test]
fn a_second_agent_waits_for_the_first_and_takes_over() {
    let (mut t, cluster) =
        Topology::two_nodes_running("uptwo", "ipip", "", "--metrics 127.0.0.1:9464");
    let ping = t.flood_ping(0, 1, 6);
    thread::sleep(Duration::from_millis(300));
    let second = t.spawn_agent(
        0,
        &format!("--cluster {} --metrics 127.0.0.1:9465", cluster.display()),
    );
    let waiting = wait_for_text(
        &second,
        "another agent holds this node",
        Duration::from_secs(10),
    );
    assert!(waiting, "the second agent did not wait");
    let ready = t.nodes[0]
        .ns
        .exec("curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:9465/readyz");
    assert_eq!(ready, "503", "the waiting agent said it was ready");
    thread::sleep(Duration::from_millis(500));
    let stopped = SystemTime::now();
    t.stop_agent(0);
    t.wait_agent(0, &second);
    let took_over = SystemTime::now();
    let (sent, received) = t.flood_ping_result(0, 1, ping);
    assert!(sent >= 500, "ping sent only {sent}");
    assert_eq!(sent, received, "packets lost in the hand-over");
    assert!(
        t.ping_spanned(0, 1, stopped, took_over),
        "the ping did not span the hand-over"
    );
    let log = fs::read_to_string(&second).unwrap();
    let took = log
        .find("this one holds the node now")
        .expect("hand-over logged");
    let applied = log.find("cluster state applied").expect("state applied");
    assert!(
        applied > took,
        "the second agent wrote the maps before it held the node:\n{log}"
    );
}

#[test]
fn a_downgrade_is_refused_before_anything_is_touched() {
    let (mut t, cluster) = Topology::two_nodes_running("updown", "ipip", "", "");
    t.stop_agents(0);
    // Pins as a newer agent would leave them: DP_AGENT's first field is the map ABI.
    let pins = t.pin_dir(0);
    let agent_map = pins.join("maps/DP_AGENT");
    t.nodes[0].ns.exec(&format!(
        "bpftool map update pinned {} key 0 0 0 0 value 99 0 0 0 {}",
        agent_map.display(),
        "0 ".repeat(60)
    ));
    let before = t.nodes[0].ns.exec(&format!("ls -R {}", pins.display()));
    let log = t.spawn_agent(0, &format!("--cluster {}", cluster.display()));
    let refused = wait_for_text(&log, "was written with map ABI 99", Duration::from_secs(10));
    let text = fs::read_to_string(&log).unwrap();
    assert!(refused, "no refusal:\n{text}");
    let ours = format!("speaks map ABI {}", maps_common::ABI_VERSION);
    assert!(text.contains(&ours), "{text}");
    assert_eq!(
        t.nodes[0].ns.exec(&format!("ls -R {}", pins.display())),
        before,
        "the refusing agent touched the pins"
    );
    assert_eq!(t.ping(0, 1, 2), 2, "the datapath forwards on");
}

/// CNI pods on BPF host routing, upgraded from map ABI 2 to this build's default under a 5 ms
/// ping: nothing lost; the pod keeps its endpoint and gets the egress hook; its flows then go
/// by netfilter's verdict (a FORWARD rule on node1 applies) and, once accepted, bypass again.
#[test]
fn cni_pods_upgraded_from_map_abi_2_lose_nothing_and_come_under_the_policy() {
    let old = release_bin(ABI2);
    for encap in ["ipip", "vxlan"] {
        let mut t = Topology::with_cni(
            &format!("upcni{encap}"),
            &[10, 11].map(|host| NodeSpec { subnet: 0, host }),
        );
        let cluster = t.write_cluster(&t.cluster_yaml(encap, ""));
        let source = format!("--cluster {} --watch-ms 100", cluster.display());
        for i in 0..2 {
            let log = t.spawn_agent_bin(i, &old, "", &source);
            t.wait_agent(i, &log);
            t.cni_add(i);
        }
        assert_eq!(t.ping(0, 1, 2), 2, "{ABI2} carries the CNI pods' traffic");

        let mut ping = t.flood_ping(0, 1, 6);
        thread::sleep(Duration::from_millis(800));
        t.stop_agents(0);
        t.start_agent(0, &cluster, "");
        assert!(
            ping.try_wait().unwrap().is_none(),
            "the ping ended before the new agent had attached: it did not span the upgrade"
        );
        let (sent, received) = t.flood_ping_result(0, 1, ping);
        assert!(sent >= 600, "ping sent only {sent}");
        assert_eq!(sent, received, "{encap}: packets lost in the upgrade");
        clean_after_migration(&t, 0);
        let veth = t.nodes[0]
            .ns
            .exec("ls /sys/class/net")
            .split_whitespace()
            .find(|n| n.starts_with("veth"))
            .expect("pod1's host-side veth")
            .to_string();
        for hooks in ["links/pods", "links/pods-egress"] {
            let pin = t.pin_dir(0).join(hooks).join(&veth);
            assert!(pin.exists(), "{} missing after the upgrade", pin.display());
        }

        // Under the new default, node1's FORWARD judges pod1's new flows...
        let pod2 = t.nodes[1].pod_ip.clone();
        let rule = format!("FORWARD -d {pod2} -p icmp -j DROP");
        t.nodes[0].ns.exec(&format!("iptables -I {rule}"));
        // The ping flow was accepted before the rule: its next packet is judged once the agent
        // has the ruleset change (asynchronous, within milliseconds).
        let took_effect = (0..10).any(|_| t.ping(0, 1, 1) == 0);
        assert!(
            took_effect,
            "{encap}: node1's FORWARD ignored after the upgrade"
        );
        assert_eq!(
            t.ping(0, 1, 2),
            0,
            "{encap}: node1's FORWARD rule stopped holding"
        );
        t.nodes[0].ns.exec(&format!("iptables -D {rule}"));
        // ...and what it accepts bypasses the stack after the first packets.
        let before = t.counter(0, "host_route_out", "bpf");
        let (sent, got) = t.tcp_transfer(0, 1, 10);
        assert_eq!(sent, got, "{encap}: 10 MiB after the upgrade");
        assert!(t.counter(0, "flow_accepted_out", "flows") > 0);
        let bypassed = t.counter(0, "host_route_out", "bpf") - before;
        assert!(
            bypassed > 100,
            "{encap}: only {bypassed} packets bypassed after the upgrade"
        );
        for i in 0..2 {
            t.cni_del(i);
        }
    }
}

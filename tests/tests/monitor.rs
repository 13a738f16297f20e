//! `datapath monitor`: what happened to a packet. An attacker on the underlay sends crafted
//! tunnel packets at node2's pod; each appears in `monitor --json` with its reason and
//! addresses, the legitimate traffic does not appear among the drops; a 20,000-packet flood
//! leaves the agent, the monitor and pod traffic running, with the rate limit's count
//! reported; a second monitor is refused with the reason.
//!
//! ```text
//!   pod1 ── node1 192.168.1.10 ─┐                  ┌─ node2 192.168.1.11 ── pod2 10.244.1.2
//!                               u0 ── br0 ── u1 ───┘        (TC decap; datapath monitor --json)
//!                                      │
//!                               u9 ── attacker 192.168.1.66 (tests/attack.py send, flood)
//! ```
use std::{fs, path::Path, process::Child, thread, time::Duration};

use integration_tests::{Netns, Topology, datapath_bin, script, sh, wait_for};
use serde_json::Value;

/// An attacker namespace on br0 at 192.168.1.66.
fn attacker(t: &Topology) -> Netns {
    let a = Netns::new(&format!("{}-att", t.prefix));
    sh(&format!(
        "ip link add eth0 netns {} type veth peer name u9 netns {}",
        a.name, t.underlay.name
    ));
    t.underlay.exec("ip link set u9 master br0 up");
    a.exec("ip addr add 192.168.1.66/24 dev eth0 && ip link set eth0 up");
    a
}

/// `datapath monitor` on node `i` with `args`, output to `out`.
fn start_monitor(t: &Topology, i: usize, args: &str, out: &Path) -> Child {
    t.nodes[i].ns.spawn(
        &format!(
            "{} monitor --pin-dir {} {args}",
            datapath_bin().display(),
            t.pin_dir(i).display()
        ),
        out,
    )
}

/// Stops a monitor with SIGTERM (it turns trace sampling off and says what it saw).
fn stop(mut m: Child) {
    let _ = sh(&format!("kill -TERM {} || true", m.id()));
    let _ = m.wait();
}

fn events(out: &Path) -> Vec<Value> {
    fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn find<'a>(evs: &'a [Value], reason: &str) -> Vec<&'a Value> {
    evs.iter().filter(|e| e["reason"] == reason).collect()
}

#[test]
fn hostile_packets_appear_with_their_reason_and_addresses() {
    let (mut t, _) = Topology::two_nodes_running("mon", "vxlan", "", "");
    let att = attacker(&t);
    let out = t.workdir.join("monitor.jsonl");
    let monitor = start_monitor(&t, 1, "--json", &out);
    thread::sleep(Duration::from_millis(500));
    // A second reader would split the events: refused, with the reason.
    let second = t.datapath(
        1,
        &format!("monitor --duration 1 --pin-dir {}", t.pin_dir(1).display()),
    );
    let why = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success() && why.contains("another `datapath monitor` is reading"),
        "a second monitor was not refused: {second:?}"
    );
    assert_eq!(t.ping(0, 1, 3), 3, "pods reach each other");
    let node_mac = t.nodes[1].ns.exec("cat /sys/class/net/eth0/address");
    let log = t.workdir.join("attack.log");
    let attack = att.exec_out(&format!(
        "/usr/bin/python3 {} send eth0 {} 192.168.1.11 192.168.1.10 10.244.1.2 10.244.0.2 4096 4789 2",
        script("attack.py").display(),
        node_mac.trim()
    ));
    fs::write(&log, &attack.stdout).unwrap();
    assert!(attack.status.success(), "attacker failed: {attack:?}");
    assert_eq!(t.ping(0, 1, 3), 3, "pods reach each other after the attack");
    let wanted = [
        "unknown_peer",
        "wrong_vni",
        "inner_src_spoofed",
        "wrong_port",
        "not_for_this_node",
    ];
    let seen = wait_for(Duration::from_secs(5), || {
        let evs = events(&out);
        wanted.iter().all(|r| !find(&evs, r).is_empty())
    });
    stop(monitor);
    let evs = events(&out);
    let text = fs::read_to_string(&out).unwrap_or_default();
    assert!(seen, "not every hostile class was shown:\n{text}");

    let unknown = find(&evs, "unknown_peer");
    assert!(
        unknown.iter().all(|e| e["outer"]["src"] == "192.168.1.66"
            && e["outer"]["dst"] == "192.168.1.11"
            && e["program"] == "tc_decap_ingress"
            && e["iface"] == "eth0"),
        "{unknown:#?}"
    );
    assert!(
        unknown
            .iter()
            .any(|e| e["vni"] == 4096 && e["inner"]["dst"] == "10.244.1.2"),
        "the VXLAN one's VNI and inner header: {unknown:#?}"
    );
    let vni = find(&evs, "wrong_vni");
    assert!(
        vni.iter()
            .all(|e| e["vni"] == 4097 && e["peer"] == "192.168.1.10"),
        "{vni:#?}"
    );
    let spoofed = find(&evs, "inner_src_spoofed");
    assert!(
        spoofed
            .iter()
            .all(|e| ["10.244.1.99", "8.8.8.8"].contains(&e["inner"]["src"].as_str().unwrap_or(""))),
        "{spoofed:#?}"
    );
    let port = find(&evs, "wrong_port");
    assert!(
        port.iter().all(|e| e["outer"]["dport"] == 4790),
        "{port:#?}"
    );
    // Each class once per packet sent (two each; IPIP and VXLAN for two of them).
    for (reason, n) in [
        ("unknown_peer", 4),
        ("wrong_vni", 2),
        ("inner_src_spoofed", 4),
        ("wrong_port", 2),
    ] {
        assert_eq!(find(&evs, reason).len(), n, "{reason}:\n{text}");
    }
    // The legitimate traffic (pings, the admitted control packets) is not among the drops.
    assert!(
        evs.iter().all(|e| e["type"] == "drop"
            && !(e["outer"]["src"] == "192.168.1.10"
                && e["vni"] == 4096
                && e["outer"]["dport"] == 4789
                && e["inner"]["src"] == "10.244.0.2")),
        "legitimate traffic shown as dropped:\n{text}"
    );

    // With the agent stopped, the pinned programs still drop, and a monitor still shows it.
    t.stop_agents(1);
    let out2 = t.workdir.join("monitor-no-agent.jsonl");
    let mut monitor = start_monitor(&t, 1, "--json --count 1 --duration 20", &out2);
    thread::sleep(Duration::from_millis(500));
    let again = att.exec_out(&format!(
        "/usr/bin/python3 {} send eth0 {} 192.168.1.11 192.168.1.10 10.244.1.2 10.244.0.2 4096 4789 1",
        script("attack.py").display(),
        node_mac.trim()
    ));
    assert!(again.status.success(), "attacker failed: {again:?}");
    let _ = monitor.wait();
    let evs = events(&out2);
    assert!(
        evs.len() == 1 && evs[0]["type"] == "drop",
        "no event without the agent: {evs:?}"
    );
}

#[test]
fn a_flood_is_rate_limited_and_leaves_everything_running() {
    let (mut t, _) = Topology::two_nodes_running("monf", "vxlan", "", "");
    let att = attacker(&t);
    let out = t.workdir.join("monitor.jsonl");
    let monitor = start_monitor(&t, 1, "--json --reason unknown_peer", &out);
    thread::sleep(Duration::from_millis(500));
    let node_mac = t.nodes[1].ns.exec("cat /sys/class/net/eth0/address");
    let ping = t.flood_ping(0, 1, 8);
    let flood = att.exec_out(&format!(
        "/usr/bin/python3 {} flood eth0 {} 192.168.1.11 10.244.1.2 4789 20000",
        script("attack.py").display(),
        node_mac.trim()
    ));
    assert!(flood.status.success(), "flood failed: {flood:?}");
    let (sent, received) = t.flood_ping_result(0, 1, ping);
    // The last request may still be in flight at ping's deadline.
    assert!(
        sent > 100 && sent - received <= 1,
        "pod traffic during the flood: {received}/{sent}"
    );

    let stats = t.stats(1);
    let drops = t.drops(1, "unknown_peer");
    assert!(drops >= 20_000, "the flood was not dropped: {drops}");
    let ev = &stats["events"];
    let (shown_by_kernel, limited) = (
        ev["sent"].as_u64().unwrap(),
        ev["limited"].as_u64().unwrap(),
    );
    assert!(
        limited > 10_000 && shown_by_kernel < 10_000,
        "the rate limit did not hold the flood back: {ev}"
    );
    // Agent and monitor still up; the monitor got what the kernel sent.
    let mut monitor = monitor;
    assert!(matches!(monitor.try_wait(), Ok(None)), "the monitor exited");
    assert!(
        t.agents
            .iter_mut()
            .all(|a| matches!(a.child.try_wait(), Ok(None))),
        "an agent exited"
    );
    let got = wait_for(Duration::from_secs(3), || {
        events(&out).len() as u64 >= shown_by_kernel.min(50)
    });
    stop(monitor);
    assert!(got, "the monitor showed {} events", events(&out).len());
    assert_eq!(t.ping(0, 1, 3), 3, "pods reach each other after the flood");
    let text = String::from_utf8_lossy(&flood.stdout);
    println!("{text} limited {limited}, sent {shown_by_kernel}");
}

fn status(t: &Topology, i: usize) -> Value {
    let out = t.datapath(
        i,
        &format!("status --json --pin-dir {}", t.pin_dir(i).display()),
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

#[test]
fn a_peer_whose_tunnel_is_broken_is_named_while_its_underlay_answers() {
    let mut t = Topology::two_nodes("health");
    let shared = t.write_cluster(&t.cluster_yaml("vxlan", ""));
    // node2 reads a file of its own, the same for now.
    let own = t.workdir.join("node2.yaml");
    fs::copy(&shared, &own).unwrap();
    // Probes every 2 s (10 s by default): the changes show sooner.
    t.start_agent(0, &shared, "--health-interval 2");
    t.start_agent(1, &own, "--health-interval 2");
    let healthy = wait_for(Duration::from_secs(25), || {
        status(&t, 0)["health"]["ok"] == 1
    });
    assert!(
        healthy,
        "node2 never answered through the tunnel: {}",
        status(&t, 0)
    );
    let routes = t.routes(0);
    let peer = routes.iter().find(|r| r["node"] == "192.168.1.11").unwrap();
    assert_eq!(peer["health"]["state"], "ok", "{peer}");
    assert!(
        peer["health"]["tunnel_rtt_ms"].as_f64().unwrap() > 0.0,
        "{peer}"
    );

    // node2 changes its VNI; node1's tunnel to it breaks, the underlay does not.
    let text = t.cluster_yaml("vxlan", "vxlan: { vni: 4097 }\n");
    let tmp = t.workdir.join("node2.yaml.tmp");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, &own).unwrap();
    let named = wait_for(Duration::from_secs(25), || {
        status(&t, 0)["health"]["tunnel_down"] == serde_json::json!(["192.168.1.11"])
    });
    let st = status(&t, 0);
    assert!(named, "the broken tunnel is not named: {st}");
    let text = String::from_utf8_lossy(
        &t.datapath(0, &format!("status --pin-dir {}", t.pin_dir(0).display()))
            .stdout,
    )
    .to_string();
    assert!(
        text.contains("unreachable through the tunnel while the underlay answers")
            && text.contains("192.168.1.11"),
        "{text}"
    );
    // The peer's own datapath says why: the probes arrive with the old VNI.
    assert!(t.drops(1, "wrong_vni") > 0);
    // The same VNI again: healthy again.
    fs::copy(&shared, &tmp).unwrap();
    fs::rename(&tmp, &own).unwrap();
    let back = wait_for(Duration::from_secs(25), || {
        status(&t, 0)["health"]["ok"] == 1
    });
    assert!(back, "node2 did not come back: {}", status(&t, 0));
}

#[test]
fn forwarded_packets_are_traced_only_while_a_monitor_asks() {
    let (t, _) = Topology::two_nodes_running("montr", "vxlan", "", "");
    let sent = |t: &Topology| t.stats(1)["events"]["sent"].as_u64().unwrap();
    // Nobody asks: pod traffic writes no event.
    let before = sent(&t);
    assert_eq!(t.ping(0, 1, 5), 5);
    assert_eq!(
        sent(&t),
        before,
        "events written with no monitor asking for traces"
    );

    let out = t.workdir.join("trace.jsonl");
    let mut monitor = start_monitor(
        &t,
        1,
        "--json --type trace --trace-every 1 --pod 10.244.1.2 --count 4 --duration 20",
        &out,
    );
    thread::sleep(Duration::from_millis(500));
    assert_eq!(t.ping(0, 1, 5), 5);
    let _ = monitor.wait();
    let evs = events(&out);
    assert_eq!(evs.len(), 4, "{evs:#?}");
    assert!(
        evs.iter().all(|e| e["type"] == "trace"
            && ["tc_decap_ingress", "tc_encap_egress"].contains(&e["program"].as_str().unwrap())),
        "{evs:#?}"
    );
    assert!(
        evs.iter().any(|e| e["program"] == "tc_decap_ingress"
            && e["vni"] == 4096
            && e["inner"]["src"] == "10.244.0.2"
            && e["inner"]["dst"] == "10.244.1.2"),
        "the decapsulated request with its headers: {evs:#?}"
    );
    // The monitor is gone: sampling is off again.
    let after = sent(&t);
    assert_eq!(t.ping(0, 1, 5), 5);
    assert_eq!(
        sent(&t),
        after,
        "traces still written after the monitor left"
    );
}

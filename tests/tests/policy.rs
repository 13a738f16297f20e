//! The node's NetworkPolicy with the agent's default settings: netfilter's FORWARD verdicts
//! (iptables through its nft back end and iptables-legacy, native nftables) hold for pods made
//! by the real CNI plugins, on the source node and on the destination node, for new flows and
//! for flows established before a rule came; what netfilter accepted still takes BPF host
//! routing after its first packets.
//!
//! ```text
//!  pod1 ═ veth (tc_pod_ingress: accepted flow? encap+redirect : to the stack)
//!    first packets: node1 routing → FORWARD (egress policy) → eth0 tc_encap_egress (accepts)
//!    ──► node2 eth0 TC decap (accepted flow? redirect_peer : to the stack)
//!    first packets: node2 routing → FORWARD (ingress policy) → veth tc_pod_egress (accepts) → pod2
//!  node1 ── eth0 ── u0 ── br0 ── u1 ── eth0 ── node2
//! ```
use std::{
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use integration_tests::{NodeSpec, Topology, traffic_py};

fn pods_with_defaults(tag: &str, encap: &str) -> Topology {
    let mut t = Topology::with_cni(tag, &[10, 11].map(|host| NodeSpec { subnet: 0, host }));
    let cluster = t.write_cluster(&t.cluster_yaml(encap, ""));
    for i in 0..2 {
        t.start_agent(i, &cluster, "");
    }
    for i in 0..2 {
        t.cni_add(i);
    }
    t
}

/// Whether a new TCP connection from pod1 to pod2:`port` is answered.
fn connects(t: &Topology, port: u16) -> bool {
    t.connects(0, &t.nodes[1].pod_ip, port)
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A TCP stream from pod1 to pod2:`port` for 3.5 s, with `rule` run on `node` 1.5 s in and
/// `undo` after; returns the Unix time the rule went in and the times the echoes came back.
fn stream_across(t: &Topology, port: u16, node: usize, rule: &str, undo: &str) -> (f64, Vec<f64>) {
    let log = t.workdir.join(format!("stream-{port}.json"));
    let mut client = t.nodes[0].pod.spawn(
        &format!("{} stream {} {port} 3.5", traffic_py(), t.nodes[1].pod_ip),
        &log,
    );
    thread::sleep(Duration::from_millis(1500));
    let at = now();
    t.nodes[node].ns.exec(rule);
    let status = client.wait().unwrap();
    t.nodes[node].ns.exec(undo);
    assert!(status.success(), "stream client failed: {status}");
    let echoes: Vec<f64> = serde_json::from_str(
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .last()
            .unwrap_or("[]"),
    )
    .unwrap();
    assert!(
        echoes.first().is_some_and(|e| *e < at),
        "the stream carried nothing before the rule: {echoes:?}"
    );
    (at, echoes)
}

fn policy(encap: &str) {
    let t = pods_with_defaults(&format!("pol{encap}"), encap);
    let pod1 = t.nodes[0].pod_ip.clone();
    let pod2 = t.nodes[1].pod_ip.clone();
    // What every node under kube-proxy carries: conntrack on, INVALID packets dropped.
    for n in &t.nodes {
        n.ns.exec("iptables -A FORWARD -m conntrack --ctstate INVALID -j DROP");
    }
    let mut servers = t.echo_servers(1, &[8080, 8083], 60);
    assert!(connects(&t, 8080) && connects(&t, 8083), "no policy yet");

    // Ingress policy on the destination node, iptables (Debian's default: the nft back end).
    let drop_new_8080 = format!("-d {pod2} -p tcp --dport 8080 -m conntrack --ctstate NEW -j DROP");
    t.nodes[1]
        .ns
        .exec(&format!("iptables -I FORWARD {drop_new_8080}"));
    assert!(
        !connects(&t, 8080),
        "iptables FORWARD drop on node2 ignored"
    );
    let (before_out, before_in) = (
        t.counter(0, "host_route_out", "bpf"),
        t.counter(1, "host_route_in", "bpf"),
    );
    let (sent, got) = t.tcp_transfer(0, 1, 10);
    assert!(sent.ends_with(" 10485760"), "sender printed {sent:?}");
    assert_eq!(sent, got, "10 MiB to an allowed port");
    // The accepted flow took the fast path after its first packets, both ways.
    let bypassed_out = t.counter(0, "host_route_out", "bpf") - before_out;
    let bypassed_in = t.counter(1, "host_route_in", "bpf") - before_in;
    assert!(
        bypassed_out > 100 && bypassed_in > 100,
        "accepted flow not on the fast path: out {bypassed_out}, in {bypassed_in}"
    );
    assert!(t.counter(0, "flow_accepted_out", "flows") > 0);
    assert!(t.counter(1, "flow_accepted_in", "flows") > 0);
    let verified = t.counter(0, "flow_verify_out", "stack");
    assert!(
        verified < bypassed_out / 10,
        "too many packets judged by the stack: {verified} against {bypassed_out} bypassed"
    );
    t.nodes[1]
        .ns
        .exec(&format!("iptables -D FORWARD {drop_new_8080}"));
    assert!(
        connects(&t, 8080),
        "rule removed, new connections must pass"
    );

    // The same in a native nftables table with a forward hook.
    t.nodes[1].ns.exec(&format!(
        "nft add table inet policytest && nft add chain inet policytest pol '{{ type filter hook forward priority 0 ; }}' && nft add rule inet policytest pol ip daddr {pod2} tcp dport 8080 ct state new drop"
    ));
    assert!(
        !connects(&t, 8080),
        "nftables forward drop on node2 ignored"
    );
    assert!(connects(&t, 8083), "another port stays open");
    t.nodes[1].ns.exec("nft delete table inet policytest");
    assert!(
        connects(&t, 8080),
        "table removed, new connections must pass"
    );

    // Egress policy on the source node.
    let egress = format!("-s {pod1} -p tcp --dport 8083 -m conntrack --ctstate NEW -j DROP");
    t.nodes[0].ns.exec(&format!("iptables -I FORWARD {egress}"));
    assert!(!connects(&t, 8083), "egress drop on node1 ignored");
    assert!(connects(&t, 8080), "egress rule for 8083 only");
    t.nodes[0].ns.exec(&format!("iptables -D FORWARD {egress}"));
    assert!(connects(&t, 8083));

    // An established flow meets a rule as netfilter would decide it: a NEW-only rule leaves
    // it running, a rule on every packet stops it within a second; iptables-legacy too.
    let (at, echoes) = stream_across(
        &t,
        8080,
        1,
        &format!("iptables -I FORWARD {drop_new_8080}"),
        &format!("iptables -D FORWARD {drop_new_8080}"),
    );
    // An echo every 50 ms: some 20 in the second after the first one.
    let after = echoes.iter().filter(|e| **e > at + 1.0).count();
    assert!(
        after > 10,
        "NEW-only rule stalled an established flow: {after} echoes after it"
    );
    for (node, tool) in [(1, "iptables"), (0, "iptables-legacy")] {
        let all = format!("-s {pod1} -d {pod2} -p tcp --dport 8083 -j DROP");
        let (at, echoes) = stream_across(
            &t,
            8083,
            node,
            &format!("{tool} -I FORWARD {all}"),
            &format!("{tool} -D FORWARD {all}"),
        );
        let late: Vec<f64> = echoes.iter().map(|e| e - at).filter(|d| *d > 1.0).collect();
        assert!(
            late.is_empty(),
            "{tool} drop on node{} let an established flow through: echoes at {late:?} s after the rule",
            node + 1
        );
        assert!(
            connects(&t, 8083),
            "{tool} rule removed, new connections must pass"
        );
    }
    for s in &mut servers {
        let _ = s.kill();
        let _ = s.wait();
    }
    for i in 0..2 {
        t.cni_del(i);
    }
}

#[test]
fn networkpolicy_in_netfilter_holds_with_default_settings_ipip() {
    policy("ipip");
}

#[test]
fn networkpolicy_in_netfilter_holds_with_default_settings_vxlan() {
    policy("vxlan");
}

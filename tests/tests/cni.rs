//! Pods plugged in the way a container runtime plugs them: each plugin of the agent's
//! `05-datapath.conflist` (ptp with host-local IPAM, this project's plugin, portmap) run in
//! order by `tests/cni.py` per the CNI spec, on two nodes; then pod-to-pod traffic with BPF
//! host routing and with the kernel's, a Service through kube-proxy-style NAT, and DEL.
//!
//! ```text
//!  pod1 eth0 10.244.0.x ═ vethA (tc_pod_ingress)             pod2 eth0 10.244.1.x ═ vethB
//!     bpf:    vethA ingress: encap, FIB → redirect to eth0 ──► node2 eth0 TC decap
//!             ──► bpf_redirect_peer into pod2 (unless the flow left node2 through its stack)
//!     kernel: vethA → node1 routing (aggregate route) → eth0 TC egress encap ──► node2 eth0
//!             TC decap → node2 routing (/32 via vethB) → pod2
//!  node1 ── eth0 ── u0 ── br0 ── u1 ── eth0 ── node2       (capture on u0)
//! ```
use std::fs;

use integration_tests::{NodeSpec, Topology, snmp, wire_captures, wire_check};

fn pods_on_two_nodes(tag: &str, encap: &str, routing: &str) -> Topology {
    let mut t = Topology::with_cni(tag, &[10, 11].map(|host| NodeSpec { subnet: 0, host }));
    let cluster = t.write_cluster(&t.cluster_yaml(encap, ""));
    for i in 0..2 {
        t.start_agent(i, &cluster, &format!("--host-routing {routing}"));
    }
    for i in 0..2 {
        t.cni_add(i);
    }
    t
}

/// IPv4 datagrams the node's stack forwarded.
fn forwarded(t: &Topology, i: usize) -> u64 {
    snmp(&t.nodes[i].ns, "Ip", "ForwDatagrams")
}

fn endpoints(t: &Topology, i: usize) -> serde_json::Value {
    let out = t.datapath(
        i,
        &format!("endpoints --json --pin-dir {}", t.pin_dir(i).display()),
    );
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn conflist_is_the_nodes(t: &Topology, i: usize, mtu: u64) {
    let path = t.cni_dir(i).join("net.d/05-datapath.conflist");
    let list: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    let types: Vec<&str> = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["ptp", "datapath", "portmap"], "{list}");
    let ptp = &list["plugins"][0];
    assert_eq!(ptp["mtu"], mtu, "{list}");
    assert_eq!(
        ptp["ipam"]["ranges"][0][0]["subnet"], t.nodes[i].pod_cidr,
        "{list}"
    );
    let log = fs::read_to_string(&t.agents[i].log).unwrap();
    assert!(
        log.contains(&format!("pod MTU for this mode is {mtu}")),
        "{log}"
    );
}

fn carry(encap: &str, routing: &str) {
    let t = pods_on_two_nodes(&format!("cni{encap}{routing}"), encap, routing);
    let mtu = if encap == "ipip" { 1480 } else { 1450 };
    for i in 0..2 {
        conflist_is_the_nodes(&t, i, mtu);
        assert!(
            t.nodes[i].pod_ip.starts_with(&format!("10.244.{i}.")),
            "pod address {} outside node{}'s pod CIDR",
            t.nodes[i].pod_ip,
            i + 1
        );
        let pod_mtu = t.nodes[i].pod.exec("cat /sys/class/net/eth0/mtu");
        assert_eq!(pod_mtu.trim(), mtu.to_string());
        assert_eq!(endpoints(&t, i)[0]["pod_ip"], t.nodes[i].pod_ip);
    }
    assert_eq!(t.ping(0, 1, 3), 3, "pod1 -> pod2 over {encap}, {routing}");
    assert_eq!(t.ping(1, 0, 3), 3, "pod2 -> pod1 over {encap}, {routing}");

    let (ul, pod) = wire_captures(&t, encap);
    let before = [forwarded(&t, 0), forwarded(&t, 1)];
    assert_eq!(t.udp_exchange(0, 1, 100), 100);
    let (sent, got) = t.tcp_transfer(0, 1, 50);
    assert!(sent.ends_with(" 52428800"), "sender printed {sent:?}");
    assert_eq!(sent, got, "50 MiB over TCP pod1 -> pod2");
    let fwd = [forwarded(&t, 0) - before[0], forwarded(&t, 1) - before[1]];
    let (ul, pod) = (ul.stop(), pod.stop());
    wire_check(encap, &pod, &ul, "");

    let out = t.counter(0, "host_route_out", "bpf");
    let delivered = t.counter(1, "host_route_in", "bpf");
    if routing != "kernel" {
        // Neither host's stack forwards pod-to-pod packets (a stray ARP-time packet may), but
        // with accepted flows the first packets of each flow and TCP's SYN and FIN, for
        // netfilter's verdict.
        let most = if routing == "bpf" { 20 } else { 60 };
        assert!(
            fwd[0] < most && fwd[1] < most,
            "forwarded by the hosts: {fwd:?}"
        );
        assert!(
            out > 500 && delivered > 500,
            "bypass: out {out}, in {delivered}"
        );
    } else {
        assert!(
            fwd[0] > 1000 && fwd[1] > 1000,
            "forwarded by the hosts: {fwd:?}"
        );
        assert_eq!((out, delivered), (0, 0));
    }

    for i in 0..2 {
        let ip = t.nodes[i].pod_ip.clone();
        t.cni_del(i);
        let links = t.nodes[i].ns.exec("ip -o link show");
        assert!(
            !links.contains(": veth"),
            "veth left on node{}: {links}",
            i + 1
        );
        let routes = t.nodes[i].ns.exec("ip route show");
        assert!(!routes.contains(&ip), "route to {ip} left: {routes}");
        assert_eq!(endpoints(&t, i), serde_json::json!([]), "endpoint left");
        let leases = t.cni_dir(i).join("ipam/datapath").join(&ip);
        assert!(!leases.exists(), "IP lease {} left", leases.display());
        let pod_links = t.pin_dir(i).join("links/pods");
        let left = fs::read_dir(&pod_links).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0, "pod link pins left in {}", pod_links.display());
    }
}

#[test]
fn cni_pods_ipip_bpf_host_routing() {
    carry("ipip", "bpf");
}

#[test]
fn cni_pods_vxlan_bpf_host_routing() {
    carry("vxlan", "bpf");
}

#[test]
fn cni_pods_ipip_default_accepted_flows() {
    carry("ipip", "accepted-flows");
}

#[test]
fn cni_pods_vxlan_default_accepted_flows() {
    carry("vxlan", "accepted-flows");
}

#[test]
fn cni_pods_ipip_kernel_host_routing() {
    carry("ipip", "kernel");
}

#[test]
fn cni_pods_vxlan_kernel_host_routing() {
    carry("vxlan", "kernel");
}

#[test]
fn a_cluster_ip_service_answers_through_kube_proxy_nat_with_bpf_host_routing() {
    cluster_ip_service("bpf");
}

#[test]
fn a_cluster_ip_service_answers_through_kube_proxy_nat_with_default_settings() {
    cluster_ip_service("accepted-flows");
}

fn cluster_ip_service(routing: &str) {
    let t = pods_on_two_nodes(&format!("cnisvc{}", &routing[..3]), "vxlan", routing);
    // What kube-proxy's iptables mode programs for a ClusterIP on the client's node.
    t.nodes[0].ns.exec(&format!(
        "iptables -t nat -A PREROUTING -d 10.96.0.10/32 -p tcp --dport 80 -j DNAT --to-destination {}:5001",
        t.nodes[1].pod_ip
    ));
    let (sent, got) = t.tcp_transfer_via(0, 1, "10.96.0.10", 80, 20);
    assert!(sent.ends_with(" 20971520"), "sender printed {sent:?}");
    assert_eq!(sent, got, "20 MiB through the Service");
    let nat = t.nodes[0].ns.exec("iptables -t nat -L PREROUTING -v -n -x");
    assert!(
        nat.lines()
            .any(|l| l.contains("10.96.0.10") && !l.trim_start().starts_with('0')),
        "the DNAT rule saw nothing: {nat}"
    );
    // Pod-to-pod still bypasses, and the node itself reaches the remote pod.
    assert_eq!(t.ping(0, 1, 3), 3);
    assert!(t.counter(0, "host_route_out", "bpf") > 0);
    let ping = t.nodes[0]
        .ns
        .exec_out(&format!("ping -c 3 -i 0.2 -W 1 {}", t.nodes[1].pod_ip));
    assert!(ping.status.success(), "node1 -> pod2: {ping:?}");
    for i in 0..2 {
        t.cni_del(i);
    }
}

/// A pod's hostPort, as kubelet asks for it: the runtime hands `portmap` the pod's port
/// mappings (`runtimeConfig.portMappings`), and `portmap` DNATs node2's address to the pod.
/// With default settings, pod1 and node1 both reach pod2 through node2:8080, a NAT the host's
/// stack applies and undoes (its replies take the stack, not the bypass); DEL removes the rules.
#[test]
fn a_host_port_reaches_its_pod_through_portmap_with_default_settings() {
    let mut t = Topology::with_cni(
        "cnihostport",
        &[10, 11].map(|host| NodeSpec { subnet: 0, host }),
    );
    let cluster = t.write_cluster(&t.cluster_yaml("vxlan", ""));
    for i in 0..2 {
        t.start_agent(i, &cluster, "");
    }
    t.cni_add(0);
    t.cni_add_with(
        1,
        r#"{"portMappings": [{"hostPort": 8080, "containerPort": 5001, "protocol": "tcp"}]}"#,
    );
    let node2 = t.nodes[1].addr.clone();
    let (sent, got) = t.tcp_transfer_via(0, 1, &node2, 8080, 10);
    assert!(sent.ends_with(" 10485760"), "sender printed {sent:?}");
    assert_eq!(sent, got, "10 MiB from pod1 through node2's hostPort 8080");
    let nat = t.nodes[1].ns.exec("iptables -t nat -S");
    assert!(
        nat.contains("--dport 8080") && nat.contains(&t.nodes[1].pod_ip),
        "portmap programmed no DNAT toward pod2: {nat}"
    );
    // Pod-to-pod traffic keeps its bypass beside the hostPort's NAT.
    assert_eq!(t.ping(0, 1, 3), 3);
    for i in 0..2 {
        t.cni_del(i);
    }
    let nat = t.nodes[1].ns.exec("iptables -t nat -S");
    assert!(!nat.contains("--dport 8080"), "portmap's rules left: {nat}");
}

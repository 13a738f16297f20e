//! The default host routing (`accepted-flows`) through BPF_PROG_TEST_RUN, exact bytes: a flow's
//! packets take the host's stack until the program on the far side of netfilter has seen one
//! forwarded, then bypass it with exactly the bytes the stack's path would have sent; TCP's
//! SYN, FIN and RST and every packet after a ruleset change go to the stack again.
//!
//! ```text
//!   out: pod veth tc_pod_ingress ─(to the stack: TC_ACT_OK, unchanged)─► [FORWARD] ─►
//!        underlay tc_encap_egress (encapsulates; marks the flow accepted)
//!        then: pod veth tc_pod_ingress encapsulates itself (the same bytes)
//!   in:  underlay tc_decap_ingress ─(decapsulated, to the stack)─► [FORWARD] ─►
//!        pod veth tc_pod_egress (marks the flow accepted)
//!        then: tc_decap_ingress delivers into the pod itself (bpf_redirect_peer)
//! ```
use datapath_user::reconcile::dataplane::HostRouting;
use integration_tests::progtest::*;
use maps_common::{CounterId, Endpoint, ROUTE_NEXTHOP_MAC, prog_names};

/// `TC_ACT_REDIRECT`: what `bpf_redirect_peer` makes a TC program return.
const TC_ACT_REDIRECT: u32 = 7;
/// TCP flags of a segment of an established flow (ACK), and of its first (SYN).
const ACK: u8 = 0x10;
const SYN: u8 = 0x02;
/// MACs of pod1's interface and of its host-side veth.
const POD1_MAC: [u8; 6] = [0x0a, 0x58, 10, 244, 0, 2];
const VETH1_MAC: [u8; 6] = [0x0a, 0x58, 10, 244, 0, 1];

/// An IPv4 TCP segment `src` → `dst` on port 8080 with `flags` and `ttl`.
fn segment(src: [u8; 4], dst: [u8; 4], flags: u8, ttl: u8) -> Vec<u8> {
    let mut seg = tcp(40000, 8080, b"0123456789abcdef");
    seg[13] = flags;
    ipv4(
        &Ip {
            tos: 0,
            id: 7,
            df: true,
            ttl,
            proto: 6,
            src,
            dst,
        },
        &seg,
    )
}

/// pod1's packet at its veth, as pod1 sent it.
fn from_pod1(flags: u8) -> Vec<u8> {
    eth(VETH1_MAC, POD1_MAC, 0x0800, &segment(POD1, POD2, flags, 64))
}

/// The same packet at the underlay's egress after the host forwarded it: TTL lowered, routed
/// through the agent's aggregate route.
fn forwarded_by_node1(flags: u8) -> Vec<u8> {
    eth(
        ROUTE_NEXTHOP_MAC,
        NODE_MAC,
        0x0800,
        &segment(POD1, POD2, flags, 63),
    )
}

fn pod_egress_bypasses_only_accepted_flows(encap: &str) {
    let env = Env::routed(encap, "", HostRouting::AcceptedFlows);
    let verify = |flags| {
        let (action, out) = env.run_tc(prog_names::TC_POD_INGRESS, &from_pod1(flags));
        assert_eq!(
            action, TC_ACT_OK,
            "{encap}: a packet for a verdict goes to the stack"
        );
        assert_bytes(
            &format!("{encap}: handed to the stack unchanged"),
            &out,
            &from_pod1(flags),
        );
    };
    // A new flow: its packets take the stack until netfilter has forwarded one.
    verify(ACK);
    verify(ACK);
    assert_eq!(env.counter(CounterId::FlowVerifyOut), 2);
    assert_eq!(env.counter(CounterId::HostRouteOut), 0);
    // Netfilter forwarded it: the underlay's egress encapsulates and accepts the flow.
    let (action, via_stack) = env.run_tc(prog_names::TC_ENCAP_EGRESS, &forwarded_by_node1(ACK));
    assert_eq!(action, TC_ACT_OK, "{encap}: encapsulated on the underlay");
    assert_eq!(env.counter(CounterId::FlowAcceptedOut), 1);
    // From now on the pod's veth sends it itself, byte for byte what the stack's path sent.
    let (action, bypassed) = env.run_tc(prog_names::TC_POD_INGRESS, &from_pod1(ACK));
    assert_eq!(
        action, TC_ACT_OK,
        "{encap}: sent on ul0 (the context's interface)"
    );
    assert_bytes(
        &format!("{encap}: the bypass's output"),
        &bypassed,
        &via_stack,
    );
    assert_eq!(env.counter(CounterId::HostRouteOut), 1);
    // A SYN of the same flow goes to the stack all the same: conntrack must see it.
    verify(SYN);
    // So does every packet after a ruleset change, until the far side accepts it again.
    let mut env = env;
    env.dp.bump_ruleset_gen().expect("new ruleset generation");
    let (action, out) = env.run_tc(prog_names::TC_POD_INGRESS, &from_pod1(ACK));
    assert_eq!(
        (action, out),
        (TC_ACT_OK, from_pod1(ACK)),
        "{encap}: judged again"
    );
    assert_eq!(env.counter(CounterId::HostRouteOut), 1);
}

#[test]
fn pod_egress_bypasses_only_flows_netfilter_accepted_ipip() {
    pod_egress_bypasses_only_accepted_flows("ipip");
}

#[test]
fn pod_egress_bypasses_only_flows_netfilter_accepted_vxlan() {
    pod_egress_bypasses_only_accepted_flows("vxlan");
}

/// With `bpf` the same first packet is encapsulated at once: the contrast the default makes.
#[test]
fn bpf_host_routing_bypasses_from_the_first_packet() {
    let env = Env::routed("ipip", "", HostRouting::Bpf);
    let (action, out) = env.run_tc(prog_names::TC_POD_INGRESS, &from_pod1(SYN));
    assert_eq!(action, TC_ACT_OK);
    assert_eq!(out.len(), from_pod1(SYN).len() + 20, "encapsulated at once");
    assert_eq!(env.counter(CounterId::FlowVerifyOut), 0);
}

/// Records pod1 behind its veth, as the CNI plugin does.
fn record_pod1(env: &mut Env) {
    let ep = Endpoint {
        ifindex: env.ifindex,
        pod_mac: POD1_MAC,
        host_mac: VETH1_MAC,
    };
    env.dp
        .maps
        .endpoints
        .insert(POD1, ep, 0)
        .expect("pod1 as the CNI plugin records it");
}

fn delivery_waits_for_the_verdict(encap: &str) {
    let mut env = Env::routed(encap, "", HostRouting::AcceptedFlows);
    record_pod1(&mut env);
    let tunnel = from_peer(encap == "vxlan", &segment(POD2, POD1, ACK, 64), 4096, PEER);
    // First: decapsulated and handed to the stack, for node1's FORWARD.
    let (action, decapsulated) = env.run_tc(prog_names::TC_DECAP_INGRESS, &tunnel);
    assert_eq!(action, TC_ACT_OK, "{encap}: to the stack for a verdict");
    assert_eq!(
        &decapsulated[14..],
        &segment(POD2, POD1, ACK, 64)[..],
        "{encap}: the inner packet, untouched"
    );
    assert_eq!(env.counter(CounterId::FlowVerifyIn), 1);
    // The stack forwarded it to pod1's veth: the veth's egress accepts the flow.
    let to_pod = eth(POD1_MAC, VETH1_MAC, 0x0800, &segment(POD2, POD1, ACK, 63));
    let (action, out) = env.run_tc(prog_names::TC_POD_EGRESS, &to_pod);
    assert_eq!(
        (action, &out),
        (TC_ACT_OK, &to_pod),
        "{encap}: the veth's egress only looks"
    );
    assert_eq!(env.counter(CounterId::FlowAcceptedIn), 1);
    // Then: delivered into the pod straight away, as the host would have delivered it.
    let (action, delivered) = env.run_tc(prog_names::TC_DECAP_INGRESS, &tunnel);
    assert_eq!(
        action, TC_ACT_REDIRECT,
        "{encap}: bpf_redirect_peer into pod1"
    );
    assert_bytes(&format!("{encap}: delivered"), &delivered, &to_pod);
    assert_eq!(env.counter(CounterId::HostRouteIn), 1);
}

#[test]
fn delivery_into_the_pod_waits_for_netfilters_verdict_ipip() {
    delivery_waits_for_the_verdict("ipip");
}

#[test]
fn delivery_into_the_pod_waits_for_netfilters_verdict_vxlan() {
    delivery_waits_for_the_verdict("vxlan");
}

/// A same-subnet peer under crossSubnet (or any natively reached peer: `encapsulation: none`):
/// the flow takes the stack until netfilter forwarded one packet, then leaves pod1's veth with
/// exactly the bytes the stack sent: no header, the peer's MAC, TTL lowered.
#[test]
fn native_peer_flow_bypasses_once_accepted() {
    let env = Env::routed("vxlan", "crossSubnet: true\n", HostRouting::AcceptedFlows);
    let (action, out) = env.run_tc(prog_names::TC_POD_INGRESS, &from_pod1(ACK));
    assert_eq!(
        (action, &out),
        (TC_ACT_OK, &from_pod1(ACK)),
        "to the stack first"
    );
    assert_eq!(env.counter(CounterId::FlowVerifyOut), 1);
    // The stack routed it by the peer's own route (next hop node2) to the underlay.
    let forwarded = eth(PEER_MAC, NODE_MAC, 0x0800, &segment(POD1, POD2, ACK, 63));
    let (action, out) = env.run_tc(prog_names::TC_ENCAP_EGRESS, &forwarded);
    assert_eq!((action, &out), (TC_ACT_OK, &forwarded), "sent on as it is");
    assert_eq!(env.counter(CounterId::FlowAcceptedOut), 1);
    // Then the veth's program sends it itself, the same bytes.
    let (_, out) = env.run_tc(prog_names::TC_POD_INGRESS, &from_pod1(ACK));
    assert_bytes("native bypass", &out, &forwarded);
    assert_eq!(env.counter(CounterId::HostRouteOut), 1);
    assert_eq!(env.counter(CounterId::NativeForward), 2);
}

/// Natively routed packets for a recorded pod: from a natively reached peer's pods straight
/// into the pod (`bpf` host routing: no verdict to wait for); from anywhere else (a host
/// outside the cluster, a peer reached through a tunnel) to the host's stack, untouched.
#[test]
fn native_packets_from_peer_pods_go_straight_in_others_take_the_stack() {
    let mut env = Env::routed("vxlan", "crossSubnet: true\n", HostRouting::Bpf);
    record_pod1(&mut env);
    let native = eth(NODE_MAC, PEER_MAC, 0x0800, &segment(POD2, POD1, ACK, 63));
    let (action, out) = env.run_tc(prog_names::TC_DECAP_INGRESS, &native);
    assert_eq!(action, TC_ACT_REDIRECT, "bpf_redirect_peer into pod1");
    let to_pod = eth(POD1_MAC, VETH1_MAC, 0x0800, &segment(POD2, POD1, ACK, 62));
    assert_bytes("delivered", &out, &to_pod);
    assert_eq!(env.counter(CounterId::HostRouteIn), 1);
    let outsider = eth(
        NODE_MAC,
        PEER_MAC,
        0x0800,
        &segment([192, 168, 3, 10], POD1, ACK, 63),
    );
    let (action, out) = env.run_tc(prog_names::TC_DECAP_INGRESS, &outsider);
    assert_eq!(
        (action, &out),
        (TC_ACT_OK, &outsider),
        "outside the cluster: the stack"
    );
    assert_eq!(env.counter(CounterId::HostRouteIn), 1);
}

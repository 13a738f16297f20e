//! Each kernel program run through BPF_PROG_TEST_RUN: exact input, expected action, exact
//! expected output bytes.
//!
//! ```text
//!   test thread ── setns ──► netns: ul0 192.168.1.10/24 mac 02:00:00:00:00:0a (veth to ul1)
//!                                   neighbour 192.168.1.11 lladdr 02:00:00:00:00:0b PERMANENT
//!   program input:  eth | IPv4 10.244.0.2 → 10.244.1.2 | TCP/UDP/ICMP        (encap)
//!                   eth | outer IPv4 192.168.1.11 → .10 | [UDP|VXLAN|eth] | inner   (decap)
//! ```
//! The FIB and neighbour lookups of the encap program resolve in that namespace, so the output
//! MACs are known. The only byte not fixed in advance is VXLAN's UDP source port: it comes from
//! the skb's hash where it has one, else from a hash of the inner flow; it is checked to lie in
//! the Linux VXLAN device's range and to be stable for a flow.
use integration_tests::progtest::*;
use maps_common::{DropReason, prog_names};

#[test]
fn ipip_encap_of_tcp_udp_icmp_is_exact() {
    let env = Env::new("ipip");
    for (proto, inner) in inner_packets() {
        let input = eth(NODE_MAC, NODE_MAC, 0x0800, &inner);
        let (action, out) = env.run_tc(prog_names::TC_ENCAP_EGRESS, &input);
        assert_eq!(action, TC_ACT_OK, "{proto}: action");
        let want = eth(
            PEER_MAC,
            NODE_MAC,
            0x0800,
            &ipv4(&outer_ip(&inner, 4), &inner),
        );
        assert_bytes(&format!("ipip encap of {proto}"), &out, &want);
        assert_eq!(
            out.len(),
            input.len() + 20,
            "{proto}: IPIP adds exactly 20 bytes"
        );
    }
}

#[test]
fn vxlan_encap_of_tcp_udp_icmp_is_exact() {
    let env = Env::new("vxlan");
    for (proto, inner) in inner_packets() {
        let input = eth(NODE_MAC, NODE_MAC, 0x0800, &inner);
        let (out, sport) = vxlan_encapsulated(&env, proto, &input, 50);
        let inner_frame = eth(PEER_VTEP, NODE_VTEP, 0x0800, &inner);
        let payload = [udp(sport, 4789, &[vxlan_hdr(4096), inner_frame].concat())].concat();
        let want = eth(
            PEER_MAC,
            NODE_MAC,
            0x0800,
            &ipv4(&outer_ip(&inner, 17), &payload),
        );
        assert_bytes(&format!("vxlan encap of {proto}"), &out, &want);
    }
}

/// `input` through `tc_encap_egress`, which must pass it on with `overhead` bytes of VXLAN in
/// front and a source port in the Linux VXLAN device's range, the same on a second run (one
/// flow, one port). Returns the output and that port.
fn vxlan_encapsulated(env: &Env, proto: &str, input: &[u8], overhead: usize) -> (Vec<u8>, u16) {
    let (action, out) = env.run_tc(prog_names::TC_ENCAP_EGRESS, input);
    assert_eq!(action, TC_ACT_OK, "{proto}: action");
    assert_eq!(
        out.len(),
        input.len() + overhead,
        "{proto}: VXLAN adds exactly {overhead} bytes"
    );
    // The UDP header follows the outer IP header (20 bytes for IPv4, 40 for IPv6).
    let at = 14 + overhead - 30;
    let sport = u16::from_be_bytes([out[at], out[at + 1]]);
    assert!(
        (32768..61000).contains(&sport),
        "{proto}: source port {sport} outside the Linux VXLAN range"
    );
    let (_, again) = env.run_tc(prog_names::TC_ENCAP_EGRESS, input);
    assert_eq!(
        &again[at..at + 2],
        &out[at..at + 2],
        "{proto}: source port not stable for a flow"
    );
    (out, sport)
}

#[test]
fn decap_at_xdp_and_tc_is_exact() {
    for mode in ["ipip", "vxlan"] {
        let env = Env::new(mode);
        for (proto, inner) in reply_packets() {
            let input = from_peer(mode == "vxlan", &inner, 4096, PEER);
            let want = eth(NODE_MAC, PEER_MAC, 0x0800, &inner);
            let (action, out) = env.run_xdp(&input);
            assert_eq!(action, XDP_PASS, "{mode}/{proto}: xdp action");
            assert_bytes(&format!("xdp decap {mode}/{proto}"), &out, &want);
            let (action, out) = env.run_tc(prog_names::TC_DECAP_INGRESS, &input);
            assert_eq!(action, TC_ACT_OK, "{mode}/{proto}: tc action");
            assert_bytes(&format!("tc decap {mode}/{proto}"), &out, &want);
        }
    }
}

/// A plain UDP/53 frame from `src` to `dst`, sent by `src_mac` to node1.
fn dns_frame(src_mac: [u8; 6], src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let ip = Ip {
        tos: 0,
        id: 9,
        df: false,
        ttl: 64,
        proto: 17,
        src,
        dst,
    };
    eth(
        NODE_MAC,
        src_mac,
        0x0800,
        &ipv4(&ip, &udp(1234, 53, b"dns")),
    )
}

#[test]
fn traffic_that_is_not_ours_passes_unchanged() {
    let env = Env::new("vxlan");
    let arp = eth([0xff; 6], PEER_MAC, 0x0806, &[0u8; 28]);
    let ipv6 = eth(NODE_MAC, PEER_MAC, 0x86dd, &[0x60; 48]);
    let other_udp = dns_frame(PEER_MAC, PEER, NODE);
    let not_a_pod = dns_frame(NODE_MAC, POD1, [8, 8, 8, 8]);
    let local_pod = {
        let (_, mut p) = inner_packets().remove(1);
        p[16..20].copy_from_slice(&[10, 244, 0, 9]);
        eth(NODE_MAC, NODE_MAC, 0x0800, &p)
    };
    // XDP sees frames as the wire delivers them, cut anywhere; the kernel refuses such input
    // for skb programs (the stack would not build that skb either).
    let short = eth(NODE_MAC, PEER_MAC, 0x0800, &[0x45, 0, 0]);
    let (a, out) = env.run_xdp(&short);
    assert_eq!(a, XDP_PASS, "xdp IPv4 cut after 3 bytes");
    assert_bytes("xdp IPv4 cut after 3 bytes", &out, &short);
    for (what, pkt) in [
        ("arp", &arp),
        ("ipv6", &ipv6),
        ("udp to another port", &other_udp),
        ("not a pod destination", &not_a_pod),
        ("this node's own pod", &local_pod),
    ] {
        let (a, out) = env.run_xdp(pkt);
        assert_eq!(a, XDP_PASS, "xdp {what}");
        assert_bytes(&format!("xdp {what}"), &out, pkt);
        for prog in [prog_names::TC_DECAP_INGRESS, prog_names::TC_ENCAP_EGRESS] {
            let (a, out) = env.run_tc(prog, pkt);
            assert_eq!(a, TC_ACT_OK, "{prog} {what}");
            assert_bytes(&format!("{prog} {what}"), &out, pkt);
        }
    }
}

#[test]
fn decap_refuses_what_is_not_allowed_and_counts_why() {
    let env = Env::new("vxlan");
    let (_, inner) = reply_packets().remove(0);
    let mut spoofed = inner.clone();
    spoofed[12..16].copy_from_slice(&[10, 244, 0, 66]); // claims to be a pod of node1
    spoofed[10..12].copy_from_slice(&[0, 0]);
    let c = csum(&spoofed[..20]);
    spoofed[10..12].copy_from_slice(&c);
    let cases = [
        (
            "unknown source node",
            from_peer(true, &inner, 4096, [192, 168, 1, 99]),
            DropReason::UnknownPeer,
        ),
        (
            "wrong VNI",
            from_peer(true, &inner, 1, PEER),
            DropReason::WrongVni,
        ),
        (
            "spoofed inner source",
            from_peer(true, &spoofed, 4096, PEER),
            DropReason::InnerSrcSpoofed,
        ),
        (
            "truncated VXLAN",
            from_peer(true, &inner, 4096, PEER)[..46].to_vec(),
            DropReason::Truncated,
        ),
    ];
    for (what, pkt, reason) in cases {
        let before = env.drops(reason);
        let (a, _) = env.run_xdp(&pkt);
        assert_eq!(a, XDP_DROP, "xdp {what}");
        let (a, _) = env.run_tc(prog_names::TC_DECAP_INGRESS, &pkt);
        assert_eq!(a, TC_ACT_SHOT, "tc {what}");
        assert_eq!(
            env.drops(reason),
            before + 2,
            "{what}: counted under {reason:?}"
        );
    }
}

/// Fills in the TCP or UDP checksum of an IPv4 packet (as the sending stack would).
fn with_l4_checksum(mut ip: Vec<u8>) -> Vec<u8> {
    let off = match ip[9] {
        6 => 16,
        17 => 6,
        _ => return ip,
    };
    let l4_len = ip.len() - 20;
    ip[20 + off..20 + off + 2].copy_from_slice(&[0, 0]);
    let pseudo = [&ip[12..20], &[0, ip[9]], &(l4_len as u16).to_be_bytes()[..]].concat();
    let c = csum(&[pseudo, ip[20..].to_vec()].concat());
    ip[20 + off..20 + off + 2].copy_from_slice(&c);
    ip
}

#[test]
fn vxlan_encap_with_udp_checksum_is_exact() {
    let env = Env::with("vxlan", "vxlan: { udpChecksum: true }\n");
    for (proto, inner) in inner_packets() {
        let inner = with_l4_checksum(inner);
        let input = eth(NODE_MAC, NODE_MAC, 0x0800, &inner);
        let (action, out) = env.run_tc(prog_names::TC_ENCAP_EGRESS, &input);
        assert_eq!(action, TC_ACT_OK, "{proto}: action");
        let sport = u16::from_be_bytes([out[34], out[35]]);
        let inner_frame = eth(PEER_VTEP, NODE_VTEP, 0x0800, &inner);
        let mut dgram = udp(sport, 4789, &[vxlan_hdr(4096), inner_frame].concat());
        // The checksum over the whole datagram, computed here from every byte.
        let pseudo = [
            &NODE[..],
            &PEER,
            &[0, 17],
            &(dgram.len() as u16).to_be_bytes(),
        ]
        .concat();
        let c = csum(&[pseudo, dgram.clone()].concat());
        dgram[6..8].copy_from_slice(&c);
        let want = eth(
            PEER_MAC,
            NODE_MAC,
            0x0800,
            &ipv4(&outer_ip(&inner, 17), &dgram),
        );
        assert_bytes(&format!("vxlan+udp checksum encap of {proto}"), &out, &want);
        assert_ne!(c, [0, 0], "{proto}: checksum must not be zero");
    }
}

/// Node1's view of `peers` (name, address, pod CIDR) besides itself, applied whole as the
/// agent applies a new cluster state.
fn apply_peers(env: &mut Env, peers: &[(&str, &str, &str)]) {
    use datapath_user::cluster::{Defaults, Limits};
    let mut text = String::from(
        "encapsulation: ipip\nnodes:\n  - name: node1\n    address: 192.168.1.10\n    podCIDR: 10.244.0.0/24\n",
    );
    for (name, addr, cidr) in peers {
        text += &format!("  - name: {name}\n    address: {addr}\n    podCIDR: {cidr}\n");
    }
    let limits = Limits {
        max_nodes: 64,
        own_node: Some("node1".into()),
        own_addrs: Vec::new(),
    };
    let cluster =
        datapath_user::source::parse_text(&text, &Defaults::default(), &limits).expect("cluster");
    env.dp.apply_full(&cluster).expect("apply");
}

/// The outer destination the encap program picks for a packet to `dst`.
fn encap_toward(env: &Env, dst: [u8; 4]) -> [u8; 4] {
    let inner = ipv4(
        &Ip {
            tos: 0,
            id: 1,
            df: true,
            ttl: 64,
            proto: 17,
            src: POD1,
            dst,
        },
        &udp(5353, 53, b"query"),
    );
    let input = eth(NODE_MAC, NODE_MAC, 0x0800, &inner);
    let (_, out) = env.run_tc(prog_names::TC_ENCAP_EGRESS, &input);
    assert_eq!(out.len(), input.len() + 20, "{dst:?} was not encapsulated");
    out[30..34].try_into().unwrap()
}

/// Pod CIDRs of several prefix lengths: each destination goes to the node owning the longest
/// matching CIDR, through the exact-match lookups while at most 4 lengths are in use, through
/// the LPM trie beyond, and back once a length is gone.
#[test]
fn pod_cidrs_of_mixed_lengths_reach_their_owners() {
    let mut env = Env::new("ipip");
    let four = [
        ("node2", "192.168.1.11", "10.244.1.0/24"),
        ("node3", "192.168.1.12", "10.245.0.0/25"),
        ("node4", "192.168.1.13", "10.245.0.128/26"),
        ("node5", "192.168.1.14", "10.246.0.0/23"),
    ];
    let fifth = ("node6", "192.168.1.15", "10.247.0.0/27");
    let owners: [([u8; 4], [u8; 4]); 5] = [
        ([10, 244, 1, 9], [192, 168, 1, 11]),
        ([10, 245, 0, 100], [192, 168, 1, 12]),
        ([10, 245, 0, 150], [192, 168, 1, 13]),
        ([10, 246, 1, 200], [192, 168, 1, 14]),
        ([10, 247, 0, 30], [192, 168, 1, 15]),
    ];
    let lpm = |env: &Env| {
        let cfg = env.dp.maps.read_config().expect("config");
        (
            cfg.flags & maps_common::config_flags::LPM_LOOKUP != 0,
            cfg.prefix_lens,
        )
    };
    for (phase, peers, want_lpm, want_lens) in [
        ("4 lengths", four.to_vec(), false, [26, 25, 24, 23]),
        (
            "5 lengths",
            [&four[..], &[fifth]].concat(),
            true,
            [27, 26, 25, 24],
        ),
        ("back to 4", four.to_vec(), false, [26, 25, 24, 23]),
    ] {
        apply_peers(&mut env, &peers);
        assert_eq!(lpm(&env), (want_lpm, want_lens), "{phase}: lookup config");
        for (dst, owner) in &owners[..peers.len()] {
            assert_eq!(encap_toward(&env, *dst), *owner, "{phase}: {dst:?}");
        }
    }
}

/// VXLAN over IPv6, written by the program for packets other than GSO: exactly 70 bytes, the
/// outer IPv6 header with the inner traffic class (and flow label, or one from the flow's
/// hash), the next hop's MACs from the FIB and neighbour table (`bpf_fib_lookup` AF_INET6),
/// and a UDP checksum equal to one computed here over every byte of the datagram. A UDP packet
/// without a checksum is left to the kernel device (redirected, unwritten).
#[test]
fn vxlan_over_ipv6_encap_of_tcp_udp_icmpv6_is_exact() {
    let env = Env::dual();
    for (proto, inner) in inner_packets6() {
        let input = eth(NODE_MAC, NODE_MAC, 0x86dd, &inner);
        let (out, sport) = vxlan_encapsulated(&env, proto, &input, 70);
        let label = u32::from_be_bytes([0, out[15] & 0x0f, out[16], out[17]]);
        let inner_label = u32::from_be_bytes([0, inner[1] & 0x0f, inner[2], inner[3]]);
        if inner_label != 0 {
            assert_eq!(label, inner_label, "{proto}: flow label not copied");
        } else {
            assert_ne!(label, 0, "{proto}: no flow label from the flow's hash");
        }
        let (_, again) = env.run_tc(prog_names::TC_ENCAP_EGRESS, &input);
        assert_eq!(
            &again[14..18],
            &out[14..18],
            "{proto}: flow label not stable"
        );
        let inner_frame = eth(PEER_VTEP6, NODE_VTEP6, 0x86dd, &inner);
        // The checksum over the whole datagram, computed here from every byte.
        let dgram = udp(sport, 4789, &[vxlan_hdr(4096), inner_frame].concat());
        let dgram = with_csum6(NODE6, PEER6, 17, dgram, 6);
        let want = eth(
            PEER_MAC,
            NODE_MAC,
            0x86dd,
            &ipv6(
                (inner[0] << 4) | (inner[1] >> 4),
                label,
                17,
                64,
                NODE6,
                PEER6,
                &dgram,
            ),
        );
        assert_bytes(&format!("vxlan/ipv6 encap of {proto}"), &out, &want);
    }
    let before = env.counter(maps_common::CounterId::EncapIpv6);
    let bare = ipv6(0, 0, 17, 63, POD1_6, POD2_6, &udp(5353, 53, b"no checksum"));
    let input = eth(NODE_MAC, NODE_MAC, 0x86dd, &bare);
    let (action, out) = env.run_tc(prog_names::TC_ENCAP_EGRESS, &input);
    assert_eq!(
        action, TC_ACT_REDIRECT,
        "UDP without a checksum: to the device"
    );
    assert_eq!(
        out.len(),
        input.len(),
        "UDP without a checksum: written by the program"
    );
    assert_eq!(env.counter(maps_common::CounterId::EncapIpv6), before + 1);
}

/// The IPv6 next hop is cached in the peer's slot beside (not in place of) what IPv4 cached
/// there: each family's packets leave with their own next hop's MAC, a cached one is kept
/// until the underlay generation moves, and then the new neighbour entry is used.
#[test]
fn ipv6_next_hops_are_cached_apart_from_ipv4_ones() {
    let mut env = Env::dual();
    let dst_mac = |out: &[u8]| <[u8; 6]>::try_from(&out[..6]).unwrap();
    let (_, v6) = inner_packets6().remove(0);
    let (_, v4) = inner_packets().remove(0);
    // The next hop's MAC the encap program gives a packet of `ether_type`.
    let send = |env: &Env, ether_type: u16, ip: &[u8]| {
        let frame = eth(NODE_MAC, NODE_MAC, ether_type, ip);
        dst_mac(&env.run_tc(prog_names::TC_ENCAP_EGRESS, &frame).1)
    };
    let send6 = |env: &Env| send(env, 0x86dd, &v6);
    let send4 = |env: &Env| send(env, 0x0800, &v4);
    const V6_NEIGH: [u8; 6] = [2, 0, 0, 0, 0, 0x0c];
    testkit::net::sh("ip neigh replace fd00:1::11 lladdr 02:00:00:00:00:0c dev ul0 nud permanent");
    env.dp.bump_underlay_gen().expect("bump");
    for _ in 0..2 {
        assert_eq!(send6(&env), V6_NEIGH, "IPv6 next hop");
        assert_eq!(send4(&env), PEER_MAC, "IPv4 next hop of the same peer");
    }
    // The cache is per CPU: every run from here on, on CPU 0.
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
    assert_eq!(send6(&env), V6_NEIGH, "IPv6 next hop, cached again");
    testkit::net::sh("ip neigh replace fd00:1::11 lladdr 02:00:00:00:00:0d dev ul0 nud permanent");
    assert_eq!(send6(&env), V6_NEIGH, "cached until the generation moves");
    env.dp.bump_underlay_gen().expect("bump");
    assert_eq!(
        send6(&env),
        [2, 0, 0, 0, 0, 0x0d],
        "the new neighbour after the bump"
    );
}

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
//! the kernel's flow hash, whose seed is random per boot; it is checked to lie in the Linux
//! VXLAN device's range and to be stable for a flow.
use std::{fs::File, os::fd::AsRawFd as _};

use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use datapath_user::{
    cluster::{self, Defaults, Limits},
    loader::{self, LoadOptions},
    maps::{DatapathMaps, LocalOptions},
    net::Iface,
};
use integration_tests::{sh, unique};
use maps_common::{DropReason, prog_names};

const NODE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0a];
const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0b];
const NODE: [u8; 4] = [192, 168, 1, 10];
const PEER: [u8; 4] = [192, 168, 1, 11];
const POD1: [u8; 4] = [10, 244, 0, 2];
const POD2: [u8; 4] = [10, 244, 1, 2];
/// VTEP MACs as the cluster file derives them (0e:00 + address).
const NODE_VTEP: [u8; 6] = [0x0e, 0, 192, 168, 1, 10];
const PEER_VTEP: [u8; 6] = [0x0e, 0, 192, 168, 1, 11];
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// A namespace the calling thread lives in until drop, then returns to its own.
struct ThreadNetns {
    name: String,
    home: File,
}

impl ThreadNetns {
    fn enter() -> Self {
        let name = unique("ptr");
        sh(&format!("ip netns add {name}"));
        let setup = format!(
            "ip -n {name} link add ul0 address 02:00:00:00:00:0a type veth peer name ul1 && \
             ip -n {name} link set ul0 up && ip -n {name} link set ul1 up && ip -n {name} link set lo up && \
             ip -n {name} addr add 192.168.1.10/24 dev ul0 && \
             ip -n {name} neigh add 192.168.1.11 lladdr 02:00:00:00:00:0b dev ul0 nud permanent && \
             ip netns exec {name} sysctl -qw net.ipv4.conf.all.forwarding=1"
        );
        let home = File::open("/proc/thread-self/ns/net").expect("own netns");
        let me = Self { name, home };
        sh(&setup);
        let target = File::open(format!("/run/netns/{}", me.name)).expect("netns file");
        // SAFETY: setns on this thread only, with valid fds.
        assert_eq!(
            unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        me
    }
}

impl Drop for ThreadNetns {
    fn drop(&mut self) {
        // SAFETY: back to the namespace the thread came from.
        unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
        let _ = integration_tests::sh_out(&format!("ip netns del {}", self.name));
    }
}

/// The datapath loaded (not attached) with node1's view of a two-node cluster.
struct Env {
    ebpf: Ebpf,
    maps: DatapathMaps,
    _ns: ThreadNetns,
    ifindex: u32,
}

impl Env {
    fn new(encap: &str) -> Self {
        Self::with(encap, "")
    }

    /// `extra` goes into the cluster file before `nodes:`.
    fn with(encap: &str, extra: &str) -> Self {
        let ns = ThreadNetns::enter();
        let ifindex: u32 = std::fs::read_to_string("/sys/class/net/ul0/ifindex")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| {
                // /sys still shows the old namespace: ask iproute2 inside the new one.
                sh("ip -j link show ul0")
                    .split("\"ifindex\":")
                    .nth(1)
                    .and_then(|r| r.split(',').next())
                    .and_then(|n| n.trim().parse().ok())
                    .expect("ifindex of ul0")
            });
        let text = format!(
            "encapsulation: {encap}\n{extra}nodes:\n  - name: node1\n    address: 192.168.1.10\n    podCIDR: 10.244.0.0/24\n  - name: node2\n    address: 192.168.1.11\n    podCIDR: 10.244.1.0/24\n"
        );
        let limits = Limits {
            max_nodes: 64,
            own_node: Some("node1".into()),
        };
        let cluster = cluster::parse(&text, &Defaults::default(), &limits).expect("cluster");
        let mut ebpf = loader::load(&LoadOptions {
            max_nodes: 64,
            log_level: 0,
            pin_dir: None,
        })
        .expect("load object");
        let mut maps = DatapathMaps::take(&mut ebpf).expect("maps");
        let local = LocalOptions {
            node: "node1".into(),
            iface: Iface {
                name: "ul0".into(),
                ifindex,
                mtu: 1500,
                addr: Some(NODE.into()),
                prefix_len: Some(24),
            },
            inner_src_check: true,
            max_nodes: 64,
            csum_ifindex: 0,
        };
        maps.sync(&cluster, &local).expect("sync the maps");
        for name in [prog_names::TC_ENCAP_EGRESS, prog_names::TC_DECAP_INGRESS] {
            let p: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            p.load().expect("verifier accepts the TC program");
        }
        let p: &mut Xdp = ebpf
            .program_mut(prog_names::XDP_DECAP_INGRESS)
            .unwrap()
            .try_into()
            .unwrap();
        p.load().expect("verifier accepts the XDP program");
        Self {
            ebpf,
            maps,
            _ns: ns,
            ifindex,
        }
    }

    /// Runs a TC program with the packet on ul0; returns (action, output bytes).
    fn run_tc(&self, prog: &str, input: &[u8]) -> (u32, Vec<u8>) {
        let p: &SchedClassifier = self.ebpf.program(prog).unwrap().try_into().unwrap();
        // __sk_buff with only ifindex (offset 40) set.
        let mut ctx = [0u8; 192];
        ctx[40..44].copy_from_slice(&self.ifindex.to_ne_bytes());
        let mut out = vec![0u8; input.len() + 128];
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("test run of {prog} on {}: {e:?}", hex(input)));
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn run_xdp(&self, input: &[u8]) -> (u32, Vec<u8>) {
        let p: &Xdp = self
            .ebpf
            .program(prog_names::XDP_DECAP_INGRESS)
            .unwrap()
            .try_into()
            .unwrap();
        let mut out = vec![0u8; input.len() + 128];
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("test run");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn drops(&self, reason: DropReason) -> u64 {
        DatapathMaps::sum_counters(&self.maps.drops)[reason as usize].packets
    }
}

// ---- packet builders, written independently of the kernel code ----

fn csum(bytes: &[u8]) -> [u8; 2] {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    (!(sum as u16)).to_be_bytes()
}

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    [&dst[..], &src, &ethertype.to_be_bytes(), payload].concat()
}

struct Ip {
    tos: u8,
    id: u16,
    df: bool,
    ttl: u8,
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
}

fn ipv4(h: &Ip, payload: &[u8]) -> Vec<u8> {
    let len = (20 + payload.len()) as u16;
    let mut hdr = vec![0x45, h.tos];
    hdr.extend(len.to_be_bytes());
    hdr.extend(h.id.to_be_bytes());
    hdr.extend(if h.df { [0x40, 0] } else { [0, 0] });
    hdr.extend([h.ttl, h.proto, 0, 0]);
    hdr.extend(h.src);
    hdr.extend(h.dst);
    let c = csum(&hdr);
    hdr[10..12].copy_from_slice(&c);
    [hdr, payload.to_vec()].concat()
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    [
        &sport.to_be_bytes()[..],
        &dport.to_be_bytes(),
        &len.to_be_bytes(),
        &[0, 0],
        payload,
    ]
    .concat()
}

fn tcp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![];
    h.extend(sport.to_be_bytes());
    h.extend(dport.to_be_bytes());
    h.extend(1000u32.to_be_bytes()); // seq
    h.extend(0u32.to_be_bytes()); // ack
    h.extend([0x50, 0x02, 0xff, 0xff, 0x12, 0x34, 0, 0]); // SYN, window, checksum, urg
    [h, payload.to_vec()].concat()
}

fn icmp_echo(id: u16, seq: u16) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0];
    m.extend(id.to_be_bytes());
    m.extend(seq.to_be_bytes());
    m.extend(b"abcdefghijklmnop");
    let c = csum(&m);
    m[2..4].copy_from_slice(&c);
    m
}

fn vxlan_hdr(vni: u32) -> Vec<u8> {
    vec![
        0x08,
        0,
        0,
        0,
        (vni >> 16) as u8,
        (vni >> 8) as u8,
        vni as u8,
        0,
    ]
}

/// Inner packets of the three protocols, as pod1 would send them to pod2.
fn inner_packets() -> Vec<(&'static str, Vec<u8>)> {
    let ip = |proto, df, payload: &[u8]| {
        ipv4(
            &Ip {
                tos: 0xb8 | 0x01, // DSCP EF, ECN ECT(1)
                id: 0x1234,
                df,
                ttl: 63,
                proto,
                src: POD1,
                dst: POD2,
            },
            payload,
        )
    };
    vec![
        ("tcp", ip(6, true, &tcp(40000, 80, b"GET / HTTP/1.1\r\n"))),
        ("udp", ip(17, false, &udp(5353, 53, b"query"))),
        ("icmp", ip(1, true, &icmp_echo(7, 1))),
    ]
}

/// The outer header the datapath must write: DSCP/ECN, ID and DF from the inner header.
fn outer_ip(inner: &[u8], proto: u8) -> Ip {
    Ip {
        tos: inner[1],
        id: u16::from_be_bytes([inner[4], inner[5]]),
        df: inner[6] & 0x40 != 0,
        ttl: 64,
        proto,
        src: NODE,
        dst: PEER,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn assert_bytes(what: &str, got: &[u8], want: &[u8]) {
    if got != want {
        let at = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: output differs at byte {at} (len got {}, want {})\n got: {}\nwant: {}",
            got.len(),
            want.len(),
            hex(got),
            hex(want)
        );
    }
}

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
        let (action, out) = env.run_tc(prog_names::TC_ENCAP_EGRESS, &input);
        assert_eq!(action, TC_ACT_OK, "{proto}: action");
        assert_eq!(
            out.len(),
            input.len() + 50,
            "{proto}: VXLAN adds exactly 50 bytes"
        );
        let sport = u16::from_be_bytes([out[34], out[35]]);
        assert!(
            (32768..61000).contains(&sport),
            "{proto}: source port {sport} outside the Linux VXLAN range"
        );
        let (_, again) = env.run_tc(prog_names::TC_ENCAP_EGRESS, &input);
        assert_eq!(
            &again[34..36],
            &out[34..36],
            "{proto}: source port not stable for a flow"
        );
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

/// A frame node2 would send node1: outer headers around `inner`.
fn from_peer(vxlan: bool, inner: &[u8], vni: u32, src: [u8; 4]) -> Vec<u8> {
    let (proto, payload) = if vxlan {
        let frame = eth(NODE_VTEP, PEER_VTEP, 0x0800, inner);
        (17, udp(45000, 4789, &[vxlan_hdr(vni), frame].concat()))
    } else {
        (4, inner.to_vec())
    };
    let ip = Ip {
        tos: 0,
        id: 1,
        df: true,
        ttl: 64,
        proto,
        src,
        dst: NODE,
    };
    eth(NODE_MAC, PEER_MAC, 0x0800, &ipv4(&ip, &payload))
}

fn reply_packets() -> Vec<(&'static str, Vec<u8>)> {
    inner_packets()
        .into_iter()
        .map(|(p, mut ip)| {
            // pod2 -> pod1: swap the addresses, fix the checksum.
            ip[12..16].copy_from_slice(&POD2);
            ip[16..20].copy_from_slice(&POD1);
            ip[10..12].copy_from_slice(&[0, 0]);
            let c = csum(&ip[..20]);
            ip[10..12].copy_from_slice(&c);
            (p, ip)
        })
        .collect()
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

//! Generated input: random frames and mutations of valid IPIP, VXLAN and plain frames through
//! each program (the underlay's three and the pod veth's, with BPF host routing and a pod
//! recorded, so TC decapsulation's delivery into the pod is under test too) with
//! BPF_PROG_TEST_RUN, every outcome checked against the reference model below
//! (written from the README's table of packet classes, not from the kernel code): passed
//! unchanged, encapsulated or decapsulated to the exact bytes the model builds, or dropped with
//! the reason the model names, as counted in DP_DROPS.
//!
//! `DP_FUZZ_SEED=<n>` replays a run; `DP_FUZZ_PACKETS=<n>` sets the packets per mode (default
//! 50,000 per mode, two modes: 100,000 through each of the three programs).
use datapath_user::reconcile::dataplane::HostRouting;
use integration_tests::progtest::*;
use maps_common::{DropReason, prog_names};

const TC_ACT_REDIRECT: u32 = 7;
const VNI: u32 = 4096;
const PORT: u16 = 4789;
const MTU: usize = 1500;
/// The namespace's local pod CIDR (10.244.0.0/24) and node2's (10.244.1.0/24).
const LOCAL_NET: [u8; 3] = [10, 244, 0];
const PEER_NET: [u8; 3] = [10, 244, 1];

/// What a program must do with a frame.
#[derive(Debug, PartialEq)]
enum Outcome {
    Pass,
    /// Output bytes; for VXLAN encapsulation the UDP source port (bytes 34..36) is the
    /// kernel's flow hash and only checked for range.
    Rewrite(Vec<u8>),
    /// Handed straight into pod1 (`bpf_redirect_peer`) with these bytes.
    Deliver(Vec<u8>),
    Drop(DropReason),
}

/// MACs of pod1's interface and of its host-side veth, as its endpoint records them.
const POD1_MAC: [u8; 6] = [0x0a, 0x58, 10, 244, 0, 2];
const VETH1_MAC: [u8; 6] = [0x0a, 0x58, 10, 244, 0, 1];

fn be16(b: &[u8], at: usize) -> usize {
    u16::from_be_bytes([b[at], b[at + 1]]) as usize
}

fn in_net(addr: &[u8], net: [u8; 3]) -> bool {
    addr[..3] == net
}

// ---- the reference model ----

/// TC egress on the underlay of node1 (192.168.1.10) in `mode` ("ipip" or "vxlan").
fn model_encap(f: &[u8], vxlan: bool) -> Outcome {
    if f.len() < 34 || be16(f, 12) != 0x0800 {
        return Outcome::Pass;
    }
    let ip = &f[14..];
    if !in_net(&ip[16..20], PEER_NET) {
        return Outcome::Pass; // local pod, or not a pod at all
    }
    let (ver, ihl, tot) = (ip[0] >> 4, (ip[0] & 15) as usize * 4, be16(ip, 2));
    let ip_len = f.len() - 14;
    if ver != 4 || ihl < 20 || tot < ihl || tot > ip_len {
        return Outcome::Drop(DropReason::BadInnerHeader);
    }
    let overhead = if vxlan { 50 } else { 20 };
    if ip_len + overhead > MTU {
        return Outcome::Drop(DropReason::TooBig);
    }
    let outer = Ip {
        tos: ip[1],
        id: be16(ip, 4) as u16,
        df: ip[6] & 0x40 != 0,
        ttl: 64,
        proto: if vxlan { 17 } else { 4 },
        src: NODE,
        dst: PEER,
    };
    let payload = if vxlan {
        let inner = eth(PEER_VTEP, NODE_VTEP, 0x0800, ip);
        udp(0, PORT, &[vxlan_hdr(VNI), inner].concat())
    } else {
        ip.to_vec()
    };
    Outcome::Rewrite(eth(PEER_MAC, NODE_MAC, 0x0800, &ipv4(&outer, &payload)))
}

/// TC ingress on a local pod's host-side veth of node1 with `--host-routing bpf`: a local
/// pod's packet for a remote pod is encapsulated there (its TTL decremented first, the
/// header checksum updated incrementally as a router does, RFC 1624) and redirected to the
/// underlay; everything else, and what the stack must answer (TTL about to expire, too big
/// for the tunnel), is passed to the host's stack unchanged.
fn model_pod_ingress(f: &[u8], vxlan: bool) -> Outcome {
    if f.len() < 34 || be16(f, 12) != 0x0800 {
        return Outcome::Pass;
    }
    let ip = &f[14..];
    if ip[0] >> 4 != 4 || ip[0] & 15 < 5 {
        return Outcome::Pass;
    }
    let (ttl, overhead) = (ip[8], if vxlan { 50 } else { 20 });
    if !in_net(&ip[12..16], LOCAL_NET) || ttl <= 1 || !in_net(&ip[16..20], PEER_NET) {
        return Outcome::Pass;
    }
    if f.len() - 14 + overhead > MTU {
        return Outcome::Pass; // the stack's route MTU answers with ICMP
    }
    model_encap(&ttl_decremented(f), vxlan)
}

/// `f` with its IPv4 TTL lowered by one and the header checksum updated incrementally
/// (RFC 1624), as a router does.
fn ttl_decremented(f: &[u8]) -> Vec<u8> {
    let ip = &f[14..];
    let ttl = ip[8];
    let mut routed = f.to_vec();
    routed[14 + 8] = ttl - 1;
    let old = u16::from_be_bytes([ttl, ip[9]]);
    let new = u16::from_be_bytes([ttl - 1, ip[9]]);
    let hc = u16::from_be_bytes([ip[10], ip[11]]);
    let mut sum = u32::from(!hc) + u32::from(!old) + u32::from(new);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    routed[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    routed
}

/// TC decapsulation with BPF host routing and pod1 recorded: a decapsulated IPv4 packet for
/// pod1 with a TTL to spare goes straight into it, MACs rewritten as the host would; anything
/// else to the stack as decapsulated.
fn model_deliver(d: Vec<u8>) -> Outcome {
    let ip = &d[14..];
    if ip.len() < 20 || ip[0] >> 4 != 4 || ip[0] & 15 < 5 || ip[16..20] != POD1 || ip[8] <= 1 {
        return Outcome::Rewrite(d);
    }
    let mut out = ttl_decremented(&d);
    out[0..6].copy_from_slice(&POD1_MAC);
    out[6..12].copy_from_slice(&VETH1_MAC);
    Outcome::Deliver(out)
}

/// Whether the IPv4 header at `off` is addressed to a local pod.
fn ipv4_for_local_pod(f: &[u8], off: usize) -> bool {
    f.len() >= off + 20 && in_net(&f[off + 16..off + 20], LOCAL_NET)
}

fn vxlan_flags_ok(vx: &[u8]) -> bool {
    vx[0] == 0x08 && vx[1..4] == [0, 0, 0] && vx[7] == 0
}

/// A UDP packet (outer IPv4 without options) that looks like VXLAN for a local pod.
fn vxlan_for_local_pod(f: &[u8]) -> bool {
    f.len() >= 64
        && vxlan_flags_ok(&f[42..50])
        && be16(f, 62) == 0x0800
        && ipv4_for_local_pod(f, 64)
}

/// Decapsulation on node1: the classification shared by XDP and TC. `Ok(strip)` to decap.
fn model_classify(f: &[u8]) -> Result<Option<usize>, DropReason> {
    use DropReason::*;
    if f.len() < 34 || be16(f, 12) != 0x0800 {
        return Ok(None);
    }
    let ip = &f[14..];
    let (ver, ihl) = (ip[0] >> 4, (ip[0] & 15) as usize * 4);
    if ver != 4 || ihl < 20 {
        return Ok(None);
    }
    let frags = be16(ip, 6);
    let for_us = ip[16..20] == NODE;
    let vxlan = match ip[9] {
        4 => false,
        17 => {
            if frags & 0x1fff != 0 || f.len() < 14 + ihl + 8 {
                return Ok(None);
            }
            if be16(f, 14 + ihl + 2) != PORT as usize {
                if for_us && ihl == 20 && vxlan_for_local_pod(f) {
                    return Err(WrongPort);
                }
                return Ok(None);
            }
            true
        }
        _ => return Ok(None),
    };
    if !for_us {
        let inner_off = 14 + ihl + if vxlan { 30 } else { 0 };
        if ihl == 20 && (!vxlan || vxlan_for_local_pod(f)) && ipv4_for_local_pod(f, inner_off) {
            return Err(NotForThisNode);
        }
        return Ok(None);
    }
    if ihl != 20 {
        return Err(OuterIpOptions);
    }
    if frags & 0x3fff != 0 {
        return Err(OuterFragment);
    }
    if ip[12..16] != PEER {
        return Err(UnknownPeer);
    }
    let outer_len = be16(ip, 2);
    if outer_len > f.len() - 14 {
        return Err(Truncated);
    }
    if vxlan {
        if outer_len < 20 || be16(f, 38) != outer_len - 20 {
            return Err(BadOuterLength);
        }
        if f.len() < 50 {
            return Err(Truncated);
        }
        if !vxlan_flags_ok(&f[42..50]) {
            return Err(BadVxlanFlags);
        }
        if (f[46] as u32) << 16 | (f[47] as u32) << 8 | f[48] as u32 != VNI {
            return Err(WrongVni);
        }
        if f.len() < 64 {
            return Err(Truncated);
        }
        if be16(f, 62) != 0x0800 {
            return Err(InnerNotIpv4);
        }
    }
    let strip = if vxlan { 50 } else { 20 };
    if outer_len < strip + 20 {
        return Err(BadOuterLength);
    }
    let inner = &f[14 + strip..];
    let (iver, iihl, ilen) = (inner[0] >> 4, (inner[0] & 15) as usize * 4, be16(inner, 2));
    if iver != 4 || iihl < 20 || ilen < iihl || ilen > outer_len - strip {
        return Err(BadInnerHeader);
    }
    // The sending node itself (its own traffic to a pod) is no spoof either.
    if !in_net(&inner[12..16], PEER_NET) && inner[12..16] != f[26..30] {
        return Err(InnerSrcSpoofed);
    }
    Ok(Some(strip))
}

fn model_decap(f: &[u8], xdp: bool) -> Outcome {
    match model_classify(f) {
        Err(reason) => Outcome::Drop(reason),
        Ok(None) => Outcome::Pass,
        Ok(Some(strip)) => {
            let head = if xdp {
                eth(
                    f[0..6].try_into().unwrap(),
                    f[6..12].try_into().unwrap(),
                    0x0800,
                    &[],
                )
            } else {
                f[..14].to_vec()
            };
            let d = [head, f[14 + strip..].to_vec()].concat();
            if xdp {
                Outcome::Rewrite(d)
            } else {
                model_deliver(d)
            }
        }
    }
}

// ---- generation ----

/// SplitMix64: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Valid frames of every class the programs meet: pod traffic both ways in both modes,
/// traffic for this node and others, non-IPv4.
fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (_, ip) in inner_packets() {
        out.push(eth(PEER_MAC, NODE_MAC, 0x0800, &ip));
    }
    let big = ipv4(
        &Ip {
            tos: 0,
            id: 9,
            df: true,
            ttl: 63,
            proto: 17,
            src: POD1,
            dst: POD2,
        },
        &udp(1, 2, &[0x5a; 1440]),
    );
    out.push(eth(PEER_MAC, NODE_MAC, 0x0800, &big));
    for (_, ip) in reply_packets() {
        out.push(from_peer(true, &ip, VNI, PEER));
        out.push(from_peer(false, &ip, VNI, PEER));
    }
    let plain = |src, dst, payload: &[u8], proto| {
        let h = Ip {
            tos: 0,
            id: 3,
            df: false,
            ttl: 1,
            proto,
            src,
            dst,
        };
        eth(NODE_MAC, PEER_MAC, 0x0800, &ipv4(&h, payload))
    };
    out.push(plain(PEER, NODE, &udp(53, 5353, b"answer"), 17));
    out.push(plain(PEER, [10, 244, 0, 7], &tcp(1, 2, b""), 6));
    out.push(plain([8, 8, 8, 8], POD1, &icmp_echo(1, 1), 1));
    out.push(eth(NODE_MAC, PEER_MAC, 0x0806, &[0, 1, 8, 0, 6, 4, 0, 1]));
    out.push(eth(NODE_MAC, PEER_MAC, 0x86dd, &[0x60; 48]));
    let tagged = [&[0x00, 0x05, 0x08, 0x00][..], &out[4][14..]].concat();
    out.push(eth(NODE_MAC, PEER_MAC, 0x8100, &tagged));
    out
}

/// Offsets of the fields the programs read, in all the layouts above.
const FIELDS: &[usize] = &[
    12, 13, 14, 15, 16, 17, 20, 21, 22, 23, 26, 29, 30, 33, 34, 36, 37, 38, 39, 42, 43, 46, 47, 48,
    49, 50, 62, 63, 64, 66, 67, 70, 76, 79, 80, 83,
];
const VALUES: &[u8] = &[
    0, 1, 4, 5, 6, 0x08, 0x0a, 0x11, 0x12, 0x20, 0x40, 0x45, 0x46, 0x4f, 0x50, 0x81, 0x86, 0xb5,
    0xc0, 0xdd, 0xf4, 0xff,
];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    if rng.chance(8) {
        let n = 14 + rng.below(200);
        let mut f = rng.bytes(n);
        if rng.chance(50) {
            f[12..14].copy_from_slice(&[8, 0]);
        }
        return f;
    }
    let mut f = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(3) {
        match rng.below(10) {
            0..=3 => {
                let at = FIELDS[rng.below(FIELDS.len())];
                if at < f.len() {
                    f[at] = if rng.chance(70) {
                        VALUES[rng.below(VALUES.len())]
                    } else {
                        rng.next() as u8
                    };
                }
            }
            4 | 5 => {
                let at = rng.below(f.len().min(100));
                f[at] ^= 1 << rng.below(8);
            }
            6 | 7 => {
                let keep = 14 + rng.below(f.len() - 13);
                f.truncate(keep);
            }
            8 => {
                let extra = rng.below(64);
                f.extend(rng.bytes(extra));
            }
            _ => {
                // Keep the outer length consistent so deeper checks are reached.
                if f.len() >= 34 {
                    let n = (f.len() - 14) as u16;
                    f[16..18].copy_from_slice(&n.to_be_bytes());
                    if f.len() >= 42 && f[23] == 17 {
                        f[38..40].copy_from_slice(&(n - 20).to_be_bytes());
                    }
                }
            }
        }
    }
    f
}

// ---- the run ----

/// Whether the kernel refuses to test-run a TC program on `f`: an IPv4 or IPv6 ethertype with
/// less than that header behind it (no skb can be built; on a real link such a frame reaches
/// TC ingress only, where the programs pass it).
fn tc_refuses(f: &[u8]) -> bool {
    match be16(f, 12) {
        0x0800 => f.len() < 34,
        0x86dd => f.len() < 54,
        _ => false,
    }
}

/// Runs `prog` on `f` and checks the outcome; false when the kernel refused the test run.
fn check(env: &Env, prog: &str, f: &[u8], want: Outcome, seed: u64, n: usize) -> bool {
    let (action, out) = if prog == prog_names::XDP_DECAP_INGRESS {
        env.run_xdp(f)
    } else {
        match env.try_run_tc(prog, f) {
            Ok(r) => r,
            Err(e) => {
                assert!(
                    tc_refuses(f),
                    "test run of {prog} refused ({e}): {}",
                    hex(f)
                );
                return false;
            }
        }
    };
    let ctx = || format!("{prog}, packet {n} of seed {seed}: {}", hex(f));
    let xdp = prog == prog_names::XDP_DECAP_INGRESS;
    let (pass, drop) = if xdp {
        (XDP_PASS, XDP_DROP)
    } else {
        (TC_ACT_OK, TC_ACT_SHOT)
    };
    match want {
        Outcome::Pass => {
            assert_eq!(action, pass, "want pass: {}", ctx());
            assert!(
                out == f,
                "pass changed the packet: {}\n got: {}",
                ctx(),
                hex(&out)
            );
        }
        Outcome::Rewrite(mut expect) => {
            assert!(
                action == pass || (!xdp && action == TC_ACT_REDIRECT),
                "want rewrite, action {action}: {}",
                ctx()
            );
            let encaps = [prog_names::TC_ENCAP_EGRESS, prog_names::TC_POD_INGRESS];
            if encaps.contains(&prog) && expect.len() > 36 && expect[23] == 17 {
                let sport = be16(&out, 34);
                assert!((32768..61000).contains(&sport), "sport {sport}: {}", ctx());
                expect[34..36].copy_from_slice(&out[34..36]);
            }
            if out != expect {
                assert_bytes(&ctx(), &out, &expect);
            }
        }
        Outcome::Deliver(expect) => {
            assert_eq!(
                action,
                TC_ACT_REDIRECT,
                "want delivery into pod1: {}",
                ctx()
            );
            if out != expect {
                assert_bytes(&ctx(), &out, &expect);
            }
        }
        Outcome::Drop(reason) => {
            assert_eq!(action, drop, "want drop ({reason:?}): {}", ctx());
        }
    }
    true
}

/// Empties `DP_STACK_FLOWS`, which the encapsulating programs fill as pod flows cross the
/// host's stack: the model leaves that rule (a reply of such a flow takes the stack) to the
/// exact-bytes tests in `accepted_flows.rs`.
fn forget_stack_flows(env: &mut Env) {
    let keys: Vec<_> = env.dp.maps.stack_flows.keys().flatten().collect();
    for k in keys {
        let _ = env.dp.maps.stack_flows.remove(&k);
    }
}

fn run_mode(mode: &str, seed: u64, packets: usize) -> [usize; 4] {
    // BPF host routing on, so that the pod veth's program acts, and pod1 recorded as the CNI
    // plugin records it, so that TC decapsulation delivers into it.
    let mut env = Env::routed(mode, "", HostRouting::Bpf);
    let ep = maps_common::Endpoint {
        ifindex: env.ifindex,
        pod_mac: POD1_MAC,
        host_mac: VETH1_MAC,
    };
    env.dp.maps.endpoints.insert(POD1, ep, 0).expect("pod1");
    let vxlan = mode == "vxlan";
    let seeds = seeds();
    let mut rng = Rng(seed);
    // Passed, rewritten (delivered included), dropped, delivered into pod1.
    let mut tally = [0usize; 4];
    let mut drops_want = vec![0u64; DropReason::COUNT as usize];
    let mut refused = 0;
    for n in 0..packets {
        let f = mutate(&mut rng, &seeds);
        let cases = [
            (prog_names::TC_ENCAP_EGRESS, model_encap(&f, vxlan)),
            (prog_names::XDP_DECAP_INGRESS, model_decap(&f, true)),
            (prog_names::TC_DECAP_INGRESS, model_decap(&f, false)),
            (prog_names::TC_POD_INGRESS, model_pod_ingress(&f, vxlan)),
        ];
        for (prog, want) in cases {
            if prog != prog_names::XDP_DECAP_INGRESS && tc_refuses(&f) {
                // Checked once that the kernel does refuse, then not counted.
                assert!(!check(&env, prog, &f, Outcome::Pass, seed, n));
                refused += 1;
                continue;
            }
            if prog == prog_names::TC_DECAP_INGRESS {
                forget_stack_flows(&mut env);
            }
            match &want {
                Outcome::Pass => tally[0] += 1,
                Outcome::Rewrite(_) => tally[1] += 1,
                Outcome::Deliver(_) => {
                    tally[1] += 1;
                    tally[3] += 1;
                }
                Outcome::Drop(r) => {
                    tally[2] += 1;
                    drops_want[*r as usize] += 1;
                }
            }
            let reason = match &want {
                Outcome::Drop(r) => Some(*r),
                _ => None,
            };
            let before = reason.map(|r| env.drops(r));
            assert!(check(&env, prog, &f, want, seed, n));
            if let (Some(r), Some(b)) = (reason, before) {
                assert_eq!(
                    env.drops(r),
                    b + 1,
                    "{prog}, packet {n} of seed {seed}: not counted under {r:?}: {}",
                    hex(&f)
                );
            }
        }
    }
    for r in DropReason::ALL {
        assert_eq!(
            env.drops(r),
            drops_want[r as usize],
            "{mode}: total drops under {r:?}"
        );
    }
    println!(
        "{mode}: {packets} packets x 4 programs: {} passed, {} rewritten ({} delivered into pod1), {} dropped, {refused} TC runs refused by the kernel (short L3); drops by reason: {}",
        tally[0],
        tally[1],
        tally[3],
        tally[2],
        DropReason::ALL
            .iter()
            .filter(|r| drops_want[**r as usize] > 0)
            .map(|r| format!("{}={}", r.name(), drops_want[*r as usize]))
            .collect::<Vec<_>>()
            .join(" ")
    );
    tally
}

#[test]
fn random_and_mutated_packets_match_the_reference_model() {
    let seed = std::env::var("DP_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let packets: usize = std::env::var("DP_FUZZ_PACKETS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50_000);
    println!("fuzz seed {seed} (replay: DP_FUZZ_SEED={seed})");
    for mode in ["ipip", "vxlan"] {
        let [pass, rewrite, drop, delivered] = run_mode(mode, seed, packets);
        // Every class must be exercised, or the generator has gone blind.
        assert!(
            pass > 0 && rewrite > packets / 20 && drop > packets / 20 && delivered > packets / 100,
            "{mode}: {pass}/{rewrite}/{drop}, {delivered} delivered"
        );
    }
}

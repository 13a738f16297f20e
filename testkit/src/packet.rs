//! Packets built byte by byte, independently of the kernel code: Ethernet, IPv4 (with its
//! checksum), IPv6, UDP, TCP, ICMP echo, VXLAN; the two-node addresses the tests and the
//! benchmark use; and a byte-exact comparison that says where two frames differ.

pub const NODE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0a];
pub const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0b];
pub const NODE: [u8; 4] = [192, 168, 1, 10];
pub const PEER: [u8; 4] = [192, 168, 1, 11];
pub const POD1: [u8; 4] = [10, 244, 0, 2];
pub const POD2: [u8; 4] = [10, 244, 1, 2];
/// VTEP MACs as the cluster file derives them (0e:00 + address).
pub const NODE_VTEP: [u8; 6] = [0x0e, 0, 192, 168, 1, 10];
pub const PEER_VTEP: [u8; 6] = [0x0e, 0, 192, 168, 1, 11];

pub fn csum(bytes: &[u8]) -> [u8; 2] {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    (!(sum as u16)).to_be_bytes()
}

pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    [&dst[..], &src, &ethertype.to_be_bytes(), payload].concat()
}

pub struct Ip {
    pub tos: u8,
    pub id: u16,
    pub df: bool,
    pub ttl: u8,
    pub proto: u8,
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

pub fn ipv4(h: &Ip, payload: &[u8]) -> Vec<u8> {
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

pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
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

pub fn tcp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![];
    h.extend(sport.to_be_bytes());
    h.extend(dport.to_be_bytes());
    h.extend(1000u32.to_be_bytes()); // seq
    h.extend(0u32.to_be_bytes()); // ack
    h.extend([0x50, 0x02, 0xff, 0xff, 0x12, 0x34, 0, 0]); // SYN, window, checksum, urg
    [h, payload.to_vec()].concat()
}

pub fn icmp_echo(id: u16, seq: u16) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0];
    m.extend(id.to_be_bytes());
    m.extend(seq.to_be_bytes());
    m.extend(b"abcdefghijklmnop");
    let c = csum(&m);
    m[2..4].copy_from_slice(&c);
    m
}

pub fn vxlan_hdr(vni: u32) -> Vec<u8> {
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

/// The dual-stack two-node cluster's IPv6 half: node1 and node2 on the underlay, a pod on
/// each, and node1's VTEP MAC as the cluster file derives it (0e:06 + the address's last
/// four bytes); node2's is given (`PEER_VTEP6`).
pub const NODE6: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
pub const PEER6: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11];
pub const POD1_6: [u8; 16] = [0xfd, 0, 0, 0x10, 2, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
pub const POD2_6: [u8; 16] = [0xfd, 0, 0, 0x10, 2, 0x44, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2];
pub const NODE_VTEP6: [u8; 6] = [0x0e, 6, 0, 0, 0, 0x10];
pub const PEER_VTEP6: [u8; 6] = [0x66, 0, 0, 0, 0, 6];

/// An IPv6 header (traffic class, flow label, next header, hop limit, addresses) before
/// `payload`.
pub fn ipv6(
    tclass: u8,
    label: u32,
    next: u8,
    hops: u8,
    src: [u8; 16],
    dst: [u8; 16],
    payload: &[u8],
) -> Vec<u8> {
    let vcf = (6u32 << 28) | (tclass as u32) << 20 | (label & 0xf_ffff);
    [
        &vcf.to_be_bytes()[..],
        &(payload.len() as u16).to_be_bytes(),
        &[next, hops],
        &src,
        &dst,
        payload,
    ]
    .concat()
}

/// `l4` (TCP, UDP or ICMPv6 between `src` and `dst`) with its checksum filled in, over the
/// IPv6 pseudo-header; the checksum field is at `at`.
pub fn with_csum6(src: [u8; 16], dst: [u8; 16], next: u8, mut l4: Vec<u8>, at: usize) -> Vec<u8> {
    l4[at..at + 2].copy_from_slice(&[0, 0]);
    let pseudo = [
        &src[..],
        &dst,
        &(l4.len() as u32).to_be_bytes(),
        &[0, 0, 0, next],
    ]
    .concat();
    let c = csum(&[pseudo, l4.clone()].concat());
    l4[at..at + 2].copy_from_slice(&c);
    l4
}

/// Inner IPv6 packets of the three protocols, checksums valid, as pod1 would send them to
/// pod2: TCP with a flow label, UDP and ICMPv6 echo without (DSCP EF, ECN ECT(1) on all).
pub fn inner_packets6() -> Vec<(&'static str, Vec<u8>)> {
    let ip = |label, next, l4: Vec<u8>, at| {
        let l4 = with_csum6(POD1_6, POD2_6, next, l4, at);
        ipv6(0xb9, label, next, 63, POD1_6, POD2_6, &l4)
    };
    let mut echo = vec![128, 0, 0, 0, 0, 7, 0, 1];
    echo.extend(b"abcdefghijklmnop");
    vec![
        (
            "tcp",
            ip(0x12345, 6, tcp(40000, 80, b"GET / HTTP/1.1\r\n"), 16),
        ),
        ("udp", ip(0, 17, udp(5353, 53, b"query"), 6)),
        ("icmpv6", ip(0, 58, echo, 2)),
    ]
}

/// Inner packets of the three protocols, as pod1 would send them to pod2.
pub fn inner_packets() -> Vec<(&'static str, Vec<u8>)> {
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
pub fn outer_ip(inner: &[u8], proto: u8) -> Ip {
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

pub fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn assert_bytes(what: &str, got: &[u8], want: &[u8]) {
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

/// A frame node2 would send node1: outer headers around `inner`.
pub fn from_peer(vxlan: bool, inner: &[u8], vni: u32, src: [u8; 4]) -> Vec<u8> {
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

pub fn reply_packets() -> Vec<(&'static str, Vec<u8>)> {
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

//! Internet checksum of the headers the programs write: IPv4 headers, and the outer UDP
//! checksum of VXLAN over both families, from headers alone.
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
    vxlan::VxlanHdr,
};

/// Sum of `T`'s bytes as big-endian 16-bit words (`T` of even size), unfolded.
#[inline(always)]
fn sum_words<T, const WORDS: usize>(v: &T) -> u32 {
    // SAFETY: T is plain data of 2 * WORDS bytes; read as big-endian words.
    let words = unsafe { &*(v as *const T as *const [[u8; 2]; WORDS]) };
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < WORDS {
        sum += u16::from_be_bytes(words[i]) as u32;
        i += 1;
    }
    sum
}

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Returns the header checksum of `hdr` (whose `check` field must be zero), in wire order.
#[inline(always)]
pub fn ipv4_header(hdr: &Ipv4Hdr) -> [u8; 2] {
    (!fold(sum_words::<_, 10>(hdr))).to_be_bytes()
}

/// Sum of the IPv4 pseudo-header of `ip`'s payload for protocol `proto` and length `len`.
#[inline(always)]
fn pseudo(ip: &Ipv4Hdr, proto: u8, len: u16) -> u32 {
    sum_words::<_, 2>(&ip.src_addr) + sum_words::<_, 2>(&ip.dst_addr) + proto as u32 + len as u32
}

/// The outer UDP checksum of a VXLAN packet, computed from headers alone (Linux's "local
/// checksum offload" identity): a valid inner TCP/UDP checksum makes the inner segment sum
/// to the complement of its pseudo-header; a valid ICMP checksum makes the message sum to 0.
///
/// Returns the checksum in wire order, or zero ("none", always allowed for IPv4) when the
/// inner packet's own checksum does not cover it: other protocols, fragments, IPv4 options,
/// UDP sent without a checksum (`inner_udp_check` is the inner UDP checksum field, if UDP).
#[inline(always)]
pub fn vxlan_udp(
    outer: &Ipv4Hdr,
    udp: &UdpHdr,
    vxlan: &VxlanHdr,
    inner_eth: &EthHdr,
    inner: &Ipv4Hdr,
    inner_udp_check: Option<[u8; 2]>,
) -> [u8; 2] {
    const TCP: u8 = 6;
    const UDP: u8 = 17;
    const ICMP: u8 = 1;
    if inner.vihl != 0x45 || u16::from_be_bytes(inner.frags) & 0x3fff != 0 {
        return [0; 2];
    }
    let inner_l4_len = u16::from_be_bytes(inner.tot_len).wrapping_sub(20);
    let segment = match (inner.proto, inner_udp_check) {
        (TCP, _) => !fold(pseudo(inner, TCP, inner_l4_len)),
        (UDP, Some(check)) if check != [0; 2] => !fold(pseudo(inner, UDP, inner_l4_len)),
        (ICMP, _) => 0,
        _ => return [0; 2],
    };
    let sum = pseudo(outer, UDP, u16::from_be_bytes(udp.len))
        + sum_words::<_, 4>(udp)
        + sum_words::<_, 4>(vxlan)
        + sum_words::<_, 7>(inner_eth)
        + sum_words::<_, 10>(inner)
        + segment as u32;
    match !fold(sum) {
        // 0 means "no checksum" in UDP: send its ones' complement twin.
        0 => [0xff, 0xff],
        c => c.to_be_bytes(),
    }
}

/// The outer UDP checksum of a VXLAN packet over IPv6 around an inner IPv6 packet, from
/// headers alone, as `vxlan_udp` does for IPv4: the inner TCP, UDP or ICMPv6 message (right
/// behind the inner IPv6 header, `inner.payload_len` long) sums to the complement of its
/// pseudo-header, whether its own checksum is complete or left for offload
/// (`CHECKSUM_PARTIAL` holds the pseudo-header's sum). That pseudo-header's addresses are the
/// inner header's own, so they cancel: of the inner header only its first 8 bytes remain,
/// less the message's length and next header. The caller checked the next header.
#[inline(always)]
pub fn vxlan6_udp(
    outer: &Ipv6Hdr,
    udp: &UdpHdr,
    vxlan: &VxlanHdr,
    inner_eth: &EthHdr,
    inner: &Ipv6Hdr,
) -> [u8; 2] {
    const UDP: u32 = 17;
    // SAFETY: the first 8 bytes of the 40-byte header.
    let inner_head = unsafe { &*(inner as *const Ipv6Hdr as *const [u8; 8]) };
    let inner_l4 = u16::from_be_bytes(inner.payload_len) as u32 + inner.next_hdr as u32;
    let sum = sum_words::<_, 8>(&outer.src_addr)
        + sum_words::<_, 8>(&outer.dst_addr)
        + u16::from_be_bytes(udp.len) as u32
        + UDP
        + sum_words::<_, 4>(udp)
        + sum_words::<_, 4>(vxlan)
        + sum_words::<_, 7>(inner_eth)
        + sum_words::<_, 4>(inner_head)
        + (!fold(inner_l4)) as u32;
    match !fold(sum) {
        // 0 means "no checksum" in UDP (refused over IPv6): send its ones' complement twin.
        0 => [0xff, 0xff],
        c => c.to_be_bytes(),
    }
}

/// Lowers the TTL of the IPv4 header at `ip` by one and updates its checksum incrementally
/// (RFC 1624: HC' = ~(~HC + ~m + m')), as a router forwarding it would. The caller has checked
/// that the TTL is above 1.
#[inline(always)]
pub fn decrement_ttl(ip: &mut Ipv4Hdr) {
    let old = u16::from_be_bytes([ip.ttl, ip.proto]);
    let new = u16::from_be_bytes([ip.ttl - 1, ip.proto]);
    let check = u16::from_be_bytes(ip.check);
    let sum = (!check) as u32 + (!old) as u32 + new as u32;
    ip.check = (!fold(sum)).to_be_bytes();
    ip.ttl -= 1;
}

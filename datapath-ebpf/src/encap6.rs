//! The two ways an IPv6 packet is put in VXLAN over IPv6. Packets other than GSO are written
//! by the program: the 70 bytes of outer IPv6, UDP (its checksum from headers alone), VXLAN and
//! inner Ethernet inserted with `bpf_skb_adjust_room`, then the outer next hop from
//! `bpf_fib_lookup` (AF_INET6) and NDP through `bpf_redirect_neigh`. GSO packets, and those
//! whose inner checksum does not cover them, go to the kernel's VXLAN device with a tunnel
//! key: it alone writes a UDP checksum in every segment.
use aya_ebpf::{
    bindings::{
        __sk_buff, BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_TUNINFO_IPV6, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        bpf_tunnel_key,
    },
    programs::TcContext,
};
use maps_common::{DropReason, NodeConfig, NodeConfig6, PodRoute6, VXLAN6_OVERHEAD};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv6Hdr,
    udp::UdpHdr,
    vxlan::VxlanHdr,
};

use crate::{
    csum, encap,
    nexthop::{self, forward6},
    outcome,
    parse::{IPPROTO_TCP, IPPROTO_UDP, ptr_at, ptr_at_mut},
};

const IPPROTO_ICMPV6: u8 = 58;
const OUTER_HOP_LIMIT: u8 = 64;

/// Everything VXLAN over IPv6 puts between the outer Ethernet header and the inner IPv6 one.
#[repr(C)]
struct Vxlan6Headers {
    ip: Ipv6Hdr,
    udp: UdpHdr,
    vxlan: VxlanHdr,
    inner_eth: EthHdr,
}
const _: () = assert!(core::mem::size_of::<Vxlan6Headers>() == VXLAN6_OVERHEAD as usize);

/// Whether the program writes this packet's tunnel itself: not GSO, the frame exactly the
/// inner IPv6 packet (no trailing bytes the checksum would miss), and TCP, ICMPv6 or UDP with a
/// checksum right behind the IPv6 header, whose own checksum gives the outer one.
#[inline(always)]
fn writable(ctx: &TcContext, inner: &Ipv6Hdr) -> bool {
    // SAFETY: ctx.skb.skb is the program's __sk_buff.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    let frame = ctx.len() - EthHdr::LEN as u32;
    if gso_size != 0 || u16::from_be_bytes(inner.payload_len) as u32 + Ipv6Hdr::LEN as u32 != frame
    {
        return false;
    }
    match inner.next_hdr {
        IPPROTO_TCP | IPPROTO_ICMPV6 => true,
        // UDP over IPv6 must carry a checksum; one sent without is left to the device.
        IPPROTO_UDP => ptr_at::<[u8; 2], _>(ctx, EthHdr::LEN + Ipv6Hdr::LEN + 6)
            // SAFETY: ptr_at checked the bounds.
            .is_some_and(|c| unsafe { *c } != [0; 2]),
        _ => false,
    }
}

/// Encapsulates in VXLAN over IPv6 toward `route`'s node: written here and sent to the outer
/// next hop when the packet is `writable`, else handed to the kernel's VXLAN device. The
/// caller checked the packet's version and size. Returns the verdict, or the reason to drop.
///
/// Each way runs in a BPF-to-BPF call, never inlined: the headers and the FIB's parameters,
/// or the tunnel key, get a stack frame of their own beside the caller's lookups, flows and
/// events, which together would exceed the verifier's 512 bytes.
#[inline(always)]
pub fn encap6(
    ctx: &TcContext,
    cfg: &NodeConfig,
    c6: &NodeConfig6,
    route: &PodRoute6,
    inner: &Ipv6Hdr,
) -> Result<i32, DropReason> {
    let skb = ctx.skb.skb;
    outcome::decode(if writable(ctx, inner) {
        own_frame(write_and_forward, skb, cfg, c6, route, inner)
    } else {
        own_frame(key_and_redirect, skb, cfg, c6, route, inner)
    })
}

/// Runs `way` in a BPF-to-BPF call of its own (one per way: `F` is each function's own
/// zero-sized type), its outcome in one register.
#[inline(never)]
fn own_frame<F>(
    way: F,
    skb: *mut __sk_buff,
    cfg: &NodeConfig,
    c6: &NodeConfig6,
    route: &PodRoute6,
    inner: &Ipv6Hdr,
) -> i64
where
    F: Fn(&TcContext, &NodeConfig, &NodeConfig6, &PodRoute6, &Ipv6Hdr) -> Result<i32, DropReason>,
{
    outcome::encode(way(&TcContext::new(skb), cfg, c6, route, inner))
}

/// The kernel device's way, for GSO packets: the inner Ethernet header and an IPv6 tunnel key
/// (VNI, addresses in wire order, traffic class and flow label copied from the inner header,
/// RFC 6040), the packet redirected to the metadata-mode device, which writes the outer
/// headers with a UDP checksum in every segment.
#[inline(always)]
fn key_and_redirect(
    ctx: &TcContext,
    cfg: &NodeConfig,
    c6: &NodeConfig6,
    route: &PodRoute6,
    inner: &Ipv6Hdr,
) -> Result<i32, DropReason> {
    // SAFETY: all-zero is a valid bpf_tunnel_key.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = cfg.vni;
    key.__bindgen_anon_1.remote_ipv6 = nexthop::words(&route.node_addr);
    key.__bindgen_anon_3.local_ipv6 = nexthop::words(&c6.node_addr);
    key.tunnel_tos = (inner.vcf[0] << 4) | (inner.vcf[1] >> 4);
    key.tunnel_ttl = OUTER_HOP_LIMIT;
    key.tunnel_label = u32::from_be_bytes(inner.vcf) & 0x000f_ffff;
    let macs = (route.vtep_mac, c6.vtep_mac);
    let flags = BPF_F_TUNINFO_IPV6 as u64;
    encap::to_tunnel_device(ctx, macs, &mut key, flags, c6.vxlan_ifindex)
}

#[inline(always)]
fn write_and_forward(
    ctx: &TcContext,
    cfg: &NodeConfig,
    c6: &NodeConfig6,
    route: &PodRoute6,
    inner: &Ipv6Hdr,
) -> Result<i32, DropReason> {
    let hash = flow_hash6(ctx, inner);
    let udp_len = u16::from_be_bytes(inner.payload_len)
        .wrapping_add((Ipv6Hdr::LEN + UdpHdr::LEN + VxlanHdr::LEN + EthHdr::LEN) as u16)
        .to_be_bytes();
    let flags = (BPF_F_ADJ_ROOM_ENCAP_L3_IPV6
        | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
        | BPF_F_ADJ_ROOM_ENCAP_L2_ETH) as u64
        | encap::encap_l2_len();
    ctx.adjust_room(VXLAN6_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| DropReason::AdjustFailed)?;
    // Revalidate after adjust_room: the head moved. Written in place, field by field, and the
    // checksum read back from there: built on the stack, 70 bytes would not fit beside the
    // caller's frame.
    let p = ptr_at_mut::<Vxlan6Headers, _>(ctx, EthHdr::LEN).ok_or(DropReason::Truncated)?;
    // SAFETY: bounds checked just above; nothing else refers to these bytes.
    let h = unsafe { &mut *p };
    h.ip.vcf = outer_vcf(inner.vcf, hash);
    h.ip.payload_len = udp_len;
    h.ip.next_hdr = IPPROTO_UDP;
    h.ip.hop_limit = OUTER_HOP_LIMIT;
    h.ip.src_addr = c6.node_addr;
    h.ip.dst_addr = route.node_addr;
    h.udp.src = encap::source_port(hash).to_be_bytes();
    h.udp.dst = cfg.vxlan_port.to_be_bytes();
    h.udp.len = udp_len;
    h.udp.check = [0; 2];
    h.vxlan.flags = network_types::vxlan::VXLAN_I_FLAG_MASK;
    h.vxlan._reserved1 = [0; 3];
    h.vxlan.vni = [(cfg.vni >> 16) as u8, (cfg.vni >> 8) as u8, cfg.vni as u8];
    h.vxlan._reserved2 = 0;
    h.inner_eth.dst_addr = route.vtep_mac;
    h.inner_eth.src_addr = c6.vtep_mac;
    h.inner_eth.ether_type = EtherType::Ipv6 as u16;
    h.udp.check = csum::vxlan6_udp(&h.ip, &h.udp, &h.vxlan, &h.inner_eth, inner);
    forward6(
        ctx,
        cfg,
        (&c6.node_addr, &route.node_addr),
        Some(route.peer_idx),
    )
}

/// The outer header's version, traffic class and flow label: the inner header's (RFC 6040),
/// with a flow label from the flow's hash when it has none, as the kernel's tunnels do.
#[inline(always)]
fn outer_vcf(vcf: [u8; 4], hash: u32) -> [u8; 4] {
    if u32::from_be_bytes(vcf) & 0x000f_ffff != 0 {
        return vcf;
    }
    let label = (hash & 0x000f_ffff).to_be_bytes();
    [vcf[0], (vcf[1] & 0xf0) | label[1], label[2], label[3]]
}

/// The inner flow's hash, as the Linux VXLAN device picks its source port by: the skb's own
/// when it has one, else the inner addresses' last words, next header and ports, mixed.
#[inline(always)]
fn flow_hash6(ctx: &TcContext, inner: &Ipv6Hdr) -> u32 {
    // SAFETY: ctx.skb.skb is the program's __sk_buff.
    let hash = unsafe { (*ctx.skb.skb).hash };
    if hash != 0 {
        return hash;
    }
    let word = |a: &[u8; 16], i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    let mut h = word(&inner.src_addr, 12)
        ^ word(&inner.src_addr, 8).rotate_left(5)
        ^ word(&inner.dst_addr, 12).rotate_left(16)
        ^ word(&inner.dst_addr, 8).rotate_left(21)
        ^ inner.next_hdr as u32;
    if (inner.next_hdr == IPPROTO_TCP || inner.next_hdr == IPPROTO_UDP)
        && let Some(ports) = ptr_at::<[u8; 4], _>(ctx, EthHdr::LEN + Ipv6Hdr::LEN)
    {
        // SAFETY: ptr_at checked the bounds.
        h ^= u32::from_ne_bytes(unsafe { *ports }).rotate_left(8);
    }
    encap::mix(h)
}

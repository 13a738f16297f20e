//! IPv6 pods over the IPv6 underlay, in VXLAN (70 bytes). Encapsulation is the program's own
//! (`encap6`) for packets other than GSO; a GSO packet gets its inner Ethernet header and an
//! IPv6 tunnel key and goes to the kernel's metadata-mode VXLAN device
//! (`NodeConfig6::vxlan_ifindex`), which writes a UDP checksum in every segment, as IPv6
//! requires and `bpf_skb_adjust_room` cannot ask GSO for. Decapsulation admits IPv6 VXLAN from
//! known nodes and strips it at XDP or TC.
use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use maps_common::{
    CounterId, DropReason, NodeConfig, NodeConfig6, NodeEntry6, PodRoute6, VXLAN6_OVERHEAD,
    config_flags, event_hook, node_flags, route_mode,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv6Hdr,
    udp::UdpHdr,
};

use crate::{
    DP_CONFIG6, DP_NODES6, DP_POD_CIDRS6,
    counters::count,
    decap::{Verdict, vxlan_and_inner_type},
    encap::{self, Start, counted},
    encap6, monitor, nexthop,
    parse::{IPPROTO_UDP, Packet, ptr_at},
};

/// From the outer Ethernet header to the inner IPv6 header.
const INNER_IP_OFF: usize = EthHdr::LEN + VXLAN6_OVERHEAD as usize;

/// The IPv6 configuration, once the agent carries IPv6 pods.
#[inline(always)]
pub fn config6() -> Option<&'static NodeConfig6> {
    DP_CONFIG6.get(0).filter(|c| c.pod_prefix_len != 0)
}

/// At the underlay's egress, encapsulates an IPv6 packet headed for a remote node's IPv6 pod
/// CIDR; passes others, unless the kernel routed them here through the aggregate route
/// (destination MAC `ROUTE_NEXTHOP_MAC`): those are never passed as they are.
#[inline(always)]
pub fn try_encap6(ctx: &TcContext) -> Result<i32, DropReason> {
    let (cfg, via_aggregate) = match encap::start(ctx) {
        Start::Leave(action) => return Ok(action),
        Start::Lookup(cfg, via_aggregate) => (cfg, via_aggregate),
    };
    let len = ctx.len();
    let (Some(c6), Some(ip)) = (config6(), ptr_at::<Ipv6Hdr, _>(ctx, EthHdr::LEN)) else {
        return pass_or(len, via_aggregate);
    };
    // SAFETY: ptr_at checked the bounds; copied before the frame changes.
    let inner = unsafe { *ip };
    let route = match DP_POD_CIDRS6.get(&Key::new(128, inner.dst_addr)) {
        // A same-subnet peer's own route carries its packets natively; through the aggregate
        // route (a peer in another subnet under `encapsulation: none`, or routes being
        // replaced) they reach it unencapsulated, the FIB's next hop toward it in front.
        Some(r) if r.mode == route_mode::NATIVE => {
            let action = match via_aggregate {
                true => {
                    nexthop::forward6(ctx, cfg, (&c6.node_addr, &r.node_addr), Some(r.peer_idx))
                }
                false => Ok(aya_ebpf::bindings::TC_ACT_OK),
            };
            return counted(
                action.map(|a| (CounterId::NativeForward, a)),
                r.peer_idx,
                len,
            );
        }
        Some(r) if r.mode == route_mode::VXLAN => *r,
        // A packet `encap6` wrote and left to `bpf_redirect_neigh` comes by again once the
        // neighbour resolves, re-sent through the aggregate next hop: its own is known now.
        _ if via_aggregate && DP_NODES6.get_ptr(inner.dst_addr).is_some() => {
            let action = nexthop::forward6(ctx, cfg, (&c6.node_addr, &inner.dst_addr), None)?;
            count(CounterId::Pass, len);
            return Ok(action);
        }
        _ => return pass_or(len, via_aggregate),
    };
    // A pod's flow that crossed the host's stack toward a remote pod is netfilter's verdict.
    crate::hostroute6::stack_forwarded6(ctx, cfg, c6, &inner);
    let outcome = send6(ctx, cfg, c6, &route, &inner).map(|a| (CounterId::EncapVxlan, a));
    let outcome = counted(outcome, route.peer_idx, len);
    if outcome.is_ok() {
        monitor::forwarded(ctx, event_hook::TC_ENCAP);
    }
    outcome
}

/// Passes a packet that is not for a remote IPv6 pod, unless the aggregate route sent it here
/// (then nothing can deliver it).
#[inline(always)]
fn pass_or(len: u32, via_aggregate: bool) -> Result<i32, DropReason> {
    if via_aggregate {
        return Err(DropReason::NoPodRoute);
    }
    count(CounterId::Pass, len);
    Ok(aya_ebpf::bindings::TC_ACT_OK)
}

/// Checks the packet and sends it toward `route`'s node in VXLAN over IPv6: written by the
/// program when it can, else by the kernel's VXLAN device (`encap6`).
/// Counted under `EncapIpv6` (the caller counts `EncapVxlan`) and marked encapsulated, so the
/// outer packet is passed at the underlay's egress without a lookup.
#[inline(always)]
pub fn send6(
    ctx: &TcContext,
    cfg: &NodeConfig,
    c6: &NodeConfig6,
    route: &PodRoute6,
    inner: &Ipv6Hdr,
) -> Result<i32, DropReason> {
    // No IPv6 route toward the peer (the agent watches): dropped and counted here, not lost
    // in the device.
    if route.flags & node_flags::UNREACHABLE != 0 {
        return Err(DropReason::PeerUnreachable);
    }
    // SAFETY: ctx.skb.skb is the program's __sk_buff.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    let len = ctx.len();
    if inner.vcf[0] >> 4 != 6
        || (gso_size == 0
            && u16::from_be_bytes(inner.payload_len) as u32 + Ipv6Hdr::LEN as u32
                > len - EthHdr::LEN as u32)
    {
        return Err(DropReason::BadInnerHeader);
    }
    // The aggregate route's MTU has the host answer Packet Too Big before a packet gets here;
    // one that still would not fit is dropped and counted, never fragmented.
    if gso_size == 0
        && cfg.underlay_mtu != 0
        && len - EthHdr::LEN as u32 + VXLAN6_OVERHEAD > cfg.underlay_mtu
    {
        return Err(DropReason::TooBig);
    }
    let action = encap6::encap6(ctx, cfg, c6, route, inner)?;
    count(CounterId::EncapIpv6, len);
    // SAFETY: ctx.skb.skb is the program's __sk_buff; TC programs may write its mark. The
    // redirect happens once the program returns, and the device keeps the mark.
    unsafe { (*ctx.skb.skb).mark = maps_common::MARK_ENCAPSULATED };
    Ok(action)
}

/// Classifies an IPv6 frame: `Pass` for what is not VXLAN on the configured port addressed to
/// this node's IPv6 address; `Decap` for VXLAN from a known node with the configured VNI,
/// consistent lengths and an inner IPv6 header whose source lies in the sender's IPv6 pod
/// CIDR (when the check is on); everything in between dropped with its reason.
#[inline(always)]
pub fn classify6<P: Packet>(ctx: &P, cfg: &'static NodeConfig) -> Result<Verdict, DropReason> {
    let pass = Ok(Verdict::Pass { cfg: Some(cfg) });
    let (Some(c6), Some(ip)) = (config6(), ptr_at::<Ipv6Hdr, _>(ctx, EthHdr::LEN)) else {
        return pass;
    };
    // SAFETY: ptr_at checked the bounds.
    let outer = unsafe { *ip };
    if outer.next_hdr != IPPROTO_UDP || outer.dst_addr != c6.node_addr {
        return pass;
    }
    let Some(udp) = ptr_at::<UdpHdr, _>(ctx, EthHdr::LEN + Ipv6Hdr::LEN) else {
        return pass;
    };
    // SAFETY: ptr_at checked the bounds.
    let udp = unsafe { *udp };
    if u16::from_be_bytes(udp.dst) != cfg.vxlan_port {
        return pass;
    }
    let node = DP_NODES6
        .get_ptr(outer.src_addr)
        .ok_or(DropReason::UnknownPeer)?;
    // SAFETY: a value pointer from the map, read once, right away.
    let node = unsafe { *node };
    let payload = admit6(ctx, &outer, &udp)?;
    let vx_off = EthHdr::LEN + Ipv6Hdr::LEN + UdpHdr::LEN;
    vxlan_and_inner_type(ctx, cfg, vx_off, EtherType::Ipv6 as u16)?;
    inner6(ctx, cfg, &node, &outer, payload)?;
    Ok(Verdict::Decap {
        strip: VXLAN6_OVERHEAD,
        counter: CounterId::DecapVxlan,
        peer_idx: node.peer_idx,
        host_routing: cfg.flags & config_flags::HOST_ROUTING_BPF != 0,
        cfg,
    })
}

/// The outer lengths: the IPv6 payload within the frame and equal to the UDP length (a GSO
/// packet's are the kernel's, and it is measured by its length). Returns the payload length.
#[inline(always)]
fn admit6<P: Packet>(ctx: &P, outer: &Ipv6Hdr, udp: &UdpHdr) -> Result<usize, DropReason> {
    let frame = ctx.packet_len() - EthHdr::LEN - Ipv6Hdr::LEN;
    if ctx.is_gso() {
        return Ok(frame);
    }
    let payload = u16::from_be_bytes(outer.payload_len) as usize;
    if payload > frame {
        return Err(DropReason::Truncated);
    }
    if u16::from_be_bytes(udp.len) as usize != payload {
        return Err(DropReason::BadOuterLength);
    }
    Ok(payload)
}

/// The inner IPv6 header: version 6, within the outer payload, and a source in the sender's
/// IPv6 pod CIDR (or the sender itself) when the check is on.
#[inline(always)]
fn inner6<P: Packet>(
    ctx: &P,
    cfg: &NodeConfig,
    node: &NodeEntry6,
    outer: &Ipv6Hdr,
    payload: usize,
) -> Result<(), DropReason> {
    let strip = VXLAN6_OVERHEAD as usize - Ipv6Hdr::LEN;
    if payload < strip + Ipv6Hdr::LEN {
        return Err(DropReason::BadOuterLength);
    }
    let ip = ptr_at::<Ipv6Hdr, _>(ctx, INNER_IP_OFF).ok_or(DropReason::Truncated)?;
    // SAFETY: ptr_at checked the bounds.
    let inner = unsafe { *ip };
    let inner_len = u16::from_be_bytes(inner.payload_len) as usize + Ipv6Hdr::LEN;
    if inner.vcf[0] >> 4 != 6 || (!ctx.is_gso() && inner_len > payload - strip) {
        return Err(DropReason::BadInnerHeader);
    }
    if cfg.flags & config_flags::INNER_SRC_CHECK != 0
        && !in_cidr6(&inner.src_addr, &node.pod_cidr, node.pod_prefix_len)
        && inner.src_addr != outer.src_addr
    {
        return Err(DropReason::InnerSrcSpoofed);
    }
    Ok(())
}

/// Whether `addr` lies in `cidr`/`len` (both wire order), in two 64-bit halves (BPF has no
/// 128-bit shifts).
#[inline(always)]
pub fn in_cidr6(addr: &[u8; 16], cidr: &[u8; 16], len: u8) -> bool {
    let (hi_mask, lo_mask) = if len >= 64 {
        (u64::MAX, mask64(len - 64))
    } else {
        (mask64(len), 0)
    };
    (half(addr, 0) ^ half(cidr, 0)) & hi_mask == 0 && (half(addr, 8) ^ half(cidr, 8)) & lo_mask == 0
}

/// The leading `len` bits set (`len` above 64 counts as 64).
#[inline(always)]
fn mask64(len: u8) -> u64 {
    match len {
        0 => 0,
        l if l >= 64 => u64::MAX,
        l => u64::MAX << (64 - l as u32),
    }
}

/// Eight bytes of `b` from `at`, as a big-endian number.
#[inline(always)]
fn half(b: &[u8; 16], at: usize) -> u64 {
    let mut w = 0u64;
    for k in 0..8 {
        w = (w << 8) | b[at + k] as u64;
    }
    w
}

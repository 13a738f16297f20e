//! Encapsulation at TC egress on the underlay: IPIP or VXLAN headers in front of IPv4 packets
//! headed for a remote node's pod CIDR (IPv6 packets go to `six`), then sent to the outer next
//! hop (`nexthop`). The kernel routes remote pod traffic here through a few aggregate routes
//! whose next hop is `ROUTE_NEXTHOP`; the program, not the routing table, knows which node owns
//! which CIDR.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_DONT_FRAGMENT, TC_ACT_OK,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_tunnel_key,
    },
    helpers::{bpf_redirect, bpf_skb_set_tunnel_key},
    programs::TcContext,
};
use maps_common::{
    CounterId, DropReason, NodeConfig, PodRoute, ROUTE_NEXTHOP_MAC, config_flags, event_hook,
    route_mode,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    udp::UdpHdr,
    vxlan::VxlanHdr,
};

use crate::{
    DP_CONFIG, DP_NODES,
    counters::{count, count_peer, count_peer_unreachable},
    csum, flows, lookup, monitor,
    nexthop::forward,
    parse::{IPPROTO_IPIP, IPPROTO_TCP, IPPROTO_UDP, l4_ports, ptr_at, ptr_at_mut},
};

const OUTER_TTL: u8 = 64;
/// DF bit in the first byte of the IPv4 flags/fragment-offset field.
const IP_DF: u8 = 0x40;
/// Source ports the Linux VXLAN device picks from (its default ip_local_port_range).
const VXLAN_SPORT_MIN: u32 = 32768;
const VXLAN_SPORT_MAX: u32 = 61000;

/// Everything VXLAN puts between the outer Ethernet header and the inner IPv4 header.
#[repr(C)]
#[derive(Clone, Copy)]
struct VxlanHeaders {
    ip: Ipv4Hdr,
    udp: UdpHdr,
    vxlan: VxlanHdr,
    inner_eth: EthHdr,
}
const _: () = assert!(core::mem::size_of::<VxlanHeaders>() == 50);

/// How the underlay's egress starts on a frame of either family.
pub enum Start {
    /// Leave the frame as it is, with this verdict (counted where it should be).
    Leave(i32),
    /// Look it up: this node's configuration, and whether the kernel routed it here through
    /// the aggregate routes (destination MAC `ROUTE_NEXTHOP_MAC`).
    Lookup(&'static NodeConfig, bool),
}

/// What the underlay's egress checks first, for either family: a packet encapsulated already
/// (marked), no configuration yet, a runt.
#[inline(always)]
pub fn start(ctx: &TcContext) -> Start {
    let via_aggregate = match ptr_at::<EthHdr, _>(ctx, 0) {
        // SAFETY: ptr_at checked the bounds.
        Some(eth) => (unsafe { (*eth).dst_addr }) == ROUTE_NEXTHOP_MAC,
        None => return Start::Leave(pass(ctx.len())),
    };
    // SAFETY: ctx.skb.skb is the program's __sk_buff; TC programs may write its mark.
    unsafe {
        if (*ctx.skb.skb).mark == maps_common::MARK_ENCAPSULATED {
            (*ctx.skb.skb).mark = 0;
            // Encapsulated and addressed already (at a pod's veth, or here), unless the
            // neighbour it waited for resolved and the kernel re-sent it through its route's
            // neighbour, the aggregate next hop: then it is addressed anew below.
            if !via_aggregate {
                return Start::Leave(TC_ACT_OK);
            }
        }
    }
    match DP_CONFIG.get(0) {
        Some(cfg) if cfg.node_addr != [0; 4] => Start::Lookup(cfg, via_aggregate),
        _ => Start::Leave(pass(ctx.len())),
    }
}

/// Encapsulates an IPv4 packet if its destination lies in a remote node's encapsulated pod
/// CIDR (the caller sends IPv6 to `six`).
///
/// Returns `TC_ACT_OK` for packets it leaves alone (counted as passed or native), the verdict of
/// the redirect for encapsulated packets, or the reason to drop. A packet the kernel routed here
/// through the aggregate routes (destination MAC `ROUTE_NEXTHOP_MAC`) is never passed as it
/// is: it goes to its node encapsulated or natively, or is dropped as `NoPodRoute`.
#[inline(always)]
pub fn try_encap(ctx: &TcContext) -> Result<i32, DropReason> {
    let (cfg, via_aggregate) = match start(ctx) {
        Start::Leave(action) => return Ok(action),
        Start::Lookup(cfg, via_aggregate) => (cfg, via_aggregate),
    };
    let len = ctx.len();
    let Some(ip) = ptr_at::<Ipv4Hdr, _>(ctx, EthHdr::LEN) else {
        return Ok(pass(len));
    };
    if crate::hostroute::ether_type(ctx) != EtherType::Ipv4 as u16 {
        return Ok(pass(len));
    }
    // SAFETY: ptr_at checked the bounds; copy the 20 bytes before the head moves.
    let inner = unsafe { *ip };
    let route = match lookup::pod_route(cfg, inner.dst_addr) {
        Some(r) if r.mode != route_mode::LOCAL => r,
        // A packet this program encapsulated and handed to `bpf_redirect_neigh` comes by again
        // once the neighbour resolves: the kernel re-sends it through its route's neighbour,
        // the aggregate next hop, so it carries that MAC. Its own next hop is known now.
        _ if via_aggregate && DP_NODES.get_ptr(inner.dst_addr).is_some() => {
            let action = forward(ctx, cfg, inner.dst_addr, None)?;
            return Ok(pass_with(len, action));
        }
        _ if via_aggregate => return Err(DropReason::NoPodRoute),
        _ => return Ok(pass(len)),
    };
    // A pod's flow that crossed the host's stack toward a remote pod, encapsulated or not, is
    // netfilter's verdict.
    flows::stack_forwarded(ctx, cfg, &inner);
    match route.mode {
        route_mode::IPIP | route_mode::VXLAN => send(ctx, cfg, &route, &inner),
        // A same-subnet peer's own route normally carries these; through the aggregate route
        // (a peer in another subnet under `encapsulation: none`) they reach it unencapsulated.
        route_mode::NATIVE if via_aggregate => send_native(ctx, cfg, &route),
        route_mode::NATIVE => counted(
            Ok((CounterId::NativeForward, TC_ACT_OK)),
            route.peer_idx,
            len,
        ),
        _ => Err(DropReason::NoPodRoute),
    }
}

/// Sends the packet as it is toward `route`'s node, its next hop (native routing: the
/// fabric routes the pod CIDR from there); counts it.
#[inline(always)]
pub fn send_native(ctx: &TcContext, cfg: &NodeConfig, route: &PodRoute) -> Result<i32, DropReason> {
    let action = forward(ctx, cfg, route.node_addr, Some(route.peer_idx));
    counted(
        action.map(|a| (CounterId::NativeForward, a)),
        route.peer_idx,
        ctx.len(),
    )
}

/// Encapsulates toward `route`'s node and sends; counts it (and a peer it could not reach).
/// `inner` is the IPv4 header as it stands behind the Ethernet header now.
#[inline(always)]
pub fn send(
    ctx: &TcContext,
    cfg: &NodeConfig,
    route: &PodRoute,
    inner: &Ipv4Hdr,
) -> Result<i32, DropReason> {
    let len = ctx.len();
    let outcome = counted(
        encap_and_forward(ctx, len, cfg, route, inner),
        route.peer_idx,
        len,
    );
    if outcome.is_ok() {
        monitor::forwarded(ctx, event_hook::TC_ENCAP);
    }
    outcome
}

/// Counts an outcome toward the peer in slot `peer_idx`: the counter and the peer's tx on
/// success, the peer's unreachable count when that was the reason to drop.
#[inline(always)]
pub fn counted(
    outcome: Result<(CounterId, i32), DropReason>,
    peer_idx: u32,
    len: u32,
) -> Result<i32, DropReason> {
    match outcome {
        Ok((counter, action)) => {
            count(counter, len);
            count_peer(peer_idx, true, len);
            Ok(action)
        }
        Err(DropReason::PeerUnreachable) => {
            count_peer_unreachable(peer_idx, len);
            Err(DropReason::PeerUnreachable)
        }
        Err(reason) => Err(reason),
    }
}

/// Checks the inner header, encapsulates and sends toward the peer; returns the counter to
/// count under and the verdict, or the reason to drop.
#[inline(always)]
fn encap_and_forward(
    ctx: &TcContext,
    len: u32,
    cfg: &NodeConfig,
    route: &PodRoute,
    inner: &Ipv4Hdr,
) -> Result<(CounterId, i32), DropReason> {
    // SAFETY: ctx.skb.skb is the program's __sk_buff.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    let inner_ihl = (inner.vihl & 0x0f) as u32 * 4;
    let inner_len = u16::from_be_bytes(inner.tot_len) as u32;
    // A GSO packet's lengths are the kernel's own; others must hold what they claim.
    if inner.vihl >> 4 != 4
        || inner_ihl < 20
        || (gso_size == 0 && (inner_len < inner_ihl || inner_len > len - EthHdr::LEN as u32))
    {
        return Err(DropReason::BadInnerHeader);
    }
    if route.mode == route_mode::VXLAN
        && cfg.flags & config_flags::UDP_CSUM != 0
        && gso_size != 0
        && cfg.csum_ifindex != 0
    {
        return Ok((
            CounterId::EncapVxlan,
            via_csum_device(ctx, cfg, route, inner)?,
        ));
    }
    let counter = encap(ctx, len, gso_size, cfg, route, inner)?;
    let action = forward(ctx, cfg, route.node_addr, Some(route.peer_idx))?;
    Ok((counter, action))
}

/// VXLAN for a GSO packet when outer UDP checksums are asked for: hands the packet, with its
/// inner Ethernet header written and a tunnel key set, to the kernel's metadata-mode VXLAN
/// device (`NodeConfig::csum_ifindex`). Only that device can mark a GSO packet for a checksum
/// in every segment's outer UDP header (`SKB_GSO_UDP_TUNNEL_CSUM`); `bpf_skb_adjust_room` has
/// no flag for it, and one checksum written here would be wrong for all segments but one.
///
/// Returns the redirect verdict; `AdjustFailed` when the kernel refuses the tunnel key.
#[inline(always)]
fn via_csum_device(
    ctx: &TcContext,
    cfg: &NodeConfig,
    route: &PodRoute,
    inner: &Ipv4Hdr,
) -> Result<i32, DropReason> {
    // SAFETY: all-zero is a valid bpf_tunnel_key.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = cfg.vni;
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(route.node_addr);
    key.__bindgen_anon_3.local_ipv4 = u32::from_be_bytes(cfg.node_addr);
    // RFC 6040 and RFC 2003 as on the BPF path: the device copies ECN, DF is passed on.
    key.tunnel_tos = inner.tos;
    key.tunnel_ttl = OUTER_TTL;
    let flags = if inner.frags[0] & IP_DF != 0 {
        BPF_F_DONT_FRAGMENT as u64
    } else {
        0
    };
    let macs = (route.vtep_mac, cfg.vtep_mac);
    to_tunnel_device(ctx, macs, &mut key, flags, cfg.csum_ifindex)
}

/// Hands the packet to the kernel's metadata-mode VXLAN device `ifindex`, either family: the
/// inner Ethernet header addressed (`macs`: destination, source VTEP) and `key` set as its
/// tunnel with `flags` (without BPF_F_ZERO_CSUM_TX the device writes the outer UDP checksum).
/// Returns the redirect verdict; `AdjustFailed` when the kernel refuses the key.
#[inline(always)]
pub fn to_tunnel_device(
    ctx: &TcContext,
    (dst, src): ([u8; 6], [u8; 6]),
    key: &mut bpf_tunnel_key,
    flags: u64,
    ifindex: u32,
) -> Result<i32, DropReason> {
    let eth = ptr_at_mut::<EthHdr, _>(ctx, 0).ok_or(DropReason::Truncated)?;
    // SAFETY: bounds checked just above.
    unsafe {
        (*eth).dst_addr = dst;
        (*eth).src_addr = src;
    }
    // SAFETY: key lives on the caller's stack for the call.
    let rc = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            flags,
        )
    };
    if rc != 0 {
        return Err(DropReason::AdjustFailed);
    }
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

#[inline(always)]
fn pass(len: u32) -> i32 {
    pass_with(len, TC_ACT_OK)
}

#[inline(always)]
fn pass_with(len: u32, action: i32) -> i32 {
    count(CounterId::Pass, len);
    action
}

/// Inserts the tunnel headers after the Ethernet header and writes them; `len` is the packet's
/// length before, `gso_size` its GSO segment size (0: not GSO).
///
/// On success the packet is `eth | outer IPv4 | [UDP | VXLAN | inner eth] | inner IPv4 ...`,
/// GSO metadata updated so a GSO packet is segmented as a tunnel packet, and the counter to
/// count it under is returned. The MTU check here comes before the room is made; the FIB lookup
/// repeats it only on its success path, not on the unresolved-neighbour one. Fails with `TooBig`
/// when a non-GSO packet would exceed the underlay MTU, `AdjustFailed` when the kernel refuses
/// the room, `Truncated` when the new headers are not in the linear area.
#[inline(always)]
fn encap(
    ctx: &TcContext,
    len: u32,
    gso_size: u32,
    cfg: &NodeConfig,
    route: &PodRoute,
    inner: &Ipv4Hdr,
) -> Result<CounterId, DropReason> {
    let vxlan = route.mode == route_mode::VXLAN;
    let overhead = overhead(route.mode);
    if too_big(len, gso_size, cfg, route.mode) {
        return Err(DropReason::TooBig);
    }

    // The frame's length, not the inner header's claim: trailing padding stays inside. A GSO
    // packet's outer lengths are rewritten per segment.
    let ip_len = (len - EthHdr::LEN as u32) as u16;
    let outer = outer_ipv4(
        cfg,
        route,
        inner,
        ip_len.wrapping_add(overhead as u16),
        vxlan,
    );
    let gso = gso_flag(ctx, gso_size, cfg, inner, overhead);
    if !vxlan {
        ctx.adjust_room(
            overhead as i32,
            BPF_ADJ_ROOM_MAC,
            BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64 | gso,
        )
        .map_err(|_| DropReason::AdjustFailed)?;
        // Revalidate after adjust_room: the head moved.
        let p = ptr_at_mut::<Ipv4Hdr, _>(ctx, EthHdr::LEN).ok_or(DropReason::Truncated)?;
        // SAFETY: bounds checked just above.
        unsafe { *p = outer };
        return Ok(CounterId::EncapIpip);
    }
    let mut hdrs = vxlan_headers(ctx, cfg, route, inner, outer, ip_len);
    let flags = (BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
        | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
        | BPF_F_ADJ_ROOM_ENCAP_L2_ETH) as u64
        | encap_l2_len()
        | gso;
    ctx.adjust_room(overhead as i32, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| DropReason::AdjustFailed)?;
    // Revalidate after adjust_room: the head moved.
    // With trailing padding the inner checksum does not cover every byte: send zero then.
    if cfg.flags & config_flags::UDP_CSUM != 0
        && gso_size == 0
        && u16::from_be_bytes(inner.tot_len) == ip_len
    {
        let l4_check = inner_l4_check(ctx, inner);
        hdrs.udp.check = csum::vxlan_udp(
            &hdrs.ip,
            &hdrs.udp,
            &hdrs.vxlan,
            &hdrs.inner_eth,
            inner,
            l4_check,
        );
    }
    let p = ptr_at_mut::<VxlanHeaders, _>(ctx, EthHdr::LEN).ok_or(DropReason::Truncated)?;
    // SAFETY: bounds checked just above.
    unsafe { *p = hdrs };
    Ok(CounterId::EncapVxlan)
}

/// The outer IPv4 header toward `route`'s node, `tot_len` long.
#[inline(always)]
fn outer_ipv4(
    cfg: &NodeConfig,
    route: &PodRoute,
    inner: &Ipv4Hdr,
    tot_len: u16,
    vxlan: bool,
) -> Ipv4Hdr {
    let mut outer = Ipv4Hdr {
        vihl: 0x45,
        // RFC 6040 normal mode: DSCP and ECN copied from the inner header.
        tos: inner.tos,
        tot_len: tot_len.to_be_bytes(),
        id: inner.id,
        // RFC 2003: DF copied from the inner header.
        frags: [inner.frags[0] & IP_DF, 0],
        ttl: OUTER_TTL,
        proto: if vxlan { IPPROTO_UDP } else { IPPROTO_IPIP },
        check: [0; 2],
        src_addr: cfg.node_addr,
        dst_addr: route.node_addr,
    };
    outer.check = csum::ipv4_header(&outer);
    outer
}

/// Everything VXLAN puts in front of the inner IPv4 header (`ip_len` long): the source port
/// from the inner flow's hash, the UDP checksum zero (filled in later when asked for).
#[inline(always)]
fn vxlan_headers(
    ctx: &TcContext,
    cfg: &NodeConfig,
    route: &PodRoute,
    inner: &Ipv4Hdr,
    outer: Ipv4Hdr,
    ip_len: u16,
) -> VxlanHeaders {
    let sport = source_port(flow_hash(ctx, inner));
    VxlanHeaders {
        ip: outer,
        udp: UdpHdr {
            src: sport.to_be_bytes(),
            dst: cfg.vxlan_port.to_be_bytes(),
            len: ip_len.wrapping_add(30).to_be_bytes(),
            // Zero: allowed for UDP over IPv4 and what Calico and Cilium send.
            check: [0; 2],
        },
        vxlan: VxlanHdr {
            flags: network_types::vxlan::VXLAN_I_FLAG_MASK,
            _reserved1: [0; 3],
            vni: [(cfg.vni >> 16) as u8, (cfg.vni >> 8) as u8, cfg.vni as u8],
            _reserved2: 0,
        },
        inner_eth: EthHdr {
            dst_addr: route.vtep_mac,
            src_addr: cfg.vtep_mac,
            ether_type: EtherType::Ipv4 as u16,
        },
    }
}

/// The inner flow's hash, which picks the VXLAN source port as the Linux VXLAN device does:
/// the skb's own (the socket's, or the NIC's RSS hash) when it has one, else a hash of the
/// inner addresses, protocol and ports. `bpf_get_hash_recalc` would run the kernel's flow
/// dissector for the second case, at a multiple of this cost.
#[inline(always)]
fn flow_hash(ctx: &TcContext, inner: &Ipv4Hdr) -> u32 {
    // SAFETY: ctx.skb.skb is the program's __sk_buff.
    let hash = unsafe { (*ctx.skb.skb).hash };
    if hash != 0 {
        return hash;
    }
    let mut h = u32::from_ne_bytes(inner.src_addr)
        ^ u32::from_ne_bytes(inner.dst_addr).rotate_left(16)
        ^ inner.proto as u32;
    if let Some(([sport, dport], _)) = l4_ports(ctx, inner) {
        h ^= u32::from_ne_bytes([sport[0], sport[1], dport[0], dport[1]]).rotate_left(8);
    }
    mix(h)
}

/// murmur3's finaliser: every input bit reaches every output bit.
#[inline(always)]
pub fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The VXLAN source port for a flow's hash, in the range the Linux VXLAN device uses.
#[inline(always)]
pub fn source_port(hash: u32) -> u16 {
    ((((hash as u64) * ((VXLAN_SPORT_MAX - VXLAN_SPORT_MIN) as u64)) >> 32) as u32
        + VXLAN_SPORT_MIN) as u16
}

/// Bytes the tunnel of `mode` (IPIP or VXLAN) puts in front of the inner IPv4 header.
#[inline(always)]
fn overhead(mode: u8) -> u32 {
    match mode {
        route_mode::VXLAN => maps_common::VXLAN_OVERHEAD,
        route_mode::IPIP => maps_common::IPIP_OVERHEAD,
        _ => 0,
    }
}

/// Whether a non-GSO packet of `len` bytes (Ethernet header included) would exceed the
/// underlay MTU once encapsulated in `mode`. GSO packets are segmented to fit (`gso_flag`).
#[inline(always)]
pub fn too_big(len: u32, gso_size: u32, cfg: &NodeConfig, mode: u8) -> bool {
    gso_size == 0
        && cfg.underlay_mtu != 0
        && len - EthHdr::LEN as u32 + overhead(mode) > cfg.underlay_mtu
}

/// `BPF_F_ADJ_ROOM_FIXED_GSO` when a GSO packet's segments, encapsulated, still fit the underlay
/// MTU (the pod MTU leaves room for the tunnel): they keep their size. Otherwise (a sender with a
/// larger MTU, or the MTU unknown) no flag, and the kernel shrinks the segment size by the
/// tunnel's overhead so that they fit.
#[inline(always)]
fn gso_flag(
    ctx: &TcContext,
    gso_size: u32,
    cfg: &NodeConfig,
    inner: &Ipv4Hdr,
    overhead: u32,
) -> u64 {
    if gso_size == 0 || cfg.underlay_mtu == 0 {
        return 0;
    }
    let ihl = (inner.vihl & 0x0f) as usize * 4;
    let l4_len = match inner.proto {
        IPPROTO_UDP => 8,
        IPPROTO_TCP => match ptr_at::<[u8; 13], _>(ctx, EthHdr::LEN + ihl) {
            // SAFETY: ptr_at checked the bounds; byte 12 holds the data offset in words.
            Some(tcp) => (unsafe { (*tcp)[12] } >> 4) as u32 * 4,
            None => return 0,
        },
        _ => return 0,
    };
    if gso_size + ihl as u32 + l4_len + overhead <= cfg.underlay_mtu {
        BPF_F_ADJ_ROOM_FIXED_GSO as u64
    } else {
        0
    }
}

/// The inner UDP checksum field, read before the head moves; `None` for other protocols or
/// when the header is not in the linear area. Zero means "no checksum" for UDP over IPv4.
#[inline(always)]
fn inner_l4_check(ctx: &TcContext, inner: &Ipv4Hdr) -> Option<[u8; 2]> {
    if inner.proto != IPPROTO_UDP || inner.vihl & 0x0f != 5 {
        return None;
    }
    // After adjust_room the inner UDP header sits behind eth + 50 + inner IPv4.
    let off = EthHdr::LEN + maps_common::VXLAN_OVERHEAD as usize + Ipv4Hdr::LEN;
    let udp = ptr_at::<UdpHdr, _>(ctx, off)?;
    // SAFETY: ptr_at checked the bounds.
    Some(unsafe { (*udp).check })
}

/// `BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN)`: the inner L2 header length, in bits 56..63.
#[inline(always)]
pub const fn encap_l2_len() -> u64 {
    (EthHdr::LEN as u64 & 0xff) << 56
}

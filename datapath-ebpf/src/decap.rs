//! Decapsulation on the underlay's ingress: decides whether an IPIP/VXLAN packet is ours and
//! allowed in, then strips the tunnel headers at XDP or at TC.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_FIXED_GSO, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action::XDP_PASS,
    },
    helpers::bpf_xdp_adjust_head,
    programs::{TcContext, XdpContext},
};
use maps_common::{
    CounterId, DropReason, NodeConfig, NodeEntry, config_flags, event_hook, route_mode,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    udp::UdpHdr,
    vxlan::{VXLAN_I_FLAG_MASK, VxlanHdr},
};

use crate::{
    DP_CONFIG, DP_NODES,
    counters::{count, count_peer},
    lookup::{in_cidr, pod_route},
    monitor,
    parse::{IP_OFFSET, IPPROTO_IPIP, IPPROTO_UDP, Packet, ptr_at, ptr_at_mut},
};

/// MF flag and fragment offset bits of the IPv4 flags/fragment-offset field.
const IP_MF_OFFSET: u16 = 0x3fff;
const IPV4_MIN_HLEN: usize = 20;
/// From the UDP header to the inner IPv4 header of a VXLAN packet: UDP, VXLAN, inner Ethernet.
const VXLAN_TO_INNER_IP: usize = UdpHdr::LEN + VxlanHdr::LEN + EthHdr::LEN;

/// What the classifier decided for a packet that is not dropped.
pub enum Verdict {
    /// Not a tunnel packet for this node: hand it on untouched. `cfg`: the configuration, once
    /// there is one, so that delivery of a natively routed packet reads it no second time.
    Pass { cfg: Option<&'static NodeConfig> },
    /// Ours and allowed: remove `strip` bytes after the outer Ethernet header. `host_routing`:
    /// BPF host routing is on (the inner packet may go straight into its pod); `cfg`: the
    /// configuration, so that delivery reads it no second time. A flag beside an always-valid
    /// pointer, not an `Option` of it: LLVM turns "pointer or null" into a mask on the
    /// pointer, which the verifier refuses.
    Decap {
        strip: u32,
        counter: CounterId,
        peer_idx: u32,
        host_routing: bool,
        cfg: &'static NodeConfig,
    },
}

/// A tunnel packet addressed to this node, as parsed: its outer IPv4 header and whether it is
/// VXLAN (else IPIP).
struct Outer {
    ip: Ipv4Hdr,
    vxlan: bool,
}

/// What the outer headers hold once admitted: the sending node, and the outer length to
/// check the rest against.
struct Admitted {
    node: NodeEntry,
    outer_len: usize,
    gso: bool,
}

/// Classifies a received frame: parsing (is it a tunnel packet for this node?), admission
/// (from a known node, no options or fragments, lengths that agree), then the tunnel and
/// inner headers.
///
/// Returns `Pass` for anything that is not a tunnel packet for a local pod: not IPv4, not IPIP
/// or UDP, a non-first fragment. Returns `Decap` for IPIP, or VXLAN on the configured port,
/// addressed to this node, from a known node, with the configured VNI, consistent lengths and
/// an inner IPv4 header (and, when the check is on, an inner source in the sender's pod CIDR).
/// Everything in between is dropped with its reason; see the README's table of packet classes.
#[inline(always)]
pub fn classify<P: Packet>(ctx: &P) -> Result<Verdict, DropReason> {
    let Some(cfg) = DP_CONFIG.get(0) else {
        return Ok(Verdict::Pass { cfg: None });
    };
    let Some(eth) = ptr_at::<EthHdr, _>(ctx, 0) else {
        return Ok(Verdict::Pass { cfg: Some(cfg) });
    };
    // SAFETY: ptr_at checked the bounds.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type == EtherType::Ipv6 as u16 {
        return crate::six::classify6(ctx, cfg);
    }
    if ether_type != EtherType::Ipv4 as u16 {
        return Ok(Verdict::Pass { cfg: Some(cfg) });
    }
    let Some(outer) = parse_outer(ctx, cfg)? else {
        return Ok(Verdict::Pass { cfg: Some(cfg) });
    };
    let adm = admit(ctx, &outer)?;
    let (strip, counter) = if outer.vxlan {
        (vxlan_header(ctx, cfg, &adm)?, CounterId::DecapVxlan)
    } else {
        (maps_common::IPIP_OVERHEAD, CounterId::DecapIpip)
    };
    check_inner(ctx, cfg, &outer, &adm, strip)?;
    Ok(Verdict::Decap {
        strip,
        counter,
        peer_idx: adm.node.peer_idx,
        host_routing: cfg.flags & config_flags::HOST_ROUTING_BPF != 0,
        cfg,
    })
}

/// Parses the outer headers of an IPv4 frame: `None` for what is not a tunnel packet addressed
/// to this node (passed on), a drop for tunnel packets aimed at a local pod the wrong way
/// (another port, another node's address).
#[inline(always)]
fn parse_outer<P: Packet>(ctx: &P, cfg: &NodeConfig) -> Result<Option<Outer>, DropReason> {
    if cfg.node_addr == [0; 4] {
        return Ok(None);
    }
    let Some(ip) = ptr_at::<Ipv4Hdr, _>(ctx, EthHdr::LEN) else {
        return Ok(None);
    };
    // SAFETY: ptr_at checked the bounds.
    let ip = unsafe { *ip };
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < IPV4_MIN_HLEN {
        return Ok(None);
    }
    let for_us = ip.dst_addr == cfg.node_addr;
    let vxlan = match ip.proto {
        IPPROTO_IPIP => false,
        IPPROTO_UDP => {
            // A non-first fragment carries no UDP header: not recognisably a tunnel packet.
            if u16::from_be_bytes(ip.frags) & IP_OFFSET != 0 {
                return Ok(None);
            }
            let Some(udp) = ptr_at::<UdpHdr, _>(ctx, EthHdr::LEN + ihl) else {
                return Ok(None);
            };
            // SAFETY: ptr_at checked the bounds.
            if u16::from_be_bytes(unsafe { (*udp).dst }) != cfg.vxlan_port {
                // VXLAN aimed at a local pod through another port is refused, not passed;
                // other UDP is not ours.
                if for_us && ihl == IPV4_MIN_HLEN && vxlan_for_local_pod(ctx, cfg) {
                    return Err(DropReason::WrongPort);
                }
                return Ok(None);
            }
            true
        }
        _ => return Ok(None),
    };
    if !for_us {
        let for_local_pod = ihl == IPV4_MIN_HLEN
            && if vxlan {
                vxlan_for_local_pod(ctx, cfg)
            } else {
                ipv4_for_local_pod(ctx, cfg, EthHdr::LEN + IPV4_MIN_HLEN)
            };
        if for_local_pod {
            return Err(DropReason::NotForThisNode);
        }
        return Ok(None);
    }
    if ihl != IPV4_MIN_HLEN {
        return Err(DropReason::OuterIpOptions);
    }
    Ok(Some(Outer { ip, vxlan }))
}

/// Admission of a tunnel packet addressed to this node: whole (no fragment), from a known
/// node, no longer than the frame.
#[inline(always)]
fn admit<P: Packet>(ctx: &P, outer: &Outer) -> Result<Admitted, DropReason> {
    if u16::from_be_bytes(outer.ip.frags) & IP_MF_OFFSET != 0 {
        return Err(DropReason::OuterFragment);
    }
    let node = DP_NODES
        .get_ptr(outer.ip.src_addr)
        .ok_or(DropReason::UnknownPeer)?;
    // SAFETY: a value pointer from the map, read once, right away.
    let node = unsafe { *node };
    // Lengths are checked on packets as they came off the wire; a GSO packet's are the
    // kernel's (segmentation rewrites them), so it is measured by its length instead.
    let gso = ctx.is_gso();
    let frame_ip_len = ctx.packet_len() - EthHdr::LEN;
    let outer_len = if gso {
        frame_ip_len
    } else {
        u16::from_be_bytes(outer.ip.tot_len) as usize
    };
    if outer_len > frame_ip_len {
        return Err(DropReason::Truncated);
    }
    Ok(Admitted {
        node,
        outer_len,
        gso,
    })
}

/// The UDP length, VXLAN flags and VNI, and inner Ethernet type of an admitted VXLAN packet;
/// the bytes to strip.
#[inline(always)]
fn vxlan_header<P: Packet>(ctx: &P, cfg: &NodeConfig, adm: &Admitted) -> Result<u32, DropReason> {
    let udp = ptr_at::<UdpHdr, _>(ctx, EthHdr::LEN + IPV4_MIN_HLEN).ok_or(DropReason::Truncated)?;
    // SAFETY: ptr_at checked the bounds.
    let udp_len = u16::from_be_bytes(unsafe { (*udp).len }) as usize;
    if !adm.gso && udp_len != adm.outer_len - IPV4_MIN_HLEN {
        return Err(DropReason::BadOuterLength);
    }
    let vx_off = EthHdr::LEN + IPV4_MIN_HLEN + UdpHdr::LEN;
    vxlan_and_inner_type(ctx, cfg, vx_off, EtherType::Ipv4 as u16)?;
    Ok(maps_common::VXLAN_OVERHEAD)
}

/// The VXLAN header at `vx_off` (flags as the Linux VXLAN device wants them, the configured
/// VNI) and the inner Ethernet type behind it (`inner_type`, the outer header's family),
/// for either underlay family.
#[inline(always)]
pub fn vxlan_and_inner_type<P: Packet>(
    ctx: &P,
    cfg: &NodeConfig,
    vx_off: usize,
    inner_type: u16,
) -> Result<(), DropReason> {
    let vx = ptr_at::<VxlanHdr, _>(ctx, vx_off).ok_or(DropReason::Truncated)?;
    // SAFETY: ptr_at checked the bounds.
    let vx = unsafe { *vx };
    if !vxlan_flags_ok(&vx) {
        return Err(DropReason::BadVxlanFlags);
    }
    let vni = ((vx.vni[0] as u32) << 16) | ((vx.vni[1] as u32) << 8) | vx.vni[2] as u32;
    if vni != cfg.vni {
        return Err(DropReason::WrongVni);
    }
    let inner_eth =
        ptr_at::<EthHdr, _>(ctx, vx_off + VxlanHdr::LEN).ok_or(DropReason::Truncated)?;
    // SAFETY: ptr_at checked the bounds.
    if unsafe { (*inner_eth).ether_type } != inner_type {
        return Err(DropReason::InnerNotIpv4);
    }
    Ok(())
}

/// The inner IPv4 header behind `strip` bytes: whole, with lengths that fit the outer, and
/// (when the check is on) a source in the sender's pod CIDR.
#[inline(always)]
fn check_inner<P: Packet>(
    ctx: &P,
    cfg: &NodeConfig,
    outer: &Outer,
    adm: &Admitted,
    strip: u32,
) -> Result<(), DropReason> {
    let strip = strip as usize;
    if adm.outer_len < strip + IPV4_MIN_HLEN {
        return Err(DropReason::BadOuterLength);
    }
    let inner = ptr_at::<Ipv4Hdr, _>(ctx, EthHdr::LEN + strip).ok_or(DropReason::Truncated)?;
    // SAFETY: ptr_at checked the bounds.
    let inner = unsafe { *inner };
    let inner_len = u16::from_be_bytes(inner.tot_len) as usize;
    let inner_ihl = ((inner.vihl & 0x0f) as usize) * 4;
    if inner.vihl >> 4 != 4
        || inner_ihl < IPV4_MIN_HLEN
        || (!adm.gso && (inner_len < inner_ihl || inner_len > adm.outer_len - strip))
    {
        return Err(DropReason::BadInnerHeader);
    }
    // The sender's pod CIDR came with its DP_NODES entry: no second lookup. The sending node
    // itself is a legitimate source too (its own traffic to a pod, kubelet's probes).
    let node = &adm.node;
    if cfg.flags & config_flags::INNER_SRC_CHECK != 0
        && !in_cidr(inner.src_addr, node.pod_cidr, node.pod_prefix_len)
        && inner.src_addr != outer.ip.src_addr
    {
        return Err(DropReason::InnerSrcSpoofed);
    }
    Ok(())
}

/// As the Linux VXLAN device: I flag set, every reserved bit clear.
#[inline(always)]
fn vxlan_flags_ok(vx: &VxlanHdr) -> bool {
    vx.flags == VXLAN_I_FLAG_MASK && vx._reserved1 == [0; 3] && vx._reserved2 == 0
}

/// Whether a UDP packet (outer header without options) looks like VXLAN carrying IPv4 to a
/// local pod: valid VXLAN flags, inner Ethernet type IPv4, inner destination a local pod.
#[inline(always)]
fn vxlan_for_local_pod<P: Packet>(ctx: &P, cfg: &NodeConfig) -> bool {
    let vx_off = EthHdr::LEN + IPV4_MIN_HLEN + UdpHdr::LEN;
    let (Some(vx), Some(inner_eth)) = (
        ptr_at::<VxlanHdr, _>(ctx, vx_off),
        ptr_at::<EthHdr, _>(ctx, vx_off + VxlanHdr::LEN),
    ) else {
        return false;
    };
    // SAFETY: ptr_at checked the bounds.
    let (vx, eth_type) = unsafe { (*vx, (*inner_eth).ether_type) };
    vxlan_flags_ok(&vx)
        && eth_type == EtherType::Ipv4 as u16
        && ipv4_for_local_pod(ctx, cfg, EthHdr::LEN + IPV4_MIN_HLEN + VXLAN_TO_INNER_IP)
}

/// Whether the IPv4 header at `off` is addressed to this node's pod CIDR.
#[inline(always)]
fn ipv4_for_local_pod<P: Packet>(ctx: &P, cfg: &NodeConfig, off: usize) -> bool {
    let Some(ip) = ptr_at::<Ipv4Hdr, _>(ctx, off) else {
        return false;
    };
    // SAFETY: ptr_at checked the bounds.
    let dst = unsafe { (*ip).dst_addr };
    cfg.pod_prefix_len != 0 && in_cidr(dst, cfg.pod_cidr, cfg.pod_prefix_len)
}

/// XDP: classifies, then moves the head past the tunnel headers and writes a fresh Ethernet
/// header (the outer one's MACs, the inner packet's type) so the stack takes the inner packet
/// as addressed to this host. Returns `XDP_PASS` for both passed and decapsulated packets.
#[inline(always)]
pub fn try_decap_xdp(ctx: &XdpContext) -> Result<u32, DropReason> {
    let len = (ctx.data_end() - ctx.data()) as u32;
    let (strip, counter, peer_idx) = match classify(ctx)? {
        Verdict::Pass { .. } => {
            count(CounterId::Pass, len);
            return Ok(XDP_PASS);
        }
        Verdict::Decap {
            strip,
            counter,
            peer_idx,
            ..
        } => (strip, counter, peer_idx),
    };
    monitor::forwarded(ctx, event_hook::XDP_DECAP);
    let eth = ptr_at::<EthHdr, _>(ctx, 0).ok_or(DropReason::Truncated)?;
    // SAFETY: ptr_at checked the bounds.
    let (dst, src) = unsafe { ((*eth).dst_addr, (*eth).src_addr) };
    // SAFETY: ctx.ctx is the program's xdp_md.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, strip as i32) } != 0 {
        return Err(DropReason::AdjustFailed);
    }
    // Revalidate after adjust_head: the head moved.
    let eth = ptr_at_mut::<EthHdr, _>(ctx, 0).ok_or(DropReason::Truncated)?;
    // SAFETY: bounds checked just above.
    unsafe {
        (*eth).dst_addr = dst;
        (*eth).src_addr = src;
        (*eth).ether_type = inner_ether_type(strip);
    }
    count_decap(counter, strip, peer_idx, len);
    Ok(XDP_PASS)
}

/// Counts a decapsulated packet: under `counter`, `DecapIpv6` too for IPv6 VXLAN, and toward
/// its peer.
#[inline(always)]
fn count_decap(counter: CounterId, strip: u32, peer_idx: u32, len: u32) {
    count(counter, len);
    if strip == maps_common::VXLAN6_OVERHEAD {
        count(CounterId::DecapIpv6, len);
    }
    count_peer(peer_idx, false, len);
}

/// The Ethernet type of what `strip` bytes of tunnel headers held: IPv6 behind IPv6 VXLAN's 70
/// bytes, IPv4 behind IPIP's and IPv4 VXLAN's.
#[inline(always)]
fn inner_ether_type(strip: u32) -> u16 {
    if strip == maps_common::VXLAN6_OVERHEAD {
        EtherType::Ipv6 as u16
    } else {
        EtherType::Ipv4 as u16
    }
}

/// Where a packet goes once the TC decapsulation is done with it. An explicit tag (`repr`),
/// so that choosing one never masks the pointer (see `Verdict::Decap`).
#[repr(u8)]
pub enum Delivery {
    /// The host's stack: passed untouched, or decapsulated for the stack to route.
    Stack,
    /// Decapsulated with BPF host routing on: straight into its local pod if it may go
    /// (`hostroute::deliver`), else the stack.
    Pod(&'static NodeConfig),
}

/// Where a packet that is no tunnel packet goes with BPF host routing on (`cfg`): straight
/// into its local pod when it comes from a pod CIDR this node reaches natively (crossSubnet's
/// same-subnet peers, `encapsulation: none`), as decapsulated packets do; else the stack.
/// Anything from outside the cluster's pods takes the stack.
#[inline(always)]
fn native_delivery(ctx: &TcContext, cfg: &'static NodeConfig) -> Delivery {
    let Some(eth) = ptr_at::<EthHdr, _>(ctx, 0) else {
        return Delivery::Stack;
    };
    // SAFETY: ptr_at checked the bounds.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return Delivery::Stack;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr, _>(ctx, EthHdr::LEN) else {
        return Delivery::Stack;
    };
    // SAFETY: ptr_at checked the bounds.
    let (src, dst) = unsafe { ((*ip).src_addr, (*ip).dst_addr) };
    if !in_cidr(dst, cfg.pod_cidr, cfg.pod_prefix_len) {
        return Delivery::Stack;
    }
    match pod_route(cfg, src) {
        Some(r) if r.mode == route_mode::NATIVE => {
            count_peer(r.peer_idx, false, ctx.len());
            Delivery::Pod(cfg)
        }
        _ => Delivery::Stack,
    }
}

/// TC ingress: classifies, then removes the tunnel headers behind the outer Ethernet header,
/// which stays (its type is already IPv4).
#[inline(always)]
pub fn try_decap_tc(ctx: &TcContext) -> Result<Delivery, DropReason> {
    let len = ctx.len();
    let (strip, counter, peer_idx, host_routing, cfg) = match classify(ctx)? {
        Verdict::Pass { cfg } => {
            count(CounterId::Pass, len);
            return Ok(match cfg {
                Some(cfg) if cfg.flags & config_flags::HOST_ROUTING_BPF != 0 => {
                    native_delivery(ctx, cfg)
                }
                _ => Delivery::Stack,
            });
        }
        Verdict::Decap {
            strip,
            counter,
            peer_idx,
            host_routing,
            cfg,
        } => (strip, counter, peer_idx, host_routing, cfg),
    };
    monitor::forwarded(ctx, event_hook::TC_DECAP);
    // The inner header is of the outer one's family, so nothing changes version
    // (BPF_F_ADJ_ROOM_DECAP_L3_IPV4 would say so, and exists only from 6.3). GSO size fixed:
    // a GRO-merged or GSO packet's segment size is already the inner payload's; growing it
    // by the stripped headers would make the host's forwarding refuse it as larger than the
    // pod's MTU.
    ctx.adjust_room(
        -(strip as i32),
        BPF_ADJ_ROOM_MAC,
        BPF_F_ADJ_ROOM_FIXED_GSO as u64,
    )
    .map_err(|_| DropReason::AdjustFailed)?;
    count_decap(counter, strip, peer_idx, len);
    Ok(if host_routing {
        Delivery::Pod(cfg)
    } else {
        Delivery::Stack
    })
}

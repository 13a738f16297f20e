//! Decapsulation on the underlay's ingress: decides whether an IPIP/VXLAN packet is ours and
//! allowed in, then strips the tunnel headers at XDP or at TC.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, TC_ACT_OK, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        xdp_action::XDP_PASS,
    },
    helpers::bpf_xdp_adjust_head,
    maps::lpm_trie::Key,
    programs::{TcContext, XdpContext},
};
use maps_common::{CounterId, DropReason, config_flags};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    udp::UdpHdr,
    vxlan::{VXLAN_I_FLAG_MASK, VxlanHdr},
};

use crate::{
    DP_CONFIG, DP_NODES, DP_POD_CIDRS,
    counters::{count, count_peer},
    parse::{Packet, ptr_at, ptr_at_mut},
};

const IPPROTO_IPIP: u8 = 4;
const IPPROTO_UDP: u8 = 17;
/// MF flag and fragment offset bits of the IPv4 flags/fragment-offset field.
const IP_MF_OFFSET: u16 = 0x3fff;
const IPV4_MIN_HLEN: usize = 20;

/// What the classifier decided for a packet that is not dropped.
pub enum Verdict {
    /// Not a tunnel packet for this node: hand it on untouched.
    Pass,
    /// Ours and allowed: remove `strip` bytes after the outer Ethernet header.
    Decap {
        strip: u32,
        counter: CounterId,
        peer_idx: u32,
    },
}

/// Classifies a received frame.
///
/// Returns `Pass` for anything that is not IPIP, or UDP to the configured VXLAN port, addressed
/// to this node's underlay address; `Decap` for a tunnel packet from a known node with the
/// configured VNI whose inner packet is IPv4 (and, when the check is on, whose inner source
/// lies in the sender's pod CIDR); otherwise the reason to drop it.
#[inline(always)]
pub fn classify<P: Packet>(ctx: &P) -> Result<Verdict, DropReason> {
    let Some(cfg) = DP_CONFIG.get(0) else {
        return Ok(Verdict::Pass);
    };
    if cfg.node_addr == [0; 4] {
        return Ok(Verdict::Pass);
    }
    let Some(eth) = ptr_at::<EthHdr, _>(ctx, 0) else {
        return Ok(Verdict::Pass);
    };
    // SAFETY: ptr_at checked the bounds.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return Ok(Verdict::Pass);
    }
    let Some(ip) = ptr_at::<Ipv4Hdr, _>(ctx, EthHdr::LEN) else {
        return Ok(Verdict::Pass);
    };
    // SAFETY: ptr_at checked the bounds.
    let outer = unsafe { *ip };
    if outer.dst_addr != cfg.node_addr || outer.vihl >> 4 != 4 {
        return Ok(Verdict::Pass);
    }
    let ihl = ((outer.vihl & 0x0f) as usize) * 4;
    if ihl < IPV4_MIN_HLEN {
        return Ok(Verdict::Pass);
    }
    let fragmented = u16::from_be_bytes(outer.frags) & IP_MF_OFFSET != 0;

    let vxlan = match outer.proto {
        IPPROTO_IPIP => false,
        IPPROTO_UDP => {
            // A non-first fragment carries no UDP header: not recognisably ours.
            if u16::from_be_bytes(outer.frags) & 0x1fff != 0 {
                return Ok(Verdict::Pass);
            }
            let Some(udp) = ptr_at::<UdpHdr, _>(ctx, EthHdr::LEN + ihl) else {
                return Ok(Verdict::Pass);
            };
            // SAFETY: ptr_at checked the bounds.
            if u16::from_be_bytes(unsafe { (*udp).dst }) != cfg.vxlan_port {
                return Ok(Verdict::Pass);
            }
            true
        }
        _ => return Ok(Verdict::Pass),
    };

    // From here on the packet is a tunnel packet addressed to us: admit it or drop it.
    if ihl != IPV4_MIN_HLEN {
        return Err(DropReason::OuterIpOptions);
    }
    if fragmented {
        return Err(DropReason::OuterFragment);
    }
    let node = DP_NODES
        .get_ptr(outer.src_addr)
        .ok_or(DropReason::UnknownPeer)?;
    // SAFETY: a value pointer from the map, read once, right away.
    let peer_idx = unsafe { (*node).peer_idx };

    let (strip, counter) = if vxlan {
        let vx_off = EthHdr::LEN + IPV4_MIN_HLEN + UdpHdr::LEN;
        let vx = ptr_at::<VxlanHdr, _>(ctx, vx_off).ok_or(DropReason::Truncated)?;
        // SAFETY: ptr_at checked the bounds.
        let vx = unsafe { *vx };
        // As the Linux VXLAN device: I flag set, every reserved bit clear.
        if vx.flags != VXLAN_I_FLAG_MASK || vx._reserved1 != [0; 3] || vx._reserved2 != 0 {
            return Err(DropReason::BadVxlanFlags);
        }
        let vni = ((vx.vni[0] as u32) << 16) | ((vx.vni[1] as u32) << 8) | vx.vni[2] as u32;
        if vni != cfg.vni {
            return Err(DropReason::WrongVni);
        }
        let inner_eth =
            ptr_at::<EthHdr, _>(ctx, vx_off + VxlanHdr::LEN).ok_or(DropReason::Truncated)?;
        // SAFETY: ptr_at checked the bounds.
        if unsafe { (*inner_eth).ether_type } != EtherType::Ipv4 as u16 {
            return Err(DropReason::InnerNotIpv4);
        }
        (maps_common::VXLAN_OVERHEAD, CounterId::DecapVxlan)
    } else {
        (maps_common::IPIP_OVERHEAD, CounterId::DecapIpip)
    };

    let inner =
        ptr_at::<Ipv4Hdr, _>(ctx, EthHdr::LEN + strip as usize).ok_or(DropReason::Truncated)?;
    // SAFETY: ptr_at checked the bounds.
    let inner = unsafe { *inner };
    if inner.vihl >> 4 != 4 || inner.vihl & 0x0f < 5 {
        return Err(DropReason::BadInnerHeader);
    }
    if cfg.flags & config_flags::INNER_SRC_CHECK != 0 {
        let owner = DP_POD_CIDRS
            .get(&Key::new(32, inner.src_addr))
            .ok_or(DropReason::InnerSrcSpoofed)?;
        if owner.node_addr != outer.src_addr {
            return Err(DropReason::InnerSrcSpoofed);
        }
    }
    Ok(Verdict::Decap {
        strip,
        counter,
        peer_idx,
    })
}

/// XDP: classifies, then moves the head past the tunnel headers and writes a fresh Ethernet
/// header (the outer one's MACs, IPv4 type) so the stack takes the inner packet as addressed
/// to this host. Returns `XDP_PASS` for both passed and decapsulated packets.
#[inline(always)]
pub fn try_decap_xdp(ctx: &XdpContext) -> Result<u32, DropReason> {
    let len = (ctx.data_end() - ctx.data()) as u32;
    let (strip, counter, peer_idx) = match classify(ctx)? {
        Verdict::Pass => {
            count(CounterId::Pass, len);
            return Ok(XDP_PASS);
        }
        Verdict::Decap {
            strip,
            counter,
            peer_idx,
        } => (strip, counter, peer_idx),
    };
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
        (*eth).ether_type = EtherType::Ipv4 as u16;
    }
    count(counter, len);
    count_peer(peer_idx, false, len);
    Ok(XDP_PASS)
}

/// TC ingress: classifies, then removes the tunnel headers behind the outer Ethernet header,
/// which stays (its type is already IPv4). Returns `TC_ACT_OK` for passed and decapsulated
/// packets.
#[inline(always)]
pub fn try_decap_tc(ctx: &TcContext) -> Result<i32, DropReason> {
    let len = ctx.len();
    match classify(ctx)? {
        Verdict::Pass => {
            count(CounterId::Pass, len);
            Ok(TC_ACT_OK)
        }
        Verdict::Decap {
            strip,
            counter,
            peer_idx,
        } => {
            ctx.adjust_room(
                -(strip as i32),
                BPF_ADJ_ROOM_MAC,
                BPF_F_ADJ_ROOM_DECAP_L3_IPV4 as u64,
            )
            .map_err(|_| DropReason::AdjustFailed)?;
            count(counter, len);
            count_peer(peer_idx, false, len);
            Ok(TC_ACT_OK)
        }
    }
}

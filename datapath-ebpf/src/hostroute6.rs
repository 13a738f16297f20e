//! BPF host routing for IPv6 pods, as `hostroute` does it for IPv4: a local pod's packets for
//! remote IPv6 pods are encapsulated at the pod's veth (`six::send6`, as at the underlay),
//! decapsulated ones go straight into their pod;
//! in the default mode only flows netfilter (ip6tables, nftables) accepted in the stack.
use aya_ebpf::{
    bindings::TC_ACT_OK, helpers::bpf_redirect_peer, maps::lpm_trie::Key, programs::TcContext,
};
use maps_common::{
    CounterId, DropReason, FlowKey6, NodeConfig, NodeConfig6, VXLAN6_OVERHEAD, flow_dir, route_mode,
};
use network_types::{eth::EthHdr, ip::Ipv6Hdr};

use crate::{
    DP_ENDPOINTS6, DP_POD_CIDRS6,
    counters::count,
    encap::counted,
    flows::{self, Seen},
    hostroute,
    parse::{IPPROTO_TCP, IPPROTO_UDP, ptr_at, ptr_at_mut},
    six,
};

/// The IPv6 header behind the Ethernet header (the caller checked the type), copied.
#[inline(always)]
fn ipv6_at(ctx: &TcContext) -> Option<Ipv6Hdr> {
    let ip = ptr_at::<Ipv6Hdr, _>(ctx, EthHdr::LEN)?;
    // SAFETY: ptr_at checked the bounds.
    let ip = unsafe { *ip };
    (ip.vcf[0] >> 4 == 6).then_some(ip)
}

/// The flow of `ip` in direction `dir`: addresses, next header, and the ports of TCP or UDP
/// right behind the IPv6 header (behind extension headers the ports stay zero: the flow is
/// then judged by addresses and protocol alone, as for an IPv4 fragment).
#[inline(always)]
pub fn seen6(ctx: &TcContext, ip: &Ipv6Hdr, dir: u8) -> Seen<FlowKey6> {
    let mut key = FlowKey6 {
        src: ip.src_addr,
        dst: ip.dst_addr,
        proto: ip.next_hdr,
        dir,
        ..FlowKey6::default()
    };
    let off = EthHdr::LEN + Ipv6Hdr::LEN;
    let mut control = false;
    if (ip.next_hdr == IPPROTO_TCP || ip.next_hdr == IPPROTO_UDP)
        && let Some(ports) = ptr_at::<[[u8; 2]; 2], _>(ctx, off)
    {
        // SAFETY: ptr_at checked the bounds.
        let ports = unsafe { *ports };
        key.sport = ports[0];
        key.dport = ports[1];
        control = ip.next_hdr == IPPROTO_TCP && flows::tcp_control(ctx, off);
    }
    Seen { key, control }
}

/// At the pod's veth, host routing BPF: a local pod's IPv6 packet for a remote IPv6 pod is
/// sent encapsulated in VXLAN over IPv6 (`six::send6`). `TC_ACT_OK` (the stack) for what
/// is not that, a hop limit about to expire, a packet too big for the tunnel (the route MTU
/// has the stack answer Packet Too Big), a peer reached natively, or a flow netfilter has yet
/// to accept.
#[inline(always)]
pub fn pod_egress6(ctx: &TcContext) -> Result<i32, DropReason> {
    let (Some(cfg), Some(c6), Some(inner)) =
        (hostroute::bpf_routing(), six::config6(), ipv6_at(ctx))
    else {
        return Ok(TC_ACT_OK);
    };
    if !six::in_cidr6(&inner.src_addr, &c6.pod_cidr, c6.pod_prefix_len) || inner.hop_limit <= 1 {
        return Ok(TC_ACT_OK);
    }
    let route = match DP_POD_CIDRS6.get(&Key::new(128, inner.dst_addr)) {
        Some(r) if r.mode == route_mode::VXLAN => *r,
        _ => return Ok(TC_ACT_OK),
    };
    let len = ctx.len();
    if cfg.underlay_mtu != 0 && segment_len(ctx, &inner) + VXLAN6_OVERHEAD > cfg.underlay_mtu {
        return Ok(TC_ACT_OK);
    }
    if flows::enforced(cfg) {
        let seen = seen6(ctx, &inner, flow_dir::OUT);
        if !flows::may_bypass(cfg, &seen, CounterId::FlowVerifyOut, len) {
            return Ok(TC_ACT_OK);
        }
    }
    let inner = decrement_hop_limit(ctx)?;
    let sent = six::send6(ctx, cfg, c6, &route, &inner).map(|a| (CounterId::EncapVxlan, a));
    let action = counted(sent, route.peer_idx, len)?;
    count(CounterId::HostRouteOut, len);
    Ok(action)
}

/// The IPv6 length of the packets `ctx` becomes on the wire: itself, or for a GSO packet each
/// segment (the IPv6 header, the TCP header as its data offset gives it, else UDP's, and the
/// segment size). One that would not fit the tunnel takes the stack, whose route MTU answers
/// Packet Too Big, so the sender's MSS shrinks (a pod whose MTU leaves room never gets here).
#[inline(always)]
fn segment_len(ctx: &TcContext, ip: &Ipv6Hdr) -> u32 {
    // SAFETY: ctx.skb.skb is the program's __sk_buff.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 {
        return ctx.len() - EthHdr::LEN as u32;
    }
    let l4 = if ip.next_hdr == IPPROTO_TCP {
        // Data offset, in 32-bit words: the high nibble of byte 12; the longest TCP header
        // when unreadable.
        ptr_at::<u8, _>(ctx, EthHdr::LEN + Ipv6Hdr::LEN + 12)
            // SAFETY: ptr_at checked the bounds.
            .map_or(60, |b| ((unsafe { *b }) >> 4) as u32 * 4)
    } else {
        8
    };
    Ipv6Hdr::LEN as u32 + l4 + gso_size
}

/// Takes one off the hop limit (the caller checked it above 1); IPv6 has no header checksum.
/// Returns the header as it is now.
#[inline(always)]
fn decrement_hop_limit(ctx: &TcContext) -> Result<Ipv6Hdr, DropReason> {
    let ip = ptr_at_mut::<Ipv6Hdr, _>(ctx, EthHdr::LEN).ok_or(DropReason::Truncated)?;
    // SAFETY: bounds checked just above.
    unsafe {
        (*ip).hop_limit -= 1;
        Ok(*ip)
    }
}

/// After IPv6 decapsulation at TC with host routing BPF: straight into the local pod the
/// inner destination names (`DP_ENDPOINTS6`), under the same rule as IPv4
/// (`flows::may_deliver`). `None`: the stack delivers it.
#[inline(always)]
pub fn deliver6(ctx: &TcContext, cfg: &NodeConfig) -> Option<i32> {
    let inner = ipv6_at(ctx)?;
    if inner.hop_limit <= 1 {
        return None;
    }
    let ep = DP_ENDPOINTS6.get_ptr(inner.dst_addr)?;
    // SAFETY: a value pointer from the map, copied right away.
    let ep = unsafe { *ep };
    if !flows::may_deliver(cfg, &seen6(ctx, &inner, flow_dir::IN), ctx.len()) {
        return None;
    }
    decrement_hop_limit(ctx).ok()?;
    let eth = ptr_at_mut::<EthHdr, _>(ctx, 0)?;
    // SAFETY: bounds checked just above.
    unsafe {
        (*eth).dst_addr = ep.pod_mac;
        (*eth).src_addr = ep.host_mac;
    }
    count(CounterId::HostRouteIn, ctx.len());
    // SAFETY: plain helper call.
    Some(unsafe { bpf_redirect_peer(ep.ifindex, 0) } as i32)
}

/// At the pod veth's egress: an IPv6 packet the stack forwarded to the pod, whose flow
/// netfilter has thereby accepted (the caller checked that flows are enforced).
#[inline(always)]
pub fn pod_ingress_seen6(ctx: &TcContext, cfg: &NodeConfig) {
    if let Some(ip) = ipv6_at(ctx) {
        let key = seen6(ctx, &ip, flow_dir::IN).key;
        flows::forwarded(cfg, &key, CounterId::FlowAcceptedIn, ctx.len());
    }
}

/// At the underlay's egress, for an IPv6 packet that crossed the host's stack toward a remote
/// pod: netfilter's verdict on a local pod's flow (`flows::stack_seen`).
#[inline(always)]
pub fn stack_forwarded6(ctx: &TcContext, cfg: &NodeConfig, c6: &NodeConfig6, ip: &Ipv6Hdr) {
    if cfg.flags & maps_common::config_flags::HOST_ROUTING_BPF != 0
        && six::in_cidr6(&ip.src_addr, &c6.pod_cidr, c6.pod_prefix_len)
    {
        flows::stack_seen(cfg, seen6(ctx, ip, flow_dir::OUT).key, ctx.len());
    }
}

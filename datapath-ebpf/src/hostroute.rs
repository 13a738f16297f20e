//! BPF host routing: a local pod's packets for remote pods are encapsulated at the pod's veth
//! and sent straight to the underlay; decapsulated packets for local pods go straight into the
//! pod (`bpf_redirect_peer`). Neither crosses the host's routing or netfilter: in the default
//! mode only flows netfilter already accepted (`flows`), with `bpf` every such packet.
//! Everything else (Services, the node's own traffic, local pods) takes the stack, and so do
//! the replies of flows that left through it: their NAT (a Service's DNAT) must be undone there.
use aya_ebpf::{bindings::TC_ACT_OK, helpers::bpf_redirect_peer, programs::TcContext};
use maps_common::{CounterId, DropReason, NodeConfig, config_flags, flow_dir, route_mode};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

use crate::{
    DP_CONFIG, DP_ENDPOINTS,
    counters::count,
    csum, encap, flows, hostroute6, lookup,
    parse::{ptr_at, ptr_at_mut},
};

/// At the pod's veth: encapsulates an IPv4 packet (or, for a peer reached natively, only
/// addresses it) and sends
/// toward the peer node when host routing is BPF, the source is a local pod and the
/// destination a remote pod CIDR.
///
/// Returns `TC_ACT_OK` (the host's stack takes it: host routing off, not pod-to-remote-pod, TTL
/// about to expire, too big for the tunnel, where the stack's route MTU answers with ICMP, or a
/// flow netfilter has yet to accept), the redirect verdict, or the reason to drop (as at the
/// underlay's egress).
#[inline(always)]
pub fn try_pod_egress(ctx: &TcContext) -> Result<i32, DropReason> {
    let (Some(cfg), Some(inner)) = (bpf_routing(), ipv4_at(ctx, ether_type(ctx))) else {
        return Ok(TC_ACT_OK);
    };
    if !lookup::in_cidr(inner.src_addr, cfg.pod_cidr, cfg.pod_prefix_len) || inner.ttl <= 1 {
        return Ok(TC_ACT_OK);
    }
    let route = match lookup::pod_route(cfg, inner.dst_addr) {
        Some(r) if r.mode != route_mode::LOCAL => r,
        _ => return Ok(TC_ACT_OK),
    };
    // SAFETY: ctx.skb.skb is the program's __sk_buff.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if encap::too_big(ctx.len(), gso_size, cfg, route.mode) {
        return Ok(TC_ACT_OK);
    }
    if flows::enforced(cfg) {
        let seen = flows::seen(ctx, &inner, flow_dir::OUT);
        if !flows::may_bypass(cfg, &seen, CounterId::FlowVerifyOut, ctx.len()) {
            return Ok(TC_ACT_OK);
        }
    }
    let ip = ptr_at_mut::<Ipv4Hdr, _>(ctx, EthHdr::LEN).ok_or(DropReason::Truncated)?;
    // SAFETY: bounds checked just above; the TTL was checked above 1.
    let inner = unsafe {
        csum::decrement_ttl(&mut *ip);
        *ip
    };
    let action = if route.mode == route_mode::NATIVE {
        encap::send_native(ctx, cfg, &route)?
    } else {
        encap::send(ctx, cfg, &route, &inner)?
    };
    // SAFETY: ctx.skb.skb is the program's __sk_buff; TC programs may write its mark.
    unsafe { (*ctx.skb.skb).mark = maps_common::MARK_ENCAPSULATED };
    count(CounterId::HostRouteOut, ctx.len());
    Ok(action)
}

/// This node's configuration when host routing is BPF and the underlay is known: the
/// condition for sending anything from a pod's veth, of either family.
#[inline(always)]
pub fn bpf_routing() -> Option<&'static NodeConfig> {
    DP_CONFIG
        .get(0)
        .filter(|c| c.flags & config_flags::HOST_ROUTING_BPF != 0 && c.underlay_ifindex != 0)
}

/// The frame's Ethernet type (wire order, as `EtherType` values are); 0 for a runt.
#[inline(always)]
pub fn ether_type(ctx: &TcContext) -> u16 {
    // SAFETY: ptr_at checked the bounds.
    ptr_at::<EthHdr, _>(ctx, 0).map_or(0, |eth| unsafe { (*eth).ether_type })
}

/// The IPv4 header behind the Ethernet header of a frame of type `family`, copied; `None` for
/// anything else.
#[inline(always)]
fn ipv4_at(ctx: &TcContext, family: u16) -> Option<Ipv4Hdr> {
    if family != EtherType::Ipv4 as u16 {
        return None;
    }
    let ip = ptr_at::<Ipv4Hdr, _>(ctx, EthHdr::LEN)?;
    // SAFETY: ptr_at checked the bounds.
    let ip = unsafe { *ip };
    (ip.vihl >> 4 == 4 && ip.vihl & 0x0f >= 5).then_some(ip)
}

/// After decapsulation at TC: delivers the inner packet straight into its local pod, unless
/// the flow's other direction left through the host's stack (where a Service's NAT may have
/// rewritten it, to be undone by the stack) or, with `flows` enforced, netfilter has yet to
/// accept the flow. Returns the redirect verdict, or `None` to let the stack deliver it.
/// The caller has checked that host routing is BPF (`config_flags::HOST_ROUTING_BPF`) in `cfg`.
#[inline(always)]
pub fn deliver(ctx: &TcContext, cfg: &NodeConfig) -> Option<i32> {
    let family = ether_type(ctx);
    if family == EtherType::Ipv6 as u16 {
        return hostroute6::deliver6(ctx, cfg);
    }
    let inner = ipv4_at(ctx, family)?;
    if inner.ttl <= 1 {
        return None;
    }
    let ep = DP_ENDPOINTS.get_ptr(inner.dst_addr)?;
    // SAFETY: a value pointer from the map, copied right away.
    let ep = unsafe { *ep };
    let seen = flows::seen(ctx, &inner, flow_dir::IN);
    if !flows::may_deliver(cfg, &seen, ctx.len()) {
        return None;
    }
    let eth = ptr_at_mut::<EthHdr, _>(ctx, 0)?;
    let ip = ptr_at_mut::<Ipv4Hdr, _>(ctx, EthHdr::LEN)?;
    // SAFETY: bounds checked just above; the TTL was checked above 1.
    unsafe {
        (*eth).dst_addr = ep.pod_mac;
        (*eth).src_addr = ep.host_mac;
        csum::decrement_ttl(&mut *ip);
    }
    count(CounterId::HostRouteIn, ctx.len());
    // SAFETY: plain helper call.
    Some(unsafe { bpf_redirect_peer(ep.ifindex, 0) } as i32)
}

/// At TC egress of a local pod's host-side veth: a packet the host's stack forwarded to the
/// pod, whose flow (if it came decapsulated and unchanged) netfilter has thereby accepted.
#[inline(always)]
pub fn pod_ingress_seen(ctx: &TcContext) {
    let Some(cfg) = DP_CONFIG.get(0) else {
        return;
    };
    if !flows::enforced(cfg) {
        return;
    }
    let family = ether_type(ctx);
    if family == EtherType::Ipv6 as u16 {
        hostroute6::pod_ingress_seen6(ctx, cfg);
    } else if let Some(ip) = ipv4_at(ctx, family) {
        let key = flows::seen(ctx, &ip, flow_dir::IN).key;
        flows::forwarded(cfg, &key, CounterId::FlowAcceptedIn, ctx.len());
    }
}

//! Events for `datapath monitor`: a dropped packet (and, while a monitor asks, one forwarded
//! packet in `trace_every`) decoded into an `Event` and written to the `DP_EVENTS` ring
//! buffer, behind a per-CPU token bucket so a flood of bad packets costs a few hundred events
//! a second, not one per packet. What the bucket refuses or the full ring loses is counted.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use maps_common::{
    DEFAULT_EVENT_BURST, DEFAULT_EVENT_RATE, DropReason, Event, MonitorConf, MonitorState,
    event_kind,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
    vxlan::VxlanHdr,
};

use crate::{
    DP_EVENTS, DP_MONITOR, DP_MONITOR_CONF,
    parse::{IP_OFFSET, IPPROTO_IPIP, IPPROTO_TCP, IPPROTO_UDP, Packet, ptr_at},
};

const IPV4: u16 = 0x0800u16.to_be();
const IPV6: u16 = 0x86ddu16.to_be();
/// `bpf_ringbuf_output` flag: do not wake the reader.
const BPF_RB_NO_WAKEUP: u64 = 1;
const ETH_IP: usize = EthHdr::LEN;

/// Reports a dropped packet.
#[inline(always)]
pub fn dropped<P: Packet>(ctx: &P, hook: u8, reason: DropReason) {
    emit(
        ctx,
        DP_MONITOR_CONF.get(0),
        (event_kind::DROP, hook, reason as u8),
    );
}

/// Reports a forwarded packet, one in `trace_every` while a monitor asks for traces.
#[inline(always)]
pub fn forwarded<P: Packet>(ctx: &P, hook: u8) {
    let Some(conf) = DP_MONITOR_CONF.get(0) else {
        return;
    };
    if conf.trace_every == 0 {
        return;
    }
    let Some(st) = DP_MONITOR.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot, written only by this CPU while the program runs.
    let seen = unsafe {
        (*st).trace_seen += 1;
        (*st).trace_seen
    };
    if seen % conf.trace_every as u64 == 0 {
        emit(ctx, Some(conf), (event_kind::TRACE, hook, 0));
    }
}

/// Writes one event (kind, hook, reason) if this CPU's bucket has a token; `conf`, read once
/// by the caller, sets the bucket. The event is written in place in the ring (104 bytes the
/// stack does not have to hold).
#[inline(always)]
fn emit<P: Packet>(ctx: &P, conf: Option<&MonitorConf>, (kind, hook, reason): (u8, u8, u8)) {
    let Some(st) = DP_MONITOR.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: this CPU's slot, written only by this CPU while the program runs.
    let st = unsafe { &mut *st };
    if !take_token(st, conf, now) {
        st.limited += 1;
        return;
    }
    let Some(mut entry) = DP_EVENTS.reserve(0) else {
        st.lost += 1;
        return;
    };
    // SAFETY: the reserved entry is ours to write, an Event's size; all-zero is a valid Event.
    let ev = unsafe {
        let p = entry.as_mut_ptr();
        core::ptr::write_bytes(p, 0, 1);
        &mut *p
    };
    (ev.ts_ns, ev.kind, ev.hook, ev.reason) = (now, kind, hook, reason);
    (ev.ifindex, ev.len) = (ctx.ifindex(), ctx.packet_len() as u32);
    decode(ctx, ev);
    // No wakeup per event (an irq_work each, microseconds under a flood): the monitor polls.
    entry.submit(BPF_RB_NO_WAKEUP);
    st.sent += 1;
}

/// One token from this CPU's bucket, refilled at `rate` a second up to `burst`.
#[inline(always)]
fn take_token(st: &mut MonitorState, conf: Option<&MonitorConf>, now: u64) -> bool {
    let (mut rate, mut burst) = (DEFAULT_EVENT_RATE as u64, DEFAULT_EVENT_BURST as u64);
    if let Some(c) = conf {
        if c.rate != 0 {
            rate = c.rate as u64;
        }
        if c.burst != 0 {
            burst = c.burst as u64;
        }
    }
    let cap = burst * 1000;
    // At most 1000 s, so micros (10^9) times a u32 rate fits in 64 bits (no 128-bit multiply
    // in BPF).
    let micros = now.saturating_sub(st.last_ns).min(1_000_000_000_000) / 1000;
    // Millitokens: `rate` a second is rate * 1000 millitokens per 10^6 us.
    let refill = micros * rate / 1000;
    st.millitokens = (st.millitokens + refill).min(cap);
    st.last_ns = now;
    if st.millitokens < 1000 {
        return false;
    }
    st.millitokens -= 1000;
    true
}

/// The frame's first IP header, its ports, and for IPIP and VXLAN (outer header without
/// options or extension headers) the inner header and its ports.
#[inline(always)]
fn decode<P: Packet>(ctx: &P, ev: &mut Event) {
    let Some(eth) = ptr_at::<EthHdr, _>(ctx, 0) else {
        return;
    };
    // SAFETY: ptr_at checked the bounds.
    let ty = unsafe { (*eth).ether_type };
    let outer = (&mut ev.family, &mut ev.proto, &mut ev.src, &mut ev.dst);
    let Some(l4) = ip_at(ctx, ty, ETH_IP, outer) else {
        return;
    };
    if let Some((s, d)) = ports(ctx, ev.proto, l4) {
        (ev.sport, ev.dport) = (s, d);
    }
    let (inner_at, inner_ty) = match ev.proto {
        IPPROTO_IPIP => (l4, IPV4),
        IPPROTO_UDP => match vxlan(ctx, l4) {
            Some((v, ty)) => {
                ev.vni = v;
                (l4 + UdpHdr::LEN + VxlanHdr::LEN + EthHdr::LEN, ty)
            }
            None => return,
        },
        _ => return,
    };
    let inner = (
        &mut ev.inner_family,
        &mut ev.inner_proto,
        &mut ev.inner_src,
        &mut ev.inner_dst,
    );
    if let Some(l4) = ip_at(ctx, inner_ty, inner_at, inner)
        && let Some((s, d)) = ports(ctx, ev.inner_proto, l4)
    {
        (ev.inner_sport, ev.inner_dport) = (s, d);
    }
}

/// The IP header of Ethernet type `ty` at `off` into (family, protocol, source, destination);
/// the offset of what follows when its ports can be read there (IPv4 without options, first
/// fragment; IPv6 without extension headers).
#[inline(always)]
fn ip_at<P: Packet>(
    ctx: &P,
    ty: u16,
    off: usize,
    (family, proto, src, dst): (&mut u8, &mut u8, &mut [u8; 16], &mut [u8; 16]),
) -> Option<usize> {
    if ty == IPV6 {
        let ip = ptr_at::<Ipv6Hdr, _>(ctx, off)?;
        // SAFETY: ptr_at checked the bounds.
        let ip = unsafe { &*ip };
        (*family, *proto) = (6, ip.next_hdr);
        (*src, *dst) = (ip.src_addr, ip.dst_addr);
        return Some(off + Ipv6Hdr::LEN);
    }
    if ty != IPV4 {
        return None;
    }
    let ip = ptr_at::<Ipv4Hdr, _>(ctx, off)?;
    // SAFETY: ptr_at checked the bounds.
    let ip = unsafe { &*ip };
    (*family, *proto) = (4, ip.proto);
    src[..4].copy_from_slice(&ip.src_addr);
    dst[..4].copy_from_slice(&ip.dst_addr);
    let first = u16::from_be_bytes(ip.frags) & IP_OFFSET == 0;
    (ip.vihl == 0x45 && first).then_some(off + Ipv4Hdr::LEN)
}

/// TCP or UDP ports at `off`.
#[inline(always)]
fn ports<P: Packet>(ctx: &P, proto: u8, off: usize) -> Option<([u8; 2], [u8; 2])> {
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let p = ptr_at::<[[u8; 2]; 2], _>(ctx, off)?;
    // SAFETY: ptr_at checked the bounds.
    let p = unsafe { *p };
    Some((p[0], p[1]))
}

/// The VNI and inner Ethernet type of what follows the UDP header at `udp_at`, when it reads
/// as VXLAN carrying IPv4 or IPv6 (I flag set), whatever the port.
#[inline(always)]
fn vxlan<P: Packet>(ctx: &P, udp_at: usize) -> Option<(u32, u16)> {
    let vx = ptr_at::<VxlanHdr, _>(ctx, udp_at + UdpHdr::LEN)?;
    let eth = ptr_at::<EthHdr, _>(ctx, udp_at + UdpHdr::LEN + VxlanHdr::LEN)?;
    // SAFETY: ptr_at checked the bounds.
    let (vx, eth_type) = unsafe { (*vx, (*eth).ether_type) };
    if vx.flags & network_types::vxlan::VXLAN_I_FLAG_MASK == 0
        || (eth_type != IPV4 && eth_type != IPV6)
    {
        return None;
    }
    let vni = ((vx.vni[0] as u32) << 16) | ((vx.vni[1] as u32) << 8) | vx.vni[2] as u32;
    Some((vni, eth_type))
}

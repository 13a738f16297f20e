//! Events for `datapath monitor`: a dropped packet (and, while a monitor asks, one forwarded
//! packet in `trace_every`) decoded into an `Event` and written to the `DP_EVENTS` ring
//! buffer, behind a per-CPU token bucket so a flood of bad packets costs a few hundred events
//! a second, not one per packet. What the bucket refuses or the full ring loses is counted.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use maps_common::{
    DEFAULT_EVENT_BURST, DEFAULT_EVENT_RATE, DropReason, Event, MonitorConf, MonitorState,
    event_kind,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, udp::UdpHdr, vxlan::VxlanHdr};

use crate::{
    DP_EVENTS, DP_MONITOR, DP_MONITOR_CONF,
    parse::{IP_OFFSET, IPPROTO_IPIP, IPPROTO_TCP, IPPROTO_UDP, Packet, ptr_at},
};

const IPV4: u16 = 0x0800u16.to_be();
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

#[inline(always)]
/// Writes one event (kind, hook, reason) if this CPU's bucket has a token; `conf`, read once
/// by the caller, sets the bucket.
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
    let mut ev = Event {
        ts_ns: now,
        kind,
        hook,
        reason,
        ifindex: ctx.ifindex(),
        len: ctx.packet_len() as u32,
        ..Event::default()
    };
    decode(ctx, &mut ev);
    // No wakeup per event (an irq_work each, microseconds under a flood): the monitor polls.
    match DP_EVENTS.output(ev, BPF_RB_NO_WAKEUP) {
        Ok(()) => st.sent += 1,
        Err(_) => st.lost += 1,
    }
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

/// The frame's first IPv4 header, its ports, and for IPIP and VXLAN (outer header without
/// options) the inner header and its ports.
#[inline(always)]
fn decode<P: Packet>(ctx: &P, ev: &mut Event) {
    let Some(eth) = ptr_at::<EthHdr, _>(ctx, 0) else {
        return;
    };
    // SAFETY: ptr_at checked the bounds.
    if unsafe { (*eth).ether_type } != IPV4 {
        return;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr, _>(ctx, ETH_IP) else {
        return;
    };
    // SAFETY: ptr_at checked the bounds.
    let ip = unsafe { *ip };
    ev.proto = ip.proto;
    ev.src = ip.src_addr;
    ev.dst = ip.dst_addr;
    let plain = ip.vihl == 0x45;
    let first = u16::from_be_bytes(ip.frags) & IP_OFFSET == 0;
    if !plain || !first {
        return;
    }
    let l4 = ETH_IP + Ipv4Hdr::LEN;
    if let Some((s, d)) = ports(ctx, ip.proto, l4) {
        (ev.sport, ev.dport) = (s, d);
    }
    let inner_at = match ip.proto {
        IPPROTO_IPIP => l4,
        IPPROTO_UDP => match vni(ctx, l4) {
            Some(v) => {
                ev.vni = v;
                l4 + UdpHdr::LEN + VxlanHdr::LEN + EthHdr::LEN
            }
            None => return,
        },
        _ => return,
    };
    let Some(inner) = ptr_at::<Ipv4Hdr, _>(ctx, inner_at) else {
        return;
    };
    // SAFETY: ptr_at checked the bounds.
    let inner = unsafe { *inner };
    ev.inner_proto = inner.proto;
    ev.inner_src = inner.src_addr;
    ev.inner_dst = inner.dst_addr;
    if inner.vihl == 0x45
        && u16::from_be_bytes(inner.frags) & IP_OFFSET == 0
        && let Some((s, d)) = ports(ctx, inner.proto, inner_at + Ipv4Hdr::LEN)
    {
        (ev.inner_sport, ev.inner_dport) = (s, d);
    }
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

/// The VNI of what follows the UDP header at `udp_at`, when it reads as VXLAN carrying
/// IPv4 (I flag set, inner Ethernet type IPv4), whatever the port.
#[inline(always)]
fn vni<P: Packet>(ctx: &P, udp_at: usize) -> Option<u32> {
    let vx = ptr_at::<VxlanHdr, _>(ctx, udp_at + UdpHdr::LEN)?;
    let eth = ptr_at::<EthHdr, _>(ctx, udp_at + UdpHdr::LEN + VxlanHdr::LEN)?;
    // SAFETY: ptr_at checked the bounds.
    let (vx, eth_type) = unsafe { (*vx, (*eth).ether_type) };
    if vx.flags & network_types::vxlan::VXLAN_I_FLAG_MASK == 0 || eth_type != IPV4 {
        return None;
    }
    Some(((vx.vni[0] as u32) << 16) | ((vx.vni[1] as u32) << 8) | vx.vni[2] as u32)
}

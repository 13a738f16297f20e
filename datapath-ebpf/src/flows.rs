//! Accepted flows (`--host-routing accepted-flows`, the default): the host's netfilter judges
//! the first packets of every pod flow in the stack; the program on the far side of the stack
//! (the underlay's egress going out, the pod veth's egress coming in) records the flows it let
//! through unchanged, and only those bypass the stack afterwards, until the agent bumps the
//! ruleset generation or the verdict is `REVERIFY_NS` old. Netfilter's flowtables have the same
//! shape: the stack decides, the fast path follows.
use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::TcContext};
use maps_common::{
    CounterId, FastFlow, FlowKey, NodeConfig, REVERIFY_NS, config_flags, flow_dir, flow_state,
};
use network_types::ip::Ipv4Hdr;

use crate::{
    DP_FAST_FLOWS, DP_STACK_FLOWS,
    counters::count,
    lookup,
    parse::{IPPROTO_TCP, l4_ports, ptr_at},
};

/// TCP flags conntrack must see (SYN, FIN, RST): such packets always take the stack.
const TCP_CONTROL: u8 = 0x01 | 0x02 | 0x04;

/// A packet's flow as its sender sent it, and whether it is a TCP SYN, FIN or RST.
#[derive(Clone, Copy)]
pub struct Seen {
    pub key: FlowKey,
    pub control: bool,
}

/// The flow of `ip` (behind the Ethernet header) in direction `dir` (a `flow_dir` value, 0 for
/// `DP_STACK_FLOWS`): addresses, protocol, and for TCP/UDP (first or only fragment) the ports.
#[inline(always)]
pub fn seen(ctx: &TcContext, ip: &Ipv4Hdr, dir: u8) -> Seen {
    let mut key = FlowKey {
        src: ip.src_addr,
        dst: ip.dst_addr,
        proto: ip.proto,
        dir,
        ..FlowKey::default()
    };
    let mut control = false;
    if let Some((ports, off)) = l4_ports(ctx, ip) {
        key.sport = ports[0];
        key.dport = ports[1];
        if ip.proto == IPPROTO_TCP {
            // A TCP header too short to hold its flags is the stack's to judge.
            control = match ptr_at::<u8, _>(ctx, off + 13) {
                // SAFETY: ptr_at checked the bounds.
                Some(flags) => (unsafe { *flags }) & TCP_CONTROL != 0,
                None => true,
            };
        }
    }
    Seen { key, control }
}

/// Whether only accepted flows may bypass the stack on this node.
#[inline(always)]
pub fn enforced(cfg: &NodeConfig) -> bool {
    cfg.flags & config_flags::ACCEPTED_FLOWS != 0
}

/// Before a bypass. Returns true when netfilter accepted the flow in this ruleset generation
/// less than `REVERIFY_NS` ago (and the packet is no TCP SYN/FIN/RST). Otherwise records that a
/// packet of the flow goes to the stack for a verdict (`PENDING`, or `CONTROL` for SYN/FIN/RST),
/// counts it under `verify`, and returns false: the caller hands the packet to the stack.
#[inline(always)]
pub fn may_bypass(cfg: &NodeConfig, seen: &Seen, verify: CounterId, len: u32) -> bool {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if !seen.control
        && let Some(f) = DP_FAST_FLOWS.get_ptr(seen.key)
    {
        // SAFETY: a value pointer from the map, copied right away.
        let f = unsafe { *f };
        if f.state == flow_state::ACCEPTED
            && f.ruleset_gen == cfg.ruleset_gen
            && now.wrapping_sub(f.since_ns) < REVERIFY_NS
        {
            return true;
        }
    }
    let flow = FastFlow {
        since_ns: now,
        ruleset_gen: cfg.ruleset_gen,
        state: if seen.control {
            flow_state::CONTROL
        } else {
            flow_state::PENDING
        },
        _pad: [0; 3],
    };
    // A full LRU map evicts its oldest flow; an insert cannot fail otherwise.
    let _ = DP_FAST_FLOWS.insert(seen.key, flow, 0);
    count(verify, len);
    false
}

/// On the far side of the stack, for a packet it forwarded. Returns false when the flow has no
/// entry: the stack rewrote it (NAT) or it never came by the near side. Otherwise a `PENDING`
/// entry of this generation becomes `ACCEPTED` (counted under `accepted`), and returns true.
#[inline(always)]
pub fn forwarded(cfg: &NodeConfig, key: &FlowKey, accepted: CounterId, len: u32) -> bool {
    let Some(f) = DP_FAST_FLOWS.get_ptr_mut(*key) else {
        return false;
    };
    // SAFETY: a value pointer from the map; a racing writer only makes one verdict wait.
    unsafe {
        if (*f).state == flow_state::PENDING && (*f).ruleset_gen == cfg.ruleset_gen {
            (*f).state = flow_state::ACCEPTED;
            (*f).since_ns = bpf_ktime_get_coarse_ns();
            count(accepted, len);
        }
    }
    true
}

/// At the underlay's egress, for a packet a local pod sent through the host's stack (the
/// encap program's path). A flow that came by the pod's veth unchanged is netfilter's verdict
/// for `flows` (accepted when pending). Any other (rewritten by NAT on the way) is recorded,
/// once, so its replies take the stack too.
#[inline(always)]
pub fn stack_forwarded(ctx: &TcContext, cfg: &NodeConfig, ip: &Ipv4Hdr) {
    if cfg.flags & config_flags::HOST_ROUTING_BPF == 0
        || !lookup::in_cidr(ip.src_addr, cfg.pod_cidr, cfg.pod_prefix_len)
    {
        return;
    }
    let mut key = seen(ctx, ip, flow_dir::OUT).key;
    if enforced(cfg) && forwarded(cfg, &key, CounterId::FlowAcceptedOut, ctx.len()) {
        return;
    }
    key.dir = 0;
    // The lookup also marks the entry recently used, keeping a live flow from eviction.
    if DP_STACK_FLOWS.get_ptr(key).is_none() {
        // A full LRU map evicts its oldest flow; an insert cannot fail otherwise.
        let _ = DP_STACK_FLOWS.insert(key, 1, 0);
    }
}

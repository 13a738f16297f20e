//! Accepted flows (`--host-routing accepted-flows`, the default): the host's netfilter judges
//! the first packets of every pod flow in the stack; the program on the far side of the stack
//! (the underlay's egress going out, the pod veth's egress coming in) records the flows it let
//! through unchanged, and only those bypass the stack afterwards, until the agent bumps the
//! ruleset generation or the verdict is `REVERIFY_NS` old. Netfilter's flowtables have the same
//! shape: the stack decides, the fast path follows. Both families share the logic; `Flow`
//! names each one's key and maps.
use aya_ebpf::{btf_maps::LruHashMap, helpers::bpf_ktime_get_coarse_ns, programs::TcContext};
use maps_common::{
    CounterId, FastFlow, FlowKey, FlowKey6, MAX_FLOWS, NodeConfig, REVERIFY_NS, config_flags,
    flow_dir, flow_state,
};
use network_types::ip::Ipv4Hdr;

use crate::{
    DP_FAST_FLOWS, DP_FAST_FLOWS6, DP_STACK_FLOWS, DP_STACK_FLOWS6,
    counters::count,
    lookup,
    parse::{IPPROTO_TCP, l4_ports, ptr_at},
};

/// TCP flags conntrack must see (SYN, FIN, RST): such packets always take the stack.
const TCP_CONTROL: u8 = 0x01 | 0x02 | 0x04;
const FLOWS: usize = MAX_FLOWS as usize;

/// A flow key of one address family, with that family's flow maps.
pub trait Flow: Copy + 'static {
    /// Flows on their way to netfilter's verdict, and those it accepted.
    fn fast() -> &'static LruHashMap<Self, FastFlow, FLOWS>;
    /// Flows that left through the host's stack, possibly rewritten by NAT.
    fn stack() -> &'static LruHashMap<Self, u32, FLOWS>;
    /// The same flow in direction `dir`.
    fn with_dir(self, dir: u8) -> Self;
    /// The flow its replies belong to, as `stack()` records it (direction 0).
    fn reply(self) -> Self;
}

/// `Flow` for a family's key type and its two maps.
macro_rules! flow_impl {
    ($key:ty, $fast:ident, $stack:ident) => {
        impl Flow for $key {
            #[inline(always)]
            fn fast() -> &'static LruHashMap<Self, FastFlow, FLOWS> {
                &$fast
            }
            #[inline(always)]
            fn stack() -> &'static LruHashMap<Self, u32, FLOWS> {
                &$stack
            }
            #[inline(always)]
            fn with_dir(self, dir: u8) -> Self {
                Self { dir, ..self }
            }
            #[inline(always)]
            fn reply(self) -> Self {
                let (src, dst, sport, dport) = (self.dst, self.src, self.dport, self.sport);
                Self {
                    src,
                    dst,
                    sport,
                    dport,
                    dir: 0,
                    ..self
                }
            }
        }
    };
}
flow_impl!(FlowKey, DP_FAST_FLOWS, DP_STACK_FLOWS);
flow_impl!(FlowKey6, DP_FAST_FLOWS6, DP_STACK_FLOWS6);

/// A packet's flow as its sender sent it, and whether it is a TCP SYN, FIN or RST.
#[derive(Clone, Copy)]
pub struct Seen<K> {
    pub key: K,
    pub control: bool,
}

/// Whether the TCP header at `off` carries SYN, FIN or RST; one too short to hold its flags
/// is the stack's to judge (true).
#[inline(always)]
pub fn tcp_control(ctx: &TcContext, off: usize) -> bool {
    match ptr_at::<u8, _>(ctx, off + 13) {
        // SAFETY: ptr_at checked the bounds.
        Some(flags) => (unsafe { *flags }) & TCP_CONTROL != 0,
        None => true,
    }
}

/// The flow of `ip` (behind the Ethernet header) in direction `dir` (a `flow_dir` value, 0 for
/// `DP_STACK_FLOWS`): addresses, protocol, and for TCP/UDP (first or only fragment) the ports.
#[inline(always)]
pub fn seen(ctx: &TcContext, ip: &Ipv4Hdr, dir: u8) -> Seen<FlowKey> {
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
        control = ip.proto == IPPROTO_TCP && tcp_control(ctx, off);
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
pub fn may_bypass<K: Flow>(cfg: &NodeConfig, seen: &Seen<K>, verify: CounterId, len: u32) -> bool {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if !seen.control
        && let Some(f) = K::fast().get_ptr(seen.key)
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
    let _ = K::fast().insert(seen.key, flow, 0);
    count(verify, len);
    false
}

/// On the far side of the stack, for a packet it forwarded. Returns false when the flow has no
/// entry: the stack rewrote it (NAT) or it never came by the near side. Otherwise a `PENDING`
/// entry of this generation becomes `ACCEPTED` (counted under `accepted`), and returns true.
#[inline(always)]
pub fn forwarded<K: Flow>(cfg: &NodeConfig, key: &K, accepted: CounterId, len: u32) -> bool {
    let Some(f) = K::fast().get_ptr_mut(*key) else {
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
    stack_seen(cfg, seen(ctx, ip, flow_dir::OUT).key, ctx.len());
}

/// `stack_forwarded` once the packet is known to be a local pod's, for either family: `key`
/// is its flow in direction `OUT`.
#[inline(always)]
pub fn stack_seen<K: Flow>(cfg: &NodeConfig, key: K, len: u32) {
    if enforced(cfg) && forwarded(cfg, &key, CounterId::FlowAcceptedOut, len) {
        return;
    }
    let key = key.with_dir(0);
    // The lookup also marks the entry recently used, keeping a live flow from eviction.
    if K::stack().get_ptr(key).is_none() {
        // A full LRU map evicts its oldest flow; an insert cannot fail otherwise.
        let _ = K::stack().insert(key, 1, 0);
    }
}

/// Whether a decapsulated packet of flow `seen` may go straight into its pod: its flow's other
/// direction did not leave through the host's stack (where a Service's NAT may have rewritten
/// it, to be undone by the stack), and with `flows` enforced, netfilter accepted it.
#[inline(always)]
pub fn may_deliver<K: Flow>(cfg: &NodeConfig, seen: &Seen<K>, len: u32) -> bool {
    if K::stack().get_ptr(seen.key.reply()).is_some() {
        return false;
    }
    !enforced(cfg) || may_bypass(cfg, seen, CounterId::FlowVerifyIn, len)
}

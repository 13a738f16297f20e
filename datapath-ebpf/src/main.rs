//! Entry points and maps of the datapath's kernel programs. Entry points only dispatch; the
//! work lives in `encap` (TC egress) and `decap` (XDP or TC ingress).
//! On the host (`cargo clippy --workspace`) it builds as an empty binary.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod counters;
mod csum;
mod decap;
mod encap;
mod encap6;
mod flows;
mod hostroute;
mod hostroute6;
mod lookup;
mod monitor;
mod nexthop;
mod outcome;
mod parse;
mod six;

use aya_ebpf::{
    bindings::{__sk_buff, TC_ACT_OK, TC_ACT_SHOT, xdp_action::XDP_DROP},
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use maps_common::{
    AgentInfo, Counter, CounterId, DEFAULT_MAX_NODES, DropReason, EVENTS_BYTES, Endpoint, Event,
    FastFlow, FlowKey, FlowKey6, MAX_FLOWS, MonitorConf, MonitorState, NextHop, NodeConfig,
    NodeConfig6, NodeEntry, NodeEntry6, PeerHealth, PeerStats, PodKey, PodRoute, PodRoute6,
    event_hook,
};
use network_types::eth::EtherType;

const MAX_NODES: usize = DEFAULT_MAX_NODES as usize;

/// This node's settings (one entry); see `maps_common::NodeConfig`.
#[btf_map]
pub static DP_CONFIG: Array<NodeConfig, 1> = Array::new();

/// Pod CIDR -> owning node, by longest prefix: the fallback when more prefix lengths are in
/// use than `lookup` tries. The agent resizes it with `--max-nodes`.
#[btf_map]
pub static DP_POD_CIDRS: LpmTrie<[u8; 4], PodRoute, MAX_NODES> = LpmTrie::new();

/// (prefix length, network) -> owning node, exact match: the per-packet lookup.
#[btf_map]
pub static DP_POD_ROUTES: HashMap<PodKey, PodRoute, MAX_NODES> = HashMap::new();

/// Underlay address -> known node; decapsulation accepts only these sources.
#[btf_map]
pub static DP_NODES: HashMap<[u8; 4], NodeEntry, MAX_NODES> = HashMap::new();

/// Packets and bytes by `CounterId`.
#[btf_map]
pub static DP_COUNTERS: PerCpuArray<Counter, { CounterId::COUNT as usize }> = PerCpuArray::new();

/// Dropped packets and bytes by `DropReason`.
#[btf_map]
pub static DP_DROPS: PerCpuArray<Counter, { DropReason::COUNT as usize }> = PerCpuArray::new();

/// Traffic per peer node, by `PodRoute::peer_idx`.
#[btf_map]
pub static DP_PEER_STATS: PerCpuArray<PeerStats, MAX_NODES> = PerCpuArray::new();

/// Local pod address -> host-side veth and MACs, written by the CNI plugin.
#[btf_map]
pub static DP_ENDPOINTS: HashMap<[u8; 4], Endpoint, MAX_ENDPOINTS> = HashMap::new();

/// Flows local pods sent to remote pods through the host's stack; their replies take it too.
#[btf_map]
pub static DP_STACK_FLOWS: LruHashMap<FlowKey, u32, { MAX_FLOWS as usize }> = LruHashMap::new();

/// Pod flows on their way to netfilter's verdict, and those it accepted (`flows`).
#[btf_map]
pub static DP_FAST_FLOWS: LruHashMap<FlowKey, FastFlow, { MAX_FLOWS as usize }> = LruHashMap::new();

/// Each peer's outer next hop as the FIB last gave it, per CPU (no locking), by `peer_idx`.
#[btf_map]
pub static DP_NEXTHOPS: PerCpuArray<NextHop, MAX_NODES> = PerCpuArray::new();

/// Why the agent last rejected a cluster state, for `datapath status`; no program reads it.
#[btf_map]
pub static DP_AGENT_NOTE: Array<[u8; maps_common::AGENT_NOTE_LEN], 1> = Array::new();

/// What the agent last applied, for `datapath status`; no program reads it.
#[btf_map]
pub static DP_AGENT: Array<AgentInfo, 1> = Array::new();

/// Dropped (and sampled forwarded) packets for `datapath monitor` (`monitor`).
#[btf_map]
pub static DP_EVENTS: RingBuf<Event, { EVENTS_BYTES as usize }> = RingBuf::new();

/// Each CPU's event token bucket and event counts.
#[btf_map]
pub static DP_MONITOR: PerCpuArray<MonitorState, 1> = PerCpuArray::new();

/// Each peer's last health probe, written by the agent for `datapath status`; no program
/// reads it.
#[btf_map]
pub static DP_HEALTH: HashMap<[u8; 4], PeerHealth, MAX_NODES> = HashMap::new();

/// `DP_HEALTH` for the peers' IPv6 halves, by IPv6 underlay address; no program reads it.
#[btf_map]
pub static DP_HEALTH6: HashMap<[u8; 16], PeerHealth, MAX_NODES> = HashMap::new();

/// The event rate limit and trace sampling, written by the agent and `datapath monitor`.
#[btf_map]
pub static DP_MONITOR_CONF: Array<MonitorConf, 1> = Array::new();

/// This node's IPv6 settings (one entry, all zero without IPv6 pods); see `six`.
#[btf_map]
pub static DP_CONFIG6: Array<NodeConfig6, 1> = Array::new();

/// IPv6 pod CIDR -> owning node, by longest prefix.
#[btf_map]
pub static DP_POD_CIDRS6: LpmTrie<[u8; 16], PodRoute6, MAX_NODES> = LpmTrie::new();

/// IPv6 underlay address -> known node; IPv6 decapsulation accepts only these sources.
#[btf_map]
pub static DP_NODES6: HashMap<[u8; 16], NodeEntry6, MAX_NODES> = HashMap::new();

/// Local pod IPv6 address -> host-side veth and MACs, written by the CNI plugin.
#[btf_map]
pub static DP_ENDPOINTS6: HashMap<[u8; 16], Endpoint, MAX_ENDPOINTS> = HashMap::new();

/// `DP_STACK_FLOWS` for IPv6 pods.
#[btf_map]
pub static DP_STACK_FLOWS6: LruHashMap<FlowKey6, u32, { MAX_FLOWS as usize }> = LruHashMap::new();

/// `DP_FAST_FLOWS` for IPv6 pods.
#[btf_map]
pub static DP_FAST_FLOWS6: LruHashMap<FlowKey6, FastFlow, { MAX_FLOWS as usize }> =
    LruHashMap::new();

const MAX_ENDPOINTS: usize = maps_common::MAX_ENDPOINTS as usize;

/// TC ingress on a local pod's host-side veth: BPF host routing of what the pod sends.
#[classifier]
pub fn tc_pod_ingress(ctx: TcContext) -> i32 {
    by_family(
        &ctx,
        event_hook::TC_POD_INGRESS,
        hostroute::try_pod_egress,
        hostroute6::pod_egress6,
    )
}

/// TC egress on a local pod's host-side veth: records the flows netfilter let through to the
/// pod; never changes or drops a packet.
#[classifier]
pub fn tc_pod_egress(ctx: TcContext) -> i32 {
    hostroute::pod_ingress_seen(&ctx);
    TC_ACT_OK
}

/// TC egress on the underlay: encapsulates traffic for remote pod CIDRs.
#[classifier]
pub fn tc_encap_egress(ctx: TcContext) -> i32 {
    by_family(
        &ctx,
        event_hook::TC_ENCAP,
        encap::try_encap,
        six::try_encap6,
    )
}

/// XDP on the underlay: decapsulates IPIP and VXLAN from known nodes.
#[xdp]
pub fn xdp_decap_ingress(ctx: XdpContext) -> u32 {
    match decap::try_decap_xdp(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            let len = (ctx.data_end() - ctx.data()) as u32;
            counters::count_drop(reason, len);
            monitor::dropped(&ctx, event_hook::XDP_DECAP, reason);
            debug!(&ctx, "xdp drop reason={}", reason as u32);
            XDP_DROP
        }
    }
}

/// TC ingress on the underlay: the same decapsulation where XDP costs more; then the host's
/// stack, or with BPF host routing straight into the local pod.
#[classifier]
pub fn tc_decap_ingress(ctx: TcContext) -> i32 {
    match decap::try_decap_tc(&ctx) {
        Ok(decap::Delivery::Stack) => TC_ACT_OK,
        Ok(decap::Delivery::Pod(cfg)) => hostroute::deliver(&ctx, cfg).unwrap_or(TC_ACT_OK),
        Err(reason) => drop_tc(&ctx, event_hook::TC_DECAP, reason),
    }
}

/// TC ingress on the checksum path's kernel VXLAN device: only this datapath admits tunnel
/// traffic, so anything that device decapsulated on its own is dropped and counted.
#[classifier]
pub fn tc_csum_dev_ingress(ctx: TcContext) -> i32 {
    drop_tc(&ctx, event_hook::TC_CSUM_DEV, DropReason::KernelTunnelRx)
}

/// Returns at once: the floor the benchmark subtracts from the TC programs' cost (only in
/// the benchmark's build of the object).
#[cfg(feature = "floor")]
#[classifier]
pub fn tc_floor(_ctx: TcContext) -> i32 {
    aya_ebpf::bindings::TC_ACT_OK
}

/// Returns at once: the floor the benchmark subtracts from the XDP program's cost (only in
/// the benchmark's build of the object).
#[cfg(feature = "floor")]
#[xdp]
pub fn xdp_floor(_ctx: XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

/// A TC program's dispatch: IPv6 frames to its `v6` half, the rest to `v4`; then the action,
/// or the drop counted, reported and logged (`hook`).
///
/// Each half, and a drop's report (`drop_call`), is a BPF-to-BPF call, never inlined
/// (`half`): each gets a stack frame of its own, so every path fits the verifier's 512 bytes,
/// which they would not together. A half's outcome comes back in one register (`outcome`).
#[inline(always)]
fn by_family<F4, F6>(ctx: &TcContext, hook: u8, v4: F4, v6: F6) -> i32
where
    F4: Fn(&TcContext) -> Result<i32, DropReason>,
    F6: Fn(&TcContext) -> Result<i32, DropReason>,
{
    let skb = ctx.skb.skb;
    let code = if hostroute::ether_type(ctx) == EtherType::Ipv6 as u16 {
        half(v6, skb)
    } else {
        half(v4, skb)
    };
    if code >= 0 {
        code as i32
    } else {
        drop_call(skb, hook, code)
    }
}

/// Runs one family's half of a TC program in a call of its own (one function per half: `F`
/// is each half's own zero-sized type).
#[inline(never)]
fn half<F: Fn(&TcContext) -> Result<i32, DropReason>>(way: F, skb: *mut __sk_buff) -> i64 {
    outcome::encode(way(&TcContext::new(skb)))
}

/// `drop_tc` as a BPF-to-BPF call, beside the halves rather than inside their frames.
#[inline(never)]
fn drop_call(skb: *mut __sk_buff, hook: u8, code: i64) -> i32 {
    let reason = outcome::decode(code)
        .err()
        .unwrap_or(DropReason::AdjustFailed);
    drop_tc(&TcContext::new(skb), hook, reason)
}

#[inline(always)]
fn drop_tc(ctx: &TcContext, hook: u8, reason: DropReason) -> i32 {
    counters::count_drop(reason, ctx.len());
    monitor::dropped(ctx, hook, reason);
    debug!(ctx, "tc drop reason={}", reason as u32);
    TC_ACT_SHOT
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

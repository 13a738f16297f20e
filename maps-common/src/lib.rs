//! Map keys, values, names and reason codes shared by the kernel programs and the agent.
//!
//! Every type here is `#[repr(C)]`, `Copy`, has explicit padding and no `bool`/enum fields, so
//! the kernel and userspace agree byte for byte and `bpftool map dump` shows named fields (BTF).
//! Wire-order fields are `[u8; N]`; everything else is host order.
#![no_std]

/// Names of the maps, as they appear in the object file, in bpffs and in `bpftool map list`.
pub mod map_names {
    /// `Array<NodeConfig, 1>`: this node's own settings.
    pub const CONFIG: &str = "DP_CONFIG";
    /// `LpmTrie<[u8; 4], PodRoute>`: pod CIDR -> owning node (longest-prefix fallback, and
    /// what `bpftool` shows by prefix).
    pub const POD_CIDRS: &str = "DP_POD_CIDRS";
    /// `HashMap<PodKey, PodRoute>`: the same entries, exact-match by (prefix length, network);
    /// what the encap program looks up, once per prefix length in use.
    pub const POD_ROUTES: &str = "DP_POD_ROUTES";
    /// `HashMap<[u8; 4], NodeEntry>`: underlay address -> known node (decap accepts only these).
    pub const NODES: &str = "DP_NODES";
    /// `PerCpuArray<Counter>` indexed by [`crate::CounterId`].
    pub const COUNTERS: &str = "DP_COUNTERS";
    /// `PerCpuArray<Counter>` indexed by [`crate::DropReason`].
    pub const DROPS: &str = "DP_DROPS";
    /// `PerCpuArray<PeerStats>` indexed by [`crate::PodRoute::peer_idx`].
    pub const PEER_STATS: &str = "DP_PEER_STATS";
    /// `HashMap<[u8; 4], Endpoint>`: a local pod's address -> its host-side interface, written
    /// by the project's CNI plugin.
    pub const ENDPOINTS: &str = "DP_ENDPOINTS";
    /// `LruHashMap<FlowKey, u32>`: flows local pods sent to remote pods through the host's
    /// stack, where NAT may have rewritten them (a Service's DNAT); their replies go back
    /// through the stack too, never straight into the pod.
    pub const STACK_FLOWS: &str = "DP_STACK_FLOWS";
    /// `Array<AgentInfo, 1>`: what the agent last did, for `datapath status` (the programs do
    /// not read it).
    pub const AGENT: &str = "DP_AGENT";
    /// `Array<[u8; AGENT_NOTE_LEN], 1>`: why the last rejected cluster state was rejected
    /// (UTF-8, NUL-padded), for `datapath status`; no program reads it.
    pub const AGENT_NOTE: &str = "DP_AGENT_NOTE";
    /// `RingBuf<Event>`: dropped (and, when asked, sampled forwarded) packets for
    /// `datapath monitor`.
    pub const EVENTS: &str = "DP_EVENTS";
    /// `PerCpuArray<MonitorState, 1>`: each CPU's event token bucket and what it sent,
    /// limited and lost.
    pub const MONITOR: &str = "DP_MONITOR";
    /// `Array<MonitorConf, 1>`: the event rate limit and trace sampling.
    pub const MONITOR_CONF: &str = "DP_MONITOR_CONF";
    /// `HashMap<[u8; 4], PeerHealth>`: each peer's last probe through the tunnel and over the
    /// underlay, written by the agent; no program reads it.
    pub const HEALTH: &str = "DP_HEALTH";
    /// `LruHashMap<FlowKey, FastFlow>`: pod flows on their way to the host's netfilter for a
    /// verdict, and those it accepted, which BPF host routing then carries (default mode).
    pub const FAST_FLOWS: &str = "DP_FAST_FLOWS";
    /// `PerCpuArray<NextHop>` indexed like `PEER_STATS`: each peer's outer next hop as the
    /// kernel's FIB last gave it, valid while `NodeConfig::underlay_gen` is unchanged.
    pub const NEXTHOPS: &str = "DP_NEXTHOPS";
    /// `Array<NodeConfig6, 1>`: this node's IPv6 settings (all zero: no IPv6 pods carried).
    pub const CONFIG6: &str = "DP_CONFIG6";
    /// `LpmTrie<[u8; 16], PodRoute6>`: IPv6 pod CIDR -> owning node.
    pub const POD_CIDRS6: &str = "DP_POD_CIDRS6";
    /// `HashMap<[u8; 16], NodeEntry6>`: IPv6 underlay address -> known node (IPv6 decap
    /// accepts only these).
    pub const NODES6: &str = "DP_NODES6";
    /// `HashMap<[u8; 16], Endpoint>`: a local pod's IPv6 address -> its host-side interface.
    pub const ENDPOINTS6: &str = "DP_ENDPOINTS6";
    /// `LruHashMap<FlowKey6, u32>`: `STACK_FLOWS` for IPv6.
    pub const STACK_FLOWS6: &str = "DP_STACK_FLOWS6";
    /// `LruHashMap<FlowKey6, FastFlow>`: `FAST_FLOWS` for IPv6.
    pub const FAST_FLOWS6: &str = "DP_FAST_FLOWS6";
    /// `HashMap<[u8; 16], PeerHealth>`: `HEALTH` for the peers' IPv6 halves, by their IPv6
    /// underlay address.
    pub const HEALTH6: &str = "DP_HEALTH6";
    /// All maps the agent pins, in the order `datapath stats` reads them.
    pub const ALL: [&str; 24] = [
        CONFIG,
        POD_CIDRS,
        POD_ROUTES,
        NODES,
        COUNTERS,
        DROPS,
        PEER_STATS,
        ENDPOINTS,
        STACK_FLOWS,
        AGENT,
        FAST_FLOWS,
        NEXTHOPS,
        AGENT_NOTE,
        EVENTS,
        MONITOR,
        MONITOR_CONF,
        HEALTH,
        CONFIG6,
        POD_CIDRS6,
        NODES6,
        ENDPOINTS6,
        STACK_FLOWS6,
        FAST_FLOWS6,
        HEALTH6,
    ];
}

/// Names of the kernel programs (their function names in `datapath-ebpf`).
pub mod prog_names {
    /// TC egress on the underlay interface: encapsulates traffic for remote pod CIDRs.
    pub const TC_ENCAP_EGRESS: &str = "tc_encap_egress";
    /// XDP on the underlay interface: decapsulates IPIP/VXLAN for this node.
    pub const XDP_DECAP_INGRESS: &str = "xdp_decap_ingress";
    /// TC ingress variant of the decapsulation, for drivers where XDP costs more.
    pub const TC_DECAP_INGRESS: &str = "tc_decap_ingress";
    /// TC ingress on the checksum path's kernel VXLAN device: drops what that device decapsulated.
    pub const TC_CSUM_DEV_INGRESS: &str = "tc_csum_dev_ingress";
    /// TC ingress on a local pod's host-side veth: BPF host routing of what the pod sends.
    pub const TC_POD_INGRESS: &str = "tc_pod_ingress";
    /// TC egress on a local pod's host-side veth: records the flows the host's netfilter let
    /// through toward the pod (`--host-routing accepted-flows`).
    pub const TC_POD_EGRESS: &str = "tc_pod_egress";
    /// Programs that only return: the benchmark's floor.
    pub const TC_FLOOR: &str = "tc_floor";
    pub const XDP_FLOOR: &str = "xdp_floor";
}

/// Version of the layout of the pinned maps (their keys, values and meaning). 1 was the first
/// release (six maps, 12 then 16 drop reasons); 2 added exact-match pod routes, endpoints, stack
/// flows, the agent map and per-peer unreachable counts; 3 the accepted flows (`DP_FAST_FLOWS`),
/// the next-hop cache (`DP_NEXTHOPS`), the ruleset and underlay generations in `NodeConfig` and
/// four flow counters; 4 the monitor and health maps; 5 the IPv6 maps (`DP_CONFIG6`,
/// `DP_POD_CIDRS6`, `DP_NODES6`); 6 BPF host routing for IPv6 (`DP_ENDPOINTS6`,
/// `DP_STACK_FLOWS6`, `DP_FAST_FLOWS6`); 7 the IPv6 halves' health (`DP_HEALTH6`). The README
/// keeps the history.
pub const ABI_VERSION: u32 = 7;

/// Maps are sized for this many nodes unless the agent is told otherwise (Kubernetes' largest
/// supported cluster).
pub const DEFAULT_MAX_NODES: u32 = 5000;

/// Bytes IPIP adds: one outer IPv4 header.
pub const IPIP_OVERHEAD: u32 = 20;
/// Bytes VXLAN adds: outer IPv4 + UDP + VXLAN header + inner Ethernet header.
pub const VXLAN_OVERHEAD: u32 = 50;
/// IANA's VXLAN port, Calico's default.
pub const VXLAN_PORT_IANA: u16 = 4789;
/// The Linux VXLAN device's default port, Flannel's default.
pub const VXLAN_PORT_LINUX: u16 = 8472;

/// Next hop of the agent's few aggregate routes (cluster CIDRs toward the underlay interface,
/// `onlink`): a link-local address no host uses, with a permanent neighbour entry of
/// [`ROUTE_NEXTHOP_MAC`]. The kernel hands every packet for a remote pod to the encap program
/// with that destination MAC; the program picks the real outer next hop itself (FIB lookup).
pub const ROUTE_NEXTHOP: [u8; 4] = [169, 254, 0, 1];
/// Destination MAC the kernel writes for packets routed through [`ROUTE_NEXTHOP`]: locally
/// administered, so a frame the program did not rewrite is never mistaken for a real host's.
pub const ROUTE_NEXTHOP_MAC: [u8; 6] = [0x0e, 0xd9, 0x00, 0x00, 0x00, 0x01];
/// `skb->mark` of a packet BPF host routing encapsulated at a pod's veth and redirected to the
/// underlay: the underlay's egress program clears it and sends the packet on without looking
/// again (as Cilium marks its own packets with magic values). A pod's packets arrive with no
/// mark: crossing namespaces scrubs it.
pub const MARK_ENCAPSULATED: u32 = 0x0d47_0e00;

/// Distinct pod-CIDR prefix lengths the encap program tries by exact match (longest first);
/// with more in use it falls back to the LPM trie.
pub const MAX_PREFIX_LENS: usize = 4;

/// `PodRoute::mode`: how traffic to a pod CIDR leaves this node.
pub mod route_mode {
    /// Pod CIDR of this node: not touched by the encap program.
    pub const LOCAL: u8 = 0;
    /// Reached natively (same-subnet peer under crossSubnet): passed unencapsulated.
    pub const NATIVE: u8 = 1;
    /// Encapsulated in IPIP (IP protocol 4).
    pub const IPIP: u8 = 2;
    /// Encapsulated in VXLAN.
    pub const VXLAN: u8 = 3;

    /// Human name of a mode, for `datapath routes` and metrics.
    pub const fn name(mode: u8) -> &'static str {
        match mode {
            LOCAL => "local",
            NATIVE => "native",
            IPIP => "ipip",
            VXLAN => "vxlan",
            _ => "unknown",
        }
    }
}

/// `NodeConfig::flags` bits.
pub mod config_flags {
    /// Compute the outer UDP checksum of VXLAN packets instead of sending zero.
    pub const UDP_CSUM: u32 = 1 << 0;
    /// After decapsulation, require the inner source to lie in the sender's pod CIDR.
    pub const INNER_SRC_CHECK: u32 = 1 << 1;
    /// More distinct pod-CIDR prefix lengths than `MAX_PREFIX_LENS`: look up the LPM trie.
    pub const LPM_LOOKUP: u32 = 1 << 2;
    /// BPF host routing: pods' packets for remote pods are encapsulated at the pod's veth and
    /// sent straight to the underlay; replies for them go straight into the pod.
    pub const HOST_ROUTING_BPF: u32 = 1 << 3;
    /// With `HOST_ROUTING_BPF`: only flows the host's netfilter accepted in the current ruleset
    /// generation bypass the stack; every other packet takes it (`DP_FAST_FLOWS`).
    pub const ACCEPTED_FLOWS: u32 = 1 << 4;
}

/// `AgentInfo::host_routing`: how pods' packets cross this node, as `datapath status` names it.
pub mod host_routing {
    /// Through the host's routing and netfilter (`--host-routing kernel`).
    pub const KERNEL: u8 = 0;
    /// Straight between the pod's veth and the underlay, skipping netfilter (`bpf`).
    pub const BPF: u8 = 1;
    /// The first packets of every flow through the host's netfilter, the rest of the flows it
    /// accepted straight (`accepted-flows`, the default).
    pub const ACCEPTED_FLOWS: u8 = 2;

    /// The mode's name, as the `--host-routing` flag spells it.
    pub const fn name(mode: u8) -> &'static str {
        match mode {
            KERNEL => "kernel",
            BPF => "bpf",
            ACCEPTED_FLOWS => "accepted-flows",
            _ => "unknown",
        }
    }
}

/// `AgentInfo::decap_hook`: where decapsulation runs.
pub mod decap_hook {
    pub const XDP: u8 = 1;
    pub const TC: u8 = 2;
}

/// `AgentInfo::tc_attach`: how the TC programs are attached.
pub mod tc_attach {
    pub const TCX: u8 = 1;
    pub const NETLINK: u8 = 2;
}

/// `FastFlow::state`: where a flow of `DP_FAST_FLOWS` stands with the host's netfilter.
pub mod flow_state {
    /// A packet of the flow went to the host's stack for netfilter's verdict; the program on
    /// the far side of the stack (the underlay's or the pod veth's egress) accepts the flow
    /// when the packet reaches it unchanged.
    pub const PENDING: u8 = 1;
    /// A TCP SYN, FIN or RST went to the stack: conntrack must see those, so it accepts
    /// nothing, but it tells the far side the flow was not rewritten by NAT.
    pub const CONTROL: u8 = 2;
    /// Netfilter forwarded a packet of the flow in this ruleset generation: its packets
    /// bypass the stack until the generation changes or the verdict is `REVERIFY_NS` old.
    pub const ACCEPTED: u8 = 3;
}

/// `FlowKey::dir` of `DP_FAST_FLOWS` entries.
pub mod flow_dir {
    /// A local pod's packets toward a remote pod (judged in this node's FORWARD).
    pub const OUT: u8 = 1;
    /// Decapsulated packets toward a local pod.
    pub const IN: u8 = 2;
}

/// How long a flow's accepted verdict stands before one packet takes the stack again: it
/// refreshes the flow's conntrack entry (UDP's lasts 120 s, ICMP's 30 s) and re-asks netfilter.
pub const REVERIFY_NS: u64 = 10_000_000_000;

/// Entries of `DP_ENDPOINTS`: pods on one node, far above Kubernetes' 110.
pub const MAX_ENDPOINTS: u32 = 4096;

/// The layout this build gives each pinned map: (name, key size, value size, max entries), for
/// maps sized for `max_nodes`. A pinned map that differs in any of them belongs to another
/// release or another `--max-nodes`, and is migrated rather than reused.
pub const fn map_layouts(max_nodes: u32) -> [(&'static str, u32, u32, u32); 24] {
    use core::mem::size_of;
    let lpm_key = 8; // prefix length (u32) + IPv4 address
    [
        (map_names::CONFIG, 4, size_of::<NodeConfig>() as u32, 1),
        (
            map_names::POD_CIDRS,
            lpm_key,
            size_of::<PodRoute>() as u32,
            max_nodes,
        ),
        (
            map_names::POD_ROUTES,
            size_of::<PodKey>() as u32,
            size_of::<PodRoute>() as u32,
            max_nodes,
        ),
        (
            map_names::NODES,
            4,
            size_of::<NodeEntry>() as u32,
            max_nodes,
        ),
        (
            map_names::COUNTERS,
            4,
            size_of::<Counter>() as u32,
            CounterId::COUNT,
        ),
        (
            map_names::DROPS,
            4,
            size_of::<Counter>() as u32,
            DropReason::COUNT,
        ),
        (
            map_names::PEER_STATS,
            4,
            size_of::<PeerStats>() as u32,
            max_nodes,
        ),
        (
            map_names::ENDPOINTS,
            4,
            size_of::<Endpoint>() as u32,
            MAX_ENDPOINTS,
        ),
        (
            map_names::STACK_FLOWS,
            size_of::<FlowKey>() as u32,
            4,
            MAX_FLOWS,
        ),
        (map_names::AGENT, 4, size_of::<AgentInfo>() as u32, 1),
        (
            map_names::FAST_FLOWS,
            size_of::<FlowKey>() as u32,
            size_of::<FastFlow>() as u32,
            MAX_FLOWS,
        ),
        (
            map_names::NEXTHOPS,
            4,
            size_of::<NextHop>() as u32,
            max_nodes,
        ),
        (map_names::AGENT_NOTE, 4, AGENT_NOTE_LEN as u32, 1),
        (map_names::EVENTS, 0, 0, EVENTS_BYTES),
        (map_names::MONITOR, 4, size_of::<MonitorState>() as u32, 1),
        (
            map_names::MONITOR_CONF,
            4,
            size_of::<MonitorConf>() as u32,
            1,
        ),
        (
            map_names::HEALTH,
            4,
            size_of::<PeerHealth>() as u32,
            max_nodes,
        ),
        (map_names::CONFIG6, 4, size_of::<NodeConfig6>() as u32, 1),
        (
            map_names::POD_CIDRS6,
            20, // prefix length (u32) + IPv6 address
            size_of::<PodRoute6>() as u32,
            max_nodes,
        ),
        (
            map_names::NODES6,
            16,
            size_of::<NodeEntry6>() as u32,
            max_nodes,
        ),
        (
            map_names::ENDPOINTS6,
            16,
            size_of::<Endpoint>() as u32,
            MAX_ENDPOINTS,
        ),
        (
            map_names::STACK_FLOWS6,
            size_of::<FlowKey6>() as u32,
            4,
            MAX_FLOWS,
        ),
        (
            map_names::FAST_FLOWS6,
            size_of::<FlowKey6>() as u32,
            size_of::<FastFlow>() as u32,
            MAX_FLOWS,
        ),
        (
            map_names::HEALTH6,
            16,
            size_of::<PeerHealth>() as u32,
            max_nodes,
        ),
    ]
}

/// A peer's health as the agent last probed it (`DP_HEALTH`): an ICMP echo to its probe
/// address (the first address of its pod CIDR) through the tunnel, and one to its underlay
/// address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerHealth {
    /// Unix time of the last probe, in seconds.
    pub checked_unix: u64,
    /// Round trip through the tunnel in microseconds; 0 when it went unanswered.
    pub tunnel_rtt_us: u32,
    /// Round trip over the underlay in microseconds; 0 when it went unanswered.
    pub underlay_rtt_us: u32,
    /// Unix time since which the tunnel state (answered or not) holds.
    pub since_unix: u64,
    /// The peer's name in the cluster state (UTF-8, NUL-padded, cut to fit): what
    /// `datapath monitor` shows beside its address.
    pub name: [u8; PEER_NAME_LEN],
}
const _: () = assert!(core::mem::size_of::<PeerHealth>() == 24 + PEER_NAME_LEN);

/// What a peer's last probes say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthState {
    /// The tunnel answers.
    Ok,
    /// Only the underlay answers: a VNI or port mismatch, a firewall dropping the tunnel.
    TunnelDown,
    /// Neither answers.
    Down,
}

impl HealthState {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::TunnelDown => "tunnel_down",
            Self::Down => "down",
        }
    }
}

impl PeerHealth {
    pub const fn state(&self) -> HealthState {
        match (self.tunnel_rtt_us != 0, self.underlay_rtt_us != 0) {
            (true, _) => HealthState::Ok,
            (false, true) => HealthState::TunnelDown,
            (false, false) => HealthState::Down,
        }
    }
}

/// Bytes of a peer's name in `PeerHealth`.
pub const PEER_NAME_LEN: usize = 64;

/// Size of the `DP_EVENTS` ring buffer: 4,096 events of 64 bytes (plus headers).
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// `Event::kind`.
pub mod event_kind {
    /// A packet a program dropped.
    pub const DROP: u8 = 1;
    /// A packet a program forwarded (sampled, only while a monitor asks).
    pub const TRACE: u8 = 2;
}

/// `Event::hook`: the program and hook that saw the packet.
pub mod event_hook {
    pub const XDP_DECAP: u8 = 1;
    pub const TC_DECAP: u8 = 2;
    pub const TC_ENCAP: u8 = 3;
    pub const TC_POD_INGRESS: u8 = 4;
    pub const TC_CSUM_DEV: u8 = 5;

    /// The program and hook's name, as `datapath monitor` prints it.
    pub const fn name(hook: u8) -> &'static str {
        match hook {
            XDP_DECAP => "xdp_decap_ingress (xdp)",
            TC_DECAP => "tc_decap_ingress (tc ingress)",
            TC_ENCAP => "tc_encap_egress (tc egress)",
            TC_POD_INGRESS => "tc_pod_ingress (tc ingress, pod veth)",
            TC_CSUM_DEV => "tc_csum_dev_ingress (tc ingress, checksum device)",
            _ => "unknown",
        }
    }
}

/// One packet for `datapath monitor`, headers decoded in the program: the packet's first
/// IPv4 or IPv6 header (outer, for a tunnel packet) and, for IPIP and VXLAN, the inner one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns`: nanoseconds since boot (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// `event_kind`.
    pub kind: u8,
    /// `event_hook`.
    pub hook: u8,
    /// `DropReason` for drops; 0 for traces.
    pub reason: u8,
    /// IP protocol (IPv6: next header) of the first header; 0 when the frame is neither IPv4
    /// nor IPv6.
    pub proto: u8,
    pub ifindex: u32,
    /// The frame's length.
    pub len: u32,
    /// VXLAN's VNI; 0 for anything else.
    pub vni: u32,
    /// IP version of the first header (4 or 6; 0: neither) and of the inner one (0: none).
    pub family: u8,
    pub inner_family: u8,
    /// IP protocol of the inner header; 0 without one.
    pub inner_proto: u8,
    pub _pad0: u8,
    /// TCP/UDP ports of the first header (wire order); 0 otherwise.
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub inner_sport: [u8; 2],
    pub inner_dport: [u8; 2],
    /// Addresses, IPv4 ones in their first 4 bytes.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub inner_src: [u8; 16],
    pub inner_dst: [u8; 16],
    pub _pad1: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<Event>() == 104);

/// Each CPU's event token bucket, and what it did with events.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorState {
    /// Tokens, in millitokens (so a refill of a fraction of one still counts).
    pub millitokens: u64,
    pub last_ns: u64,
    /// Events written to `DP_EVENTS`.
    pub sent: u64,
    /// Events the token bucket refused.
    pub limited: u64,
    /// Events lost to a full ring buffer.
    pub lost: u64,
    /// Forwarded packets seen while tracing, for sampling one in `trace_every`.
    pub trace_seen: u64,
}
const _: () = assert!(core::mem::size_of::<MonitorState>() == 48);

/// The event rate limit and trace sampling; all zero means the defaults.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorConf {
    /// Events per second per CPU (0: `DEFAULT_EVENT_RATE`).
    pub rate: u32,
    /// Burst, in events (0: `DEFAULT_EVENT_BURST`).
    pub burst: u32,
    /// Trace one forwarded packet in this many; 0: no traces (the default).
    pub trace_every: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<MonitorConf>() == 16);

/// Default event rate limit per CPU: a flood of bad packets costs the node a few hundred
/// events a second, not one per packet.
pub const DEFAULT_EVENT_RATE: u32 = 200;
pub const DEFAULT_EVENT_BURST: u32 = 100;

/// Flows in `DP_STACK_FLOWS`: every Service connection a busy node's pods keep open; each packet
/// such a flow sends re-inserts it, so only a flow idle while 65,536 newer ones pass is forgotten.
pub const MAX_FLOWS: u32 = 65536;

/// `NodeEntry::flags` bits, written by the agent.
pub mod node_flags {
    /// The kernel has no usable route (or next-hop neighbour) toward the node's address: its
    /// pods' traffic is dropped as `peer_unreachable` until the underlay can reach it again.
    pub const UNREACHABLE: u8 = 1 << 0;
}

/// This node's settings; the single entry of `DP_CONFIG`. All zero means "not configured yet":
/// the programs then pass every packet untouched.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// This node's underlay IPv4 address, wire order.
    pub node_addr: [u8; 4],
    /// VXLAN network identifier (24 bits used), host order.
    pub vni: u32,
    /// This node's VTEP MAC: inner source MAC of the VXLAN frames it sends.
    pub vtep_mac: [u8; 6],
    /// VXLAN UDP destination port, host order.
    pub vxlan_port: u16,
    /// `config_flags` bits.
    pub flags: u32,
    /// MTU of the underlay interface; encapsulated non-GSO packets must fit in it.
    pub underlay_mtu: u32,
    /// Interface index of the metadata-mode kernel VXLAN device that carries GSO packets when
    /// `UDP_CSUM` is set (BPF cannot ask GSO for per-segment outer checksums); 0 when absent.
    pub csum_ifindex: u32,
    /// This node's own pod CIDR, wire order, and its prefix length: decap tells "for a local
    /// pod" by mask, without a map lookup.
    pub pod_cidr: [u8; 4],
    /// Distinct pod-CIDR prefix lengths in `DP_POD_ROUTES`, longest first; 0 ends the list.
    pub prefix_lens: [u8; MAX_PREFIX_LENS],
    pub pod_prefix_len: u8,
    pub _pad: [u8; 3],
    /// Interface index of the underlay interface: where BPF host routing sends from a veth.
    pub underlay_ifindex: u32,
    /// Generation of the host's netfilter ruleset, bumped by the agent on every change: an
    /// accepted flow of another generation is judged again (`ACCEPTED_FLOWS`).
    pub ruleset_gen: u32,
    /// Generation of the underlay's routes, links and neighbours, bumped by the agent on every
    /// netlink notification of them: a `DP_NEXTHOPS` entry of another generation is looked up
    /// again. 0: no cache.
    pub underlay_gen: u32,
}
const _: () = assert!(core::mem::size_of::<NodeConfig>() == 52);

/// Value of `DP_NEXTHOPS`: where packets encapsulated for one peer go, as `bpf_fib_lookup`
/// answered in generation `underlay_gen`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// `NodeConfig::underlay_gen` of the lookup (0 for an empty slot), with `NEXTHOP_IPV6`
    /// set when it is the next hop of the peer's IPv6 address.
    pub underlay_gen: u32,
    /// Interface the outer packet leaves by.
    pub ifindex: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    /// That interface's MTU (the FIB's `mtu_result`).
    pub mtu: u32,
}
const _: () = assert!(core::mem::size_of::<NextHop>() == 24);

/// `NextHop::underlay_gen`'s bit for the IPv6 half's next hop; generations stay below it.
pub const NEXTHOP_IPV6: u32 = 1 << 31;

/// The single value of `DP_AGENT`: what the agent last applied, written after each change.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentInfo {
    /// `ABI_VERSION` of the agent that wrote it.
    pub abi_version: u32,
    pub pid: u32,
    /// Unix time of the last reload, in seconds.
    pub last_reload_unix: u64,
    pub reloads: u64,
    pub reload_failures: u64,
    /// 1 when the last reload succeeded.
    pub last_reload_ok: u8,
    /// `route_mode` of the encapsulation (IPIP or VXLAN).
    pub mode: u8,
    pub cross_subnet: u8,
    /// Decapsulation hook: 1 XDP, 2 TC.
    pub decap_hook: u8,
    /// `host_routing` value.
    pub host_routing: u8,
    /// How TC programs are attached: 1 tcx, 2 netlink (clsact).
    pub tc_attach: u8,
    /// Reference CNI plugins missing from the CNI bin directory, one bit each in the order of
    /// the configuration list (ptp, host-local, portmap).
    pub cni_missing: u8,
    /// 1 once the agent is stopping (SIGTERM): its pid lives on a moment longer.
    pub stopping: u8,
    pub pod_mtu: u32,
    pub nodes_skipped: u32,
    /// The agent's version, NUL-padded.
    pub version: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<AgentInfo>() == 64);

/// Bytes of `DP_AGENT_NOTE`'s one value: the last rejection's reason, cut to fit.
pub const AGENT_NOTE_LEN: usize = 256;

/// Value of `DP_ENDPOINTS` (key: the pod's IPv4, wire order): what delivering straight into
/// a local pod needs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// Host-side interface of the pod's veth pair (`bpf_redirect_peer` target).
    pub ifindex: u32,
    /// MAC of the pod's own interface: destination of frames delivered to it.
    pub pod_mac: [u8; 6],
    /// MAC of the host-side interface: source of those frames, as the host would send them.
    pub host_mac: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<Endpoint>() == 16);

/// Key of `DP_STACK_FLOWS` (a flow as it left the node, after the stack's NAT; `dir` 0) and of
/// `DP_FAST_FLOWS` (`dir` a `flow_dir` value). Ports are wire order, zero for protocols
/// without them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub dir: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);

/// `FlowKey` for IPv6 (`DP_STACK_FLOWS6`, `DP_FAST_FLOWS6`): the same fields, 16-byte
/// addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey6 {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub dir: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey6>() == 40);

/// Value of `DP_FAST_FLOWS`: where a pod flow stands with the host's netfilter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastFlow {
    /// `bpf_ktime_get_ns` when the state was written.
    pub since_ns: u64,
    /// `NodeConfig::ruleset_gen` when the state was written.
    pub ruleset_gen: u32,
    /// `flow_state` value.
    pub state: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FastFlow>() == 16);

/// Key of `DP_POD_ROUTES`: the same layout as an LPM trie key, but matched exactly. `addr` is
/// the network address (host bits zero), wire order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PodKey {
    pub prefix_len: u32,
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<PodKey>() == 8);

/// The network mask of a prefix length, host order; `len` above 32 counts as 32.
#[inline(always)]
pub const fn prefix_mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else if len >= 32 {
        u32::MAX
    } else {
        u32::MAX << (32 - len as u32)
    }
}

/// Value of `DP_POD_CIDRS` (key: `[u8; 4]` address with a prefix length): the node that owns a
/// pod CIDR and how to reach it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodRoute {
    /// Owning node's underlay IPv4 address, wire order.
    pub node_addr: [u8; 4],
    /// Owning node's VTEP MAC: inner destination MAC of VXLAN frames sent to it.
    pub vtep_mac: [u8; 6],
    /// `route_mode` value.
    pub mode: u8,
    pub _pad: u8,
    /// Slot of the owning node in `DP_PEER_STATS`.
    pub peer_idx: u32,
}
const _: () = assert!(core::mem::size_of::<PodRoute>() == 16);

/// Value of `DP_NODES` (key: the node's underlay IPv4, wire order): a node this one accepts
/// encapsulated traffic from, with the pod CIDR its inner sources must lie in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeEntry {
    /// Slot of the node in `DP_PEER_STATS`.
    pub peer_idx: u32,
    /// The node's pod CIDR, wire order, and its prefix length.
    pub pod_cidr: [u8; 4],
    pub pod_prefix_len: u8,
    /// `route_mode` value of the node's pod CIDR (informational for decap).
    pub mode: u8,
    /// `node_flags` bits.
    pub flags: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<NodeEntry>() == 12);

/// Bytes VXLAN over an IPv6 underlay adds: outer IPv6, UDP, VXLAN and inner Ethernet headers.
pub const VXLAN6_OVERHEAD: u32 = 70;

/// This node's IPv6 settings; the single entry of `DP_CONFIG6`. All zero: no IPv6 pods are
/// carried (the programs pass IPv6 untouched). IPv6 pods travel in VXLAN over the IPv6
/// underlay only, through the kernel's metadata-mode VXLAN device (`vxlan_ifindex`), which
/// writes the outer headers with a UDP checksum on every packet and segment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig6 {
    /// This node's underlay IPv6 address, wire order.
    pub node_addr: [u8; 16],
    /// This node's IPv6 pod CIDR, wire order, and its prefix length.
    pub pod_cidr: [u8; 16],
    /// This node's IPv6 VTEP MAC: inner source MAC of the VXLAN frames it sends.
    pub vtep_mac: [u8; 6],
    pub pod_prefix_len: u8,
    pub _pad: u8,
    /// Interface index of the metadata-mode VXLAN device IPv6 frames are handed to.
    pub vxlan_ifindex: u32,
}
const _: () = assert!(core::mem::size_of::<NodeConfig6>() == 44);

/// Value of `DP_POD_CIDRS6` (key: `[u8; 16]` address with a prefix length): the node that owns
/// an IPv6 pod CIDR.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodRoute6 {
    /// Owning node's underlay IPv6 address, wire order.
    pub node_addr: [u8; 16],
    /// Owning node's IPv6 VTEP MAC: inner destination MAC of VXLAN frames sent to it.
    pub vtep_mac: [u8; 6],
    /// `route_mode` value: LOCAL, VXLAN or NATIVE.
    pub mode: u8,
    /// `node_flags` of the owning node's IPv6 half: `UNREACHABLE` when this node has no IPv6
    /// route toward it (its IPv6 pods' packets are dropped as `peer_unreachable`).
    pub flags: u8,
    /// Slot of the owning node in `DP_PEER_STATS` (shared with its IPv4 half).
    pub peer_idx: u32,
}
const _: () = assert!(core::mem::size_of::<PodRoute6>() == 28);

/// Value of `DP_NODES6` (key: the node's underlay IPv6, wire order): a node this one accepts
/// IPv6 VXLAN from, with the IPv6 pod CIDR its inner sources must lie in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeEntry6 {
    /// Slot of the node in `DP_PEER_STATS`.
    pub peer_idx: u32,
    /// The node's IPv6 pod CIDR, wire order, and its prefix length.
    pub pod_cidr: [u8; 16],
    pub pod_prefix_len: u8,
    /// `node_flags` bits.
    pub flags: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<NodeEntry6>() == 24);

/// A packet and byte count; the value of `DP_COUNTERS` and `DP_DROPS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

impl Counter {
    /// Field by field: for summing per-CPU values.
    pub const fn plus(self, o: Self) -> Self {
        Self {
            packets: self.packets + o.packets,
            bytes: self.bytes + o.bytes,
        }
    }
}

/// Traffic to and from one peer node; the value of `DP_PEER_STATS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Packets and bytes this node encapsulated toward the peer (or sent natively).
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Packets and bytes decapsulated from the peer.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Packets for the peer dropped because the kernel's FIB had no route toward it.
    pub unreachable_packets: u64,
    pub unreachable_bytes: u64,
}
const _: () = assert!(core::mem::size_of::<PeerStats>() == 48);

impl PeerStats {
    /// Field by field: for summing per-CPU values.
    pub const fn plus(self, o: Self) -> Self {
        Self {
            tx_packets: self.tx_packets + o.tx_packets,
            tx_bytes: self.tx_bytes + o.tx_bytes,
            rx_packets: self.rx_packets + o.rx_packets,
            rx_bytes: self.rx_bytes + o.rx_bytes,
            unreachable_packets: self.unreachable_packets + o.unreachable_packets,
            unreachable_bytes: self.unreachable_bytes + o.unreachable_bytes,
        }
    }
}

/// Index into `DP_COUNTERS`. Bytes are counted as the packet's length when the program saw it.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterId {
    EncapIpip = 0,
    EncapVxlan = 1,
    DecapIpip = 2,
    DecapVxlan = 3,
    /// Sent to a pod CIDR of a same-subnet peer without encapsulation (crossSubnet).
    NativeForward = 4,
    /// Not ours: passed untouched (not IPv4, not for a remote pod, not addressed to this node).
    Pass = 5,
    /// Encapsulated at a pod's veth and sent straight to the underlay (BPF host routing).
    HostRouteOut = 6,
    /// Decapsulated and delivered straight into the pod (`bpf_redirect_peer`).
    HostRouteIn = 7,
    /// A local pod's packet for a remote pod handed to the host's stack for netfilter's verdict
    /// (its flow not accepted yet, a TCP SYN/FIN/RST, or a verdict due again).
    FlowVerifyOut = 8,
    /// A decapsulated packet for a local pod handed to the stack for netfilter's verdict.
    FlowVerifyIn = 9,
    /// Outbound flows netfilter forwarded, recorded at the underlay's egress as accepted.
    FlowAcceptedOut = 10,
    /// Inbound flows netfilter forwarded, recorded at the pod veth's egress as accepted.
    FlowAcceptedIn = 11,
    /// Of `EncapVxlan`, the IPv6 pods' packets (VXLAN over the IPv6 underlay).
    EncapIpv6 = 12,
    /// Of `DecapVxlan`, the IPv6 pods' packets.
    DecapIpv6 = 13,
}

impl CounterId {
    pub const COUNT: u32 = 14;
    pub const ALL: [CounterId; Self::COUNT as usize] = [
        Self::EncapIpip,
        Self::EncapVxlan,
        Self::DecapIpip,
        Self::DecapVxlan,
        Self::NativeForward,
        Self::Pass,
        Self::HostRouteOut,
        Self::HostRouteIn,
        Self::FlowVerifyOut,
        Self::FlowVerifyIn,
        Self::FlowAcceptedOut,
        Self::FlowAcceptedIn,
        Self::EncapIpv6,
        Self::DecapIpv6,
    ];

    /// (direction, mode) labels of the counter, as the metrics endpoint exports them.
    pub const fn labels(self) -> (&'static str, &'static str) {
        match self {
            Self::EncapIpip => ("encap", "ipip"),
            Self::EncapVxlan => ("encap", "vxlan"),
            Self::DecapIpip => ("decap", "ipip"),
            Self::DecapVxlan => ("decap", "vxlan"),
            Self::NativeForward => ("native", "none"),
            Self::Pass => ("pass", "none"),
            Self::HostRouteOut => ("host_route_out", "bpf"),
            Self::HostRouteIn => ("host_route_in", "bpf"),
            Self::FlowVerifyOut => ("flow_verify_out", "stack"),
            Self::FlowVerifyIn => ("flow_verify_in", "stack"),
            Self::FlowAcceptedOut => ("flow_accepted_out", "flows"),
            Self::FlowAcceptedIn => ("flow_accepted_in", "flows"),
            Self::EncapIpv6 => ("encap_ipv6", "vxlan"),
            Self::DecapIpv6 => ("decap_ipv6", "vxlan"),
        }
    }
}

/// Why a program dropped a packet; the index into `DP_DROPS`. Separate from action codes.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// A header the program needed was cut short, or a tunnel packet is shorter than its outer
    /// IPv4 total length says.
    Truncated = 0,
    /// Encapsulated traffic for this node from an address that is not a known node.
    UnknownPeer = 1,
    /// VXLAN with a VNI other than the configured one.
    WrongVni = 2,
    /// VXLAN header without the I flag, or with reserved flags set.
    BadVxlanFlags = 3,
    /// Inner source address outside the sending node's pod CIDR.
    InnerSrcSpoofed = 4,
    /// VXLAN whose inner frame is not of the outer header's family (not IPv4 in IPv4, not IPv6
    /// in IPv6): the name is from when only IPv4 was carried.
    InnerNotIpv4 = 5,
    /// Outer IPv4 header with options, addressed to this node as a tunnel packet.
    OuterIpOptions = 6,
    /// Fragmented outer IPv4 tunnel packet (cannot be reassembled in the program).
    OuterFragment = 7,
    /// Encapsulated packet would exceed the underlay MTU (the route MTU should have caught it).
    TooBig = 8,
    /// `bpf_skb_adjust_room` / `bpf_xdp_adjust_head` / `bpf_skb_set_tunnel_key` refused.
    AdjustFailed = 9,
    /// The kernel FIB refused the lookup for another reason (forwarding disabled, no source
    /// address, unsupported route).
    FibLookupFailed = 10,
    /// Inner IPv4 header that is not a valid IPv4 header (version, IHL, length).
    BadInnerHeader = 11,
    /// A packet the kernel VXLAN device of the checksum path decapsulated itself: only this
    /// datapath's programs admit tunnel traffic, so whatever reaches that device is dropped.
    KernelTunnelRx = 12,
    /// VXLAN for a local pod, from a known node's address, but to a UDP port other than the
    /// configured one.
    WrongPort = 13,
    /// IPIP or VXLAN for a local pod whose outer destination is not this node's address.
    NotForThisNode = 14,
    /// Outer IPv4 total length too short for the tunnel headers and an inner IPv4 header, or a
    /// UDP length that disagrees with it.
    BadOuterLength = 15,
    /// No route (or an unreachable, blackhole or prohibit route) toward the peer node's
    /// underlay address; counted per peer too.
    PeerUnreachable = 16,
    /// Routed into the datapath through the aggregate routes (destination MAC
    /// `ROUTE_NEXTHOP_MAC`) but in no remote node's pod CIDR: nothing could deliver it.
    NoPodRoute = 17,
}

impl DropReason {
    pub const COUNT: u32 = 18;
    pub const ALL: [DropReason; Self::COUNT as usize] = [
        Self::Truncated,
        Self::UnknownPeer,
        Self::WrongVni,
        Self::BadVxlanFlags,
        Self::InnerSrcSpoofed,
        Self::InnerNotIpv4,
        Self::OuterIpOptions,
        Self::OuterFragment,
        Self::TooBig,
        Self::AdjustFailed,
        Self::FibLookupFailed,
        Self::BadInnerHeader,
        Self::KernelTunnelRx,
        Self::WrongPort,
        Self::NotForThisNode,
        Self::BadOuterLength,
        Self::PeerUnreachable,
        Self::NoPodRoute,
    ];

    /// The reason's name as `datapath stats` and the metrics endpoint print it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::UnknownPeer => "unknown_peer",
            Self::WrongVni => "wrong_vni",
            Self::BadVxlanFlags => "bad_vxlan_flags",
            Self::InnerSrcSpoofed => "inner_src_spoofed",
            Self::InnerNotIpv4 => "inner_not_ipv4",
            Self::OuterIpOptions => "outer_ip_options",
            Self::OuterFragment => "outer_fragment",
            Self::TooBig => "too_big",
            Self::AdjustFailed => "adjust_failed",
            Self::FibLookupFailed => "fib_lookup_failed",
            Self::BadInnerHeader => "bad_inner_header",
            Self::KernelTunnelRx => "kernel_tunnel_rx",
            Self::WrongPort => "wrong_port",
            Self::NotForThisNode => "not_for_this_node",
            Self::BadOuterLength => "bad_outer_length",
            Self::PeerUnreachable => "peer_unreachable",
            Self::NoPodRoute => "no_pod_route",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::NodeConfig {}
    unsafe impl aya::Pod for super::PodRoute {}
    unsafe impl aya::Pod for super::PodKey {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::AgentInfo {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FastFlow {}
    unsafe impl aya::Pod for super::NextHop {}
    unsafe impl aya::Pod for super::NodeEntry {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::MonitorState {}
    unsafe impl aya::Pod for super::MonitorConf {}
    unsafe impl aya::Pod for super::PeerHealth {}
    unsafe impl aya::Pod for super::PeerStats {}
    unsafe impl aya::Pod for super::NodeConfig6 {}
    unsafe impl aya::Pod for super::PodRoute6 {}
    unsafe impl aya::Pod for super::NodeEntry6 {}
    unsafe impl aya::Pod for super::FlowKey6 {}
}

//! What the datapath counted and what its maps hold, read from the maps and rendered for
//! people (`datapath stats`, `datapath routes`), scripts (`--json`) and Prometheus.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
};

use std::sync::atomic::AtomicU64;

use maps_common::{CounterId, DropReason, PeerHealth, node_flags, route_mode};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::Serialize;

use crate::{
    cluster::format_mac,
    kernel::maps::{DatapathMaps, MapsError},
};

#[derive(Clone, Debug, Default, Serialize)]
pub struct CounterRow {
    pub direction: &'static str,
    pub mode: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DropRow {
    pub reason: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

/// Where a pod CIDR's node stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    /// This node's own pod CIDR.
    Local,
    Reachable,
    /// No route toward the node: its pods' traffic is dropped as `peer_unreachable`.
    Unreachable,
}

impl PeerState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Reachable => "reachable",
            Self::Unreachable => "unreachable",
        }
    }
}

impl std::fmt::Display for PeerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct RouteRow {
    pub pod_cidr: String,
    /// The owning node's underlay address, of the pod CIDR's family.
    pub node: IpAddr,
    /// `ipv4` or `ipv6`. An IPv6 row's node shares its IPv4 row's counter slot: per-peer sums
    /// and metrics count the IPv4 rows only.
    pub family: &'static str,
    pub vtep_mac: String,
    pub mode: &'static str,
    pub state: PeerState,
    pub peer_slot: u32,
    pub unreachable_packets: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// The agent's last health probe of the node (`DP_HEALTH`); `None` before the first, for
    /// this node and native peers.
    pub health: Option<Health>,
}

impl RouteRow {
    /// The row of a pod CIDR owned by `node`, in `mode`, counted in slot `peer_idx`; IPv4, no
    /// VTEP MAC and no health until the caller says.
    fn of(
        maps: &DatapathMaps,
        pod_cidr: String,
        node: IpAddr,
        (mode, peer_idx): (u8, u32),
        down: bool,
    ) -> Self {
        let local = mode == route_mode::LOCAL;
        let s = if local {
            Default::default()
        } else {
            maps.peer_stats(peer_idx)
        };
        Self {
            pod_cidr,
            node,
            family: "ipv4",
            vtep_mac: String::new(),
            mode: route_mode::name(mode),
            state: match (local, down) {
                (true, _) => PeerState::Local,
                (_, true) => PeerState::Unreachable,
                (_, false) => PeerState::Reachable,
            },
            peer_slot: peer_idx,
            unreachable_packets: s.unreachable_packets,
            tx_packets: s.tx_packets,
            tx_bytes: s.tx_bytes,
            rx_packets: s.rx_packets,
            rx_bytes: s.rx_bytes,
            health: None,
        }
    }

    /// Another node's IPv4 row: one per peer, whose counters are the peer's.
    fn is_peer(&self) -> bool {
        self.state != PeerState::Local && self.family == "ipv4"
    }
}

/// The IPv6 pod CIDR map's rows (none in pins before map ABI 5).
fn routes6(maps: &DatapathMaps, health: &BTreeMap<IpAddr, PeerHealth>) -> Vec<RouteRow> {
    let Some(m) = &maps.six else {
        return Vec::new();
    };
    let nodes: std::collections::HashMap<[u8; 16], maps_common::NodeEntry6> =
        m.nodes.iter().flatten().collect();
    m.pod_cidrs
        .iter()
        .flatten()
        .map(|(k, r)| {
            let down = nodes
                .get(&r.node_addr)
                .is_some_and(|e| e.flags & node_flags::UNREACHABLE != 0);
            let cidr = format!("{}/{}", std::net::Ipv6Addr::from(k.data()), k.prefix_len());
            let node = std::net::Ipv6Addr::from(r.node_addr).into();
            RouteRow {
                family: "ipv6",
                vtep_mac: format_mac(&r.vtep_mac),
                health: health.get(&node).map(Health::of),
                ..RouteRow::of(maps, cidr, node, (r.mode, r.peer_idx), down)
            }
        })
        .collect()
}

/// A peer's last health probe: round trips in milliseconds, `None` when unanswered.
#[derive(Clone, Debug, Serialize)]
pub struct Health {
    /// `ok`, `tunnel_down` (the underlay answers, the tunnel does not: a VNI or port mismatch,
    /// a firewall), or `down` (neither answers).
    pub state: &'static str,
    pub tunnel_rtt_ms: Option<f64>,
    pub underlay_rtt_ms: Option<f64>,
    /// Unix time of the probe, and since when the tunnel's state holds.
    pub checked_unix: u64,
    pub since_unix: u64,
}

impl Health {
    fn of(h: &maps_common::PeerHealth) -> Self {
        let ms = |us: u32| (us != 0).then(|| f64::from(us) / 1000.0);
        Self {
            state: h.state().name(),
            tunnel_rtt_ms: ms(h.tunnel_rtt_us),
            underlay_rtt_ms: ms(h.underlay_rtt_us),
            checked_unix: h.checked_unix,
            since_unix: h.since_unix,
        }
    }
}

/// Everything the maps say, at one moment.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    pub node_addr: Ipv4Addr,
    pub vni: u32,
    pub vxlan_port: u16,
    pub underlay_mtu: u32,
    pub nodes_known: usize,
    pub counters: Vec<CounterRow>,
    pub drops: Vec<DropRow>,
    pub routes: Vec<RouteRow>,
    /// What the programs did with events for `datapath monitor`, summed over CPUs.
    pub events: EventCounts,
}

/// Events written to `DP_EVENTS`, refused by the token bucket, lost to a full ring.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct EventCounts {
    pub sent: u64,
    pub limited: u64,
    pub lost: u64,
}

impl EventCounts {
    fn read(maps: &DatapathMaps) -> Self {
        let Some(m) = &maps.monitor else {
            return Self::default();
        };
        let Ok(per_cpu) = m.get(&0, 0) else {
            return Self::default();
        };
        per_cpu.iter().fold(Self::default(), |a, s| Self {
            sent: a.sent + s.sent,
            limited: a.limited + s.limited,
            lost: a.lost + s.lost,
        })
    }
}

/// Which bytes each counter counts: each program counts the frame as it has it.
pub const BYTES_LEGEND: &str = "bytes are Ethernet frames as each program counted them: encap, native, pass and peer tx before encapsulation (the pod's packet); decap and peer rx as received (tunnel headers included, 20 B IPIP, 50 B VXLAN); host_route_out after encapsulation; host_route_in after decapsulation";

impl Snapshot {
    pub fn read(maps: &DatapathMaps) -> Result<Self, MapsError> {
        let cfg = maps.read_config()?;
        let counters = DatapathMaps::sum_counters(&maps.counters);
        let drops = DatapathMaps::sum_counters(&maps.drops);
        let nodes = maps.read_nodes()?;
        let health = maps.read_health();
        let routes = maps
            .read_pod_cidrs()?
            .into_iter()
            .map(|(cidr, r)| {
                let node = Ipv4Addr::from(r.node_addr);
                let down = nodes
                    .get(&node)
                    .is_some_and(|e| e.flags & node_flags::UNREACHABLE != 0);
                let row = RouteRow::of(
                    maps,
                    cidr.to_string(),
                    node.into(),
                    (r.mode, r.peer_idx),
                    down,
                );
                RouteRow {
                    vtep_mac: format_mac(&r.vtep_mac),
                    health: health.get(&node.into()).map(Health::of),
                    ..row
                }
            })
            .chain(routes6(maps, &health))
            .collect();
        Ok(Self {
            node_addr: Ipv4Addr::from(cfg.node_addr),
            vni: cfg.vni,
            vxlan_port: cfg.vxlan_port,
            underlay_mtu: cfg.underlay_mtu,
            nodes_known: nodes.len(),
            counters: CounterId::ALL
                .iter()
                .map(|id| {
                    let (direction, mode) = id.labels();
                    let c = counters.get(*id as usize).copied().unwrap_or_default();
                    CounterRow {
                        direction,
                        mode,
                        packets: c.packets,
                        bytes: c.bytes,
                    }
                })
                .collect(),
            drops: DropReason::ALL
                .iter()
                .map(|r| {
                    let c = drops.get(*r as usize).copied().unwrap_or_default();
                    DropRow {
                        reason: r.name(),
                        packets: c.packets,
                        bytes: c.bytes,
                    }
                })
                .collect(),
            routes,
            events: EventCounts::read(maps),
        })
    }

    /// Counters as a person reads them.
    pub fn render_stats(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "node {}  vni {}  vxlan port {}  underlay mtu {}  peers {}",
            self.node_addr, self.vni, self.vxlan_port, self.underlay_mtu, self.nodes_known
        );
        let _ = writeln!(
            s,
            "{:<14} {:<6} {:>14} {:>16}",
            "what (non-zero)", "mode", "packets", "bytes"
        );
        for c in self.counters.iter().filter(|c| c.packets > 0) {
            let _ = writeln!(
                s,
                "{:<14} {:<6} {:>14} {:>16}",
                c.direction, c.mode, c.packets, c.bytes
            );
        }
        let drops: Vec<_> = self.drops.iter().filter(|d| d.packets > 0).collect();
        if drops.is_empty() {
            let _ = writeln!(s, "drops: none");
        } else {
            let _ = writeln!(s, "drops (non-zero):");
        }
        for d in drops {
            let _ = writeln!(s, "  {:<20} {:>14} {:>16}", d.reason, d.packets, d.bytes);
        }
        let _ = writeln!(s, "{BYTES_LEGEND}");
        let e = &self.events;
        let _ = writeln!(
            s,
            "monitor events: {} sent, {} limited (rate limit), {} lost (ring full)",
            e.sent, e.limited, e.lost
        );
        let _ = writeln!(s, "peers:");
        for r in self.routes.iter().filter(|r| r.is_peer()) {
            let _ = writeln!(
                s,
                "  {:<15} {:<11} tx {:>10} pkts {:>14} B   rx {:>10} pkts {:>14} B   unreachable {:>8} pkts",
                r.node,
                r.state,
                r.tx_packets,
                r.tx_bytes,
                r.rx_packets,
                r.rx_bytes,
                r.unreachable_packets
            );
        }
        s
    }

    /// The pod CIDR map as a person reads it.
    pub fn render_routes(&self) -> String {
        let mut s = format!(
            "{:<18} {:<15} {:<17} {:<6} {:<11} {:>5} {:>12}  {:<11} {:>9} {:>9}\n",
            "pod cidr",
            "node",
            "vtep mac",
            "mode",
            "state",
            "slot",
            "unreachable",
            "health",
            "tunnel ms",
            "ul ms"
        );
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |m| format!("{m:.2}"));
        for r in &self.routes {
            let h = r.health.as_ref();
            let _ = writeln!(
                s,
                "{:<18} {:<15} {:<17} {:<6} {:<11} {:>5} {:>12}  {:<11} {:>9} {:>9}",
                r.pod_cidr,
                r.node,
                r.vtep_mac,
                r.mode,
                r.state,
                r.peer_slot,
                r.unreachable_packets,
                h.map_or("-", |h| h.state),
                ms(h.and_then(|h| h.tunnel_rtt_ms)),
                ms(h.and_then(|h| h.underlay_rtt_ms)),
            );
        }
        s
    }

    /// Each probed peer's reachability through the tunnel and over the underlay, and the
    /// tunnel's round trip.
    fn register_health(&self, reg: &mut Registry) {
        let tunnel = Family::<Peer, Gauge>::default();
        let underlay = Family::<Peer, Gauge>::default();
        let rtt = Family::<Peer, Gauge<f64, AtomicU64>>::default();
        for r in &self.routes {
            let Some(h) = &r.health else { continue };
            let l = Peer {
                peer: r.node.to_string(),
            };
            tunnel
                .get_or_create(&l)
                .set(i64::from(h.tunnel_rtt_ms.is_some()));
            underlay
                .get_or_create(&l)
                .set(i64::from(h.underlay_rtt_ms.is_some()));
            if let Some(ms) = h.tunnel_rtt_ms {
                rtt.get_or_create(&l).set(ms / 1000.0);
            }
        }
        reg.register(
            "datapath_peer_tunnel_up",
            "1 while the peer's probe address answers through the tunnel",
            tunnel,
        );
        reg.register(
            "datapath_peer_underlay_up",
            "1 while the peer's underlay address answers",
            underlay,
        );
        reg.register(
            "datapath_peer_tunnel_rtt_seconds",
            "Round trip of the last probe through the tunnel",
            rtt,
        );
    }

    /// Packets and bytes by direction and mode, and drops by reason.
    fn register_traffic(&self, reg: &mut Registry) {
        let packets = Family::<DirMode, Counter>::default();
        let bytes = Family::<DirMode, Counter>::default();
        for c in &self.counters {
            let l = DirMode {
                direction: c.direction.into(),
                mode: c.mode.into(),
            };
            packets.get_or_create(&l).inc_by(c.packets);
            bytes.get_or_create(&l).inc_by(c.bytes);
        }
        reg.register("datapath_packets", "Packets by direction and mode", packets);
        reg.register("datapath_bytes", "Bytes by direction and mode", bytes);
        let drops = Family::<Reason, Counter>::default();
        let drop_bytes = Family::<Reason, Counter>::default();
        for d in &self.drops {
            let l = Reason {
                reason: d.reason.into(),
            };
            drops.get_or_create(&l).inc_by(d.packets);
            drop_bytes.get_or_create(&l).inc_by(d.bytes);
        }
        reg.register("datapath_drops", "Dropped packets by reason", drops);
        reg.register(
            "datapath_dropped_bytes",
            "Dropped bytes by reason",
            drop_bytes,
        );
    }

    /// Per-peer packets, bytes and reachability.
    fn register_peers(&self, reg: &mut Registry) {
        let peer_packets = Family::<PeerDir, Counter>::default();
        let peer_bytes = Family::<PeerDir, Counter>::default();
        let unreachable = Family::<Peer, Gauge>::default();
        let unreachable_drops = Family::<Peer, Counter>::default();
        for r in self.routes.iter().filter(|r| r.is_peer()) {
            let peer = r.node.to_string();
            for (direction, p, b) in [
                ("tx", r.tx_packets, r.tx_bytes),
                ("rx", r.rx_packets, r.rx_bytes),
            ] {
                let l = PeerDir {
                    peer: peer.clone(),
                    direction: direction.into(),
                };
                peer_packets.get_or_create(&l).inc_by(p);
                peer_bytes.get_or_create(&l).inc_by(b);
            }
            let l = Peer { peer };
            unreachable
                .get_or_create(&l)
                .set(i64::from(r.state == PeerState::Unreachable));
            unreachable_drops
                .get_or_create(&l)
                .inc_by(r.unreachable_packets);
        }
        reg.register(
            "datapath_peer_packets",
            "Packets per peer node and direction",
            peer_packets,
        );
        reg.register(
            "datapath_peer_bytes",
            "Bytes per peer node and direction",
            peer_bytes,
        );
        reg.register(
            "datapath_peer_unreachable",
            "1 while the kernel has no route toward the peer node",
            unreachable,
        );
        self.register_health(reg);
        reg.register(
            "datapath_peer_unreachable_drops",
            "Packets for the peer dropped as unreachable",
            unreachable_drops,
        );
    }

    /// The metrics in the OpenMetrics text format, through prometheus-client: the maps' counters
    /// and gauges, then the agent's own (`extra`).
    pub fn render_openmetrics(&self, extra: &[Extra]) -> String {
        let mut reg = Registry::default();
        self.register_traffic(&mut reg);
        self.register_peers(&mut reg);
        let events = Family::<Outcome, Counter>::default();
        for (outcome, n) in [
            ("sent", self.events.sent),
            ("limited", self.events.limited),
            ("lost", self.events.lost),
        ] {
            events
                .get_or_create(&Outcome {
                    outcome: outcome.into(),
                })
                .inc_by(n);
        }
        reg.register(
            "datapath_monitor_events",
            "Events for datapath monitor: sent, refused by the rate limit, lost to a full ring",
            events,
        );
        let known = Gauge::<i64>::default();
        known.set(self.nodes_known as i64);
        reg.register("datapath_nodes_known", "Peer nodes in the maps", known);
        for e in extra {
            match *e {
                Extra::Gauge(name, help, v) => {
                    let g = Gauge::<f64, AtomicU64>::default();
                    g.set(v);
                    reg.register(name, help, g);
                }
                Extra::Counter(name, help, v) => {
                    let c = Counter::<u64>::default();
                    c.inc_by(v);
                    reg.register(name, help, c);
                }
                Extra::PeerGauges(name, help, ref values) => {
                    let f = Family::<Peer, Gauge<f64, AtomicU64>>::default();
                    for (peer, v) in values {
                        f.get_or_create(&Peer { peer: peer.clone() }).set(*v);
                    }
                    reg.register(name, help, f);
                }
                Extra::PeerCounters(name, help, ref values) => {
                    let f = Family::<Peer, Counter>::default();
                    for (peer, v) in values {
                        f.get_or_create(&Peer { peer: peer.clone() }).inc_by(*v);
                    }
                    reg.register(name, help, f);
                }
            }
        }
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &reg) {
            return format!("# error encoding metrics: {e}\n# EOF\n");
        }
        out
    }
}

/// An agent metric beside the maps' (prometheus-client adds `_total` to a counter's name).
pub enum Extra {
    Gauge(&'static str, &'static str, f64),
    Counter(&'static str, &'static str, u64),
    /// One value per peer (label `peer`).
    PeerGauges(&'static str, &'static str, Vec<(String, f64)>),
    PeerCounters(&'static str, &'static str, Vec<(String, u64)>),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirMode {
    direction: String,
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerDir {
    peer: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Peer {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: String,
}

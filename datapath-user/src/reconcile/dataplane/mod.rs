//! The agent's model of what the maps and its kernel routes hold, and the changes that bring
//! them to a new cluster state: a full state is diffed in memory, a delta touches only its
//! nodes. Nothing here reads the maps back or lists kernel routes after the start.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr},
};

use maps_common::{NodeConfig, NodeEntry, PodRoute, map_names, node_flags, route_mode};

mod delta;
mod fabric;
pub use fabric::Fabric;
mod six;
mod write;

use write::{next_gen, same_node};

use crate::{
    cluster::{Cidr, Cluster, Encap, Invalid, Node, Settings},
    kernel::maps::{DatapathMaps, MapsError, map_err},
    underlay::{
        netlink::{Iface, RouteSpec},
        probe::Sources,
    },
};

/// Settings of this node that are not in the cluster state.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    pub node: String,
    pub iface: Iface,
    pub inner_src_check: bool,
    pub max_nodes: u32,
    /// Ifindex of the checksum path's kernel VXLAN device (`net::CSUM_DEV`), 0 when absent.
    pub csum_ifindex: u32,
    /// How pods' packets cross this node (`--host-routing`).
    pub host_routing: HostRouting,
}

/// Where pods' packets are routed on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HostRouting {
    /// BPF host routing for the flows the host's netfilter accepted: each flow's first packets
    /// (and every TCP SYN, FIN, RST) take the host's stack; once netfilter has forwarded one,
    /// the flow goes straight between the pod's veth and the underlay until the ruleset changes.
    AcceptedFlows,
    /// Straight between the pod's veth and the underlay, in BPF, skipping netfilter.
    Bpf,
    /// Through the host's routing and netfilter.
    Kernel,
}

impl HostRouting {
    /// The `maps_common::host_routing` code `DP_AGENT` records.
    pub fn code(self) -> u8 {
        use maps_common::host_routing as h;
        match self {
            Self::AcceptedFlows => h::ACCEPTED_FLOWS,
            Self::Bpf => h::BPF,
            Self::Kernel => h::KERNEL,
        }
    }

    pub fn name(self) -> &'static str {
        maps_common::host_routing::name(self.code())
    }

    /// What the mode skips, for the startup log and `datapath status`.
    pub fn bypass(self) -> &'static str {
        match self {
            Self::AcceptedFlows => {
                "netfilter judges every pod flow's first packets, TCP SYN/FIN/RST and one packet every 10 s; flows it forwarded then skip the host's stack until the ruleset changes"
            }
            Self::Bpf => {
                "every pod-to-remote-pod packet skips the host's routing and netfilter (policy must be enforced elsewhere)"
            }
            Self::Kernel => "nothing: every packet takes the host's routing and netfilter",
        }
    }
}

/// What one change did to the maps (routes are counted by whoever applies them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub config: bool,
    pub nodes_upserted: usize,
    pub nodes_removed: usize,
    pub cidrs_upserted: usize,
    pub cidrs_removed: usize,
    pub routes_replaced: usize,
    pub routes_removed: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// A delta that changes this node itself, or comes before any full state: the caller
    /// applies the whole state instead.
    #[error("the change needs the whole cluster state")]
    NeedsFull,
}

/// A peer half the health probe checks: echo to `probe` (the first address of its pod CIDR)
/// through the tunnel, and to `underlay`.
#[derive(Clone, Debug)]
pub struct ProbeTarget {
    pub name: String,
    pub underlay: IpAddr,
    pub probe: IpAddr,
}

/// One peer as applied: its node and what the maps hold for it.
#[derive(Clone, Debug)]
struct Peer {
    node: Node,
    entry: NodeEntry,
    route: PodRoute,
}

/// The maps plus the agent's memory of what they hold.
pub struct Dataplane {
    pub maps: DatapathMaps,
    pub local: LocalOptions,
    settings: Option<Settings>,
    me: Option<Node>,
    config: NodeConfig,
    peers: BTreeMap<String, Peer>,
    by_addr: HashMap<Ipv4Addr, String>,
    /// Pod CIDRs of peers and of this node, by first address.
    by_start: BTreeMap<u32, (Cidr, String)>,
    /// How many of `by_start`'s CIDRs have each prefix length: the encap program's list.
    prefix_counts: BTreeMap<u8, u32>,
    free: BTreeSet<u32>,
    aggregates: BTreeMap<Cidr, RouteSpec>,
    native: BTreeMap<Cidr, RouteSpec>,
    /// Pod CIDRs this node's BGP speaker holds routes for: under `encapsulation: none` a peer
    /// in another subnet is reached natively only once the fabric can route its pod CIDR.
    fabric: Fabric,
    /// What carries such a peer meanwhile: the encapsulation in use before (VXLAN at first).
    carrier: Encap,
    /// What an earlier agent left in the maps, cleared after the first full state.
    stale_nodes: HashMap<Ipv4Addr, NodeEntry>,
    stale_cidrs: BTreeSet<Cidr>,
    /// Counter slots of peers that left (by address), kept with their counts for the peer's
    /// return; new peers take them only when no other slot is free.
    retired: HashMap<Ipv4Addr, u32>,
    /// Generation of the host's netfilter ruleset as the programs know it (`NodeConfig`).
    ruleset_gen: u32,
    /// Generation of the underlay's routes, links and neighbours (`NodeConfig`).
    underlay_gen: u32,
    /// The IPv6 maps and routes (`six`).
    six: six::Six,
}

impl Dataplane {
    /// Takes over `maps`, remembering what they already hold (an earlier agent's state) so
    /// peers keep their counter slots and leftovers are removed after the first state.
    pub fn new(maps: DatapathMaps, local: LocalOptions) -> Result<Self, MapsError> {
        let stale_nodes: HashMap<_, _> = maps.read_nodes()?.into_iter().collect();
        let stale_cidrs = maps.read_pod_cidrs()?.into_keys().collect();
        let used: HashSet<u32> = stale_nodes.values().map(|e| e.peer_idx).collect();
        let free = (0..local.max_nodes).filter(|i| !used.contains(i)).collect();
        let config = maps.read_config()?;
        let six = six::Six::read(maps.six.as_ref());
        Ok(Self {
            six,
            // The ruleset and the underlay may have changed while no agent watched them: every
            // flow is judged anew, every next hop looked up anew.
            ruleset_gen: next_gen(config.ruleset_gen),
            underlay_gen: next_gen(config.underlay_gen),
            config,
            maps,
            local,
            settings: None,
            me: None,
            peers: BTreeMap::new(),
            by_addr: HashMap::new(),
            by_start: BTreeMap::new(),
            prefix_counts: BTreeMap::new(),
            free,
            aggregates: BTreeMap::new(),
            native: BTreeMap::new(),
            fabric: Fabric::default(),
            carrier: Encap::Vxlan,
            stale_nodes,
            stale_cidrs,
            retired: HashMap::new(),
        })
    }

    /// Moves to the next ruleset generation: every accepted flow is judged by netfilter again
    /// from its next packet on. Returns the new generation.
    pub fn bump_ruleset_gen(&mut self) -> Result<u32, MapsError> {
        self.ruleset_gen = next_gen(self.ruleset_gen);
        self.write_generations()?;
        Ok(self.ruleset_gen)
    }

    /// Moves to the next underlay generation: every peer's next hop is looked up in the
    /// kernel's FIB again from its next packet on.
    pub fn bump_underlay_gen(&mut self) -> Result<(), MapsError> {
        self.underlay_gen = next_gen(self.underlay_gen);
        self.write_generations()
    }

    /// Writes the generations into the programs' configuration, once there is one.
    fn write_generations(&mut self) -> Result<(), MapsError> {
        if self.config.node_addr == [0; 4] {
            return Ok(());
        }
        let config = NodeConfig {
            ruleset_gen: self.ruleset_gen,
            underlay_gen: self.underlay_gen,
            ..self.config
        };
        self.maps
            .config
            .set(0, config, 0)
            .map_err(map_err(map_names::CONFIG))?;
        self.config = config;
        Ok(())
    }

    /// MTU pods on this node should use: the underlay MTU less the encapsulation overhead.
    pub fn pod_mtu(&self) -> u32 {
        let mut overhead = self.settings.as_ref().map_or(0, |s| s.encap.overhead());
        if self.ipv6_active() {
            overhead = overhead.max(maps_common::VXLAN6_OVERHEAD);
        }
        self.local.iface.mtu.saturating_sub(overhead)
    }

    /// The IPv6 routes the kernel should hold: aggregates toward the encap program (`None`),
    /// crossSubnet's same-subnet peers via the peer.
    pub fn routes6(&self) -> BTreeMap<crate::cluster::Cidr6, Option<std::net::Ipv6Addr>> {
        self.six.routes.clone()
    }

    /// The kernel routes the agent should own now: aggregates toward the encap program, and
    /// same-subnet peers' pod CIDRs sent natively (those win where both name one CIDR).
    pub fn routes(&self) -> BTreeMap<Cidr, RouteSpec> {
        let mut all = self.aggregates.clone();
        all.extend(self.native.iter().map(|(c, r)| (*c, r.clone())));
        all
    }

    /// Peers' names and underlay addresses, and whether they are marked unreachable.
    pub fn peer_addrs(&self) -> Vec<(String, Ipv4Addr, bool)> {
        self.peers
            .values()
            .map(|p| {
                let down = p.entry.flags & node_flags::UNREACHABLE != 0;
                (p.node.name.clone(), p.node.address, down)
            })
            .collect()
    }

    /// The peer halves the health probe checks (tunnelled ones), IPv4 halves first.
    pub fn tunnel_peers(&self) -> Vec<ProbeTarget> {
        self.peers
            .values()
            .filter(|p| p.route.mode == route_mode::IPIP || p.route.mode == route_mode::VXLAN)
            .map(|p| ProbeTarget {
                name: p.node.name.clone(),
                underlay: p.node.address.into(),
                probe: p.node.pod_cidr.addr.into(),
            })
            .chain(self.tunnel_peers6())
            .collect()
    }

    /// This node's probe addresses: its pod CIDRs' first addresses (IPv6 while it carries
    /// IPv6 pods).
    pub fn own_probe_addrs(&self) -> Sources {
        Sources {
            v4: self.own_pod_cidr().map(|c| c.addr),
            v6: self.own_pod_cidr6().map(|c| c.addr),
        }
    }

    /// The cluster's pod networks: the state's cluster CIDRs, else every pod CIDR merged
    /// (what the aggregate routes cover, and this node's own).
    pub fn cluster_networks(&self) -> Vec<Cidr> {
        match &self.settings {
            Some(s) if !s.cluster_cidrs.is_empty() => s.cluster_cidrs.clone(),
            _ => self
                .aggregates
                .keys()
                .copied()
                .chain(self.own_pod_cidr())
                .collect(),
        }
    }

    /// This node, once a state is applied.
    pub fn me(&self) -> Option<&Node> {
        self.me.as_ref()
    }

    /// Every other node of the applied state.
    pub fn peer_nodes(&self) -> impl Iterator<Item = &Node> {
        self.peers.values().map(|p| &p.node)
    }

    /// This node's own pod CIDR, once a state is applied.
    pub fn own_pod_cidr(&self) -> Option<Cidr> {
        self.me.as_ref().map(|m| m.pod_cidr)
    }

    /// The node whose pod CIDR is exactly `c`, if any.
    pub fn owner_of(&self, c: &Cidr) -> Option<String> {
        self.by_start
            .get(&c.range().0)
            .filter(|(o, _)| o == c)
            .map(|(_, name)| name.clone())
    }

    pub fn settings(&self) -> Option<&Settings> {
        self.settings.as_ref()
    }

    pub fn node_count(&self) -> usize {
        self.peers.len() + usize::from(self.me.is_some())
    }

    /// Brings the maps to a whole, validated cluster state, touching only what differs.
    pub fn apply_full(&mut self, cluster: &Cluster) -> Result<Changes, ApplyError> {
        let me = cluster
            .node(&self.local.node)
            .ok_or_else(|| MapsError::OwnNodeMissing(self.local.node.clone()))?
            .clone();
        let settings = cluster.settings.clone();
        let replan = self.settings.as_ref() != Some(&settings)
            || !self.me.as_ref().is_some_and(|m| same_node(m, &me));
        let names: HashSet<&str> = cluster.nodes.iter().map(|n| n.name.as_str()).collect();
        let removes: Vec<String> = self
            .peers
            .keys()
            .filter(|n| !names.contains(n.as_str()) || **n == me.name)
            .cloned()
            .collect();
        let upserts: Vec<Node> = cluster
            .nodes
            .iter()
            .filter(|n| n.name != me.name)
            .filter(|n| {
                replan
                    || !self
                        .peers
                        .get(&n.name)
                        .is_some_and(|p| same_node(&p.node, n))
            })
            .cloned()
            .collect();
        let changes = self.commit(settings, me, upserts, removes, replan)?;
        self.remove_stale()?;
        Ok(changes)
    }

    /// Applies a change of some nodes (`upserts` replace nodes of the same name) after checking
    /// it against the rest: no address or pod CIDR claimed twice, room in the maps. A change
    /// to this node itself, or before any full state, is `NeedsFull`.
    pub fn apply_delta(
        &mut self,
        upserts: Vec<Node>,
        removes: Vec<String>,
    ) -> Result<Changes, ApplyError> {
        let (Some(me), Some(settings)) = (self.me.clone(), self.settings.clone()) else {
            return Err(ApplyError::NeedsFull);
        };
        if upserts.iter().any(|n| n.name == me.name) || removes.contains(&me.name) {
            return Err(ApplyError::NeedsFull);
        }
        self.check_delta(&me, &upserts, &removes)?;
        Ok(self.commit(settings, me, upserts, removes, false)?)
    }

    /// Marks a peer reachable or not (`node_flags::UNREACHABLE`); true when that changed.
    pub fn set_unreachable(&mut self, name: &str, down: bool) -> Result<bool, MapsError> {
        let Some(p) = self.peers.get_mut(name) else {
            return Ok(false);
        };
        let flags = if down {
            p.entry.flags | node_flags::UNREACHABLE
        } else {
            p.entry.flags & !node_flags::UNREACHABLE
        };
        if flags == p.entry.flags {
            return Ok(false);
        }
        p.entry.flags = flags;
        self.maps
            .nodes
            .insert(p.node.address.octets(), p.entry, 0)
            .map_err(map_err(map_names::NODES))?;
        let v6 = p.node.v6;
        self.flags6(v6, flags)?;
        Ok(true)
    }
}

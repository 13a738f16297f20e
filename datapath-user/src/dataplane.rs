//! The agent's model of what the maps and its kernel routes hold, and the changes that bring
//! them to a new cluster state: a full state is diffed in memory, a delta touches only its
//! nodes. Nothing here reads the maps back or lists kernel routes after the start.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
};

use aya::maps::lpm_trie::Key;
use maps_common::{
    MAX_PREFIX_LENS, NodeConfig, NodeEntry, PodKey, PodRoute, ROUTE_NEXTHOP, config_flags,
    map_names, node_flags, route_mode,
};

use crate::{
    cluster::{Cidr, Cluster, Encap, Invalid, Node, Problem, Settings},
    maps::{DatapathMaps, MapsError, map_err},
    net::{Iface, RouteSpec},
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
        Ok(Self {
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
        let overhead = self.settings.as_ref().map_or(0, |s| s.encap.overhead());
        self.local.iface.mtu.saturating_sub(overhead)
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
        Ok(true)
    }

    fn check_delta(&self, me: &Node, upserts: &[Node], removes: &[String]) -> Result<(), Invalid> {
        let touched: HashSet<&str> = upserts
            .iter()
            .map(|n| n.name.as_str())
            .chain(removes.iter().map(String::as_str))
            .collect();
        let mut problems = Vec::new();
        let mut problem = |n: &Node, field: &str, reason: String| {
            problems.push(Problem {
                path: format!("node {:?}.{field}", n.name),
                reason,
            });
        };
        for (i, n) in upserts.iter().enumerate() {
            let earlier = &upserts[..i];
            let other_addr = self
                .by_addr
                .get(&n.address)
                .filter(|o| !touched.contains(o.as_str()))
                .cloned()
                .or_else(|| (me.address == n.address).then(|| me.name.clone()))
                .or_else(|| {
                    earlier
                        .iter()
                        .find(|e| e.address == n.address)
                        .map(|e| e.name.clone())
                });
            if let Some(o) = other_addr {
                let reason = format!("duplicate address {} (also node {o:?})", n.address);
                problem(n, "address", reason);
            }
            let overlap = self
                .overlapping(&n.pod_cidr)
                .into_iter()
                .find(|(_, o)| !touched.contains(o.as_str()) || *o == me.name)
                .or_else(|| {
                    earlier
                        .iter()
                        .find(|e| e.pod_cidr.overlaps(&n.pod_cidr))
                        .map(|e| (e.pod_cidr, e.name.clone()))
                });
            if let Some((c, o)) = overlap {
                let reason = format!("{} overlaps {c} of node {o:?}", n.pod_cidr);
                problem(n, "podCIDR", reason);
            }
        }
        let added = upserts
            .iter()
            .filter(|n| !self.peers.contains_key(&n.name))
            .count();
        let removed = removes
            .iter()
            .filter(|n| self.peers.contains_key(*n))
            .count();
        let total = self.node_count() + added - removed;
        if total > self.local.max_nodes as usize {
            problems.push(Problem {
                path: "nodes".into(),
                reason: format!(
                    "{total} nodes do not fit in maps sized for {} (raise --max-nodes)",
                    self.local.max_nodes
                ),
            });
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Invalid(problems))
        }
    }

    /// Pod CIDRs already applied (peers' and this node's) that overlap `c`.
    fn overlapping(&self, c: &Cidr) -> Vec<(Cidr, String)> {
        let (start, end) = c.range();
        let before = self.by_start.range(..start).next_back();
        before
            .filter(|(_, (o, _))| o.range().1 >= start)
            .into_iter()
            .chain(self.by_start.range(start..=end))
            .map(|(_, (o, name))| (*o, name.clone()))
            .collect()
    }

    fn commit(
        &mut self,
        settings: Settings,
        me: Node,
        upserts: Vec<Node>,
        removes: Vec<String>,
        replan: bool,
    ) -> Result<Changes, MapsError> {
        let mut ch = Changes::default();
        // The pod CIDR set changes when a node goes, or comes or moves its CIDR: only then are
        // the aggregate routes worked out again.
        let cidrs_change = replan
            || removes.iter().any(|n| self.peers.contains_key(n))
            || upserts.iter().any(|n| {
                self.peers
                    .get(&n.name)
                    .is_none_or(|p| p.node.pod_cidr != n.pod_cidr)
            });
        self.settings = Some(settings);
        for name in &removes {
            if let Some(p) = self.peers.remove(name) {
                self.unlink(&p, &mut ch)?;
                ch.nodes_removed += 1;
            }
        }
        for n in &upserts {
            let moved = self
                .peers
                .get(&n.name)
                .is_some_and(|p| p.node.address != n.address || p.node.pod_cidr != n.pod_cidr);
            if moved && let Some(p) = self.peers.remove(&n.name) {
                self.unlink(&p, &mut ch)?;
                // The same node, moved: its counters go on in the same slot.
                self.retired.insert(n.address, p.entry.peer_idx);
            }
        }
        if replan {
            self.set_me(me, &mut ch)?;
        }
        for n in upserts {
            self.link(n, &mut ch)?;
        }
        let config = self.node_config();
        if config != self.config {
            self.maps
                .config
                .set(0, config, 0)
                .map_err(map_err(map_names::CONFIG))?;
            self.config = config;
            ch.config = true;
        }
        if cidrs_change {
            self.aggregates = self.aggregate_routes();
        }
        Ok(ch)
    }

    /// Writes this node's own (local) pod CIDR entry, replacing the one it had.
    fn set_me(&mut self, me: Node, ch: &mut Changes) -> Result<(), MapsError> {
        if let Some(old) = self.me.take() {
            self.by_addr.remove(&old.address);
            if old.pod_cidr != me.pod_cidr {
                self.unindex(&old.pod_cidr);
                self.remove_cidr(&old.pod_cidr, ch)?;
            }
        }
        let route = PodRoute {
            node_addr: me.address.octets(),
            vtep_mac: me.vtep_mac,
            mode: route_mode::LOCAL,
            _pad: 0,
            peer_idx: 0,
        };
        self.write_cidr(&me.pod_cidr, &route, ch)?;
        self.index(me.pod_cidr, &me.name);
        self.by_addr.insert(me.address, me.name.clone());
        self.me = Some(me);
        Ok(())
    }

    /// Writes one peer: its DP_NODES entry first, then its pod CIDR, so no packet finds a
    /// CIDR whose node is not known yet.
    fn link(&mut self, n: Node, ch: &mut Changes) -> Result<(), MapsError> {
        let old = self.peers.remove(&n.name);
        let (peer_idx, flags) = match &old {
            Some(p) => (p.entry.peer_idx, p.entry.flags),
            None => (self.claim_slot(n.address)?, 0),
        };
        let mode = self.mode_for(&n);
        let entry = NodeEntry {
            peer_idx,
            pod_cidr: n.pod_cidr.addr.octets(),
            pod_prefix_len: n.pod_cidr.len,
            mode,
            flags,
            _pad: 0,
        };
        let route = PodRoute {
            node_addr: n.address.octets(),
            vtep_mac: n.vtep_mac,
            mode,
            _pad: 0,
            peer_idx,
        };
        if old.as_ref().map(|p| p.entry) != Some(entry) {
            self.maps
                .nodes
                .insert(n.address.octets(), entry, 0)
                .map_err(map_err(map_names::NODES))?;
            ch.nodes_upserted += 1;
        }
        if old.as_ref().map(|p| p.route) != Some(route) {
            self.write_cidr(&n.pod_cidr, &route, ch)?;
        }
        if mode == route_mode::NATIVE {
            let spec = RouteSpec {
                cidr: n.pod_cidr,
                via: n.address,
                ifindex: self.local.iface.ifindex,
                mtu: None,
            };
            self.native.insert(n.pod_cidr, spec);
        } else {
            self.native.remove(&n.pod_cidr);
        }
        self.by_addr.insert(n.address, n.name.clone());
        self.index(n.pod_cidr, &n.name);
        self.peers.insert(
            n.name.clone(),
            Peer {
                node: n,
                entry,
                route,
            },
        );
        Ok(())
    }

    /// Records `c` as `owner`'s pod CIDR in the by-start index and the prefix-length counts.
    fn index(&mut self, c: Cidr, owner: &str) {
        if let Some((old, _)) = self.by_start.insert(c.range().0, (c, owner.to_string())) {
            self.uncount(old.len);
        }
        *self.prefix_counts.entry(c.len).or_default() += 1;
    }

    /// Forgets the pod CIDR starting where `c` starts.
    fn unindex(&mut self, c: &Cidr) {
        if let Some((old, _)) = self.by_start.remove(&c.range().0) {
            self.uncount(old.len);
        }
    }

    fn uncount(&mut self, len: u8) {
        if let Some(n) = self.prefix_counts.get_mut(&len) {
            *n -= 1;
            if *n == 0 {
                self.prefix_counts.remove(&len);
            }
        }
    }

    /// Removes one peer: its pod CIDR first, then its DP_NODES entry; frees its slot.
    fn unlink(&mut self, p: &Peer, ch: &mut Changes) -> Result<(), MapsError> {
        self.remove_cidr(&p.node.pod_cidr, ch)?;
        self.unindex(&p.node.pod_cidr);
        self.native.remove(&p.node.pod_cidr);
        match self.maps.nodes.remove(&p.node.address.octets()) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(map_names::NODES)(e)),
        }
        self.by_addr.remove(&p.node.address);
        self.retire(p.node.address, p.entry.peer_idx);
        Ok(())
    }

    /// Frees a peer's counter slot but remembers it, counts and all, for the address.
    fn retire(&mut self, addr: Ipv4Addr, slot: u32) {
        self.free.insert(slot);
        self.retired.insert(addr, slot);
    }

    /// A counter slot for a new peer, counts kept: the one an earlier agent gave this address,
    /// or the one it had before it left. Else the lowest free slot no departed peer holds (or,
    /// when every free slot does, the lowest), zeroed.
    fn claim_slot(&mut self, addr: Ipv4Addr) -> Result<u32, MapsError> {
        let known = self.stale_nodes.remove(&addr).map(|e| e.peer_idx);
        for slot in known.into_iter().chain(self.retired.remove(&addr)) {
            if self.free.remove(&slot) {
                return Ok(slot);
            }
        }
        let held: HashSet<u32> = self.retired.values().copied().collect();
        let slot = self
            .free
            .iter()
            .copied()
            .find(|s| !held.contains(s))
            .or_else(|| self.free.first().copied())
            .ok_or(MapsError::NoPeerSlot)?;
        self.free.remove(&slot);
        self.retired.retain(|_, s| *s != slot);
        self.maps.reset_peer(slot)?;
        Ok(slot)
    }

    fn mode_for(&self, n: &Node) -> u8 {
        let s = self.settings.as_ref().expect("settings set before nodes");
        let encap = match s.encap {
            Encap::Ipip => route_mode::IPIP,
            Encap::Vxlan => route_mode::VXLAN,
        };
        let same_subnet = self.my_subnet().is_some_and(|c| c.contains(n.address));
        if s.cross_subnet && same_subnet {
            route_mode::NATIVE
        } else {
            encap
        }
    }

    fn my_subnet(&self) -> Option<Cidr> {
        let me = self.me.as_ref()?;
        let len = me.prefix_len.or(self.local.iface.prefix_len).unwrap_or(32);
        Some(Cidr {
            addr: Ipv4Addr::from(u32::from(me.address) & Cidr::mask(len)),
            len,
        })
    }

    fn write_cidr(&mut self, c: &Cidr, r: &PodRoute, ch: &mut Changes) -> Result<(), MapsError> {
        self.maps
            .pod_routes
            .insert(pod_key(c), r, 0)
            .map_err(map_err(map_names::POD_ROUTES))?;
        self.maps
            .pod_cidrs
            .insert(&Key::new(c.len as u32, c.addr.octets()), r, 0)
            .map_err(map_err(map_names::POD_CIDRS))?;
        self.stale_cidrs.remove(c);
        ch.cidrs_upserted += 1;
        Ok(())
    }

    fn remove_cidr(&mut self, c: &Cidr, ch: &mut Changes) -> Result<(), MapsError> {
        let gone = |r: Result<(), aya::maps::MapError>, name| match r {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(map_err(name)(e)),
        };
        gone(
            self.maps.pod_routes.remove(&pod_key(c)),
            map_names::POD_ROUTES,
        )?;
        let key = Key::new(c.len as u32, c.addr.octets());
        if gone(self.maps.pod_cidrs.remove(&key), map_names::POD_CIDRS)? {
            ch.cidrs_removed += 1;
        }
        Ok(())
    }

    /// Removes what an earlier agent left in the maps that the first state does not hold.
    fn remove_stale(&mut self) -> Result<(), MapsError> {
        let mut ch = Changes::default();
        for c in std::mem::take(&mut self.stale_cidrs) {
            if self.by_start.get(&c.range().0).is_none_or(|(o, _)| *o != c) {
                self.remove_cidr(&c, &mut ch)?;
            }
        }
        for (addr, e) in std::mem::take(&mut self.stale_nodes) {
            if !self.by_addr.contains_key(&addr) {
                match self.maps.nodes.remove(&addr.octets()) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(err) => return Err(map_err(map_names::NODES)(err)),
                }
                self.retire(addr, e.peer_idx);
            }
        }
        Ok(())
    }

    fn node_config(&self) -> NodeConfig {
        let (Some(me), Some(s)) = (&self.me, &self.settings) else {
            return self.config;
        };
        let mut flags = 0;
        if self.local.inner_src_check {
            flags |= config_flags::INNER_SRC_CHECK;
        }
        if s.udp_checksum {
            flags |= config_flags::UDP_CSUM;
        }
        match self.local.host_routing {
            HostRouting::AcceptedFlows => {
                flags |= config_flags::HOST_ROUTING_BPF | config_flags::ACCEPTED_FLOWS;
            }
            HostRouting::Bpf => flags |= config_flags::HOST_ROUTING_BPF,
            HostRouting::Kernel => {}
        }
        let lens = &self.prefix_counts;
        let mut prefix_lens = [0u8; MAX_PREFIX_LENS];
        if lens.len() > MAX_PREFIX_LENS {
            flags |= config_flags::LPM_LOOKUP;
        }
        for (slot, len) in prefix_lens.iter_mut().zip(lens.keys().rev()) {
            *slot = *len;
        }
        NodeConfig {
            node_addr: me.address.octets(),
            vni: s.vni,
            vtep_mac: me.vtep_mac,
            vxlan_port: s.port,
            flags,
            underlay_mtu: self.local.iface.mtu,
            csum_ifindex: self.local.csum_ifindex,
            pod_cidr: me.pod_cidr.addr.octets(),
            prefix_lens,
            pod_prefix_len: me.pod_cidr.len,
            _pad: [0; 3],
            underlay_ifindex: self.local.iface.ifindex,
            ruleset_gen: self.ruleset_gen,
            underlay_gen: self.underlay_gen,
        }
    }

    /// The few routes that hand remote pod traffic to the encap program: the cluster CIDRs and
    /// every pod CIDR, merged, but never exactly this node's own pod CIDR (its pods' own routes
    /// and the CNI's bridge route live there).
    fn aggregate_routes(&self) -> BTreeMap<Cidr, RouteSpec> {
        let own = self.me.as_ref().map(|m| m.pod_cidr);
        let mut cidrs: Vec<Cidr> = self.by_start.values().map(|(c, _)| *c).collect();
        if let Some(s) = &self.settings {
            cidrs.extend(s.cluster_cidrs.iter().copied());
        }
        let mtu = self.pod_mtu();
        aggregate(cidrs)
            .into_iter()
            .filter(|c| Some(*c) != own)
            .map(|cidr| {
                let spec = RouteSpec {
                    cidr,
                    via: Ipv4Addr::from(ROUTE_NEXTHOP),
                    ifindex: self.local.iface.ifindex,
                    mtu: Some(mtu),
                };
                (cidr, spec)
            })
            .collect()
    }
}

fn pod_key(c: &Cidr) -> PodKey {
    PodKey {
        prefix_len: c.len as u32,
        addr: c.addr.octets(),
    }
}

/// Two nodes the same but for their position in a file.
fn same_node(a: &Node, b: &Node) -> bool {
    (
        a.name.as_str(),
        a.address,
        a.prefix_len,
        a.pod_cidr,
        a.vtep_mac,
    ) == (
        b.name.as_str(),
        b.address,
        b.prefix_len,
        b.pod_cidr,
        b.vtep_mac,
    )
}

/// The fewest CIDRs that cover exactly the union of `cidrs`: contained ones dropped, sibling
/// halves merged into their parent.
pub fn aggregate(mut cidrs: Vec<Cidr>) -> Vec<Cidr> {
    cidrs.sort_by_key(|c| (u32::from(c.addr), c.len));
    let mut out: Vec<Cidr> = Vec::new();
    for c in cidrs {
        if out
            .last()
            .is_some_and(|l| l.len <= c.len && l.contains(c.addr))
        {
            continue;
        }
        out.push(c);
        while let [.., a, b] = out[..] {
            if a.len != b.len || a.len == 0 || parent(a) != parent(b) {
                break;
            }
            out.truncate(out.len() - 2);
            out.push(parent(a));
        }
    }
    out
}

fn parent(c: Cidr) -> Cidr {
    let len = c.len - 1;
    Cidr {
        addr: Ipv4Addr::from(u32::from(c.addr) & Cidr::mask(len)),
        len,
    }
}

/// The generation after `g`; never 0, which means "none" to the programs.
fn next_gen(g: u32) -> u32 {
    g.wrapping_add(1).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(s: &[&str]) -> Vec<Cidr> {
        s.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn aggregation_merges_siblings_and_drops_contained() {
        let got = aggregate(cidrs(&[
            "10.244.1.0/24",
            "10.244.0.0/24",
            "10.244.3.0/24",
            "10.244.2.0/24",
            "10.244.2.128/25",
            "10.245.0.0/24",
        ]));
        assert_eq!(got, cidrs(&["10.244.0.0/22", "10.245.0.0/24"]));
        let many: Vec<Cidr> = (0..10_000u32)
            .map(|k| Cidr {
                addr: Ipv4Addr::new(10, (k / 256) as u8, (k % 256) as u8, 0),
                len: 24,
            })
            .collect();
        assert!(aggregate(many).len() <= 8);
        assert_eq!(
            aggregate(cidrs(&["10.244.0.0/16", "10.244.7.0/24"])),
            cidrs(&["10.244.0.0/16"])
        );
    }
}

//! How the dataplane writes a state into the maps: this node and its peers (counter slots
//! kept across a peer's absence), their pod CIDRs, the node configuration the programs
//! read, and the kernel routes that follow from them.
use std::{
    collections::{BTreeMap, HashSet},
    net::Ipv4Addr,
};

use aya::maps::lpm_trie::Key;
use maps_common::{
    MAX_PREFIX_LENS, NodeConfig, NodeEntry, PodKey, PodRoute, ROUTE_NEXTHOP, config_flags,
    map_names, route_mode,
};

use super::{Changes, Dataplane, HostRouting, Peer};
use crate::{
    cluster::{Cidr, Encap, Node, Settings, aggregate},
    kernel::maps::{MapsError, map_err},
    underlay::netlink::RouteSpec,
};

impl Dataplane {
    pub(super) fn commit(
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
        if settings.encap != Encap::None {
            self.carrier = settings.encap;
        }
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
        self.sync6()?;
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
        // A peer in another subnet (`encapsulation: none`) is no next hop of this node's: the
        // aggregate route brings its packets to the programs, which send them toward it.
        if mode == route_mode::NATIVE && self.same_subnet(n.address) {
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

    /// How this node reaches peer `n`: natively when crossSubnet finds it in this subnet, or
    /// under `encapsulation: none` when it is in this subnet or the fabric can route its pod
    /// CIDR (no `bgp` block: the fabric is trusted to); else encapsulated.
    pub(super) fn mode_for(&self, n: &Node) -> u8 {
        let s = self.settings.as_ref().expect("settings set before nodes");
        let same_subnet = self.same_subnet(n.address);
        let native = match s.encap {
            Encap::None => same_subnet || s.bgp.is_none() || self.fabric.v4.contains(&n.pod_cidr),
            _ => s.cross_subnet && same_subnet,
        };
        let encap = if s.encap == Encap::None {
            self.carrier
        } else {
            s.encap
        };
        match encap {
            _ if native => route_mode::NATIVE,
            Encap::Ipip => route_mode::IPIP,
            _ => route_mode::VXLAN,
        }
    }

    fn same_subnet(&self, addr: Ipv4Addr) -> bool {
        self.my_subnet().is_some_and(|c| c.contains(addr))
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
    pub(super) fn remove_stale(&mut self) -> Result<(), MapsError> {
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

pub(super) fn pod_key(c: &Cidr) -> PodKey {
    PodKey {
        prefix_len: c.len as u32,
        addr: c.addr.octets(),
    }
}

/// Two nodes the same but for their position in a file.
pub(super) fn same_node(a: &Node, b: &Node) -> bool {
    (
        a.name.as_str(),
        a.address,
        a.prefix_len,
        a.pod_cidr,
        a.vtep_mac,
        a.v6,
    ) == (
        b.name.as_str(),
        b.address,
        b.prefix_len,
        b.pod_cidr,
        b.vtep_mac,
        b.v6,
    )
}

/// The generation after `g`; never 0, which means "none" to the programs.
pub(super) fn next_gen(g: u32) -> u32 {
    // Below `NEXTHOP_IPV6`, the bit the programs tag an IPv6 next hop with.
    (g.wrapping_add(1) & !maps_common::NEXTHOP_IPV6).max(1)
}

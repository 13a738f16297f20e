//! The IPv6 half of the dataplane: this node's IPv6 configuration, the peers' IPv6 underlay
//! addresses and pod CIDRs in the IPv6 maps (each peer in its IPv4 half's counter slot), and
//! the aggregate IPv6 routes toward the encap program. Worked out whole after every change:
//! only differences reach the maps.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv6Addr,
};

use aya::maps::lpm_trie::Key;
use maps_common::{NodeConfig6, NodeEntry6, PodRoute6, map_names, node_flags, route_mode};

use super::Dataplane;
use crate::{
    cluster::{Cidr6, Encap, NodeV6, six::aggregate6},
    kernel::maps::{Maps6, MapsError, map_err},
};

/// What the IPv6 maps hold, as the agent wrote them (or found them at its start).
#[derive(Default)]
pub struct Six {
    config: NodeConfig6,
    nodes: BTreeMap<[u8; 16], NodeEntry6>,
    cidrs: BTreeMap<Cidr6, PodRoute6>,
    /// The IPv6 routes the kernel should hold: aggregates toward the encap program (`None`),
    /// and crossSubnet's same-subnet peers' pod CIDRs via the peer (`Some`).
    pub routes: BTreeMap<Cidr6, Option<Ipv6Addr>>,
    /// Peers' IPv6 addresses this node has no IPv6 route toward (`agent::underlay`).
    unreachable: BTreeSet<Ipv6Addr>,
}

impl Six {
    /// Remembers what an earlier agent left in the maps, so that it is removed if the first
    /// state does not want it.
    pub fn read(maps: Option<&Maps6>) -> Self {
        let Some(m) = maps else {
            return Self::default();
        };
        let nodes = m.nodes.iter().flatten().collect();
        let cidrs = m
            .pod_cidrs
            .iter()
            .flatten()
            .map(|(k, v)| {
                let c = Cidr6 {
                    addr: k.data().into(),
                    len: k.prefix_len() as u8,
                };
                (c, v)
            })
            .collect();
        Self {
            config: m.config.get(&0, 0).unwrap_or_default(),
            nodes,
            cidrs,
            ..Self::default()
        }
    }
}

/// What the IPv6 maps should hold for a state.
struct Want6 {
    config: NodeConfig6,
    nodes: BTreeMap<[u8; 16], NodeEntry6>,
    cidrs: BTreeMap<Cidr6, PodRoute6>,
    /// Same-subnet peers reached natively (crossSubnet): pod CIDR -> the peer's address.
    native: BTreeMap<Cidr6, Ipv6Addr>,
}

impl Dataplane {
    /// Whether this node carries IPv6 pods: VXLAN or native routing (whose IPv6 halves the
    /// fabric cannot route yet go in VXLAN), an IPv6 half of its own, and the metadata VXLAN
    /// device that sends IPv6 frames.
    pub fn ipv6_active(&self) -> bool {
        self.settings
            .as_ref()
            .is_some_and(|s| s.encap == Encap::Vxlan || s.encap == Encap::None)
            && self.me.as_ref().is_some_and(|m| m.v6.is_some())
            && self.local.csum_ifindex != 0
            && self.maps.six.is_some()
    }

    /// This node's IPv6 pod CIDR, when it carries IPv6 pods.
    pub fn own_pod_cidr6(&self) -> Option<Cidr6> {
        self.ipv6_active()
            .then(|| self.me.as_ref()?.v6.map(|h| h.pod_cidr))
            .flatten()
    }

    /// The cluster's IPv6 pod networks, as the aggregate routes cover them (none while this
    /// node carries no IPv6 pods).
    pub fn cluster_networks6(&self) -> Vec<Cidr6> {
        let aggregates = self.six.routes.iter().filter(|(_, via)| via.is_none());
        aggregates.map(|(c, _)| *c).collect()
    }

    /// Peer nodes whose IPv6 half is in the maps (for the metrics).
    pub fn ipv6_nodes_known(&self) -> usize {
        self.six.nodes.len()
    }

    /// The IPv6 maps' content for the applied state.
    fn want6(&self) -> Want6 {
        let mut w = Want6 {
            config: NodeConfig6::default(),
            nodes: BTreeMap::new(),
            cidrs: BTreeMap::new(),
            native: BTreeMap::new(),
        };
        let Some(me) = self
            .me
            .as_ref()
            .and_then(|m| m.v6)
            .filter(|_| self.ipv6_active())
        else {
            return w;
        };
        w.config = NodeConfig6 {
            node_addr: me.address.octets(),
            pod_cidr: me.pod_cidr.addr.octets(),
            vtep_mac: me.vtep_mac,
            pod_prefix_len: me.pod_cidr.len,
            _pad: 0,
            vxlan_ifindex: self.local.csum_ifindex,
        };
        let local = PodRoute6 {
            node_addr: me.address.octets(),
            vtep_mac: me.vtep_mac,
            mode: route_mode::LOCAL,
            ..PodRoute6::default()
        };
        w.cidrs.insert(me.pod_cidr, local);
        let subnet = Cidr6::of(me.address, me.prefix_len.unwrap_or(64));
        for p in self.peers.values() {
            let Some(h) = p.node.v6 else { continue };
            w.nodes.insert(
                h.address.octets(),
                NodeEntry6 {
                    peer_idx: p.entry.peer_idx,
                    pod_cidr: h.pod_cidr.addr.octets(),
                    pod_prefix_len: h.pod_cidr.len,
                    flags: self.flags_of6(h.address, p.entry.flags),
                    _pad: [0; 2],
                },
            );
            let same_subnet = subnet.contains(h.address);
            let native = self.native6(h.pod_cidr, same_subnet);
            if native && same_subnet {
                w.native.insert(h.pod_cidr, h.address);
            }
            let route = PodRoute6 {
                node_addr: h.address.octets(),
                vtep_mac: h.vtep_mac,
                mode: if native {
                    route_mode::NATIVE
                } else {
                    route_mode::VXLAN
                },
                flags: self.flags_of6(h.address, 0) & node_flags::UNREACHABLE,
                peer_idx: p.entry.peer_idx,
            };
            w.cidrs.insert(h.pod_cidr, route);
        }
        w
    }

    /// Whether a peer's IPv6 half is reached natively, as `mode_for` decides for IPv4:
    /// crossSubnet's same-subnet peers; under `encapsulation: none`, a peer in this subnet, or
    /// one whose IPv6 pod CIDR the fabric routes (any, without a `bgp` block). A native peer
    /// in another subnet is sent through the aggregate route, its next hop the FIB's toward it.
    fn native6(&self, pod_cidr: Cidr6, same_subnet: bool) -> bool {
        let Some(s) = self.settings.as_ref() else {
            return false;
        };
        match s.encap {
            Encap::None => same_subnet || s.bgp.is_none() || self.fabric.v6.contains(&pod_cidr),
            _ => s.cross_subnet && same_subnet,
        }
    }

    /// A peer's IPv4 `node_flags` with `UNREACHABLE` as its IPv6 half's own verdict.
    fn flags_of6(&self, addr: Ipv6Addr, v4_flags: u8) -> u8 {
        let down = self.six.unreachable.contains(&addr);
        (v4_flags & !node_flags::UNREACHABLE) | if down { node_flags::UNREACHABLE } else { 0 }
    }

    /// The peers' IPv6 halves reached through the tunnel, for the health probe.
    pub(super) fn tunnel_peers6(&self) -> Vec<super::ProbeTarget> {
        let tunnelled = |c: &Cidr6| {
            self.six
                .cidrs
                .get(c)
                .is_some_and(|r| r.mode == route_mode::VXLAN)
        };
        (self.peers.values())
            .filter_map(|p| p.node.v6.map(|h| (&p.node.name, h)))
            .filter(|(_, h)| tunnelled(&h.pod_cidr))
            .map(|(name, h)| super::ProbeTarget {
                name: name.clone(),
                underlay: h.address.into(),
                probe: h.pod_cidr.addr.into(),
            })
            .collect()
    }

    /// Peers with an IPv6 half: name, IPv6 address, whether it is marked unreachable.
    pub fn peer_addrs6(&self) -> Vec<(String, Ipv6Addr, bool)> {
        (self.peers.values())
            .filter_map(|p| p.node.v6.map(|h| (p.node.name.clone(), h.address)))
            .map(|(n, a)| (n, a, self.six.unreachable.contains(&a)))
            .collect()
    }

    /// Marks a peer's IPv6 half reachable or not (no IPv6 route toward its address); true when
    /// that changed. Its pod CIDR's entry carries the flag the programs drop by.
    pub fn set_unreachable6(&mut self, addr: Ipv6Addr, down: bool) -> Result<bool, MapsError> {
        let changed = if down {
            self.six.unreachable.insert(addr)
        } else {
            self.six.unreachable.remove(&addr)
        };
        if changed {
            self.sync6()?;
        }
        Ok(changed)
    }

    /// Gives a peer's IPv6 entry its IPv4 half's `node_flags` but `UNREACHABLE`, which is the
    /// IPv6 half's own (`status` shows them), without working the whole state out again.
    pub(super) fn flags6(&mut self, v6: Option<NodeV6>, flags: u8) -> Result<(), MapsError> {
        let Some(h) = v6 else {
            return Ok(());
        };
        let flags = self.flags_of6(h.address, flags);
        let Some(m) = self.maps.six.as_mut() else {
            return Ok(());
        };
        let key = h.address.octets();
        let Some(e) = self.six.nodes.get_mut(&key).filter(|e| e.flags != flags) else {
            return Ok(());
        };
        e.flags = flags;
        m.nodes
            .insert(key, *e, 0)
            .map_err(map_err(map_names::NODES6))
    }

    /// Brings the IPv6 maps and routes to the applied state: nodes before the pod CIDRs that
    /// name them, removals after. Returns how many IPv6 pod CIDR entries changed. Nothing to
    /// do in pins without IPv6 maps.
    pub(super) fn sync6(&mut self) -> Result<usize, MapsError> {
        let want = self.want6();
        let Some(m) = self.maps.six.as_mut() else {
            return Ok(0);
        };
        let mut changed = 0;
        let have = &mut self.six;
        for (k, v) in &want.nodes {
            if have.nodes.get(k) != Some(v) {
                m.nodes
                    .insert(k, v, 0)
                    .map_err(map_err(map_names::NODES6))?;
            }
        }
        for (c, r) in &want.cidrs {
            if have.cidrs.get(c) != Some(r) {
                changed += 1;
                let key = Key::new(c.len as u32, c.addr.octets());
                m.pod_cidrs
                    .insert(&key, r, 0)
                    .map_err(map_err(map_names::POD_CIDRS6))?;
            }
        }
        if have.config != want.config {
            m.config
                .set(0, want.config, 0)
                .map_err(map_err(map_names::CONFIG6))?;
        }
        for c in have.cidrs.keys().filter(|c| !want.cidrs.contains_key(c)) {
            changed += 1;
            let _ = m.pod_cidrs.remove(&Key::new(c.len as u32, c.addr.octets()));
        }
        for k in have.nodes.keys().filter(|k| !want.nodes.contains_key(*k)) {
            let _ = m.nodes.remove(k);
        }
        let settings = self.settings.as_ref();
        let aggregates: Vec<Cidr6> = match settings.map(|s| &s.cluster_cidrs6) {
            _ if want.cidrs.is_empty() => Vec::new(),
            Some(c) if !c.is_empty() => c.clone(),
            _ => aggregate6(&want.cidrs.keys().copied().collect::<Vec<_>>()),
        };
        have.routes = aggregates.into_iter().map(|c| (c, None)).collect();
        have.routes
            .extend(want.native.iter().map(|(c, via)| (*c, Some(*via))));
        (have.config, have.nodes, have.cidrs) = (want.config, want.nodes, want.cidrs);
        Ok(changed)
    }
}

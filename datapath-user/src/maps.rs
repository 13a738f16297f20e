//! The datapath's maps from userspace: typed handles, the state a cluster asks for, and the
//! diff that brings the maps (and the agent's kernel routes) to it.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::Path,
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues, lpm_trie::Key,
    },
};
use maps_common::{
    Counter, NodeConfig, NodeEntry, PeerStats, PodRoute, config_flags, map_names, route_mode,
};

use crate::{
    cluster::{Cidr, Cluster, Encap},
    net::{self, Iface, PodRouteSpec},
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {0} is missing from the object or the pin directory")]
    Missing(&'static str),
    #[error("node {0:?} is not in the cluster state")]
    OwnNodeMissing(String),
    #[error("no free peer slot: raise --max-nodes")]
    NoPeerSlot,
    #[error(transparent)]
    Net(#[from] net::NetError),
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> MapsError {
    move |source| MapsError::Map { name, source }
}

/// Typed handles to every map of the datapath.
pub struct DatapathMaps {
    pub config: Array<MapData, NodeConfig>,
    pub pod_cidrs: LpmTrie<MapData, [u8; 4], PodRoute>,
    pub nodes: HashMap<MapData, [u8; 4], NodeEntry>,
    pub counters: PerCpuArray<MapData, Counter>,
    pub drops: PerCpuArray<MapData, Counter>,
    pub peer_stats: PerCpuArray<MapData, PeerStats>,
}

impl DatapathMaps {
    /// Takes the maps out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Self::from_maps(|name| ebpf.take_map(name).ok_or(MapsError::Missing(name)))
    }

    /// Opens the maps pinned under `pin_dir` (see `loader::map_pin_path`), whether or not an
    /// agent runs.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, MapsError> {
        Self::from_maps(|name| {
            let md = MapData::from_pin(crate::loader::map_pin_path(pin_dir, name))
                .map_err(|_| MapsError::Missing(name))?;
            Map::from_map_data(md).map_err(map_err(name))
        })
    }

    fn from_maps(
        mut get: impl FnMut(&'static str) -> Result<Map, MapsError>,
    ) -> Result<Self, MapsError> {
        fn typed<T: TryFrom<Map, Error = MapError>>(
            get: &mut impl FnMut(&'static str) -> Result<Map, MapsError>,
            name: &'static str,
        ) -> Result<T, MapsError> {
            get(name)?.try_into().map_err(map_err(name))
        }
        Ok(Self {
            config: typed(&mut get, map_names::CONFIG)?,
            pod_cidrs: typed(&mut get, map_names::POD_CIDRS)?,
            nodes: typed(&mut get, map_names::NODES)?,
            counters: typed(&mut get, map_names::COUNTERS)?,
            drops: typed(&mut get, map_names::DROPS)?,
            peer_stats: typed(&mut get, map_names::PEER_STATS)?,
        })
    }

    /// What `DP_POD_CIDRS` holds now.
    pub fn read_pod_cidrs(&self) -> Result<BTreeMap<Cidr, PodRoute>, MapsError> {
        let mut out = BTreeMap::new();
        for item in self.pod_cidrs.iter() {
            let (k, v) = item.map_err(map_err(map_names::POD_CIDRS))?;
            out.insert(
                Cidr {
                    addr: Ipv4Addr::from(k.data()),
                    len: k.prefix_len() as u8,
                },
                v,
            );
        }
        Ok(out)
    }

    /// What `DP_NODES` holds now.
    pub fn read_nodes(&self) -> Result<BTreeMap<Ipv4Addr, NodeEntry>, MapsError> {
        let mut out = BTreeMap::new();
        for item in self.nodes.iter() {
            let (k, v) = item.map_err(map_err(map_names::NODES))?;
            out.insert(Ipv4Addr::from(k), v);
        }
        Ok(out)
    }

    pub fn read_config(&self) -> Result<NodeConfig, MapsError> {
        self.config.get(&0, 0).map_err(map_err(map_names::CONFIG))
    }

    /// Sum over CPUs of each slot of a per-CPU counter map.
    pub fn sum_counters(map: &PerCpuArray<MapData, Counter>) -> Vec<Counter> {
        map.iter()
            .map(|v| {
                v.map(|per_cpu| {
                    per_cpu.iter().fold(Counter::default(), |a, c| Counter {
                        packets: a.packets + c.packets,
                        bytes: a.bytes + c.bytes,
                    })
                })
                .unwrap_or_default()
            })
            .collect()
    }

    /// Sum over CPUs of one peer's traffic.
    pub fn peer_stats(&self, idx: u32) -> PeerStats {
        self.peer_stats
            .get(&idx, 0)
            .map(|v| {
                v.iter().fold(PeerStats::default(), |a, p| PeerStats {
                    tx_packets: a.tx_packets + p.tx_packets,
                    tx_bytes: a.tx_bytes + p.tx_bytes,
                    rx_packets: a.rx_packets + p.rx_packets,
                    rx_bytes: a.rx_bytes + p.rx_bytes,
                })
            })
            .unwrap_or_default()
    }

    /// Plans the state `cluster` asks for on this node and brings the maps to it; returns the
    /// plan (whose routes the caller applies) and what changed.
    pub fn sync(
        &mut self,
        cluster: &Cluster,
        local: &LocalOptions,
    ) -> Result<(Desired, Changes), MapsError> {
        let have_nodes = self.read_nodes()?;
        let want = plan(cluster, local, &have_nodes)?;
        let changes = self.apply(&want, &have_nodes)?;
        Ok((want, changes))
    }

    /// Brings the maps to `want`, touching only what differs from what they hold (`have_nodes`
    /// is `DP_NODES` as read for the plan). Node entries are added before the pod CIDRs that use
    /// them and removed after, so no packet sees a half-written peer.
    fn apply(
        &mut self,
        want: &Desired,
        have_nodes: &BTreeMap<Ipv4Addr, NodeEntry>,
    ) -> Result<Changes, MapsError> {
        let mut changes = Changes::default();
        if self.read_config()? != want.config {
            self.config
                .set(0, want.config, 0)
                .map_err(map_err(map_names::CONFIG))?;
            changes.config = true;
        }
        for (addr, entry) in &want.nodes {
            if have_nodes.get(addr) != Some(entry) {
                if !have_nodes.contains_key(addr) {
                    // A reused slot starts from zero.
                    self.reset_peer(entry.peer_idx)?;
                }
                self.nodes
                    .insert(addr.octets(), entry, 0)
                    .map_err(map_err(map_names::NODES))?;
                changes.nodes_upserted += 1;
            }
        }
        let have_cidrs = self.read_pod_cidrs()?;
        for (cidr, route) in &want.pod_cidrs {
            if have_cidrs.get(cidr) != Some(route) {
                self.pod_cidrs
                    .insert(&Key::new(cidr.len as u32, cidr.addr.octets()), route, 0)
                    .map_err(map_err(map_names::POD_CIDRS))?;
                changes.cidrs_upserted += 1;
            }
        }
        for cidr in have_cidrs
            .keys()
            .filter(|c| !want.pod_cidrs.contains_key(c))
        {
            self.pod_cidrs
                .remove(&Key::new(cidr.len as u32, cidr.addr.octets()))
                .map_err(map_err(map_names::POD_CIDRS))?;
            changes.cidrs_removed += 1;
        }
        for addr in have_nodes.keys().filter(|a| !want.nodes.contains_key(a)) {
            self.nodes
                .remove(&addr.octets())
                .map_err(map_err(map_names::NODES))?;
            changes.nodes_removed += 1;
        }
        Ok(changes)
    }

    fn reset_peer(&mut self, idx: u32) -> Result<(), MapsError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| MapsError::Map {
            name: map_names::PEER_STATS,
            source: MapError::IoError(e),
        })?;
        let zeros = PerCpuValues::try_from(vec![PeerStats::default(); cpus]).map_err(|e| {
            MapsError::Map {
                name: map_names::PEER_STATS,
                source: MapError::IoError(e),
            }
        })?;
        self.peer_stats
            .set(idx, zeros, 0)
            .map_err(map_err(map_names::PEER_STATS))
    }
}

/// What one `apply` changed.
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

/// Settings of this node that are not in the cluster state.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    pub node: String,
    pub iface: Iface,
    pub inner_src_check: bool,
    pub max_nodes: u32,
    /// Ifindex of the checksum path's kernel VXLAN device (`net::CSUM_DEV`), 0 when absent.
    pub csum_ifindex: u32,
}

/// The maps' and routes' contents that a cluster state asks for on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub config: NodeConfig,
    pub pod_cidrs: BTreeMap<Cidr, PodRoute>,
    pub nodes: BTreeMap<Ipv4Addr, NodeEntry>,
    pub routes: Vec<PodRouteSpec>,
    /// MTU pods on this node should use: the underlay MTU less the encapsulation overhead.
    pub pod_mtu: u32,
}

/// Computes the desired state. Peer slots already in use (`have_nodes`) are kept, new peers take
/// the lowest free slot. Same-subnet peers are native under crossSubnet; the next hop toward a
/// peer behind a router comes from the kernel's routing table.
pub fn plan(
    cluster: &Cluster,
    local: &LocalOptions,
    have_nodes: &BTreeMap<Ipv4Addr, NodeEntry>,
) -> Result<Desired, MapsError> {
    let me = cluster
        .node(&local.node)
        .ok_or_else(|| MapsError::OwnNodeMissing(local.node.clone()))?;
    let prefix = me.prefix_len.or(local.iface.prefix_len).unwrap_or(32);
    let my_subnet = Cidr {
        addr: Ipv4Addr::from(u32::from(me.address) & Cidr::mask(prefix)),
        len: prefix,
    };
    let encap_mode = match cluster.encap {
        Encap::Ipip => route_mode::IPIP,
        Encap::Vxlan => route_mode::VXLAN,
    };
    let pod_mtu = local.iface.mtu.saturating_sub(cluster.encap.overhead());
    let mut flags = 0;
    if local.inner_src_check {
        flags |= config_flags::INNER_SRC_CHECK;
    }
    if cluster.udp_checksum {
        flags |= config_flags::UDP_CSUM;
    }
    let config = NodeConfig {
        node_addr: me.address.octets(),
        vni: cluster.vni,
        vtep_mac: me.vtep_mac,
        vxlan_port: cluster.port,
        flags,
        underlay_mtu: local.iface.mtu,
        csum_ifindex: local.csum_ifindex,
        _pad: 0,
    };

    let used: BTreeSet<u32> = cluster
        .nodes
        .iter()
        .filter_map(|n| have_nodes.get(&n.address).map(|e| e.peer_idx))
        .collect();
    let mut free = (0..local.max_nodes).filter(|i| !used.contains(i));

    let mut want = Desired {
        config,
        pod_cidrs: BTreeMap::new(),
        nodes: BTreeMap::new(),
        routes: Vec::new(),
        pod_mtu,
    };
    want.pod_cidrs.insert(
        me.pod_cidr,
        PodRoute {
            node_addr: me.address.octets(),
            vtep_mac: me.vtep_mac,
            mode: route_mode::LOCAL,
            _pad: 0,
            peer_idx: 0,
        },
    );
    for peer in cluster.nodes.iter().filter(|n| n.name != local.node) {
        let peer_idx = match have_nodes.get(&peer.address) {
            Some(e) => e.peer_idx,
            None => free.next().ok_or(MapsError::NoPeerSlot)?,
        };
        let same_subnet = my_subnet.contains(peer.address);
        let mode = if cluster.cross_subnet && same_subnet {
            route_mode::NATIVE
        } else {
            encap_mode
        };
        want.nodes.insert(
            peer.address,
            NodeEntry {
                peer_idx,
                mode: mode as u32,
            },
        );
        want.pod_cidrs.insert(
            peer.pod_cidr,
            PodRoute {
                node_addr: peer.address.octets(),
                vtep_mac: peer.vtep_mac,
                mode,
                _pad: 0,
                peer_idx,
            },
        );
        let via = if same_subnet {
            peer.address
        } else {
            net::gateway_to(peer.address)?.unwrap_or(peer.address)
        };
        want.routes.push(PodRouteSpec {
            cidr: peer.pod_cidr,
            via,
            dev: local.iface.name.clone(),
            mtu: (mode != route_mode::NATIVE).then_some(pod_mtu),
        });
    }
    Ok(want)
}

/// Brings the agent's kernel routes to `want`: replaces what differs, removes the rest.
pub fn apply_routes(want: &[PodRouteSpec], changes: &mut Changes) -> Result<(), MapsError> {
    let have: BTreeMap<Cidr, PodRouteSpec> = net::owned_routes()?
        .into_iter()
        .map(|r| (r.cidr, r))
        .collect();
    let wanted: BTreeSet<Cidr> = want.iter().map(|r| r.cidr).collect();
    for r in want.iter().filter(|r| have.get(&r.cidr) != Some(*r)) {
        net::replace_route(r)?;
        changes.routes_replaced += 1;
    }
    for cidr in have.keys().filter(|c| !wanted.contains(c)) {
        net::delete_route(cidr)?;
        changes.routes_removed += 1;
    }
    Ok(())
}

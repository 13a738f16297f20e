//! The datapath's maps from userspace: typed handles, opened from a loaded object or from the
//! pins, and what reading them whole needs (for `stats`, `routes`, metrics and adoption).
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues},
};
use maps_common::{
    AGENT_NOTE_LEN, AgentInfo, Counter, Endpoint, FlowKey, FlowKey6, MonitorConf, MonitorState,
    NodeConfig, NodeConfig6, NodeEntry, NodeEntry6, PeerHealth, PeerStats, PodKey, PodRoute,
    PodRoute6, map_names,
};

use crate::cluster::Cidr;

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {0} is missing from the object")]
    Missing(&'static str),
    #[error(
        "nothing is pinned at {}: no datapath agent has run with --pin-dir {} on this node (is the agent running, and with this --pin-dir?)",
        .path.display(),
        .dir.display()
    )]
    NotPinned { path: PathBuf, dir: PathBuf },
    #[error(
        "permission denied opening {}: reading the datapath's pins needs root (or CAP_BPF and access to {}); try sudo",
        .path.display(),
        .dir.display()
    )]
    PinsDenied { path: PathBuf, dir: PathBuf },
    #[error("node {0:?} is not in the cluster state")]
    OwnNodeMissing(String),
    #[error("no free peer slot: raise --max-nodes")]
    NoPeerSlot,
}

pub(crate) fn map_err(name: &'static str) -> impl Fn(MapError) -> MapsError {
    move |source| MapsError::Map { name, source }
}

/// Typed handles to every map of the datapath.
pub struct DatapathMaps {
    pub config: Array<MapData, NodeConfig>,
    pub pod_cidrs: LpmTrie<MapData, [u8; 4], PodRoute>,
    pub pod_routes: HashMap<MapData, PodKey, PodRoute>,
    pub nodes: HashMap<MapData, [u8; 4], NodeEntry>,
    pub counters: PerCpuArray<MapData, Counter>,
    pub drops: PerCpuArray<MapData, Counter>,
    pub peer_stats: PerCpuArray<MapData, PeerStats>,
    pub endpoints: HashMap<MapData, [u8; 4], Endpoint>,
    pub stack_flows: HashMap<MapData, FlowKey, u32>,
    pub agent: Array<MapData, AgentInfo>,
    pub agent_note: Array<MapData, [u8; AGENT_NOTE_LEN]>,
    /// The monitor's per-CPU token buckets and event counts; `None` in pins an agent before
    /// map ABI 4 made.
    pub monitor: Option<PerCpuArray<MapData, MonitorState>>,
    /// The monitor's rate limit and trace sampling; `None` as `monitor`.
    pub monitor_conf: Option<Array<MapData, MonitorConf>>,
    /// Each peer's last health probe; `None` as `monitor`.
    pub health: Option<HashMap<MapData, [u8; 4], PeerHealth>>,
    /// The IPv6 maps; `None` in pins an agent before map ABI 5 made.
    pub six: Option<Maps6>,
    /// Local pods' IPv6 addresses (`DP_ENDPOINTS6`); `None` in pins before map ABI 6.
    pub endpoints6: Option<HashMap<MapData, [u8; 16], Endpoint>>,
    /// `stack_flows` for IPv6; `None` as `endpoints6`.
    pub stack_flows6: Option<HashMap<MapData, FlowKey6, u32>>,
    /// `health` for the peers' IPv6 halves; `None` in pins before map ABI 7.
    pub health6: Option<HashMap<MapData, [u8; 16], PeerHealth>>,
}

/// Typed handles to the IPv6 maps.
pub struct Maps6 {
    pub config: Array<MapData, NodeConfig6>,
    pub pod_cidrs: LpmTrie<MapData, [u8; 16], PodRoute6>,
    pub nodes: HashMap<MapData, [u8; 16], NodeEntry6>,
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
            let path = crate::kernel::loader::map_pin_path(pin_dir, name);
            let md = MapData::from_pin(&path).map_err(|e| {
                let (path, dir) = (path.clone(), pin_dir.to_path_buf());
                match e {
                    MapError::SyscallError(aya::sys::SyscallError { io_error, .. })
                        if matches!(io_error.raw_os_error(), Some(libc::EPERM | libc::EACCES)) =>
                    {
                        MapsError::PinsDenied { path, dir }
                    }
                    _ => MapsError::NotPinned { path, dir },
                }
            })?;
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
            pod_routes: typed(&mut get, map_names::POD_ROUTES)?,
            nodes: typed(&mut get, map_names::NODES)?,
            counters: typed(&mut get, map_names::COUNTERS)?,
            drops: typed(&mut get, map_names::DROPS)?,
            peer_stats: typed(&mut get, map_names::PEER_STATS)?,
            endpoints: typed(&mut get, map_names::ENDPOINTS)?,
            stack_flows: typed(&mut get, map_names::STACK_FLOWS)?,
            agent: typed(&mut get, map_names::AGENT)?,
            agent_note: typed(&mut get, map_names::AGENT_NOTE)?,
            monitor: typed(&mut get, map_names::MONITOR).ok(),
            monitor_conf: typed(&mut get, map_names::MONITOR_CONF).ok(),
            health: typed(&mut get, map_names::HEALTH).ok(),
            six: (|| {
                Some(Maps6 {
                    config: typed(&mut get, map_names::CONFIG6).ok()?,
                    pod_cidrs: typed(&mut get, map_names::POD_CIDRS6).ok()?,
                    nodes: typed(&mut get, map_names::NODES6).ok()?,
                })
            })(),
            endpoints6: typed(&mut get, map_names::ENDPOINTS6).ok(),
            stack_flows6: typed(&mut get, map_names::STACK_FLOWS6).ok(),
            health6: typed(&mut get, map_names::HEALTH6).ok(),
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

    pub fn read_agent(&self) -> Result<AgentInfo, MapsError> {
        self.agent.get(&0, 0).map_err(map_err(map_names::AGENT))
    }

    /// Why the last rejected state was rejected, as the agent recorded it ("" if none was).
    pub fn read_agent_note(&self) -> Result<String, MapsError> {
        let note = self
            .agent_note
            .get(&0, 0)
            .map_err(map_err(map_names::AGENT_NOTE))?;
        Ok(from_fixed(&note))
    }

    /// Records `why` (cut on a character boundary to fit), or clears it with "".
    pub fn write_agent_note(&mut self, why: &str) -> Result<(), MapsError> {
        self.agent_note
            .set(0, fixed::<AGENT_NOTE_LEN>(why), 0)
            .map_err(map_err(map_names::AGENT_NOTE))
    }

    /// Records the last health probe of a peer's half at `addr` (nothing in pins before map
    /// ABI 4, or 7 for IPv6).
    pub fn write_health(&mut self, addr: IpAddr, h: &PeerHealth) -> Result<(), MapsError> {
        match addr {
            IpAddr::V4(a) => put_health(&mut self.health, a.octets(), h, map_names::HEALTH),
            IpAddr::V6(a) => put_health(&mut self.health6, a.octets(), h, map_names::HEALTH6),
        }
    }

    /// Forgets the health of peer addresses not in `keep`.
    pub fn retain_health(&mut self, keep: &[IpAddr]) {
        drop_health(&mut self.health, |k| keep.contains(&IpAddr::from(*k)));
        drop_health(&mut self.health6, |k| keep.contains(&IpAddr::from(*k)));
    }

    /// The last health probe of the peer half at `addr`, if any.
    pub fn health_of(&self, addr: IpAddr) -> Option<PeerHealth> {
        match addr {
            IpAddr::V4(a) => self.health.as_ref()?.get(&a.octets(), 0).ok(),
            IpAddr::V6(a) => self.health6.as_ref()?.get(&a.octets(), 0).ok(),
        }
    }

    /// Each peer half's last health probe, by its underlay address: IPv4 ones first.
    pub fn read_health(&self) -> BTreeMap<IpAddr, PeerHealth> {
        let v4 = self.health.iter().flat_map(|m| m.iter().flatten());
        let v6 = self.health6.iter().flat_map(|m| m.iter().flatten());
        v4.map(|(k, v)| (IpAddr::from(k), v))
            .chain(v6.map(|(k, v)| (IpAddr::from(k), v)))
            .collect()
    }

    /// Sets the event rate limit (per CPU, 0 for the default), keeping trace sampling.
    pub fn write_monitor_limit(&mut self, rate: u32, burst: u32) -> Result<(), MapsError> {
        self.update_monitor_conf(|c| (c.rate, c.burst) = (rate, burst))
            .map(drop)
    }

    /// Changes `DP_MONITOR_CONF` with `f`; false when the pins have none (before map ABI 4).
    pub fn update_monitor_conf(
        &mut self,
        f: impl FnOnce(&mut MonitorConf),
    ) -> Result<bool, MapsError> {
        let Some(conf_map) = &mut self.monitor_conf else {
            return Ok(false);
        };
        let mut conf = conf_map.get(&0, 0).unwrap_or_default();
        f(&mut conf);
        conf_map
            .set(0, conf, 0)
            .map_err(map_err(map_names::MONITOR_CONF))?;
        Ok(true)
    }

    pub fn write_agent(&mut self, info: &AgentInfo) -> Result<(), MapsError> {
        self.agent
            .set(0, info, 0)
            .map_err(map_err(map_names::AGENT))
    }

    pub fn read_config(&self) -> Result<NodeConfig, MapsError> {
        self.config.get(&0, 0).map_err(map_err(map_names::CONFIG))
    }

    /// Sum over CPUs of each slot of a per-CPU counter map.
    pub fn sum_counters(map: &PerCpuArray<MapData, Counter>) -> Vec<Counter> {
        map.iter()
            .map(|v| {
                v.map(|per_cpu| per_cpu.iter().fold(Counter::default(), |a, c| a.plus(*c)))
                    .unwrap_or_default()
            })
            .collect()
    }

    /// Sum over CPUs of one peer's traffic.
    pub fn peer_stats(&self, idx: u32) -> PeerStats {
        self.peer_stats
            .get(&idx, 0)
            .map(|v| v.iter().fold(PeerStats::default(), |a, p| a.plus(*p)))
            .unwrap_or_default()
    }

    /// Zeroes a peer slot's counters (a reused slot starts from zero).
    pub fn reset_peer(&mut self, idx: u32) -> Result<(), MapsError> {
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

/// `s` NUL-padded into `N` bytes, cut on a character boundary to fit: the maps' fixed-width
/// text fields (the agent's note and version, a peer's name).
pub fn fixed<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let mut end = s.len().min(N);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out[..end].copy_from_slice(&s.as_bytes()[..end]);
    out
}

/// The text of a NUL-padded fixed-width field.
pub fn from_fixed(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// `write_health` for one family's map, when the pins have it.
fn put_health<K: aya::Pod>(
    map: &mut Option<HashMap<MapData, K, PeerHealth>>,
    key: K,
    h: &PeerHealth,
    name: &'static str,
) -> Result<(), MapsError> {
    match map {
        Some(m) => m.insert(key, h, 0).map_err(map_err(name)),
        None => Ok(()),
    }
}

/// Removes the entries of one family's health map that `keep` refuses.
fn drop_health<K: aya::Pod>(
    map: &mut Option<HashMap<MapData, K, PeerHealth>>,
    keep: impl Fn(&K) -> bool,
) {
    let Some(m) = map else { return };
    let gone: Vec<K> = m.keys().flatten().filter(|k| !keep(k)).collect();
    for k in gone {
        let _ = m.remove(&k);
    }
}

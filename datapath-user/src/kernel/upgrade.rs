//! Upgrades that drop nothing. The pinned maps' layouts (key, value, entries; the ABI version the
//! agent recorded) are compared with this build's. When they differ (an earlier release, another
//! `--max-nodes`), new maps are built beside the old ones in `maps-pending`, filled from the
//! cluster state, given the counters whose meaning did not change, and the programs are swapped
//! into the pinned links; only then do `maps` become `maps-old`, `maps-pending` become `maps`,
//! and `maps-old` go. Every step leaves a state that the next start completes or rolls back.
//! One agent holds a node at a time: a lock on the pin directory.
use std::{
    collections::HashMap,
    fs::File,
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHash, Map, MapData, PerCpuArray, PerCpuValues};
use maps_common::{
    ABI_VERSION, AgentInfo, Counter, Endpoint, FlowKey, FlowKey6, NodeEntry, PeerStats,
    map_layouts, map_names,
};
use tracing::info;

use crate::kernel::maps::DatapathMaps;

/// The directories under the pin directory a migration goes through.
pub const PENDING: &str = super::pin_tree::MAPS_PENDING;
pub const OLD: &str = super::pin_tree::MAPS_OLD;

/// What the pins under a pin directory are, against this build.
#[derive(Debug, PartialEq, Eq)]
pub enum Pins {
    /// Nothing pinned: a first start.
    Fresh,
    /// The same layouts: adopted as they are.
    Current,
    /// Another layout or size: migrated. `abi` is the pinned maps' ABI version.
    Migrate { abi: u32, why: String },
}

/// Holds the node: an exclusive lock on the pin directory, released when the agent exits (or
/// dies: the kernel releases it with the process).
pub struct NodeLock(#[expect(dead_code, reason = "held for its lock")] File);

impl NodeLock {
    /// Takes the lock if free; `None` while another agent holds it.
    pub fn try_take(pin_dir: &Path) -> anyhow::Result<Option<Self>> {
        let dir = File::open(pin_dir).with_context(|| format!("opening {}", pin_dir.display()))?;
        // SAFETY: flock on an open descriptor this function owns.
        let rc = unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(Some(Self(dir)));
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EWOULDBLOCK) => Ok(None),
            _ => Err(err).with_context(|| format!("locking {}", pin_dir.display())),
        }
    }
}

fn pinned(pin_dir: &Path, sub: &str) -> PathBuf {
    pin_dir.join(sub)
}

/// Finishes or rolls back a migration a crash interrupted, from the directories it left:
/// `maps-old` without `maps` (crashed between the two renames) completes the swap; `maps-old`
/// beside `maps` (crashed before removing it) removes it; a `maps-pending` beside `maps`
/// (crashed before the swap) is removed, and the migration starts over.
pub fn recover(pin_dir: &Path) -> anyhow::Result<()> {
    let (maps, pending, old) = (
        pinned(pin_dir, super::pin_tree::MAPS),
        pinned(pin_dir, PENDING),
        pinned(pin_dir, OLD),
    );
    if old.exists() && !maps.exists() && pending.exists() {
        std::fs::rename(&pending, &maps).context("completing an interrupted migration")?;
        info!("completed an interrupted migration: the new maps are in place");
    }
    if old.exists() {
        remove_dir_pins(&old)?;
        info!("removed the maps an interrupted migration left behind");
    }
    if pending.exists() {
        remove_dir_pins(&pending)?;
        info!("rolled back an unfinished migration's new maps; it starts over");
    }
    Ok(())
}

/// Removes every pin in `dir`, then `dir`.
fn remove_dir_pins(dir: &Path) -> anyhow::Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries.flatten() {
        std::fs::remove_file(entry.path())
            .with_context(|| format!("removing {}", entry.path().display()))?;
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
}

/// The pinned maps' ABI: what `DP_AGENT` records, or 1 for the first release, which had none.
fn pinned_abi(pin_dir: &Path) -> u32 {
    let path = crate::kernel::loader::map_pin_path(pin_dir, map_names::AGENT);
    let Ok(md) = MapData::from_pin(&path) else {
        return 1;
    };
    let Ok(arr) = aya::maps::Array::<MapData, AgentInfo>::try_from(Map::Array(md)) else {
        return 1;
    };
    arr.get(&0, 0).map(|a| a.abi_version.max(1)).unwrap_or(1)
}

/// Compares the pins with this build for maps sized `max_nodes`. Refuses, before anything is
/// touched, maps a newer ABI wrote: this agent cannot know what they mean.
pub fn check(pin_dir: &Path, max_nodes: u32) -> anyhow::Result<Pins> {
    let config = crate::kernel::loader::map_pin_path(pin_dir, map_names::CONFIG);
    if !config.exists() {
        return Ok(Pins::Fresh);
    }
    let abi = pinned_abi(pin_dir);
    if abi > ABI_VERSION {
        anyhow::bail!(
            "the datapath pinned under {} was written with map ABI {abi}, by a newer agent; this agent {} speaks map ABI {ABI_VERSION} and cannot read it: run the newer agent, or `datapath detach` first (an outage)",
            pin_dir.display(),
            crate::VERSION
        );
    }
    let mut why = Vec::new();
    for (name, key, value, entries) in map_layouts(max_nodes) {
        let path = crate::kernel::loader::map_pin_path(pin_dir, name);
        let Ok(info) = MapData::from_pin(&path).and_then(|m| m.info()) else {
            why.push(format!("{name} missing"));
            continue;
        };
        let have = (info.key_size(), info.value_size(), info.max_entries());
        if have != (key, value, entries) {
            why.push(format!(
                "{name} {}/{}/{} (key/value/entries), this build {key}/{value}/{entries}",
                have.0, have.1, have.2
            ));
        }
    }
    if why.is_empty() && abi == ABI_VERSION {
        return Ok(Pins::Current);
    }
    Ok(Pins::Migrate {
        abi,
        why: why.join("; "),
    })
}

/// Kills this process when `DATAPATH_FAULT` names `step`: the upgrade tests' crash points,
/// only in the tests' build (feature `fault-injection`); a node's binary has none.
#[cfg(not(feature = "fault-injection"))]
pub fn fault(_step: &str) {}

/// Kills this process when `DATAPATH_FAULT` names `step`: the upgrade tests' crash points.
#[cfg(feature = "fault-injection")]
pub fn fault(step: &str) {
    if std::env::var("DATAPATH_FAULT").as_deref() == Ok(step) {
        tracing::warn!(step, "DATAPATH_FAULT: killing this agent here");
        // SAFETY: a signal to this very process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// Swaps the pinned maps: `maps` becomes `maps-old`, `maps-pending` becomes `maps`, and
/// `maps-old` goes. Called once the programs use the new maps.
pub fn finish(pin_dir: &Path) -> anyhow::Result<()> {
    let (maps, pending, old) = (
        pinned(pin_dir, super::pin_tree::MAPS),
        pinned(pin_dir, PENDING),
        pinned(pin_dir, OLD),
    );
    std::fs::rename(&maps, &old).context("moving the old maps aside")?;
    fault("after-rename");
    std::fs::rename(&pending, &maps).context("moving the new maps in place")?;
    remove_dir_pins(&old)
}

/// A peer's traffic as the first release counted it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct PeerStatsV1 {
    tx_packets: u64,
    tx_bytes: u64,
    rx_packets: u64,
    rx_bytes: u64,
}

/// A node entry as the first release kept it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct NodeEntryV1 {
    peer_idx: u32,
    mode: u32,
}

// SAFETY: repr(C), Copy, no padding, any bit pattern is valid.
unsafe impl aya::Pod for PeerStatsV1 {}
// SAFETY: as above.
unsafe impl aya::Pod for NodeEntryV1 {}

fn open_old<T: TryFrom<Map, Error = aya::maps::MapError>>(pin_dir: &Path, name: &str) -> Option<T> {
    let md = MapData::from_pin(crate::kernel::loader::map_pin_path(pin_dir, name)).ok()?;
    Map::from_map_data(md).ok()?.try_into().ok()
}

/// CPU by CPU, `old` plus `now`; `None` when the kernel's CPU count makes no valid value.
fn per_cpu_sum<T: aya::Pod>(old: &[T], now: &[T], plus: fn(T, T) -> T) -> Option<PerCpuValues<T>> {
    let sum: Vec<T> = old.iter().zip(now).map(|(o, n)| plus(*o, *n)).collect();
    PerCpuValues::try_from(sum).ok()
}

/// Adds, per CPU, what the old counters hold to the new ones (the new programs may already
/// have counted since the swap).
fn add_counters(old: &PerCpuArray<MapData, Counter>, new: &mut PerCpuArray<MapData, Counter>) {
    for (i, values) in old.iter().enumerate() {
        let (Ok(old_v), Ok(new_v)) = (values, new.get(&(i as u32), 0)) else {
            break; // past either map's end
        };
        if let Some(sum) = per_cpu_sum(&old_v, &new_v, Counter::plus) {
            let _ = new.set(i as u32, sum, 0);
        }
    }
}

/// Carries over, before the swap, the state the cluster state cannot give: the pods the CNI
/// plugin recorded (their hooks are moved to the new program with them) and the flows whose
/// replies must take the host's stack.
pub fn carry_state(pin_dir: &Path, new: &mut DatapathMaps) -> anyhow::Result<()> {
    if let Some(old) =
        open_old::<BpfHash<MapData, [u8; 4], Endpoint>>(pin_dir, map_names::ENDPOINTS)
    {
        for (ip, ep) in old.iter().flatten() {
            new.endpoints.insert(ip, ep, 0)?;
        }
    }
    if let Some(old) = open_old::<BpfHash<MapData, FlowKey, u32>>(pin_dir, map_names::STACK_FLOWS) {
        for (k, v) in old.iter().flatten() {
            let _ = new.stack_flows.insert(k, v, 0);
        }
    }
    carry6(pin_dir, new)
}

/// `carry_state` for the IPv6 maps, when the old pins have them (map ABI 6 on).
fn carry6(pin_dir: &Path, new: &mut DatapathMaps) -> anyhow::Result<()> {
    let old = open_old::<BpfHash<MapData, [u8; 16], Endpoint>>(pin_dir, map_names::ENDPOINTS6);
    if let (Some(old), Some(eps)) = (old, &mut new.endpoints6) {
        for (ip, ep) in old.iter().flatten() {
            eps.insert(ip, ep, 0)?;
        }
    }
    let old = open_old::<BpfHash<MapData, FlowKey6, u32>>(pin_dir, map_names::STACK_FLOWS6);
    if let (Some(old), Some(flows)) = (old, &mut new.stack_flows6) {
        for (k, v) in old.iter().flatten() {
            let _ = flows.insert(k, v, 0);
        }
    }
    Ok(())
}

/// Carries over, once the old programs no longer count, the counters (by counter and drop
/// reason, whose numbering only grew) and each peer's traffic (by its address: slots are given
/// anew), added to what the new programs counted since the swap. Best effort: what cannot be
/// read stays as it is.
pub fn carry_counters(pin_dir: &Path, new: &mut DatapathMaps) -> anyhow::Result<()> {
    for (name, map) in [
        (map_names::COUNTERS, &mut new.counters),
        (map_names::DROPS, &mut new.drops),
    ] {
        if let Some(old) = open_old::<PerCpuArray<MapData, Counter>>(pin_dir, name) {
            add_counters(&old, map);
        }
    }
    let old_slots = old_peer_slots(pin_dir);
    let new_slots: HashMap<Ipv4Addr, u32> = new
        .read_nodes()?
        .into_iter()
        .map(|(a, e)| (a, e.peer_idx))
        .collect();
    for (addr, old) in old_peer_stats(pin_dir, &old_slots) {
        let Some(idx) = new_slots.get(&addr) else {
            continue;
        };
        let Ok(now) = new.peer_stats.get(idx, 0) else {
            continue;
        };
        if let Some(sum) = per_cpu_sum(&old, &now, PeerStats::plus) {
            let _ = new.peer_stats.set(*idx, sum, 0);
        }
    }
    Ok(())
}

/// Peer address -> counter slot in the old `DP_NODES`, whichever release wrote it.
fn old_peer_slots(pin_dir: &Path) -> HashMap<Ipv4Addr, u32> {
    if let Some(m) = open_old::<BpfHash<MapData, [u8; 4], NodeEntry>>(pin_dir, map_names::NODES) {
        return m
            .iter()
            .flatten()
            .map(|(a, e)| (Ipv4Addr::from(a), e.peer_idx))
            .collect();
    }
    open_old::<BpfHash<MapData, [u8; 4], NodeEntryV1>>(pin_dir, map_names::NODES)
        .map(|m| {
            m.iter()
                .flatten()
                .map(|(a, e)| (Ipv4Addr::from(a), e.peer_idx))
                .collect()
        })
        .unwrap_or_default()
}

/// Each old peer's per-CPU traffic, in this build's type.
fn old_peer_stats(
    pin_dir: &Path,
    slots: &HashMap<Ipv4Addr, u32>,
) -> Vec<(Ipv4Addr, PerCpuValues<PeerStats>)> {
    let mut out = Vec::new();
    if let Some(m) = open_old::<PerCpuArray<MapData, PeerStats>>(pin_dir, map_names::PEER_STATS) {
        for (addr, idx) in slots {
            if let Ok(v) = m.get(idx, 0) {
                out.push((*addr, v));
            }
        }
        return out;
    }
    let Some(m) = open_old::<PerCpuArray<MapData, PeerStatsV1>>(pin_dir, map_names::PEER_STATS)
    else {
        return out;
    };
    for (addr, idx) in slots {
        let Ok(v) = m.get(idx, 0) else { continue };
        let now: Vec<PeerStats> = v
            .iter()
            .map(|o| PeerStats {
                tx_packets: o.tx_packets,
                tx_bytes: o.tx_bytes,
                rx_packets: o.rx_packets,
                rx_bytes: o.rx_bytes,
                ..PeerStats::default()
            })
            .collect();
        if let Ok(values) = PerCpuValues::try_from(now) {
            out.push((*addr, values));
        }
    }
    out
}

//! The node's state the agent shares between its tasks: the dataplane (maps), the loaded
//! object, what is attached, and the reload bookkeeping `datapath status` and metrics read.
use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use tracing::warn;

use super::dataplane::Dataplane;
use crate::{
    cluster,
    kernel::loader::{self, DecapHook},
};

/// Reload bookkeeping exported as metrics.
#[derive(Default)]
pub struct ReloadState {
    pub last_reload_unix: f64,
    pub last_reload_ok: bool,
    pub reloads: u64,
    pub failures: u64,
    /// etcd revision of the state last applied.
    pub revision: i64,
    /// Nodes of the last state left out as incomplete or unreadable.
    pub skipped: usize,
    /// Why the last state was rejected, while the last reload is a rejection (`DP_AGENT_NOTE`).
    pub rejected: Option<String>,
    /// The last state has no entry for this node: its pod CIDR is no longer its to advertise
    /// over BGP (the datapath keeps the last good state meanwhile).
    pub left_cluster: bool,
}

pub struct Shared {
    pub dp: Dataplane,
    pub reload: ReloadState,
    /// The loaded object: the checksum device's drop program is attached from it on reloads.
    pub ebpf: aya::Ebpf,
    pub pin_dir: PathBuf,
    /// Whether the checksum device (`net::CSUM_DEV`) exists with this agent's drop program on
    /// it; `None` until the first sync has made sure either way (an earlier agent may have
    /// left it).
    pub csum_dev: Option<bool>,
    /// How TC programs are attached (resolved).
    pub tc_mode: loader::TcAttach,
    /// The decapsulation hook in use, once attached.
    pub decap: Option<DecapHook>,
    /// Changes of the host's netfilter ruleset seen (`--host-routing accepted-flows`).
    pub ruleset_changes: u64,
    /// Reference CNI plugins missing from the CNI bin directory (`cni::missing_plugins`).
    pub cni_missing: u8,
    /// SIGTERM or SIGINT came: the agent is on its way out.
    pub stopping: bool,
}

impl Shared {
    /// Records why the last state was rejected ("" clears it) in `DP_AGENT_NOTE`.
    pub fn note_rejection(&mut self, why: &str) {
        if let Err(e) = self.dp.maps.write_agent_note(why) {
            warn!(
                "recording the rejection in {}: {e}",
                maps_common::map_names::AGENT_NOTE
            );
        }
    }

    /// Writes what the agent runs and last did into `DP_AGENT`, for `datapath status`.
    pub fn record(&mut self) {
        let mode = match self.dp.settings().map(|s| s.encap) {
            Some(cluster::Encap::Ipip) => maps_common::route_mode::IPIP,
            Some(cluster::Encap::None) => maps_common::route_mode::NATIVE,
            _ => maps_common::route_mode::VXLAN,
        };
        let r = &self.reload;
        let info = maps_common::AgentInfo {
            abi_version: maps_common::ABI_VERSION,
            pid: std::process::id(),
            last_reload_unix: r.last_reload_unix as u64,
            reloads: r.reloads,
            reload_failures: r.failures,
            last_reload_ok: u8::from(r.last_reload_ok),
            mode,
            cross_subnet: u8::from(self.dp.settings().is_some_and(|s| s.cross_subnet)),
            decap_hook: self.decap.unwrap_or(DecapHook::Tc).code(),
            host_routing: self.dp.local.host_routing.code(),
            tc_attach: self.tc_mode.code(),
            cni_missing: self.cni_missing,
            stopping: u8::from(self.stopping),
            pod_mtu: self.dp.pod_mtu(),
            nodes_skipped: r.skipped as u32,
            version: crate::version_bytes(),
        };
        if let Err(e) = self.dp.maps.write_agent(&info) {
            warn!(
                "recording the agent's state in {}: {e}",
                maps_common::map_names::AGENT
            );
        }
    }
}

pub type SharedRef = Arc<Mutex<Shared>>;

pub fn lock(s: &SharedRef) -> std::sync::MutexGuard<'_, Shared> {
    s.lock().expect("agent state lock")
}

/// Seconds since the Unix epoch.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

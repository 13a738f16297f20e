//! Bringing the node to a checked cluster state: one reconciler owns the desired and the
//! installed state together, the maps (`dataplane`), the kernel routes (`routes`) and the
//! checksum device (`csum`), and hands the node's outputs what they are written from.
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::{
    cluster::{self, Cidr, Cluster, Defaults, Limits, Settings, raw::RawState},
    outputs::{Outputs, Wanted},
    source::{Update, etcd},
    underlay::netlink::RouteSpec,
};

pub mod csum;
pub mod dataplane;
pub mod routes;
pub mod state;

use dataplane::{ApplyError, Changes, Fabric};
use routes::Routes;
use state::{SharedRef, lock, now};

/// Validates what the sources send and applies it: whole states, or etcd's lease events as
/// deltas when they stand alone.
pub struct Reconciler {
    pub shared: SharedRef,
    pub routes: Routes,
    pub outputs: Outputs,
    pub defaults: Defaults,
    pub limits: Limits,
    /// etcd's keys, for the whole state when a delta cannot stand alone.
    pub etcd: Option<etcd::Snapshot>,
    /// Woken when peers were added or the configuration changed: reachability is checked.
    pub health: Arc<Notify>,
    /// Woken after every state applied: the BGP speaker's configuration follows it.
    pub speaker: Arc<Notify>,
    /// The last change was rejected: deltas cannot be trusted until a whole state applies.
    dirty: bool,
    /// Warnings and skipped nodes of the last state, logged again only when they change.
    notes: (Vec<String>, Vec<cluster::Problem>),
}

impl Reconciler {
    pub fn new(
        shared: SharedRef,
        routes: Routes,
        outputs: Outputs,
        (defaults, limits): (Defaults, Limits),
        etcd: Option<etcd::Snapshot>,
    ) -> Self {
        Self {
            shared,
            routes,
            outputs,
            defaults,
            limits,
            etcd,
            health: Arc::new(Notify::new()),
            speaker: Arc::new(Notify::new()),
            dirty: false,
            notes: Default::default(),
        }
    }

    /// The one validation step, with this agent's flags and limits.
    pub fn validate(&self, raw: anyhow::Result<RawState>) -> anyhow::Result<Cluster> {
        Ok(cluster::validate(raw?, &self.defaults, &self.limits)?)
    }

    /// Applies a whole state: checksum device, maps, routes, then the outputs.
    pub async fn apply_full(&mut self, cluster: &Cluster) -> anyhow::Result<Changes> {
        self.note(cluster);
        let own = lock(&self.shared).dp.local.node.clone();
        let own = cluster.own.as_deref().unwrap_or(&own);
        let v6 = cluster.node(own).is_some_and(|n| n.v6.is_some());
        let csum = csum::with_csum_device(&self.shared, &self.routes.nl, cluster, v6).await?;
        let before = {
            let s = lock(&self.shared);
            (s.dp.settings().map(mode_text), s.dp.pod_mtu())
        };
        let mut ch = {
            let mut s = lock(&self.shared);
            if let Some(own) = &cluster.own {
                s.dp.local.node.clone_from(own);
            }
            s.reload.skipped = cluster.skipped.len();
            s.dp.local.csum_ifindex = csum;
            s.dp.apply_full(cluster)?
        };
        self.sync_routes(&mut ch).await?;
        csum::drop_csum_device(&self.shared, &self.routes.nl).await?;
        log_mode_change(&self.shared, before);
        let wanted = self.wanted();
        self.outputs.apply(wanted);
        Ok(ch)
    }

    /// What the outputs are written from, as the maps hold it now.
    fn wanted(&self) -> Wanted {
        let s = lock(&self.shared);
        Wanted {
            pod_cidr: s.dp.own_pod_cidr(),
            pod_cidr6: s.dp.own_pod_cidr6(),
            mtu: s.dp.pod_mtu(),
            networks: s.dp.cluster_networks(),
        }
    }

    /// Logs a state's warnings and skipped nodes when they differ from the last state's.
    fn note(&mut self, cluster: &Cluster) {
        let skipped = [cluster.skipped.clone(), cluster.skipped6.clone()].concat();
        let notes = (cluster.warnings.clone(), skipped);
        if notes == self.notes {
            return;
        }
        for w in &cluster.warnings {
            warn!("{w}");
        }
        for p in &cluster.skipped {
            warn!("skipping node {p}; every other node is applied");
        }
        for p in &cluster.skipped6 {
            warn!("skipping a node's IPv6 half, {p}; its IPv4 half is applied");
        }
        self.notes = notes;
    }

    /// The whole state etcd holds now, validated.
    fn etcd_state(&self) -> anyhow::Result<Cluster> {
        let etcd = self.etcd.as_ref().context("no etcd source")?;
        self.validate(etcd.whole())
    }

    /// Applies etcd lease events as a delta; falls back to the whole state etcd holds when the
    /// delta cannot stand alone (a bad lease, a conflict, a change of this node).
    async fn apply_leases(
        &mut self,
        events: &[(String, Option<String>)],
    ) -> anyhow::Result<Changes> {
        if !self.dirty
            && let Some(ch) = self.try_delta(events).await?
        {
            return Ok(ch);
        }
        let cluster = self.etcd_state()?;
        self.apply_full(&cluster).await
    }

    /// The lease events applied alone, or `None` when they cannot stand alone.
    async fn try_delta(
        &mut self,
        events: &[(String, Option<String>)],
    ) -> anyhow::Result<Option<Changes>> {
        let prefix = &self
            .etcd
            .as_ref()
            .context("lease events without etcd")?
            .prefix;
        let applied = {
            let mut s = lock(&self.shared);
            let Ok((upserts, removes)) = etcd::delta(prefix, events, |c| s.dp.owner_of(c)) else {
                return Ok(None);
            };
            s.dp.apply_delta(upserts, removes)
        };
        let mut ch = match applied {
            Ok(ch) => ch,
            Err(ApplyError::Maps(e)) => return Err(e.into()),
            Err(_) => return Ok(None),
        };
        self.sync_routes(&mut ch).await?;
        Ok(Some(ch))
    }

    /// Applies one update from the source and records the outcome.
    pub async fn handle(&mut self, update: Update) {
        let (reason, revision, result) = match update {
            Update::Full {
                state,
                reason,
                revision,
            } => {
                let result = match self.validate(state) {
                    Ok(c) => self.apply_full(&c).await,
                    Err(e) => Err(e),
                };
                (reason.name(), revision, result)
            }
            Update::Leases { events, revision } => {
                ("etcd change", revision, self.apply_leases(&events).await)
            }
        };
        self.record(reason, revision, result);
        self.speaker.notify_one();
    }

    /// Records the pod CIDRs the fabric can route now (the BGP speaker's reading): under
    /// `encapsulation: none` the peers they belong to go natively from here on.
    pub async fn apply_fabric(&mut self, routes: Fabric) {
        let count = routes.count();
        let result = lock(&self.shared).dp.set_fabric(routes);
        let mut ch = match result {
            Ok(ch) if ch == Changes::default() => return,
            Ok(ch) => ch,
            Err(e) => {
                error!("recording the fabric's routes: {e}");
                return;
            }
        };
        if let Err(e) = self.sync_routes(&mut ch).await {
            error!("routes after the fabric's routes changed: {e:#}");
        }
        info!(
            fabric_routes = count,
            ?ch,
            "the fabric's routes changed: peers moved between native and encapsulated"
        );
    }

    /// Records a reload's outcome for status and metrics, and logs it.
    fn record(&mut self, reason: &str, revision: i64, result: anyhow::Result<Changes>) {
        let mut s = lock(&self.shared);
        s.reload.reloads += 1;
        s.reload.last_reload_unix = now();
        match result {
            Ok(changes) => {
                s.reload.left_cluster = false;
                s.reload.last_reload_ok = true;
                s.reload.revision = revision;
                self.dirty = false;
                info!(reason, revision, ?changes, "cluster state applied");
                if changes.nodes_upserted > 0 || changes.config {
                    self.health.notify_one();
                }
            }
            Err(e) => {
                s.reload.left_cluster = e
                    .downcast_ref::<cluster::Invalid>()
                    .is_some_and(cluster::Invalid::lacks_own_node);
                s.reload.last_reload_ok = false;
                s.reload.failures += 1;
                s.reload.rejected = Some(format!("{reason}: {e:#}"));
                self.dirty = true;
                error!(
                    reason,
                    "cluster state rejected, last good state stays: {e:#}"
                );
            }
        }
        if s.reload.last_reload_ok && s.reload.rejected.take().is_some() {
            s.note_rejection("");
        } else if let Some(why) = s.reload.rejected.clone() {
            s.note_rejection(&why);
        }
        s.record();
    }

    /// Reads the kernel's routes again (someone may have flushed them) and repairs them.
    pub async fn repair_routes(&mut self) {
        let (want, ifindex, want6) = self.wanted_routes();
        self.routes.reconcile((&want, ifindex), &want6).await;
    }

    /// Brings the kernel routes to what the maps now ask for, counting the changes in `ch`.
    async fn sync_routes(&mut self, ch: &mut Changes) -> anyhow::Result<()> {
        let (want, ifindex, want6) = self.wanted_routes();
        self.routes.sync(&want, ifindex, ch).await?;
        self.routes.sync6(&want6, ch).await
    }

    /// The routes the maps ask for, the underlay's ifindex, and the IPv6 routes.
    fn wanted_routes(
        &self,
    ) -> (
        std::collections::BTreeMap<Cidr, RouteSpec>,
        u32,
        routes::Want6,
    ) {
        let s = lock(&self.shared);
        let ifindex = s.dp.local.iface.ifindex;
        let want6 = routes::Want6 {
            cidrs: s.dp.routes6(),
            ifindex,
            mtu: s
                .dp
                .local
                .iface
                .mtu
                .saturating_sub(maps_common::VXLAN6_OVERHEAD),
        };
        (s.dp.routes(), ifindex, want6)
    }
}

/// How a cluster's encapsulation reads in the log.
fn mode_text(s: &Settings) -> String {
    let mode = match s.encap {
        cluster::Encap::Vxlan => format!("vxlan (vni {}, port {})", s.vni, s.port),
        cluster::Encap::Ipip => "ipip".to_string(),
        cluster::Encap::None => "none (native routing)".to_string(),
    };
    let bgp = match &s.bgp {
        Some(b) => format!(", BGP AS {}", b.as_number),
        None => String::new(),
    };
    format!("{mode}, crossSubnet {}{bgp}", s.cross_subnet)
}

/// Says so when a state changed the encapsulation (given what it was and the pod MTU then),
/// and warns when pods made before run at an MTU that is no longer the pod MTU.
fn log_mode_change(shared: &SharedRef, (mode_before, mtu_before): (Option<String>, u32)) {
    let s = lock(shared);
    let (Some(from), Some(to)) = (mode_before, s.dp.settings().map(mode_text)) else {
        return;
    };
    if from != to {
        info!(from = %from, to = %to, "encapsulation changed");
    }
    let mtu = s.dp.pod_mtu();
    let pods = s.dp.maps.endpoints.keys().count();
    if mtu != mtu_before && pods > 0 {
        warn!(
            pods,
            old_mtu = mtu_before,
            new_mtu = mtu,
            "the pod MTU changed: the CNI configuration has the new one, but the pods made before keep their MTU until they are recreated (larger packets from them are refused with ICMP by the tunnel's route MTU)"
        );
    }
}

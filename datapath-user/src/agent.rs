//! `datapath run`: load or adopt the datapath, keep its maps and few routes in step with the
//! cluster state (a watched file, or etcd's events applied one lease at a time), watch the
//! underlay's routes so unreachable peers are known, serve metrics, and leave everything
//! pinned and forwarding when stopped.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Notify, mpsc},
};
use tracing::{error, info, warn};

use crate::{
    cluster::{self, Cidr, Cluster, Defaults, Limits, Settings},
    cni::{self, CniOptions},
    dataplane::{ApplyError, Changes, Dataplane, LocalOptions},
    etcd::{self, EtcdStatus},
    flannel, http,
    loader::{self, DecapHook, LoadOptions},
    maps::DatapathMaps,
    net::{self, Netlink, PeerPath, RouteSpec},
    ruleset,
    stats::Snapshot,
    upgrade, watch,
};

/// Where the cluster state comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A cluster file, watched (inotify) and reloaded on SIGHUP.
    File { path: PathBuf },
    /// Flannel's layout in etcd, watched.
    Etcd(etcd::EtcdOptions),
}

pub use crate::dataplane::HostRouting;

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub source: Source,
    pub node: String,
    pub iface: Option<String>,
    pub cni: CniOptions,
    pub host_routing: HostRouting,
    pub tc_attach: loader::TcAttach,
    /// Where `subnet.env` is written (Flannel's `/run/flannel/subnet.env`).
    pub subnet_file: PathBuf,
    /// Masquerade pod traffic leaving the cluster network, as flanneld's `--ip-masq`.
    pub ip_masq: bool,
    pub pin_dir: PathBuf,
    pub metrics: Option<SocketAddr>,
    pub decap: DecapHook,
    pub log_level: u8,
    pub max_nodes: u32,
    pub inner_src_check: bool,
    pub defaults: Defaults,
}

/// One change of cluster state from a source.
pub enum Update {
    /// A whole state as cluster text (or why there is none): the cluster file.
    Full {
        text: anyhow::Result<String>,
        reason: &'static str,
        revision: i64,
    },
    /// etcd was read whole (at the start, after an outage, when the config changed): the
    /// state is what the shared keys hold now.
    EtcdRead { revision: i64 },
    /// etcd lease keys changed: new value, or `None` when deleted.
    Leases {
        events: Vec<(String, Option<String>)>,
        revision: i64,
    },
}

/// Reload bookkeeping exported as metrics.
#[derive(Default)]
struct ReloadState {
    last_reload_unix: f64,
    last_reload_ok: bool,
    reloads: u64,
    failures: u64,
    /// etcd revision of the state last applied.
    revision: i64,
    /// Nodes of the last state left out as incomplete or unreadable.
    skipped: usize,
    /// Why the last state was rejected, while the last reload is a rejection (`DP_AGENT_NOTE`).
    rejected: Option<String>,
}

struct Shared {
    dp: Dataplane,
    reload: ReloadState,
    /// The loaded object: the checksum device's drop program is attached from it on reloads.
    ebpf: aya::Ebpf,
    pin_dir: PathBuf,
    /// Whether the checksum device (`net::CSUM_DEV`) exists with this agent's drop program on
    /// it; `None` until the first sync has made sure either way (an earlier agent may have
    /// left it).
    csum_dev: Option<bool>,
    /// How TC programs are attached (resolved).
    tc_mode: loader::TcAttach,
    /// The decapsulation hook in use, once attached.
    decap: Option<DecapHook>,
    /// Changes of the host's netfilter ruleset seen (`--host-routing accepted-flows`).
    ruleset_changes: u64,
    /// Reference CNI plugins missing from the CNI bin directory (`cni::missing_plugins`).
    cni_missing: u8,
    /// SIGTERM or SIGINT came: the agent is on its way out.
    stopping: bool,
}

impl Shared {
    /// Records why the last state was rejected ("" clears it) in `DP_AGENT_NOTE`.
    fn note_rejection(&mut self, why: &str) {
        if let Err(e) = self.dp.maps.write_agent_note(why) {
            warn!(
                "recording the rejection in {}: {e}",
                maps_common::map_names::AGENT_NOTE
            );
        }
    }

    /// Writes what the agent runs and last did into `DP_AGENT`, for `datapath status`.
    fn record(&mut self) {
        let mode = match self.dp.settings().map(|s| s.encap) {
            Some(cluster::Encap::Ipip) => maps_common::route_mode::IPIP,
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
            decap_hook: match self.decap {
                Some(DecapHook::Xdp) => 1,
                _ => 2,
            },
            host_routing: self.dp.local.host_routing.code(),
            tc_attach: if self.tc_mode == loader::TcAttach::Netlink {
                2
            } else {
                1
            },
            cni_missing: self.cni_missing,
            stopping: u8::from(self.stopping),
            pod_mtu: self.dp.pod_mtu(),
            nodes_skipped: r.skipped as u32,
            version: crate::status::version_bytes(),
        };
        if let Err(e) = self.dp.maps.write_agent(&info) {
            warn!(
                "recording the agent's state in {}: {e}",
                maps_common::map_names::AGENT
            );
        }
    }
}

type SharedRef = Arc<Mutex<Shared>>;

fn lock(s: &SharedRef) -> std::sync::MutexGuard<'_, Shared> {
    s.lock().expect("agent state lock")
}

/// The agent's side of its kernel routes: what it installed, so only differences are sent.
struct Routes {
    nl: Netlink,
    installed: BTreeMap<Cidr, RouteSpec>,
    /// The aggregate routes' next-hop neighbour entry is known to be in place.
    neigh_ready: bool,
}

impl Routes {
    /// Brings the agent's routes to `want`, the aggregate routes' next-hop neighbour entry
    /// first (once; `reconcile` checks it again, since a link flap removes it).
    async fn sync(
        &mut self,
        want: &BTreeMap<Cidr, RouteSpec>,
        ifindex: u32,
        ch: &mut Changes,
    ) -> anyhow::Result<()> {
        if !self.neigh_ready {
            self.nl.ensure_nexthop_neigh(ifindex).await?;
            self.neigh_ready = true;
        }
        for r in want.values() {
            if self.installed.get(&r.cidr) != Some(r) {
                self.nl.replace_route(r).await?;
                self.installed.insert(r.cidr, r.clone());
                ch.routes_replaced += 1;
            }
        }
        let stale: Vec<Cidr> = self
            .installed
            .keys()
            .filter(|c| !want.contains_key(c))
            .copied()
            .collect();
        for c in stale {
            self.nl.delete_route(&c).await?;
            self.installed.remove(&c);
            ch.routes_removed += 1;
        }
        Ok(())
    }

    /// Reads the kernel's view again (someone may have flushed the routes) and re-syncs.
    async fn reconcile(&mut self, want: &BTreeMap<Cidr, RouteSpec>, ifindex: u32) {
        let mut ch = Changes::default();
        self.neigh_ready = false;
        let result = async {
            self.installed = self
                .nl
                .owned_routes()
                .await?
                .into_iter()
                .map(|r| (r.cidr, r))
                .collect();
            self.sync(want, ifindex, &mut ch).await
        }
        .await;
        match result {
            Err(e) => warn!("reconciling routes: {e:#}"),
            Ok(()) if ch != Changes::default() => info!(?ch, "routes repaired"),
            Ok(()) => {}
        }
    }
}

/// Creates the checksum device and its drop program when the cluster asks for outer UDP
/// checksums; returns its ifindex, 0 when none is wanted.
async fn with_csum_device(
    shared: &SharedRef,
    nl: &Netlink,
    cluster: &Cluster,
) -> anyhow::Result<u32> {
    if cluster.encap != cluster::Encap::Vxlan || !cluster.udp_checksum {
        return Ok(0);
    }
    let (ifindex, fresh) = nl.ensure_csum_device(cluster.port).await?;
    let mut s = lock(shared);
    if fresh || s.csum_dev != Some(true) {
        let Shared {
            ebpf,
            pin_dir,
            tc_mode,
            ..
        } = &mut *s;
        loader::attach_csum_dev(ebpf, net::CSUM_DEV, fresh, *tc_mode, pin_dir)?;
        s.csum_dev = Some(true);
    }
    Ok(ifindex)
}

/// Removes the checksum device once `DP_CONFIG` no longer names it.
async fn drop_csum_device(shared: &SharedRef, nl: &Netlink) -> anyhow::Result<()> {
    let pin_dir = {
        let s = lock(shared);
        if s.dp.local.csum_ifindex != 0 || s.csum_dev == Some(false) {
            return Ok(());
        }
        s.pin_dir.clone()
    };
    loader::detach_csum_dev(&pin_dir);
    nl.remove_csum_device().await?;
    lock(shared).csum_dev = Some(false);
    Ok(())
}

/// Everything the agent's main loop works with.
struct Agent {
    shared: SharedRef,
    routes: Routes,
    parse: Box<dyn Fn(anyhow::Result<String>) -> anyhow::Result<Cluster>>,
    etcd: Option<(String, etcd::Kvs)>,
    /// The last change was rejected: deltas cannot be trusted until a whole state applies.
    dirty: bool,
    health: Arc<Notify>,
    cni: CniOptions,
    flannel: FlannelOut,
    /// Warnings and skipped nodes of the last state, logged again only when they change.
    notes: (Vec<String>, Vec<cluster::Problem>),
}

/// The Flannel node's outputs: `subnet.env` and the masquerade rules.
struct FlannelOut {
    subnet_file: PathBuf,
    ip_masq: bool,
}

impl FlannelOut {
    /// Writes `subnet.env` for this node and, with `--ip-masq`, makes sure the masquerade
    /// rules for the cluster network are in place.
    fn apply(&self, dp: &Dataplane) -> anyhow::Result<()> {
        let networks = dp.cluster_networks();
        let (Some(subnet), Some(network)) = (dp.own_pod_cidr(), flannel::covering(&networks))
        else {
            return Ok(());
        };
        let env = flannel::SubnetEnv {
            network,
            subnet,
            mtu: dp.pod_mtu(),
            ip_masq: self.ip_masq,
        };
        if env.write(&self.subnet_file)? {
            info!(path = %self.subnet_file.display(), %network, %subnet, "subnet.env written");
        }
        if self.ip_masq && flannel::ensure_masq(&network)? {
            info!(%network, "masquerade rules for traffic leaving the cluster network (re)written");
        }
        Ok(())
    }
}

impl Agent {
    /// Applies a whole state: checksum device, maps, routes, CNI and Flannel outputs.
    async fn apply_full(&mut self, cluster: &Cluster) -> anyhow::Result<Changes> {
        self.note(cluster);
        let csum = with_csum_device(&self.shared, &self.routes.nl, cluster).await?;
        let before = {
            let s = lock(&self.shared);
            (s.dp.settings().map(mode_text), s.dp.pod_mtu())
        };
        let (mut ch, want, ifindex) = {
            let mut s = lock(&self.shared);
            if let Some(own) = &cluster.own {
                s.dp.local.node.clone_from(own);
            }
            s.reload.skipped = cluster.skipped.len();
            s.dp.local.csum_ifindex = csum;
            let ch = s.dp.apply_full(cluster)?;
            (ch, s.dp.routes(), s.dp.local.iface.ifindex)
        };
        self.routes.sync(&want, ifindex, &mut ch).await?;
        drop_csum_device(&self.shared, &self.routes.nl).await?;
        log_mode_change(&self.shared, before);
        self.install_cni()?;
        self.flannel.apply(&lock(&self.shared).dp)?;
        Ok(ch)
    }

    /// Logs a state's warnings and skipped nodes when they differ from the last state's.
    fn note(&mut self, cluster: &Cluster) {
        let notes = (cluster.warnings.clone(), cluster.skipped.clone());
        if notes == self.notes {
            return;
        }
        for w in &cluster.warnings {
            warn!("{w}");
        }
        for p in &cluster.skipped {
            warn!("skipping node {p}; every other node is applied");
        }
        self.notes = notes;
    }

    fn etcd_state(&self) -> anyhow::Result<Cluster> {
        etcd_state(self.etcd.as_ref(), &*self.parse)
    }

    /// Rewrites the CNI configuration list when this node's pod CIDR or pod MTU changed.
    fn install_cni(&self) -> anyhow::Result<()> {
        let (cidr, mtu) = {
            let s = lock(&self.shared);
            (s.dp.own_pod_cidr(), s.dp.pod_mtu())
        };
        let Some(cidr) = cidr else { return Ok(()) };
        if cni::install_conflist(&self.cni, &cidr, mtu)? {
            info!(
                path = %self.cni.conf_dir.join(&self.cni.conf_name).display(),
                pod_cidr = %cidr,
                mtu,
                "CNI configuration written"
            );
        }
        Ok(())
    }

    /// Applies etcd lease events as a delta; falls back to the whole state etcd holds when the
    /// delta cannot stand alone (a bad lease, a conflict, a change of this node).
    async fn apply_leases(
        &mut self,
        events: &[(String, Option<String>)],
    ) -> anyhow::Result<Changes> {
        let (prefix, _) = self.etcd.as_ref().context("lease events without etcd")?;
        let prefix = prefix.clone();
        if !self.dirty {
            let delta = {
                let s = lock(&self.shared);
                etcd::delta(&prefix, events, |c| s.dp.owner_of(c))
            };
            if let Ok((upserts, removes)) = delta {
                let applied = {
                    let mut s = lock(&self.shared);
                    s.dp.apply_delta(upserts, removes)
                };
                match applied {
                    Ok(mut ch) => {
                        let (want, ifindex) = {
                            let s = lock(&self.shared);
                            (s.dp.routes(), s.dp.local.iface.ifindex)
                        };
                        self.routes.sync(&want, ifindex, &mut ch).await?;
                        return Ok(ch);
                    }
                    Err(ApplyError::Maps(e)) => return Err(e.into()),
                    Err(_) => {}
                }
            }
        }
        let cluster = self.etcd_state()?;
        self.apply_full(&cluster).await
    }

    async fn handle(&mut self, update: Update) {
        let (reason, revision) = match &update {
            Update::Full {
                reason, revision, ..
            } => (*reason, *revision),
            Update::EtcdRead { revision } => ("etcd read", *revision),
            Update::Leases { revision, .. } => ("etcd change", *revision),
        };
        let result = match update {
            Update::Full { text, .. } => match (self.parse)(text) {
                Ok(c) => self.apply_full(&c).await,
                Err(e) => Err(e),
            },
            Update::EtcdRead { .. } => match self.etcd_state() {
                Ok(c) => self.apply_full(&c).await,
                Err(e) => Err(e),
            },
            Update::Leases { events, .. } => self.apply_leases(&events).await,
        };
        let mut s = lock(&self.shared);
        s.reload.reloads += 1;
        s.reload.last_reload_unix = now();
        match result {
            Ok(changes) => {
                s.reload.last_reload_ok = true;
                s.reload.revision = revision;
                self.dirty = false;
                info!(reason, revision, ?changes, "cluster state applied");
                if changes.nodes_upserted > 0 || changes.config {
                    self.health.notify_one();
                }
            }
            Err(e) => {
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
}

/// Waits until this agent holds the node (the pin directory's lock): one agent writes the maps
/// at a time; a second (a rolling update's surge, a crash-looping pod) waits, not ready, and
/// takes over when the first exits. `None` when stopped while waiting.
async fn take_node(
    pin_dir: &std::path::Path,
    probe: &http::Probe,
) -> anyhow::Result<Option<upgrade::NodeLock>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut said = false;
    loop {
        if let Some(lock) = upgrade::NodeLock::try_take(pin_dir)? {
            if said {
                info!(pin_dir = %pin_dir.display(), "the other agent exited: this one holds the node now");
            }
            return Ok(Some(lock));
        }
        if !said {
            warn!(pin_dir = %pin_dir.display(), "another agent holds this node (its pin directory is locked); waiting for it to exit");
            probe.set_not_ready("another agent holds this node");
            said = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = term.recv() => return Ok(None),
            _ = int.recv() => return Ok(None),
        }
    }
}

/// The whole state etcd holds now: its keys composed into cluster text, parsed, with the
/// leases that could not be read reported as skipped.
fn etcd_state(
    etcd: Option<&(String, etcd::Kvs)>,
    parse: &dyn Fn(anyhow::Result<String>) -> anyhow::Result<Cluster>,
) -> anyhow::Result<Cluster> {
    let (prefix, kvs) = etcd.context("no etcd source")?;
    let (text, skipped) = etcd::compose(prefix, &kvs.lock().expect("etcd kvs"))?;
    let mut cluster = parse(Ok(text))?;
    cluster.skipped.extend(skipped);
    Ok(cluster)
}

pub async fn run(opts: AgentOptions) -> anyhow::Result<()> {
    loader::check_privileges()?;
    let probe = http::Probe::new("waiting for the first cluster state");
    if let Some(addr) = opts.metrics {
        http::serve(addr, probe.clone()).await?;
    }
    let nl = Netlink::connect()?;
    // A lease flanneld wrote names no node: this node's is the one with one of its addresses.
    let limits = Limits {
        max_nodes: opts.max_nodes,
        own_node: Some(opts.node.clone()),
        own_addrs: nl.addresses().await?,
    };
    let etcd_status = Arc::new(Mutex::new(EtcdStatus::default()));
    let (tx, mut rx) = mpsc::channel::<Update>(64);
    let etcd = start_source(&opts.source, tx, &etcd_status);
    let defaults = opts.defaults.clone();
    let parse = move |text: anyhow::Result<String>| -> anyhow::Result<Cluster> {
        Ok(cluster::parse(&text?, &defaults, &limits)?)
    };
    let (cluster, revision) = first_state(&mut rx, &opts.source, etcd.as_ref(), &parse).await?;
    let own = cluster.own.clone().unwrap_or_else(|| opts.node.clone());
    let me = cluster.node(&own).context("own node")?.clone();
    let iface = match &opts.iface {
        Some(name) => nl.iface(name).await?,
        None => nl.iface_with_addr(me.address).await?,
    };
    let local = LocalOptions {
        node: own.clone(),
        iface: iface.clone(),
        inner_src_check: opts.inner_src_check,
        max_nodes: opts.max_nodes,
        csum_ifindex: 0,
        host_routing: opts.host_routing,
    };

    loader::ensure_bpffs(&opts.pin_dir)?;
    let Some(_node_lock) = take_node(&opts.pin_dir, &probe).await? else {
        return Ok(()); // stopped while waiting for the node
    };
    let (pins, mut ebpf) = load(&opts)?;
    let migrating = matches!(pins, upgrade::Pins::Migrate { .. });
    let adopting = pins == upgrade::Pins::Current;
    let dp = Dataplane::new(DatapathMaps::take(&mut ebpf)?, local)?;
    let shared = Arc::new(Mutex::new(Shared {
        dp,
        reload: ReloadState::default(),
        ebpf,
        pin_dir: opts.pin_dir.clone(),
        csum_dev: None,
        tc_mode: opts.tc_attach.resolve(),
        decap: None,
        ruleset_changes: 0,
        cni_missing: 0,
        stopping: false,
    }));
    let installed = nl
        .owned_routes()
        .await?
        .into_iter()
        .map(|r| (r.cidr, r))
        .collect();
    let health = Arc::new(Notify::new());
    let mut agent = Agent {
        shared: shared.clone(),
        routes: Routes {
            nl: nl.clone(),
            installed,
            neigh_ready: false,
        },
        parse: Box::new(parse),
        etcd,
        dirty: false,
        health: health.clone(),
        cni: opts.cni.clone(),
        flannel: FlannelOut {
            subnet_file: opts.subnet_file.clone(),
            ip_masq: opts.ip_masq,
        },
        notes: Default::default(),
    };
    cni::install_plugin(&opts.cni)?;
    check_cni_plugins(&shared, &opts.cni, &probe);
    let changes = agent.apply_full(&cluster).await?;
    if migrating {
        upgrade::carry_state(&opts.pin_dir, &mut lock(&shared).dp.maps)?;
        upgrade::fault("after-fill");
    }
    {
        let mut s = lock(&shared);
        s.reload.last_reload_ok = true;
        s.reload.last_reload_unix = now();
        s.reload.revision = revision;
        info!(
            node = %opts.node,
            iface = %iface.name,
            mode = cluster.encap.name(),
            pod_mtu = s.dp.pod_mtu(),
            adopted = adopting,
            ?changes,
            "cluster state applied"
        );
        attach(&mut s, &opts, &iface)?;
    }
    if migrating {
        // The old programs stopped counting at the swap: what they counted is added now.
        upgrade::carry_counters(&opts.pin_dir, &mut lock(&shared).dp.maps)?;
        upgrade::fault("after-swap");
        upgrade::finish(&opts.pin_dir)?;
        info!(
            "migration complete: this build's programs and maps hold the node; the old maps are gone"
        );
    }
    tokio::spawn(watch_underlay(shared.clone(), nl.clone(), health.clone()));
    health.notify_one();
    {
        let etcd = matches!(opts.source, Source::Etcd(_)).then(|| etcd_status.clone());
        let shared = shared.clone();
        probe.set_metrics(move || metrics_body(&shared, etcd.as_deref()));
        probe.set_ready();
    }

    let rulesets = (opts.host_routing == HostRouting::AcceptedFlows).then(|| {
        ruleset::keep_tcp_tracking_liberal();
        ruleset::watch()
    });
    serve(agent, rx, rulesets, probe, opts.ip_masq).await
}

/// A netfilter ruleset change: accepted flows are judged again from their next packet on.
/// Notifications of one transaction that are already queued count as this one change.
fn ruleset_changed(
    shared: &SharedRef,
    change: ruleset::Change,
    rx: &mut mpsc::Receiver<ruleset::Change>,
) {
    while rx.try_recv().is_ok() {}
    ruleset::keep_tcp_tracking_liberal();
    let mut s = lock(shared);
    s.ruleset_changes += 1;
    match s.dp.bump_ruleset_gen() {
        Ok(generation) => tracing::debug!(
            ?change,
            generation,
            "netfilter ruleset changed: accepted flows are judged again"
        ),
        Err(e) => warn!("netfilter ruleset changed, but the new generation was not written: {e}"),
    }
}

/// Finishes or undoes an interrupted migration, compares the pins with this build, and loads
/// the programs: their maps beside the pinned ones when those must be migrated.
fn load(opts: &AgentOptions) -> anyhow::Result<(upgrade::Pins, aya::Ebpf)> {
    upgrade::recover(&opts.pin_dir)?;
    let pins = upgrade::check(&opts.pin_dir, opts.max_nodes)?;
    let migrating = matches!(pins, upgrade::Pins::Migrate { .. });
    if let upgrade::Pins::Migrate { abi, why } = &pins {
        info!(
            from_abi = abi,
            to_abi = maps_common::ABI_VERSION,
            "the pinned maps differ from this build's ({why}): building new maps beside them; the old programs forward until the new ones take over"
        );
    }
    let mut ebpf = loader::load(&LoadOptions {
        max_nodes: opts.max_nodes,
        log_level: opts.log_level,
        pin_dir: Some(opts.pin_dir.clone()),
        maps_dir: if migrating { upgrade::PENDING } else { "maps" },
    })?;
    if opts.log_level > 0 {
        start_kernel_logs(&mut ebpf);
    }
    Ok((pins, ebpf))
}

/// Starts the cluster source; for etcd, returns its prefix and the keys it keeps.
fn start_source(
    source: &Source,
    tx: mpsc::Sender<Update>,
    etcd_status: &Arc<Mutex<EtcdStatus>>,
) -> Option<(String, etcd::Kvs)> {
    match source {
        Source::File { path } => {
            let source = watch::file_source(path.clone(), tx);
            tokio::spawn(async move {
                if let Err(e) = source.await {
                    error!("cluster file source stopped: {e:#}");
                }
            });
            None
        }
        Source::Etcd(e) => {
            if let Some(reg) = &e.register {
                tokio::spawn(etcd::keep_registered(e.clone(), reg.clone()));
            }
            let kvs = Arc::new(Mutex::new(BTreeMap::new()));
            tokio::spawn(etcd::watch(e.clone(), tx, etcd_status.clone(), kvs.clone()));
            Some((e.prefix.trim_end_matches('/').to_string(), kvs))
        }
    }
}

/// The first good state and its revision: a bad cluster file at start is an error; etcd is
/// waited for.
async fn first_state(
    rx: &mut mpsc::Receiver<Update>,
    source: &Source,
    etcd: Option<&(String, etcd::Kvs)>,
    parse: &dyn Fn(anyhow::Result<String>) -> anyhow::Result<Cluster>,
) -> anyhow::Result<(Cluster, i64)> {
    loop {
        let (state, revision) = match rx.recv().await.context("cluster source stopped")? {
            Update::Full { text, revision, .. } => (parse(text), revision),
            Update::EtcdRead { revision } => (etcd_state(etcd, parse), revision),
            Update::Leases { .. } => continue,
        };
        match (state, source) {
            (Ok(c), _) => return Ok((c, revision)),
            (Err(e), Source::File { .. }) => return Err(e),
            (Err(e), Source::Etcd(_)) => {
                warn!("cluster state in etcd not usable yet: {e:#}");
            }
        }
    }
}

/// Pins the pod program, moves pods' hooks to it, attaches the underlay's programs and
/// records what runs.
fn attach(s: &mut Shared, opts: &AgentOptions, iface: &net::Iface) -> anyhow::Result<()> {
    loader::pin_pod_programs(&mut s.ebpf, &opts.pin_dir)?;
    let tc_mode = s.tc_mode;
    let pod_ifaces: Vec<String> =
        s.dp.maps
            .endpoints
            .iter()
            .flatten()
            .filter_map(|(_, e)| net::if_name(e.ifindex))
            .collect();
    loader::reattach_pods(&mut s.ebpf, &opts.pin_dir, tc_mode, &pod_ifaces)?;
    let (hook, why) = loader::attach(
        &mut s.ebpf,
        &iface.name,
        opts.decap,
        iface.virtual_dev,
        tc_mode,
        &opts.pin_dir,
    )?;
    info!(
        pin_dir = %opts.pin_dir.display(),
        decap = ?hook,
        decap_reason = why,
        host_routing = opts.host_routing.name(),
        bypass = opts.host_routing.bypass(),
        tc_attach = tc_mode.name(),
        "programs attached; pod MTU for this mode is {}",
        s.dp.pod_mtu()
    );
    s.decap = Some(hook);
    s.record();
    Ok(())
}

/// Applies what the source sends, reconciles routes every 30 s and the masquerade rules every
/// 5 s (with `ip_masq`), until SIGTERM or SIGINT.
async fn serve(
    mut agent: Agent,
    mut rx: mpsc::Receiver<Update>,
    mut rulesets: Option<mpsc::Receiver<ruleset::Change>>,
    probe: Arc<http::Probe>,
    ip_masq: bool,
) -> anyhow::Result<()> {
    let shared = agent.shared.clone();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut reconcile = tokio::time::interval(Duration::from_secs(30));
    reconcile.tick().await;
    // flanneld re-checks its rules every 5 s: someone may have flushed them.
    let mut masq = tokio::time::interval(Duration::from_secs(5));
    masq.tick().await;
    let mut plugins = tokio::time::interval(CNI_PLUGIN_CHECK);
    plugins.tick().await;
    loop {
        tokio::select! {
            u = rx.recv() => match u {
                Some(u) => agent.handle(u).await,
                None => break,
            },
            _ = reconcile.tick() => {
                let (want, ifindex) = {
                    let s = lock(&shared);
                    (s.dp.routes(), s.dp.local.iface.ifindex)
                };
                agent.routes.reconcile(&want, ifindex).await;
            }
            Some(change) = async { rulesets.as_mut()?.recv().await }, if rulesets.is_some() => {
                ruleset_changed(&shared, change, rulesets.as_mut().expect("watched"));
            }
            _ = masq.tick(), if ip_masq => {
                if let Err(e) = agent.flannel.apply(&lock(&shared).dp) {
                    warn!("masquerade rules: {e:#}");
                }
            }
            _ = plugins.tick() => check_cni_plugins(&shared, &agent.cni, &probe),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    {
        let mut s = lock(&shared);
        s.stopping = true;
        s.record();
    }
    info!("stopping; programs stay attached and forwarding from their pins");
    Ok(())
}

fn start_kernel_logs(ebpf: &mut aya::Ebpf) {
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(mut logger) => {
            std::thread::spawn(move || {
                loop {
                    logger.flush();
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
        Err(e) => warn!("kernel logs unavailable: {e}"),
    }
}

/// How often the CNI bin directory is looked at again for the reference plugins.
const CNI_PLUGIN_CHECK: Duration = Duration::from_secs(10);

/// Looks for the reference CNI plugins the configuration list names; says so (log, `/readyz`,
/// `datapath status`) when some are missing, and again when they come.
fn check_cni_plugins(shared: &SharedRef, cni_opts: &CniOptions, probe: &http::Probe) {
    let mask = cni::missing_plugins(cni_opts);
    let mut s = lock(shared);
    if mask == s.cni_missing {
        return;
    }
    s.cni_missing = mask;
    s.record();
    if mask == 0 {
        info!(dir = %cni_opts.bin_dir.display(), "the reference CNI plugins are there now");
        probe.set_cni_problem(None);
        return;
    }
    let why = format!(
        "CNI plugins {} missing from {}: no pod can be created on this node; install the reference plugins (containernetworking-plugins) there",
        cni::plugin_names(mask).join(", "),
        cni_opts.bin_dir.display()
    );
    warn!("{why}");
    probe.set_cni_problem(Some(why));
}

/// How a cluster's encapsulation reads in the log.
fn mode_text(s: &Settings) -> String {
    let mode = match s.encap {
        cluster::Encap::Vxlan => format!("vxlan (vni {}, port {})", s.vni, s.port),
        cluster::Encap::Ipip => "ipip".to_string(),
    };
    format!("{mode}, crossSubnet {}", s.cross_subnet)
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

/// Keeps each peer's reachability flag in step with the kernel's routes toward it: checked
/// after every change of the underlay's routes or links (netlink notifications), after new
/// peers, and every 30 s (neighbour resolution fails without a route change). Every route,
/// link or neighbour notification, and every 30 s check, also invalidates the programs'
/// next-hop cache (`DP_NEXTHOPS`).
async fn watch_underlay(shared: SharedRef, nl: Netlink, wake: Arc<Notify>) {
    let kick = wake.clone();
    let cache = shared.clone();
    tokio::spawn(async move {
        let events = net::route_events(move |event| {
            // Any change may move a peer's next hop: the programs look each up again at once.
            if let Err(e) = lock(&cache).dp.bump_underlay_gen() {
                warn!("underlay changed, but the next-hop cache was not invalidated: {e}");
            }
            if event == net::UnderlayEvent::Route {
                kick.notify_one();
            }
        });
        if let Err(e) = events.await {
            warn!("underlay route notifications unavailable, checking every 30 s: {e:#}");
        }
    });
    loop {
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        // Let a burst of route changes settle before looking.
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Err(e) = check_peers(&shared, &nl).await {
            warn!("checking peer reachability: {e:#}");
        }
        // Bounds the cache's age where notifications are missing or were lost.
        if let Err(e) = lock(&shared).dp.bump_underlay_gen() {
            warn!("the next-hop cache was not invalidated: {e}");
        }
    }
}

/// Asks the kernel's FIB about every peer and marks the unreachable ones.
async fn check_peers(shared: &SharedRef, nl: &Netlink) -> anyhow::Result<()> {
    let peers = lock(shared).dp.peer_addrs();
    let failed = nl.failed_neighbours().await?;
    let mut verdicts = Vec::with_capacity(peers.len());
    for (name, addr, was_down) in peers {
        let down = match nl.route_to(addr).await? {
            PeerPath::NoRoute => true,
            PeerPath::Reachable { gateway, oif } => {
                failed.contains(&(oif, gateway.unwrap_or(addr)))
            }
        };
        if down != was_down {
            verdicts.push((name, addr, down));
        }
    }
    let mut s = lock(shared);
    for (name, addr, down) in verdicts {
        if s.dp.set_unreachable(&name, down)? {
            if down {
                warn!(peer = %name, %addr, "peer unreachable: no route toward it; its pods' traffic is dropped and counted until there is");
            } else {
                info!(peer = %name, %addr, "peer reachable again");
            }
        }
    }
    Ok(())
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

fn metrics_body(shared: &SharedRef, etcd: Option<&Mutex<EtcdStatus>>) -> String {
    use crate::stats::Extra::{Counter, Gauge};
    let s = lock(shared);
    let r = &s.reload;
    let mut extra = vec![
        Gauge(
            "datapath_last_reload_timestamp_seconds",
            "Unix time of the last reload",
            r.last_reload_unix,
        ),
        Gauge(
            "datapath_last_reload_success",
            "1 when the last reload applied, 0 when it was rejected",
            f64::from(u8::from(r.last_reload_ok)),
        ),
        Counter("datapath_reloads", "Cluster states received", r.reloads),
        Counter(
            "datapath_reload_failures",
            "Cluster states rejected (the last good state stayed)",
            r.failures,
        ),
        Gauge(
            "datapath_pod_mtu",
            "MTU pods on this node should use",
            f64::from(s.dp.pod_mtu()),
        ),
        Gauge(
            "datapath_nodes_skipped",
            "Nodes of the last state left out as incomplete or unreadable",
            r.skipped as f64,
        ),
        Counter(
            "datapath_ruleset_changes",
            "Changes of the host's netfilter ruleset seen; each one has accepted flows judged again",
            s.ruleset_changes,
        ),
    ];
    if let Some(etcd) = etcd {
        let e = etcd.lock().expect("lock").clone();
        extra.extend([
            Gauge(
                "datapath_etcd_connected",
                "1 while the etcd watch is connected",
                f64::from(u8::from(e.connected)),
            ),
            Counter(
                "datapath_etcd_resyncs",
                "Full reads of etcd after a lost connection",
                e.resyncs,
            ),
            Gauge(
                "datapath_etcd_revision",
                "etcd revision last seen",
                e.revision as f64,
            ),
            Gauge(
                "datapath_etcd_applied_revision",
                "etcd revision of the state applied",
                r.revision as f64,
            ),
        ]);
    }
    match Snapshot::read(&s.dp.maps) {
        Ok(snap) => snap.render_openmetrics(&extra),
        Err(e) => format!("# error reading maps: {e}\n# EOF\n"),
    }
}

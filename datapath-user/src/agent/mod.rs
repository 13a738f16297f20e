//! `datapath run`: load or adopt the datapath, keep it in step with the cluster state through
//! the reconciler, watch the underlay, serve probes and metrics, and leave everything pinned
//! and forwarding when stopped. This file wires the rooms together; each does its own work.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{info, warn};

use crate::{
    bgp,
    cluster::{Cluster, Defaults, Limits},
    kernel::{
        host,
        loader::{self, DecapHook, LoadOptions},
        maps::DatapathMaps,
        pin_tree, pods, upgrade,
    },
    observe::http,
    outputs::{Outputs, cni::CniOptions, flannel},
    reconcile::{
        Reconciler,
        dataplane::{Dataplane, LocalOptions},
        routes::Routes,
        state::{ReloadState, Shared, SharedRef, lock, now},
    },
    source::{
        self, Source, Update,
        etcd::{self, EtcdStatus},
    },
    underlay::{
        netlink::{self, Netlink},
        ruleset,
    },
};

mod health;
mod metrics;
mod serve;
mod underlay;

pub use crate::reconcile::dataplane::HostRouting;

/// `datapath run`'s flags: the options the agent runs with, as parsed.
#[derive(clap::Args, Clone, Debug)]
pub struct AgentOptions {
    #[command(flatten)]
    pub source: Source,
    /// This node's name in the cluster state [default: the host name]. A state without
    /// it (leases flanneld wrote name no node) is searched for one of this host's
    /// addresses.
    #[arg(long)]
    pub node: Option<String>,
    /// Where to write Flannel's subnet.env (FLANNEL_NETWORK, FLANNEL_SUBNET, FLANNEL_MTU,
    /// FLANNEL_IPMASQ), which the pods' CNI setup on a Flannel node reads.
    #[arg(long, default_value = "/run/flannel/subnet.env")]
    pub subnet_file: PathBuf,
    /// Masquerade pod traffic leaving the cluster network, as flanneld's --ip-masq (needs
    /// the iptables tool on the node).
    #[arg(long)]
    pub ip_masq: bool,
    /// Underlay interface; defaults to the one that holds the node's address.
    #[arg(long)]
    pub iface: Option<String>,
    /// Directory (on bpffs, mounted if needed) for pinned maps and links.
    #[arg(long, default_value = loader::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Serve /healthz, /readyz and /metrics (Prometheus) on this address, e.g. 0.0.0.0:9464.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Where decapsulation runs (auto: native XDP on NICs that have it, TC on veth and
    /// other virtual devices; the log says which and why).
    #[arg(long, value_enum, default_value = "auto")]
    pub decap: DecapHook,
    /// accepted-flows: the first packets of every pod flow go through the host's routing
    /// and netfilter (iptables, nftables: NetworkPolicy), and only the flows netfilter
    /// forwarded then go straight between the pod's veth and the underlay, judged again
    /// when the ruleset changes; bpf: every pod-to-remote-pod packet skips the host's
    /// routing and netfilter (for nodes whose policy is enforced elsewhere); kernel:
    /// everything through the host's stack.
    #[arg(long, value_enum, default_value = "accepted-flows")]
    pub host_routing: HostRouting,
    /// How TC programs are attached: tcx (kernel 6.6+), netlink (clsact filters, older
    /// kernels), or auto (tcx where the kernel has it).
    #[arg(long, value_enum, default_value = "auto")]
    pub tc_attach: loader::TcAttach,
    #[command(flatten)]
    pub cni: CniOptions,
    #[command(flatten)]
    pub bgp: bgp::BgpOptions,
    /// Agent log level (error, warn, info, debug, trace); debug and trace also turn on the
    /// kernel programs' logs.
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Entries of the per-node maps.
    #[arg(long, default_value_t = maps_common::DEFAULT_MAX_NODES)]
    pub max_nodes: u32,
    /// Do not require a decapsulated packet's inner source to lie in the sender's pod CIDR.
    #[arg(long)]
    pub no_inner_src_check: bool,
    /// Events for `datapath monitor` each CPU may send a second (a token bucket in the
    /// programs; a flood of bad packets costs this many events, the rest are counted as
    /// limited).
    #[arg(long, default_value_t = maps_common::DEFAULT_EVENT_RATE)]
    pub monitor_rate: u32,
    /// Events each CPU may send at once before the rate applies.
    #[arg(long, default_value_t = maps_common::DEFAULT_EVENT_BURST)]
    pub monitor_burst: u32,
    /// Seconds between two rounds of the node-to-node health probe (every tunnel peer, each
    /// family, through the tunnel and over the underlay), as cilium-health's interval.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub health_interval: u64,
    /// Ignored: the cluster file is watched with inotify (kept so older command lines run).
    #[arg(long, hide = true)]
    pub watch_ms: Option<u64>,
    #[command(flatten)]
    pub mode: Defaults,
}

impl AgentOptions {
    /// The kernel programs' log level: on only with debug and trace.
    fn kernel_log_level(&self) -> u8 {
        match self.log_level.as_str() {
            "trace" => 5,
            "debug" => 4,
            _ => 0,
        }
    }
}

/// This node's name: `--node`, else the host name, as kubelet and flanneld use.
fn node_name(opts: &AgentOptions) -> anyhow::Result<String> {
    match &opts.node {
        Some(n) => Ok(n.clone()),
        None => flannel::host_name(),
    }
}

/// This node's own lease in etcd when `--register` asks for one. It names its node only when
/// told to (flanneld's leases name none); its public IP is `--public-ip`, else `--iface`'s
/// address, else (as flanneld) the address of the default route's interface.
async fn registration(
    opts: &AgentOptions,
    nl: &Netlink,
) -> anyhow::Result<Option<etcd::Registration>> {
    let e = &opts.source.etcd;
    if !e.register {
        return Ok(None);
    }
    let public_ip = match (e.public_ip, &opts.iface) {
        (Some(ip), _) => ip,
        (None, Some(name)) => nl
            .iface(name)
            .await?
            .addr
            .with_context(|| format!("{name} has no IPv4 address"))?,
        (None, None) => nl.default_iface().await?.addr.context(
            "the default route's interface has no IPv4 address: give --public-ip or --iface",
        )?,
    };
    Ok(Some(etcd::Registration {
        node: opts.node.clone(),
        pod_cidr: e.pod_cidr,
        public_ip,
        public_ipv6: e.public_ipv6,
        pod_cidr6: e.pod_cidr6,
        ttl_secs: e.lease_ttl,
    }))
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(opts: AgentOptions) -> anyhow::Result<()> {
    host::check_privileges()?;
    let probe = http::Probe::new("waiting for the first cluster state");
    if let Some(addr) = opts.metrics {
        http::serve(addr, probe.clone()).await?;
    }
    let node = node_name(&opts)?;
    let nl = Netlink::connect()?;
    let etcd_status = Arc::new(Mutex::new(EtcdStatus::default()));
    let (tx, mut rx) = mpsc::channel::<Update>(64);
    let register = registration(&opts, &nl).await?;
    let snapshot = source::start(&opts.source, register, tx, &etcd_status);
    // A lease flanneld wrote names no node: this node's is the one with one of its addresses.
    let limits = Limits {
        max_nodes: opts.max_nodes,
        own_node: Some(node.clone()),
        own_addrs: nl.addresses().await?,
    };
    let checks = (opts.mode.clone(), limits);
    let (cluster, revision) =
        first_state(&mut rx, &opts.source, snapshot.as_ref(), &checks).await?;
    let own = cluster.own.clone().unwrap_or_else(|| node.clone());
    let me = cluster.node(&own).context("own node")?.clone();
    let iface = match &opts.iface {
        Some(name) => nl.iface(name).await?,
        None => nl.iface_with_addr(me.address).await?,
    };
    host::ensure_bpffs(&opts.pin_dir)?;
    let Some(_node_lock) = take_node(&opts.pin_dir, &probe).await? else {
        return Ok(()); // stopped while waiting for the node
    };
    let local = LocalOptions {
        node: own,
        iface: iface.clone(),
        inner_src_check: !opts.no_inner_src_check,
        max_nodes: opts.max_nodes,
        csum_ifindex: 0,
        host_routing: opts.host_routing,
    };
    let (shared, pins) = bring_up(&opts, local)?;
    let tc_mode = opts.tc_attach.resolve();
    let cni = opts.cni.placed(&opts.pin_dir, tc_mode);
    let outputs = Outputs::new(cni.clone(), opts.subnet_file.clone(), opts.ip_masq);
    let routes = Routes::read(nl.clone()).await?;
    let mut reconciler = Reconciler::new(shared.clone(), routes, outputs, checks, snapshot);
    serve::check_cni_plugins(&shared, &cni, &probe);
    let bird = opts.bgp.bird(&opts.pin_dir);
    adopt_fabric(&shared, &bird);
    first_apply(&mut reconciler, &opts, &pins, (&cluster, revision)).await?;
    let speaker = bgp::SpeakerRef::default();
    let (fabric_tx, fabric_rx) = mpsc::channel(4);
    tokio::spawn(bgp::supervise(
        shared.clone(),
        opts.bgp.clone(),
        bird,
        reconciler.speaker.clone(),
        fabric_tx,
        speaker.clone(),
    ));
    reconciler.speaker.notify_one();
    let period = std::time::Duration::from_secs(opts.health_interval);
    tokio::spawn(health::watch(shared.clone(), nl.clone(), period));
    tokio::spawn(underlay::watch(
        shared.clone(),
        nl,
        reconciler.health.clone(),
    ));
    reconciler.health.notify_one();
    {
        let etcd = opts.source.is_etcd().then(|| etcd_status.clone());
        let shared = shared.clone();
        probe.set_metrics(move || metrics::body(&shared, etcd.as_deref(), &speaker));
        probe.set_ready();
    }
    let rulesets = (opts.host_routing == HostRouting::AcceptedFlows).then(|| {
        ruleset::keep_tcp_tracking_liberal();
        ruleset::watch()
    });
    serve::serve(reconciler, rx, rulesets, fabric_rx, probe).await
}

/// A BIRD an earlier agent started may be running with the fabric's routes: peers it says the
/// fabric routes stay native from the first state on (no detour through a tunnel).
fn adopt_fabric(shared: &SharedRef, bird: &bgp::bird::Bird) {
    if !bird.alive() {
        return;
    }
    match bgp::sessions::read(&bird.socket()) {
        Ok(r) => {
            let routes = r.fabric_routes();
            info!(fabric_routes = routes.count(), dir = %bird.dir.display(), "BGP speaker already running: adopted");
            if let Err(e) = lock(shared).dp.set_fabric(routes) {
                warn!("recording the fabric's routes: {e}");
            }
        }
        Err(e) => warn!("reading the running BGP speaker: {e:#}"),
    }
}

/// Loads (or adopts, or migrates beside) the programs and opens their maps.
fn bring_up(
    opts: &AgentOptions,
    local: LocalOptions,
) -> anyhow::Result<(SharedRef, upgrade::Pins)> {
    let (pins, mut ebpf) = load(opts)?;
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
    Ok((shared, pins))
}

/// Applies the first state, fills the new maps from the old ones when migrating, attaches
/// the programs, and finishes the migration.
async fn first_apply(
    reconciler: &mut Reconciler,
    opts: &AgentOptions,
    pins: &upgrade::Pins,
    (cluster, revision): (&Cluster, i64),
) -> anyhow::Result<()> {
    let shared = reconciler.shared.clone();
    let migrating = matches!(pins, upgrade::Pins::Migrate { .. });
    let changes = reconciler.apply_full(cluster).await?;
    let ifaces = reconciler.routes.nl.ifaces().await?;
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
            node = %s.dp.local.node,
            iface = %s.dp.local.iface.name,
            mode = cluster.encap.name(),
            pod_mtu = s.dp.pod_mtu(),
            adopted = *pins == upgrade::Pins::Current,
            ?changes,
            "cluster state applied"
        );
        attach(&mut s, opts, &ifaces)?;
        s.dp.maps
            .write_monitor_limit(opts.monitor_rate, opts.monitor_burst)?;
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
    Ok(())
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
        log_level: opts.kernel_log_level(),
        pin_dir: Some(opts.pin_dir.clone()),
        maps_dir: if migrating {
            pin_tree::MAPS_PENDING
        } else {
            pin_tree::MAPS
        },
    })?;
    if opts.kernel_log_level() > 0 {
        start_kernel_logs(&mut ebpf);
    }
    Ok((pins, ebpf))
}

/// The first good state and its revision: a bad cluster file at start is an error; etcd is
/// waited for.
async fn first_state(
    rx: &mut mpsc::Receiver<Update>,
    source: &Source,
    etcd: Option<&source::etcd::Snapshot>,
    (defaults, limits): &(Defaults, Limits),
) -> anyhow::Result<(Cluster, i64)> {
    let check = |raw: anyhow::Result<_>| -> anyhow::Result<Cluster> {
        Ok(crate::cluster::validate(raw?, defaults, limits)?)
    };
    loop {
        let (state, revision) = match rx.recv().await.context("cluster source stopped")? {
            Update::Full {
                state, revision, ..
            } => (check(state), revision),
            // Leases before any whole state: the whole state etcd holds is read instead.
            Update::Leases { revision, .. } => match etcd {
                Some(e) => (check(e.whole()), revision),
                None => continue,
            },
        };
        match state {
            Ok(c) => return Ok((c, revision)),
            Err(e) if !source.is_etcd() => return Err(e),
            Err(e) => warn!("cluster state in etcd not usable yet: {e:#}"),
        }
    }
}

/// Pins the pod program, moves pods' hooks to it, attaches the underlay's programs and
/// records what runs.
fn attach(s: &mut Shared, opts: &AgentOptions, ifaces: &[netlink::Iface]) -> anyhow::Result<()> {
    let iface = s.dp.local.iface.clone();
    pods::pin_pod_programs(&mut s.ebpf, &opts.pin_dir)?;
    let tc_mode = s.tc_mode;
    let pod_ifaces: Vec<String> =
        s.dp.maps
            .endpoints
            .iter()
            .flatten()
            .filter_map(|(_, e)| ifaces.iter().find(|i| i.ifindex == e.ifindex))
            .map(|i| i.name.clone())
            .collect();
    pods::reattach_pods(&mut s.ebpf, &opts.pin_dir, tc_mode, &pod_ifaces)?;
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

//! `datapath run`: load or adopt the datapath, keep its maps and routes in step with the
//! cluster file (watched, and reloaded on SIGHUP), serve metrics, and leave everything pinned
//! and forwarding when stopped.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    signal::unix::{SignalKind, signal},
};
use tracing::{error, info, warn};

use crate::{
    cluster::{self, Cluster, Defaults, Limits},
    etcd::{self, EtcdStatus},
    loader::{self, DecapHook, LoadOptions},
    maps::{self, Changes, DatapathMaps, LocalOptions},
    net,
    stats::Snapshot,
};

/// Where the cluster state comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A cluster file, checked every `interval` and on SIGHUP.
    File { path: PathBuf, interval: Duration },
    /// Flannel's layout in etcd, watched.
    Etcd(etcd::EtcdOptions),
}

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub source: Source,
    pub node: String,
    pub iface: Option<String>,
    pub pin_dir: PathBuf,
    pub metrics: Option<SocketAddr>,
    pub decap: DecapHook,
    pub log_level: u8,
    pub max_nodes: u32,
    pub inner_src_check: bool,
    pub defaults: Defaults,
}

/// Reload bookkeeping exported as metrics.
#[derive(Default)]
struct ReloadState {
    last_reload_unix: f64,
    last_reload_ok: bool,
    reloads: u64,
    failures: u64,
    pod_mtu: u32,
    /// etcd revision of the state last applied.
    revision: i64,
}

struct Shared {
    maps: DatapathMaps,
    reload: ReloadState,
    /// The loaded object: the checksum device's drop program is attached from it on reloads.
    ebpf: aya::Ebpf,
    pin_dir: PathBuf,
    /// Whether the checksum device (`net::CSUM_DEV`) exists with this agent's drop program on
    /// it; `None` until the first sync has made sure either way (an earlier agent may have
    /// left it).
    csum_dev: Option<bool>,
}

fn file_stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Computes the desired state for `cluster` and applies it to the kernel VXLAN device of the
/// checksum path, the maps and the routes.
fn sync(shared: &mut Shared, cluster: &Cluster, local: &LocalOptions) -> anyhow::Result<Changes> {
    let mut local = local.clone();
    local.csum_ifindex = sync_csum_device(shared, cluster)?;
    let (want, mut changes) = shared.maps.sync(cluster, &local)?;
    maps::apply_routes(&want.routes, &mut changes)?;
    shared.reload.pod_mtu = want.pod_mtu;
    if local.csum_ifindex == 0 && shared.csum_dev != Some(false) {
        // Only after DP_CONFIG no longer names the device.
        loader::detach_csum_dev(&shared.pin_dir);
        net::remove_csum_device()?;
        shared.csum_dev = Some(false);
    }
    Ok(changes)
}

/// VXLAN with outer UDP checksums sends GSO packets through a kernel VXLAN device in metadata
/// mode, the one way to get a checksum in every segment; this creates it (with its drop program
/// at ingress) when the cluster asks for checksums and returns its ifindex, 0 otherwise.
fn sync_csum_device(shared: &mut Shared, cluster: &Cluster) -> anyhow::Result<u32> {
    if cluster.encap != cluster::Encap::Vxlan || !cluster.udp_checksum {
        return Ok(0);
    }
    let (ifindex, fresh) = net::ensure_csum_device(cluster.port)?;
    if fresh || shared.csum_dev != Some(true) {
        loader::attach_csum_dev(&mut shared.ebpf, net::CSUM_DEV, fresh, &shared.pin_dir)?;
        shared.csum_dev = Some(true);
    }
    Ok(ifindex)
}

/// One cluster state from a source, as cluster text (or why there is none), why it came, and
/// the etcd revision it reflects (0 for the file). Both sources go through one parser.
pub struct Update {
    pub text: anyhow::Result<String>,
    pub reason: &'static str,
    pub revision: i64,
}

/// Reads the cluster file now, then whenever it changes or SIGHUP arrives.
async fn file_source(
    path: PathBuf,
    interval: Duration,
    tx: tokio::sync::mpsc::Sender<Update>,
) -> anyhow::Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(interval);
    let mut stamp = file_stamp(&path);
    let mut reason = "start";
    loop {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading cluster file {}", path.display()));
        if tx
            .send(Update {
                text,
                reason,
                revision: 0,
            })
            .await
            .is_err()
        {
            return Ok(());
        }
        reason = loop {
            tokio::select! {
                _ = hup.recv() => break "SIGHUP",
                _ = tick.tick() => {
                    let now = file_stamp(&path);
                    if now != stamp {
                        stamp = now;
                        break "file changed";
                    }
                }
            }
        };
    }
}

pub async fn run(opts: AgentOptions) -> anyhow::Result<()> {
    let limits = Limits {
        max_nodes: opts.max_nodes,
        own_node: Some(opts.node.clone()),
    };
    let etcd_status = Arc::new(Mutex::new(EtcdStatus::default()));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Update>(16);
    match &opts.source {
        Source::File { path, interval } => {
            let source = file_source(path.clone(), *interval, tx);
            tokio::spawn(async move {
                if let Err(e) = source.await {
                    error!("cluster file source stopped: {e:#}");
                }
            });
        }
        Source::Etcd(e) => {
            if let Some(reg) = &e.register {
                tokio::spawn(etcd::keep_registered(e.clone(), reg.clone()));
            }
            tokio::spawn(etcd::watch(e.clone(), tx, etcd_status.clone()));
        }
    }
    let parse = |text: anyhow::Result<String>| -> anyhow::Result<Cluster> {
        Ok(cluster::parse(&text?, &opts.defaults, &limits)?)
    };
    // The first good state: a bad cluster file at start is an error; etcd is waited for.
    let (cluster, revision) = loop {
        let u = rx.recv().await.context("cluster source stopped")?;
        match (parse(u.text), &opts.source) {
            (Ok(c), _) => break (c, u.revision),
            (Err(e), Source::File { .. }) => return Err(e),
            (Err(e), Source::Etcd(_)) => {
                warn!("cluster state in etcd not usable yet: {e:#}");
            }
        }
    };
    let me = cluster.node(&opts.node).context("own node")?.clone();
    let iface = match &opts.iface {
        Some(name) => net::iface(name)?,
        None => net::iface_with_addr(me.address)?,
    };
    let local = LocalOptions {
        node: opts.node.clone(),
        iface: iface.clone(),
        inner_src_check: opts.inner_src_check,
        max_nodes: opts.max_nodes,
        csum_ifindex: 0,
    };

    loader::ensure_bpffs(&opts.pin_dir)?;
    let adopting = loader::map_pin_path(&opts.pin_dir, maps_common::map_names::CONFIG).exists();
    let mut ebpf = loader::load(&LoadOptions {
        max_nodes: opts.max_nodes,
        log_level: opts.log_level,
        pin_dir: Some(opts.pin_dir.clone()),
    })?;
    if opts.log_level > 0 {
        match aya_log::EbpfLogger::init(&mut ebpf) {
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
    let maps = DatapathMaps::take(&mut ebpf)?;
    let shared = Arc::new(Mutex::new(Shared {
        maps,
        reload: ReloadState::default(),
        ebpf,
        pin_dir: opts.pin_dir.clone(),
        csum_dev: None,
    }));
    shared.lock().expect("lock").reload.revision = revision;
    {
        let mut s = shared.lock().expect("lock");
        let changes = sync(&mut s, &cluster, &local)?;
        s.reload.last_reload_ok = true;
        s.reload.last_reload_unix = now();
        info!(
            node = %opts.node,
            iface = %iface.name,
            mode = cluster.encap.name(),
            pod_mtu = s.reload.pod_mtu,
            adopted = adopting,
            ?changes,
            "cluster state applied"
        );
    }
    loader::attach(
        &mut shared.lock().expect("lock").ebpf,
        &iface.name,
        opts.decap,
        &opts.pin_dir,
    )?;
    info!(
        pin_dir = %opts.pin_dir.display(),
        decap = ?opts.decap,
        "programs attached; pod MTU for this mode is {}",
        shared.lock().expect("lock").reload.pod_mtu
    );

    if let Some(addr) = opts.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics on {addr}"))?;
        info!(%addr, "serving metrics");
        let shared = shared.clone();
        let etcd = matches!(opts.source, Source::Etcd(_)).then(|| etcd_status.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    continue;
                };
                let body = metrics_body(&shared, etcd.as_deref());
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = sock.read(&mut buf).await;
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                });
            }
        });
    }

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        let update = tokio::select! {
            u = rx.recv() => match u {
                Some(u) => u,
                None => break,
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        let reason = update.reason;
        let mut s = shared.lock().expect("lock");
        s.reload.reloads += 1;
        s.reload.last_reload_unix = now();
        match parse(update.text).and_then(|c| sync(&mut s, &c, &local)) {
            Ok(changes) => {
                s.reload.last_reload_ok = true;
                s.reload.revision = update.revision;
                info!(
                    reason,
                    revision = update.revision,
                    ?changes,
                    "cluster state applied"
                );
            }
            Err(e) => {
                s.reload.last_reload_ok = false;
                s.reload.failures += 1;
                error!(
                    reason,
                    "cluster state rejected, last good state stays: {e:#}"
                );
            }
        }
    }
    info!("stopping; programs stay attached and forwarding from their pins");
    Ok(())
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

fn metrics_body(shared: &Mutex<Shared>, etcd: Option<&Mutex<EtcdStatus>>) -> String {
    let s = shared.lock().expect("lock");
    let mut extra = vec![
        (
            "datapath_last_reload_timestamp_seconds".to_string(),
            s.reload.last_reload_unix,
        ),
        (
            "datapath_last_reload_success".to_string(),
            if s.reload.last_reload_ok { 1.0 } else { 0.0 },
        ),
        (
            "datapath_reloads_total".to_string(),
            s.reload.reloads as f64,
        ),
        (
            "datapath_reload_failures_total".to_string(),
            s.reload.failures as f64,
        ),
        ("datapath_pod_mtu".to_string(), s.reload.pod_mtu as f64),
    ];
    if let Some(etcd) = etcd {
        let e = etcd.lock().expect("lock").clone();
        extra.extend([
            (
                "datapath_etcd_connected".to_string(),
                if e.connected { 1.0 } else { 0.0 },
            ),
            ("datapath_etcd_resyncs_total".to_string(), e.resyncs as f64),
            ("datapath_etcd_revision".to_string(), e.revision as f64),
            (
                "datapath_etcd_applied_revision".to_string(),
                s.reload.revision as f64,
            ),
        ]);
    }
    match Snapshot::read(&s.maps) {
        Ok(snap) => snap.render_prometheus(&extra),
        Err(e) => format!("# error reading maps: {e}\n"),
    }
}

//! Cluster state from etcd in Flannel's subnet-lease layout: read the prefix whole (a raw
//! state for the one validation step), watch it from the revision read and pass lease changes
//! on as they come, reconnect and resync after an outage, and optionally keep this node's
//! lease.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, TlsOptions, WatchOptions,
};
use tokio::sync::mpsc;
use tracing::{info, warn};

mod layout;
mod register;

use layout::subnets_prefix;
pub use layout::{NetConfig, compose, delta, lease_key, lease_node, subnet_range};
use register::keep_registered;

use super::{Reason, Update};
use crate::cluster::{Cidr, Cidr6, raw::RawState};

/// The keys under the prefix and their values, as the watcher last saw them; shared with the
/// agent, which composes a whole state from it when a delta cannot stand alone.
pub type Kvs = Arc<Mutex<BTreeMap<String, String>>>;

/// The prefix and the keys the watcher keeps: the whole state is composed from them again
/// when a delta of lease events cannot stand alone.
#[derive(Clone)]
pub struct Snapshot {
    pub prefix: String,
    pub kvs: Kvs,
}

impl Snapshot {
    pub fn whole(&self) -> anyhow::Result<RawState> {
        compose(&self.prefix, &self.kvs.lock().expect("etcd kvs"))
    }
}

/// Starts the watcher (and the registration, when asked) and returns what it keeps.
pub fn start(
    opts: &EtcdOptions,
    register: Option<Registration>,
    tx: mpsc::Sender<Update>,
    status: &Arc<Mutex<EtcdStatus>>,
) -> Snapshot {
    if let Some(reg) = register {
        tokio::spawn(keep_registered(opts.clone(), reg));
    }
    let kvs = Arc::new(Mutex::new(BTreeMap::new()));
    tokio::spawn(watch(opts.clone(), tx, status.clone(), kvs.clone()));
    Snapshot {
        prefix: opts.prefix.trim_end_matches('/').to_string(),
        kvs,
    }
}

/// Where the agent finds the cluster in etcd and how it talks to it (`datapath run`'s etcd
/// flags).
#[derive(clap::Args, Clone, Debug)]
pub struct EtcdOptions {
    /// Read the cluster from etcd instead, in Flannel's layout (`<prefix>/config`,
    /// `<prefix>/subnets/<a.b.c.d-len>`), watched: comma-separated URLs.
    #[arg(id = "etcd_endpoints", long = "etcd-endpoints", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// The etcd key prefix of Flannel's layout (flanneld's --etcd-prefix).
    #[arg(long = "etcd-prefix", default_value = "/coreos.com/network")]
    pub prefix: String,
    /// TLS: CA bundle that signed the etcd servers' certificates.
    #[arg(long = "etcd-cafile")]
    pub ca: Option<PathBuf>,
    /// TLS: client certificate and key.
    #[arg(
        id = "etcd_certfile",
        long = "etcd-certfile",
        requires = "etcd_keyfile"
    )]
    pub cert: Option<PathBuf>,
    /// TLS: the client certificate's private key.
    #[arg(id = "etcd_keyfile", long = "etcd-keyfile", requires = "etcd_certfile")]
    pub key: Option<PathBuf>,
    /// Write and keep alive this node's own lease (as flanneld does): for `--pod-cidr`, or
    /// else the lease that already carries this node's public IP, or else a free subnet
    /// of the config's Network claimed atomically.
    #[arg(long, requires = "etcd_endpoints")]
    pub register: bool,
    /// This node's pod CIDR, for `--register`.
    #[arg(long)]
    pub pod_cidr: Option<Cidr>,
    /// This node's underlay address, for `--register`; default: the address of `--iface`.
    #[arg(long)]
    pub public_ip: Option<Ipv4Addr>,
    /// This node's IPv6 underlay address, for `--register` with a config that has
    /// `EnableIPv6` (flanneld's `--public-ipv6`): the lease claims an IPv6 subnet of
    /// `IPv6Network` with its IPv4 one, in one key (`10.244.1.0-24&fd00:10:244:1::-64`).
    #[arg(long = "public-ipv6", requires = "register")]
    pub public_ipv6: Option<Ipv6Addr>,
    /// This node's IPv6 pod CIDR, for `--register` with `--pod-cidr` and `--public-ipv6`.
    #[arg(long = "pod-cidr-v6", requires = "pod_cidr")]
    pub pod_cidr6: Option<Cidr6>,
    /// TTL of the registered lease, in seconds; renewed every third of it.
    #[arg(long, default_value_t = 60)]
    pub lease_ttl: i64,
}

/// This node's lease, as flanneld writes its own.
#[derive(Clone, Debug)]
pub struct Registration {
    /// `NodeName` written into the lease (`--node`); none when not given, as flanneld writes.
    pub node: Option<String>,
    /// This node's pod CIDR; `None`: reuse the lease that carries `public_ip`, or claim a free
    /// subnet of the config's `Network`, as flanneld does.
    pub pod_cidr: Option<Cidr>,
    pub public_ip: Ipv4Addr,
    /// The IPv6 half (`--public-ipv6`, `--pod-cidr-v6`): registered when the config enables
    /// IPv6.
    pub public_ipv6: Option<Ipv6Addr>,
    pub pod_cidr6: Option<Cidr6>,
    pub ttl_secs: i64,
}

/// What the watcher reports to the agent's metrics.
#[derive(Clone, Debug, Default)]
pub struct EtcdStatus {
    pub connected: bool,
    /// Full reads after the first one: each follows a lost connection.
    pub resyncs: u64,
    /// Revision of the newest state sent to the agent.
    pub revision: i64,
}

pub(super) async fn connect(opts: &EtcdOptions) -> anyhow::Result<Client> {
    let mut co = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    if opts.ca.is_some() || opts.cert.is_some() {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &opts.ca {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        if let (Some(cert), Some(key)) = (&opts.cert, &opts.key) {
            let c = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
            let k = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
            tls = tls.identity(Identity::from_pem(c, k));
        }
        co = co.with_tls(tls);
    }
    Ok(Client::connect(&opts.endpoints, Some(co)).await?)
}

/// Reads the prefix whole, then sends the state for every watch response, for ever: on any
/// error it reconnects (backing off from 200 ms up to 5 s) and reads the prefix whole again at
/// a new revision, from which it watches on, so no change made meanwhile is missed.
pub async fn watch(
    opts: EtcdOptions,
    tx: mpsc::Sender<Update>,
    status: Arc<Mutex<EtcdStatus>>,
    kvs: Kvs,
) {
    const FIRST_RETRY: Duration = Duration::from_millis(200);
    let mut backoff = FIRST_RETRY;
    loop {
        let Err(err) = watch_once(&opts, &tx, &status, &kvs).await else {
            return; // the agent went away
        };
        if std::mem::replace(&mut status.lock().expect("lock").connected, false) {
            warn!("etcd connection lost, datapath keeps its last good state: {err:#}");
            backoff = FIRST_RETRY;
        } else {
            warn!("etcd unreachable, retrying in {backoff:?}: {err:#}");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Sends the whole state `kvs` holds at `revision`; false when the agent is gone.
async fn send_full(
    tx: &mpsc::Sender<Update>,
    prefix: &str,
    kvs: &Kvs,
    reason: Reason,
    revision: i64,
) -> bool {
    let state = compose(prefix, &kvs.lock().expect("etcd kvs"));
    let update = Update::Full {
        state,
        reason,
        revision,
    };
    tx.send(update).await.is_ok()
}

/// One connection: a full read, then the watch from the revision after it. `Ok` only when the
/// agent is gone.
async fn watch_once(
    opts: &EtcdOptions,
    tx: &mpsc::Sender<Update>,
    status: &Mutex<EtcdStatus>,
    kvs: &Kvs,
) -> anyhow::Result<()> {
    let mut client = connect(opts).await?;
    let prefix = opts.prefix.trim_end_matches('/').to_string();
    let (mut revision, read) = read_prefix(&mut client, &prefix).await?;
    let keys = read.len();
    *kvs.lock().expect("etcd kvs") = read;
    {
        let mut s = status.lock().expect("lock");
        s.connected = true;
        // etcd revisions start at 1: a revision seen before means this read follows a loss.
        if s.revision != 0 {
            s.resyncs += 1;
            info!(
                revision,
                keys, "etcd reconnected; resynced from a full read"
            );
        } else {
            info!(revision, keys, "etcd state read");
        }
        s.revision = revision;
    }
    if !send_full(tx, &prefix, kvs, Reason::EtcdRead, revision).await {
        return Ok(());
    }
    let mut stream = client
        .watch(
            prefix.clone(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await?;
    let subnets = subnets_prefix(&prefix);
    while let Some(resp) = stream.message().await? {
        if resp.canceled() {
            anyhow::bail!("watch canceled (compacted at {})", resp.compact_revision());
        }
        if resp.events().is_empty() {
            continue;
        }
        let mut events = Vec::new();
        {
            let mut kvs = kvs.lock().expect("etcd kvs");
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let key = kv.key_str()?.to_string();
                let value = match ev.event_type() {
                    EventType::Put => Some(kv.value_str()?.to_string()),
                    EventType::Delete => None,
                };
                match &value {
                    Some(v) => kvs.insert(key.clone(), v.clone()),
                    None => kvs.remove(&key),
                };
                events.push((key, value));
            }
        }
        revision = resp.header().map(|h| h.revision()).unwrap_or(revision);
        status.lock().expect("lock").revision = revision;
        // Lease changes go on as they are; anything else (the config) changes every node.
        let sent = if events.iter().all(|(k, _)| k.starts_with(&subnets)) {
            tx.send(Update::Leases { events, revision }).await.is_ok()
        } else {
            send_full(tx, &prefix, kvs, Reason::EtcdChange, revision).await
        };
        if !sent {
            return Ok(());
        }
    }
    anyhow::bail!("watch stream ended")
}

/// Reads every key under the prefix; returns the revision and the keys.
pub(super) async fn read_prefix(
    client: &mut Client,
    prefix: &str,
) -> anyhow::Result<(i64, BTreeMap<String, String>)> {
    let prefix = prefix.trim_end_matches('/').to_string();
    let resp = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let kvs = resp
        .kvs()
        .iter()
        .filter_map(|kv| {
            Some((
                kv.key_str().ok()?.to_string(),
                kv.value_str().ok()?.to_string(),
            ))
        })
        .collect();
    Ok((revision, kvs))
}

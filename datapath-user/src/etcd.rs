//! Cluster state from etcd in Flannel's subnet-lease layout: read the prefix whole (cluster text
//! for the same parser as the file), watch it from the revision read and pass lease changes on
//! as they come, reconnect and resync after an outage, and optionally keep this node's lease.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, PutOptions, TlsOptions,
    WatchOptions,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    agent::Update,
    cluster::{self, Cidr, Node, Problem},
};

/// The keys under the prefix and their values, as the watcher last saw them; shared with the
/// agent, which composes a whole state from it when a delta cannot stand alone.
pub type Kvs = Arc<Mutex<BTreeMap<String, String>>>;

/// Where the agent finds the cluster in etcd and how it talks to it.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    /// Flannel's `--etcd-prefix`, `/coreos.com/network` by default.
    pub prefix: String,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// This node's own lease, written and kept alive when set.
    pub register: Option<Registration>,
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

/// `<prefix>/config`, Flannel's network configuration.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetConfig {
    /// The cluster's pod network, e.g. `10.244.0.0/16`.
    #[serde(default)]
    network: Option<String>,
    /// Prefix length of each node's subnet, and the first and last subnet to hand out.
    #[serde(default)]
    subnet_len: Option<u8>,
    #[serde(default)]
    subnet_min: Option<String>,
    #[serde(default)]
    subnet_max: Option<String>,
    #[serde(default)]
    backend: Backend,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Backend {
    #[serde(rename = "Type")]
    kind: Option<String>,
    #[serde(rename = "VNI")]
    vni: Option<u32>,
    port: Option<u16>,
    /// Flannel's name for what Calico calls CrossSubnet.
    direct_routing: Option<bool>,
}

/// `<prefix>/subnets/<a.b.c.d-len>`, one node's lease. `NodeName` is this agent's addition;
/// Flannel ignores it, and leases without it are named by their public IP.
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
struct Lease {
    #[serde(rename = "PublicIP")]
    public_ip: String,
    #[serde(default)]
    backend_type: Option<String>,
    #[serde(default)]
    backend_data: Option<LeaseBackendData>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node_name: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
struct LeaseBackendData {
    #[serde(rename = "VtepMAC", default, skip_serializing_if = "Option::is_none")]
    vtep_mac: Option<String>,
}

fn subnets_prefix(prefix: &str) -> String {
    format!("{}/subnets/", prefix.trim_end_matches('/'))
}

fn config_key(prefix: &str) -> String {
    format!("{}/config", prefix.trim_end_matches('/'))
}

/// The key of a lease: `10.244.1.0/24` -> `<prefix>/subnets/10.244.1.0-24`.
pub fn lease_key(prefix: &str, cidr: &Cidr) -> String {
    format!("{}{}-{}", subnets_prefix(prefix), cidr.addr, cidr.len)
}

/// Turns the keys under the prefix into cluster text (JSON in the cluster-file format) and the
/// leases left out: one that cannot be read is that node's problem, named by its key. Fails
/// only without a readable config.
pub fn compose(
    prefix: &str,
    kvs: &BTreeMap<String, String>,
) -> anyhow::Result<(String, Vec<Problem>)> {
    let config = net_config(prefix, kvs)?;
    let encap = config
        .backend
        .kind
        .as_deref()
        .unwrap_or("vxlan")
        .to_lowercase();
    let sp = subnets_prefix(prefix);
    let (mut nodes, mut skipped) = (Vec::new(), Vec::new());
    for (key, value) in kvs.range(sp.clone()..) {
        if !key.starts_with(&sp) {
            break;
        }
        match lease_node(prefix, key, value) {
            Ok(n) => nodes.push(json!({
                "name": n.name,
                "address": n.address.to_string(),
                "podCIDR": n.pod_cidr.to_string(),
                "vtepMAC": cluster::format_mac(&n.vtep_mac),
            })),
            Err(e) => {
                let text = format!("{e:#}");
                let reason = text
                    .strip_prefix(&format!("{key}: "))
                    .unwrap_or(&text)
                    .to_string();
                skipped.push(Problem {
                    path: key.clone(),
                    reason,
                });
            }
        }
    }
    let mut doc = json!({
        "encapsulation": encap,
        "crossSubnet": config.backend.direct_routing.unwrap_or(false),
        "vxlan": {
            "vni": config.backend.vni.unwrap_or(1),
            "port": config.backend.port.unwrap_or(maps_common::VXLAN_PORT_LINUX),
        },
        "nodes": nodes,
    });
    if let Some(network) = config.network {
        doc["clusterCIDR"] = json!(network);
    }
    Ok((doc.to_string(), skipped))
}

fn net_config(prefix: &str, kvs: &BTreeMap<String, String>) -> anyhow::Result<NetConfig> {
    let ck = config_key(prefix);
    serde_json::from_str(
        kvs.get(&ck)
            .with_context(|| format!("{ck}: missing (Flannel's network configuration)"))?,
    )
    .with_context(|| format!("{ck}: not Flannel's network configuration"))
}

/// The pod CIDR a lease key names: `<prefix>/subnets/10.244.1.0-24` -> 10.244.1.0/24.
fn key_cidr(prefix: &str, key: &str) -> anyhow::Result<Cidr> {
    let subnet = key
        .strip_prefix(&subnets_prefix(prefix))
        .with_context(|| format!("{key}: not a subnet lease key"))?;
    subnet
        .replacen('-', "/", 1)
        .parse()
        .map_err(|e| anyhow::anyhow!("{key}: {e}"))
}

/// One lease as a node: named by its `NodeName`, else its `PublicIP`; VTEP MAC from its
/// backend data, else derived from the address as the file source does.
pub fn lease_node(prefix: &str, key: &str, value: &str) -> anyhow::Result<Node> {
    let lease: Lease = serde_json::from_str(value)
        .with_context(|| format!("{key}: not a Flannel subnet lease"))?;
    let address: std::net::Ipv4Addr = lease.public_ip.parse().map_err(|_| {
        anyhow::anyhow!(
            "{key}: PublicIP {:?} is not an IPv4 address",
            lease.public_ip
        )
    })?;
    let vtep_mac = match lease.backend_data.and_then(|d| d.vtep_mac) {
        Some(m) => cluster::parse_mac(&m).map_err(|e| anyhow::anyhow!("{key}: VtepMAC {e}"))?,
        None => cluster::derived_vtep_mac(address),
    };
    Ok(Node {
        index: 0,
        name: lease.node_name.unwrap_or_else(|| lease.public_ip.clone()),
        address,
        prefix_len: None,
        pod_cidr: key_cidr(prefix, key)?,
        vtep_mac,
    })
}

/// Lease events as a change of nodes: a put replaces the node named in it (and whichever other
/// node held that CIDR), a delete removes the CIDR's owner (`owner_of`). Fails on anything
/// that is not a lease event (the config key) or not a lease: the caller then reads the
/// whole state instead.
pub fn delta(
    prefix: &str,
    events: &[(String, Option<String>)],
    owner_of: impl Fn(&Cidr) -> Option<String>,
) -> anyhow::Result<(Vec<Node>, Vec<String>)> {
    let (mut upserts, mut removes) = (Vec::<Node>::new(), Vec::new());
    for (key, value) in events {
        let cidr = key_cidr(prefix, key)?;
        match value {
            Some(v) => {
                let n = lease_node(prefix, key, v)?;
                if let Some(o) = owner_of(&cidr).filter(|o| *o != n.name) {
                    removes.push(o);
                }
                upserts.retain(|u| u.name != n.name);
                upserts.push(n);
            }
            None => {
                upserts.retain(|u| u.pod_cidr != cidr);
                removes.extend(owner_of(&cidr));
            }
        }
    }
    removes.retain(|r| !upserts.iter().any(|u| u.name == *r));
    Ok((upserts, removes))
}

async fn connect(opts: &EtcdOptions) -> anyhow::Result<Client> {
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

/// Tells the agent to read the whole state `kvs` holds at `revision`; false when it is gone.
async fn send_full(tx: &mpsc::Sender<Update>, revision: i64) -> bool {
    tx.send(Update::EtcdRead { revision }).await.is_ok()
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
    if !send_full(tx, revision).await {
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
            send_full(tx, revision).await
        };
        if !sent {
            return Ok(());
        }
    }
    anyhow::bail!("watch stream ended")
}

/// Writes this node's lease with a TTL and keeps it alive, as flanneld does; writes it again
/// under a new lease whenever the old one is lost (etcd restarted, TTL ran out while away).
/// Without a pod CIDR of its own it reuses the lease that carries its public IP, or claims a
/// free subnet of the config's `Network` in a transaction (so two nodes never get one).
pub async fn keep_registered(opts: EtcdOptions, reg: Registration) {
    let mut claimed: Option<Cidr> = reg.pod_cidr;
    loop {
        if let Err(e) = register_once(&opts, &reg, &mut claimed).await {
            warn!("etcd lease of this node: {e:#}; registering again");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The lease value this node writes, as flanneld writes its own (plus `NodeName`).
fn lease_value(reg: &Registration, backend: &Backend) -> String {
    serde_json::to_string(&Lease {
        public_ip: reg.public_ip.to_string(),
        backend_type: Some(backend.kind.clone().unwrap_or_else(|| "vxlan".into())),
        backend_data: Some(LeaseBackendData {
            vtep_mac: Some(cluster::format_mac(&cluster::derived_vtep_mac(
                reg.public_ip,
            ))),
        }),
        node_name: reg.node.clone(),
    })
    .expect("lease serializes")
}

async fn register_once(
    opts: &EtcdOptions,
    reg: &Registration,
    claimed: &mut Option<Cidr>,
) -> anyhow::Result<()> {
    let mut client = connect(opts).await?;
    let lease = client.lease_grant(reg.ttl_secs, None).await?.id();
    let key = match *claimed {
        Some(cidr) if reg.pod_cidr.is_some() => {
            let kvs = read_prefix(&mut client, &opts.prefix).await?.1;
            let value = lease_value(reg, &net_config(&opts.prefix, &kvs)?.backend);
            let key = lease_key(&opts.prefix, &cidr);
            client
                .put(
                    key.clone(),
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                )
                .await?;
            key
        }
        _ => {
            let cidr = claim(&mut client, opts, reg, *claimed, lease).await?;
            *claimed = Some(cidr);
            lease_key(&opts.prefix, &cidr)
        }
    };
    info!(key, ttl = reg.ttl_secs, "registered this node's lease");
    let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
    let every = Duration::from_secs((reg.ttl_secs as u64 / 3).max(1));
    loop {
        keeper.keep_alive().await?;
        match stream.message().await? {
            Some(r) if r.ttl() > 0 => {}
            _ => anyhow::bail!("lease expired"),
        }
        tokio::time::sleep(every).await;
    }
}

/// Reads every key under the prefix; returns the revision and the keys.
async fn read_prefix(
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

/// Claims this node's subnet under `lease`: the one it held before or whose lease carries its
/// public IP (taken over only if unchanged since read), else the first free one of the
/// config's range (created only if nobody has it). Each claim is one etcd transaction; a lost
/// race tries the next subnet.
async fn claim(
    client: &mut Client,
    opts: &EtcdOptions,
    reg: &Registration,
    before: Option<Cidr>,
    lease: i64,
) -> anyhow::Result<Cidr> {
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    for _ in 0..16 {
        let (_, kvs) = read_prefix(client, &opts.prefix).await?;
        let config = net_config(&opts.prefix, &kvs)?;
        let value = lease_value(reg, &config.backend);
        let put = |key: &str| {
            TxnOp::put(
                key,
                value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )
        };
        let sp = subnets_prefix(&opts.prefix);
        let mine = kvs.iter().find(|(k, v)| {
            k.starts_with(&sp)
                && serde_json::from_str::<Lease>(v)
                    .is_ok_and(|l| l.public_ip == reg.public_ip.to_string())
        });
        if let Some((key, old)) = mine {
            let cidr = key_cidr(&opts.prefix, key)?;
            let txn = Txn::new()
                .when(vec![Compare::value(
                    key.as_str(),
                    CompareOp::Equal,
                    old.as_str(),
                )])
                .and_then(vec![put(key)]);
            if client.txn(txn).await?.succeeded() {
                info!(%cidr, "took over the subnet lease that carries this node's public IP");
                return Ok(cidr);
            }
            continue;
        }
        let taken: std::collections::HashSet<String> =
            kvs.keys().filter(|k| k.starts_with(&sp)).cloned().collect();
        let range = subnet_range(&config)?;
        let free = before
            .into_iter()
            .chain(range)
            .find(|c| !taken.contains(&lease_key(&opts.prefix, c)))
            .context("no free subnet left in the config's Network")?;
        let key = lease_key(&opts.prefix, &free);
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![put(&key)]);
        if client.txn(txn).await?.succeeded() {
            info!(cidr = %free, "claimed a free subnet");
            return Ok(free);
        }
    }
    anyhow::bail!("could not claim a subnet: every try lost a race")
}

/// The subnets flanneld hands out: `SubnetLen` (24, or the network's length + 2 for networks
/// smaller than a /22) from `SubnetMin` (the second subnet) to `SubnetMax` (the last).
pub fn subnet_range(config: &NetConfig) -> anyhow::Result<impl Iterator<Item = Cidr> + use<>> {
    let network: Cidr = config
        .network
        .as_deref()
        .context("the config has no Network to claim a subnet from")?
        .parse()
        .map_err(|e| anyhow::anyhow!("the config's Network: {e}"))?;
    let len = config.subnet_len.unwrap_or(if network.len > 22 {
        network.len + 2
    } else {
        24
    });
    anyhow::ensure!(
        len >= network.len && len <= 30,
        "SubnetLen {len} does not fit in Network {network}"
    );
    let step = 1u64 << (32 - len);
    let (first, last) = network.range();
    let bound =
        |s: &Option<String>, default: u64| -> anyhow::Result<u64> {
            match s {
                None => Ok(default),
                Some(a) => Ok(u32::from(a.parse::<Ipv4Addr>().map_err(|_| {
                    anyhow::anyhow!("SubnetMin/SubnetMax {a:?} is not an IPv4 address")
                })?) as u64),
            }
        };
    let min = bound(&config.subnet_min, first as u64 + step)?;
    let max = bound(&config.subnet_max, last as u64 + 1 - step)?;
    Ok((min..=max).step_by(step as usize).map(move |a| Cidr {
        addr: Ipv4Addr::from(a as u32),
        len,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn flannel_layout_becomes_cluster_text() {
        let p = "/coreos.com/network";
        let text = compose(
            p,
            &kvs(&[
                (
                    "/coreos.com/network/config",
                    r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":1,"Port":8472}}"#,
                ),
                (
                    "/coreos.com/network/subnets/10.244.1.0-24",
                    r#"{"PublicIP":"192.168.1.11","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"66:00:00:00:00:0b"}}"#,
                ),
            ]),
        )
        .unwrap()
        .0;
        let c = cluster::parse(
            &text,
            &cluster::Defaults::default(),
            &cluster::Limits {
                max_nodes: 10,
                own_node: Some("192.168.1.11".into()),
                own_addrs: Vec::new(),
            },
        )
        .unwrap();
        assert_eq!((c.encap, c.vni, c.port), (cluster::Encap::Vxlan, 1, 8472));
        assert_eq!(c.nodes[0].pod_cidr.to_string(), "10.244.1.0/24");
        assert_eq!(c.nodes[0].vtep_mac, [0x66, 0, 0, 0, 0, 0x0b]);
    }

    #[test]
    fn a_bad_lease_is_skipped_and_named() {
        let (text, skipped) = compose(
            "/p",
            &kvs(&[
                ("/p/config", r#"{"Backend":{"Type":"ipip"}}"#),
                ("/p/subnets/10.244.1.0-24", "{"),
                (
                    "/p/subnets/10.244.2.0-24",
                    r#"{"PublicIP":"192.168.1.12","BackendType":"ipip"}"#,
                ),
            ]),
        )
        .unwrap();
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].path, "/p/subnets/10.244.1.0-24");
        assert!(skipped[0].reason.starts_with("not a Flannel subnet lease"));
        assert!(text.contains("10.244.2.0/24") && !text.contains("10.244.1.0/24"));
        let e = compose("/p", &kvs(&[])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/p/config: missing (Flannel's network configuration)"
        );
    }

    #[test]
    fn subnets_are_handed_out_as_flanneld_does() {
        let config = |json: &str| serde_json::from_str::<NetConfig>(json).unwrap();
        let all: Vec<String> = subnet_range(&config(r#"{"Network":"10.244.0.0/16"}"#))
            .unwrap()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(all.first().unwrap(), "10.244.1.0/24");
        assert_eq!(all.last().unwrap(), "10.244.255.0/24");
        assert_eq!(all.len(), 255);
        let small: Vec<String> = subnet_range(&config(
            r#"{"Network":"10.10.0.0/24","SubnetMin":"10.10.0.128"}"#,
        ))
        .unwrap()
        .map(|c| c.to_string())
        .collect();
        assert_eq!(small, ["10.10.0.128/26", "10.10.0.192/26"]);
    }
}

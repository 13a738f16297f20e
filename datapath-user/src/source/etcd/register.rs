//! This node's own lease in etcd, as flanneld keeps its own: written with a TTL and kept alive,
//! written again under a new lease when the old one is lost; a free subnet (and with
//! `EnableIPv6` and `--public-ipv6`, a free IPv6 subnet beside it, in the same key) claimed in
//! one transaction so that two nodes never get one.
use std::{collections::HashSet, time::Duration};

use anyhow::Context as _;
use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use tracing::info;

use super::{
    EtcdOptions, Registration, connect,
    layout::{
        Lease, LeaseBackendData, NetConfig, key_cidr, key_cidr6, lease_key_dual, net_config,
        subnet_range, subnet6_range, subnets_prefix,
    },
    read_prefix,
};
use crate::cluster::{self, Cidr, Cidr6, six::derived_vtep_mac6};

/// A claimed subnet: the IPv4 one and, dual-stack, the IPv6 one.
type Claim = (Cidr, Option<Cidr6>);

/// Writes this node's lease with a TTL and keeps it alive, as flanneld does; writes it again
/// under a new lease whenever the old one is lost (etcd restarted, TTL ran out while away).
/// Without a pod CIDR of its own it reuses the lease that carries its public IP, or claims a
/// free subnet of the config's `Network` in a transaction (so two nodes never get one).
pub async fn keep_registered(opts: EtcdOptions, reg: Registration) {
    let mut claimed: Option<Claim> = reg.pod_cidr.map(|c| (c, reg.pod_cidr6));
    loop {
        if let Err(e) = register_once(&opts, &reg, &mut claimed).await {
            tracing::warn!("etcd lease of this node: {e:#}; registering again");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Whether this registration has an IPv6 half the config asks for.
fn dual(reg: &Registration, config: &NetConfig) -> bool {
    config.enable_ipv6 && reg.public_ipv6.is_some()
}

/// The lease value this node writes, as flanneld writes its own (plus `NodeName`).
fn lease_value(reg: &Registration, config: &NetConfig) -> String {
    let six = reg.public_ipv6.filter(|_| dual(reg, config));
    let vtep = |mac: [u8; 6]| {
        Some(LeaseBackendData {
            vtep_mac: Some(cluster::format_mac(&mac)),
        })
    };
    serde_json::to_string(&Lease {
        public_ip: reg.public_ip.to_string(),
        backend_type: Some(
            config
                .backend
                .kind
                .clone()
                .unwrap_or_else(|| "vxlan".into()),
        ),
        backend_data: vtep(cluster::derived_vtep_mac(reg.public_ip)),
        node_name: reg.node.clone(),
        public_ipv6: six.map(|a| a.to_string()),
        backend_v6_data: six.and_then(|a| vtep(derived_vtep_mac6(a))),
    })
    .expect("lease serializes")
}

async fn register_once(
    opts: &EtcdOptions,
    reg: &Registration,
    claimed: &mut Option<Claim>,
) -> anyhow::Result<()> {
    let mut client = connect(opts).await?;
    let lease = client.lease_grant(reg.ttl_secs, None).await?.id();
    let key = match *claimed {
        Some((cidr, cidr6)) if reg.pod_cidr.is_some() => {
            let kvs = read_prefix(&mut client, &opts.prefix).await?.1;
            let value = lease_value(reg, &net_config(&opts.prefix, &kvs)?);
            let key = lease_key_dual(&opts.prefix, &cidr, cidr6.as_ref());
            let put = PutOptions::new().with_lease(lease);
            client.put(key.clone(), value, Some(put)).await?;
            key
        }
        _ => {
            let (cidr, cidr6) = claim(&mut client, opts, reg, *claimed, lease).await?;
            *claimed = Some((cidr, cidr6));
            lease_key_dual(&opts.prefix, &cidr, cidr6.as_ref())
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

/// Claims this node's subnet under `lease`: the one it held before or whose lease carries its
/// public IP (taken over only if unchanged since read), else the first free one of the
/// config's range (and of its IPv6 range, dual-stack), created only if nobody has it. Each
/// claim is one etcd transaction; a lost race tries the next subnet.
async fn claim(
    client: &mut Client,
    opts: &EtcdOptions,
    reg: &Registration,
    before: Option<Claim>,
    lease: i64,
) -> anyhow::Result<Claim> {
    for _ in 0..16 {
        let (_, kvs) = read_prefix(client, &opts.prefix).await?;
        let config = net_config(&opts.prefix, &kvs)?;
        let value = lease_value(reg, &config);
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
            let cidr = key_cidr(&opts.prefix, key).map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
            let cidr6 = key_cidr6(key).and_then(|c| c.parse().ok());
            let same = Compare::value(key.as_str(), CompareOp::Equal, old.as_str());
            let txn = Txn::new().when(vec![same]).and_then(vec![put(key)]);
            if client.txn(txn).await?.succeeded() {
                info!(%cidr, "took over the subnet lease that carries this node's public IP");
                return Ok((cidr, cidr6));
            }
            continue;
        }
        let keys: Vec<&String> = kvs.keys().filter(|k| k.starts_with(&sp)).collect();
        let (free, free6) = free_subnets(opts, reg, &config, &keys, before)?;
        let key = lease_key_dual(&opts.prefix, &free, free6.as_ref());
        let unused = Compare::create_revision(key.as_str(), CompareOp::Equal, 0);
        let txn = Txn::new().when(vec![unused]).and_then(vec![put(&key)]);
        if client.txn(txn).await?.succeeded() {
            let cidr6 = free6.map(|c| c.to_string()).unwrap_or_default();
            info!(cidr = %free, cidr6, "claimed a free subnet");
            return Ok((free, free6));
        }
    }
    anyhow::bail!("lost the race for a free subnet 16 times")
}

/// The first subnet no lease holds (the one held `before` first), and dual-stack the first
/// IPv6 subnet no lease holds; a lease key names both halves (`<v4>-<len>&<v6>-<len>`).
fn free_subnets(
    opts: &EtcdOptions,
    reg: &Registration,
    config: &NetConfig,
    keys: &[&String],
    before: Option<Claim>,
) -> anyhow::Result<Claim> {
    let taken: HashSet<Cidr> = keys
        .iter()
        .filter_map(|k| key_cidr(&opts.prefix, k).ok())
        .collect();
    let free = first_free(before.map(|b| b.0), subnet_range(config)?, &taken)
        .context("no free subnet left in the config's Network")?;
    if !dual(reg, config) {
        return Ok((free, None));
    }
    let taken6: HashSet<Cidr6> = keys
        .iter()
        .filter_map(|k| key_cidr6(k)?.parse().ok())
        .collect();
    let free6 = first_free(before.and_then(|b| b.1), subnet6_range(config)?, &taken6)
        .context("no free subnet left in the config's IPv6Network")?;
    Ok((free, Some(free6)))
}

/// The first of `before` (held already) and then `range` that is not `taken`.
fn first_free<T: Eq + std::hash::Hash>(
    before: Option<T>,
    range: impl Iterator<Item = T>,
    taken: &HashSet<T>,
) -> Option<T> {
    before.into_iter().chain(range).find(|c| !taken.contains(c))
}

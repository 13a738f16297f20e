//! Flannel's layout in etcd, read and written: the network configuration, the lease keys and
//! values, a whole prefix as a raw cluster state, lease events as a change of nodes, and the
//! subnets flanneld hands out.
use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::cluster::{
    self, Cidr, Cidr6, Node, Problem,
    raw::{NodeAt, Origin, RawNode, RawSettings, RawState},
};

/// `<prefix>/config`, Flannel's network configuration.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetConfig {
    /// The cluster's pod network, e.g. `10.244.0.0/16`.
    #[serde(default)]
    pub network: Option<String>,
    /// Prefix length of each node's subnet, and the first and last subnet to hand out.
    #[serde(default)]
    subnet_len: Option<u8>,
    #[serde(default)]
    subnet_min: Option<String>,
    #[serde(default)]
    subnet_max: Option<String>,
    #[serde(default)]
    pub(super) backend: Backend,
    /// This datapath's addition, which flanneld ignores: the cluster file's `bgp` block
    /// (`asNumber`, `nodeToNodeMesh`, `peers`), for Backend `host-gw` or any other.
    #[serde(default, rename = "BGP")]
    pub bgp: Option<cluster::bgp::RawBgp>,
    /// Flannel's dual-stack: leases then name an IPv6 subnet too, out of `IPv6Network`.
    #[serde(default, rename = "EnableIPv6")]
    pub enable_ipv6: bool,
    #[serde(default, rename = "IPv6Network")]
    pub ipv6_network: Option<String>,
    /// Prefix length of each node's IPv6 subnet (default 64).
    #[serde(default, rename = "IPv6SubnetLen")]
    ipv6_subnet_len: Option<u8>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct Backend {
    #[serde(rename = "Type")]
    pub(super) kind: Option<String>,
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
pub(super) struct Lease {
    #[serde(rename = "PublicIP")]
    pub(super) public_ip: String,
    #[serde(default)]
    pub(super) backend_type: Option<String>,
    #[serde(default)]
    pub(super) backend_data: Option<LeaseBackendData>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) node_name: Option<String>,
    /// A dual-stack lease's IPv6 address and IPv6 VTEP (`flannel-v6.<VNI>`).
    #[serde(
        rename = "PublicIPv6",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub(super) public_ipv6: Option<String>,
    #[serde(
        rename = "BackendV6Data",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub(super) backend_v6_data: Option<LeaseBackendData>,
}

#[derive(Debug, Deserialize, Serialize)]
pub(super) struct LeaseBackendData {
    #[serde(rename = "VtepMAC", default, skip_serializing_if = "Option::is_none")]
    pub(super) vtep_mac: Option<String>,
}

pub(super) fn subnets_prefix(prefix: &str) -> String {
    format!("{}/subnets/", prefix.trim_end_matches('/'))
}

fn config_key(prefix: &str) -> String {
    format!("{}/config", prefix.trim_end_matches('/'))
}

/// The key of a lease: `10.244.1.0/24` -> `<prefix>/subnets/10.244.1.0-24`.
pub fn lease_key(prefix: &str, cidr: &Cidr) -> String {
    format!("{}{}-{}", subnets_prefix(prefix), cidr.addr, cidr.len)
}

/// The key of a lease of both families: `<prefix>/subnets/10.244.1.0-24&fd00:10:244:1::-64`;
/// the IPv4 key alone without an IPv6 subnet.
pub(super) fn lease_key_dual(prefix: &str, cidr: &Cidr, cidr6: Option<&Cidr6>) -> String {
    match cidr6 {
        Some(c6) => format!("{}&{}-{}", lease_key(prefix, cidr), c6.addr, c6.len),
        None => lease_key(prefix, cidr),
    }
}

/// The IPv6 subnets flanneld hands out: `IPv6SubnetLen` (default 64) of `IPv6Network`, from
/// the second on.
pub(super) fn subnet6_range(
    config: &NetConfig,
) -> anyhow::Result<impl Iterator<Item = Cidr6> + use<>> {
    let network: Cidr6 = config
        .ipv6_network
        .as_deref()
        .context("the config enables IPv6 but has no IPv6Network to claim a subnet from")?
        .parse()
        .map_err(|e| anyhow::anyhow!("the config's IPv6Network: {e}"))?;
    let len = config.ipv6_subnet_len.unwrap_or(64);
    anyhow::ensure!(
        len >= network.len && len <= 126,
        "IPv6SubnetLen {len} does not fit in IPv6Network {network}"
    );
    let net = ipnet::Ipv6Net::new(network.addr, network.len).expect("checked when parsed");
    let subnets = net.subnets(len).expect("length checked above");
    Ok(subnets.skip(1).map(|n| Cidr6 {
        addr: n.network(),
        len: n.prefix_len(),
    }))
}

/// The keys under the prefix as a raw cluster state, in Flannel's terms: the config's backend
/// and network for the settings, one node per lease. A lease that cannot be read at all is
/// left out and named by its key. Fails only without a readable config.
pub fn compose(prefix: &str, kvs: &BTreeMap<String, String>) -> anyhow::Result<RawState> {
    let config = net_config(prefix, kvs)?;
    let sp = subnets_prefix(prefix);
    let (mut nodes, mut skipped) = (Vec::new(), Vec::new());
    for (key, value) in kvs.range(sp.clone()..) {
        if !key.starts_with(&sp) {
            break;
        }
        match lease_raw(prefix, nodes.len(), key, value) {
            Ok(n) => nodes.push(n),
            Err(p) => skipped.push(p),
        }
    }
    let b = &config.backend;
    Ok(RawState {
        origin: Origin::Etcd,
        settings: RawSettings {
            encap: Some(b.kind.as_deref().unwrap_or("vxlan").to_lowercase()),
            cross_subnet: Some(b.direct_routing.unwrap_or(false)),
            cluster_cidr: config.network.clone(),
            vni: Some(b.vni.unwrap_or(1)),
            port: Some(b.port.unwrap_or(maps_common::VXLAN_PORT_LINUX)),
            udp_checksum: None,
            bgp: config.bgp.clone(),
            cluster_cidr6: config.ipv6_network.clone().filter(|_| config.enable_ipv6),
        },
        nodes,
        problems: Vec::new(),
        skipped,
    })
}

pub(super) fn net_config(
    prefix: &str,
    kvs: &BTreeMap<String, String>,
) -> anyhow::Result<NetConfig> {
    let ck = config_key(prefix);
    serde_json::from_str(
        kvs.get(&ck)
            .with_context(|| format!("{ck}: missing (Flannel's network configuration)"))?,
    )
    .with_context(|| format!("{ck}: not Flannel's network configuration"))
}

/// The pod CIDR a lease key names: `<prefix>/subnets/10.244.1.0-24` -> 10.244.1.0/24.
pub(super) fn key_cidr(prefix: &str, key: &str) -> Result<Cidr, String> {
    let subnets = key
        .strip_prefix(&subnets_prefix(prefix))
        .ok_or_else(|| "not a subnet lease key".to_string())?;
    // A dual-stack lease names both subnets, IPv4 first: `10.244.1.0-24&fd00:10:244:1::-64`.
    let v4 = subnets.split('&').next().unwrap_or(subnets);
    v4.replacen('-', "/", 1).parse()
}

/// The IPv6 subnet a dual-stack lease key names after its `&`, as text (`fd00:10:244:1::/64`).
pub(super) fn key_cidr6(key: &str) -> Option<String> {
    let (_, v6) = key.split_once('&')?;
    Some(v6.replacen('-', "/", 1))
}

/// One lease as a raw node: named by its `NodeName`, else its `PublicIP`; its pod CIDR from
/// the key; VTEP MAC from its backend data (else derived from the address, in validation).
fn lease_raw(prefix: &str, index: usize, key: &str, value: &str) -> Result<RawNode, Problem> {
    let problem = |reason: String| Problem {
        path: key.to_string(),
        reason,
    };
    let lease: Lease = serde_json::from_str(value)
        .map_err(|e| problem(format!("not a Flannel subnet lease: {e}")))?;
    let cidr = key_cidr(prefix, key).map_err(problem)?;
    Ok(RawNode {
        as_number: None,
        index,
        at: NodeAt::Lease(key.to_string()),
        name: Some(lease.node_name.unwrap_or_else(|| lease.public_ip.clone())),
        address: Some(lease.public_ip),
        pod_cidr: Some(cidr.to_string()),
        vtep_mac: lease.backend_data.and_then(|d| d.vtep_mac),
        address6: lease.public_ipv6,
        pod_cidr6: key_cidr6(key),
        vtep_mac6: lease.backend_v6_data.and_then(|d| d.vtep_mac),
    })
}

/// One lease as a node, checked as validation checks any node.
pub fn lease_node(prefix: &str, key: &str, value: &str) -> anyhow::Result<Node> {
    let raw = lease_raw(prefix, 0, key, value).map_err(|p| anyhow::anyhow!("{p}"))?;
    cluster::validate_node(&raw).map_err(|problems| {
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("{}", text.join("; "))
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
        let cidr = key_cidr(prefix, key).map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
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
    let bound = |s: &Option<String>| -> anyhow::Result<Option<Ipv4Addr>> {
        s.as_deref()
            .map(|a| {
                a.parse::<Ipv4Addr>().map_err(|_| {
                    anyhow::anyhow!("SubnetMin/SubnetMax {a:?} is not an IPv4 address")
                })
            })
            .transpose()
    };
    let (min, max) = (bound(&config.subnet_min)?, bound(&config.subnet_max)?);
    let all: Vec<Cidr> = network.subnets(len).collect();
    let (first, last) = (all.get(1).map(|c| c.addr), all.last().map(|c| c.addr));
    let (min, max) = (min.or(first), max.or(last));
    Ok(all
        .into_iter()
        .filter(move |c| Some(c.addr) >= min && Some(c.addr) <= max))
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
        let raw = compose(
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
        .unwrap();
        let c = cluster::validate(
            raw,
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

    /// `raw` validated as node 192.168.1.11 (a lease flanneld wrote names no node).
    fn validated(raw: RawState) -> cluster::Cluster {
        let limits = cluster::Limits {
            max_nodes: 10,
            own_node: Some("192.168.1.11".into()),
            own_addrs: Vec::new(),
        };
        cluster::validate(raw, &cluster::Defaults::default(), &limits).unwrap()
    }

    #[test]
    fn host_gw_with_a_bgp_block_in_the_network_config() {
        let raw = compose(
            "/p",
            &kvs(&[
                (
                    "/p/config",
                    r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"},"BGP":{"asNumber":64600,"peers":[{"address":"192.168.1.1","asNumber":65000}]}}"#,
                ),
                (
                    "/p/subnets/10.244.1.0-24",
                    r#"{"PublicIP":"192.168.1.11","BackendType":"host-gw"}"#,
                ),
            ]),
        )
        .unwrap();
        let c = validated(raw);
        assert_eq!(c.encap, cluster::Encap::None);
        let b = c.bgp.as_ref().expect("bgp");
        assert_eq!((b.as_number, b.peers[0].as_number), (64600, 65000));
    }

    #[test]
    fn flannels_dual_stack_leases_give_both_halves() {
        let lease = r#"{"PublicIP":"192.168.1.11","PublicIPv6":"fd00::11","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"66:00:00:00:00:0b"},"BackendV6Data":{"VNI":1,"VtepMAC":"66:00:00:00:00:0c"}}"#;
        let raw = compose(
            "/p",
            &kvs(&[
                (
                    "/p/config",
                    r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#,
                ),
                ("/p/subnets/10.244.1.0-24&fd00:10:244:1::-64", lease),
                (
                    "/p/subnets/fd00:10:244:2::-64",
                    r#"{"PublicIP":"192.168.1.12","BackendType":"vxlan"}"#,
                ),
            ]),
        )
        .unwrap();
        let c = validated(raw);
        assert_eq!(c.nodes.len(), 1);
        assert_eq!(c.nodes[0].pod_cidr.to_string(), "10.244.1.0/24");
        let h = c.nodes[0].v6.expect("the lease's IPv6 half");
        assert_eq!(
            (h.address.to_string(), h.pod_cidr.to_string(), h.vtep_mac),
            (
                "fd00::11".into(),
                "fd00:10:244:1::/64".into(),
                [0x66, 0, 0, 0, 0, 0x0c]
            )
        );
        let net6: Vec<String> = c.cluster_cidrs6.iter().map(ToString::to_string).collect();
        assert_eq!(net6, ["fd00:10:244::/56"]);
        // An IPv6-only lease is skipped, with why.
        assert_eq!(c.skipped.len(), 1, "{:?}", c.skipped);
        assert!(c.skipped[0].reason.contains("IPv6 CIDR"), "{:?}", c.skipped);
        // Its events are applied as a dual-stack node too.
        let events = [(
            "/p/subnets/10.244.1.0-24&fd00:10:244:1::-64".to_string(),
            Some(lease.to_string()),
        )];
        let (up, _) = delta("/p", &events, |_| None).unwrap();
        assert_eq!(up[0].pod_cidr.to_string(), "10.244.1.0/24");
        assert_eq!(up[0].v6, Some(h));
    }

    #[test]
    fn a_bad_lease_is_skipped_and_named() {
        let raw = compose(
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
        let (skipped, cidrs): (Vec<_>, Vec<_>) = (
            raw.skipped.clone(),
            raw.nodes
                .iter()
                .filter_map(|n| n.pod_cidr.clone())
                .collect(),
        );
        let text = cidrs.join(",");
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

//! The one validation step: a raw state from any source, checked whole into a `Cluster`.
//! Every problem is reported with its path. A bad node rejects a cluster file; in live data
//! an incomplete node is skipped unless it is this one; conflicts always reject the state.
use std::{collections::HashMap, fmt, net::Ipv4Addr};

use super::{
    Cidr, Cidr6, Cluster, Defaults, Encap, Invalid, Limits, Node, Problem, Settings, bgp, cidr,
    derived_vtep_mac, parse_cidr_list, parse_mac,
    raw::{NodeField, Origin, RawNode, RawState, node_path},
    six,
};

/// The value a setting takes: the state's, else the flag's, else `fallback`; a warning when a
/// flag is overridden by a different value in the state.
fn setting<T: PartialEq + fmt::Display>(
    flag: &str,
    field: &str,
    state: Option<T>,
    given: Option<T>,
    fallback: T,
    warnings: &mut Vec<String>,
) -> T {
    match (state, given) {
        (Some(s), Some(g)) if s != g => {
            warnings.push(format!(
                "--{flag} {g} is overridden by the cluster state's {field} {s}"
            ));
            s
        }
        (Some(s), _) => s,
        (None, Some(g)) => g,
        (None, None) => fallback,
    }
}

/// The settings a cluster state resolves to. An encapsulation this datapath does not have is
/// recorded as a problem (the state is rejected) and stands as VXLAN meanwhile.
fn resolve_settings(
    raw: &RawState,
    defaults: &Defaults,
    problems: &mut Vec<Problem>,
    warnings: &mut Vec<String>,
) -> Settings {
    let s = &raw.settings;
    let flannel = matches!(raw.origin, Origin::FlannelNodeList | Origin::Etcd);
    let (vni_field, encap_field) = match raw.origin {
        Origin::File => ("vxlan.vni", "encapsulation"),
        Origin::Etcd => ("config Backend.VNI", "config Backend.Type"),
        _ => ("Flannel backend-data VNI", "Flannel backend-type"),
    };
    let stated = match s.encap.as_deref().map(str::parse::<Encap>) {
        Some(Err(reason)) => {
            problems.push(Problem {
                path: encap_field.into(),
                reason,
            });
            None
        }
        other => other.and_then(Result::ok),
    };
    let encap = setting(
        "encapsulation",
        encap_field,
        stated,
        defaults.encap,
        Encap::Vxlan,
        warnings,
    );
    let (vni0, port0) = if flannel {
        (1, maps_common::VXLAN_PORT_LINUX)
    } else {
        (4096, maps_common::VXLAN_PORT_IANA)
    };
    let (cluster_cidrs, cluster_cidrs6) = cluster_networks(raw, defaults, problems);
    Settings {
        cluster_cidrs6,
        encap,
        cross_subnet: setting(
            "cross-subnet",
            "crossSubnet",
            s.cross_subnet,
            defaults.cross_subnet.then_some(true),
            false,
            warnings,
        ),
        vni: setting("vni", vni_field, s.vni, defaults.vni, vni0, warnings),
        port: setting(
            "vxlan-port",
            "vxlan.port",
            s.port,
            defaults.port,
            port0,
            warnings,
        ),
        udp_checksum: setting(
            "vxlan-udp-checksum",
            "vxlan.udpChecksum",
            s.udp_checksum,
            defaults.udp_checksum.then_some(true),
            false,
            warnings,
        ),
        cluster_cidrs,
        bgp: None,
    }
}

/// The cluster's pod networks of both families: the state's, else the flag's (IPv4 only).
fn cluster_networks(
    raw: &RawState,
    defaults: &Defaults,
    problems: &mut Vec<Problem>,
) -> (Vec<Cidr>, Vec<Cidr6>) {
    let s = &raw.settings;
    let mut cluster_cidrs = defaults.cluster_cidrs.clone().unwrap_or_default();
    if let Some(list) = &s.cluster_cidr {
        match parse_cidr_list(list) {
            Ok(c) => cluster_cidrs = c,
            Err(reason) => problems.push(problem("clusterCIDR", reason)),
        }
    }
    let cluster_cidrs6 = match s.cluster_cidr6.as_deref().map(cidr::parse_list::<Cidr6>) {
        Some(Ok(c)) => c,
        Some(Err(reason)) => {
            problems.push(problem("clusterCIDRv6", reason));
            Vec::new()
        }
        None => Vec::new(),
    };
    (cluster_cidrs, cluster_cidrs6)
}

/// Checks a raw state whole: every problem is reported with its path. A bad node rejects a
/// cluster file; in live data (a NodeList, etcd) an incomplete node is skipped, unless it is
/// this node. Conflicts (two nodes claiming an address or overlapping pod CIDRs, a pod CIDR
/// holding node addresses) always reject the state.
pub fn validate(raw: RawState, defaults: &Defaults, limits: &Limits) -> Result<Cluster, Invalid> {
    let mut problems = raw.problems.clone();
    let mut warnings = Vec::new();
    let mut set = resolve_settings(&raw, defaults, &mut problems, &mut warnings);
    problems.extend(vxlan_problems(&set));
    let (nodes, skipped, skipped6) = read_nodes(&raw, limits, &mut problems);
    set.bgp =
        (raw.settings.bgp.as_ref()).map(|b| bgp::validate(b, &nodes, &mut problems, &mut warnings));
    if set.encap == Encap::None && set.bgp.is_none() {
        warnings.push(
            "encapsulation none without a bgp block: nothing advertises the pod CIDRs, so pods \
             reach only the nodes of this node's own subnet unless the fabric routes them"
                .into(),
        );
    }
    if raw.nodes.is_empty() && raw.problems.is_empty() && raw.skipped.is_empty() {
        problems.push(problem("nodes", "no nodes".into()));
    }
    if nodes.len() > limits.max_nodes as usize {
        let reason = format!(
            "{} nodes do not fit in maps sized for {} (raise --max-nodes)",
            nodes.len(),
            limits.max_nodes
        );
        problems.push(problem("nodes", reason));
    }
    let path = |index: usize, field: NodeField| raw.node_path(index, field);
    problems.extend(conflicts(&nodes, &path));
    problems.extend(six::conflicts6(&nodes, &path));
    problems.extend(cidrs_holding_nodes(&nodes, &set.cluster_cidrs, &path));
    let own = own_node(&nodes, limits);
    if own.is_none() && problems.is_empty() {
        problems.extend(missing_own_node(&nodes, limits));
    }
    if !problems.is_empty() {
        return Err(Invalid(problems));
    }
    let me = own
        .as_deref()
        .and_then(|o| nodes.iter().find(|n| n.name == o));
    warnings.extend(six::warnings6(&set, &nodes, me));
    Ok(Cluster {
        settings: set,
        nodes,
        own,
        warnings,
        skipped,
        skipped6,
    })
}

fn problem(path: &str, reason: String) -> Problem {
    Problem {
        path: path.into(),
        reason,
    }
}

fn vxlan_problems(set: &Settings) -> Vec<Problem> {
    let mut out = Vec::new();
    if set.vni == 0 || set.vni > 0xff_ffff {
        out.push(problem(
            "vxlan.vni",
            format!("{} is outside 1-16777215", set.vni),
        ));
    }
    if set.port == 0 {
        out.push(problem(
            "vxlan.port",
            "port 0 is not a valid UDP port".into(),
        ));
    }
    out
}

/// The raw nodes read; in live data, the ones that are incomplete (other than this node)
/// are returned apart as skipped, with what the source itself could not read, and the IPv6
/// halves left out (the node kept) apart from those.
fn read_nodes(
    raw: &RawState,
    limits: &Limits,
    problems: &mut Vec<Problem>,
) -> (Vec<Node>, Vec<Problem>, Vec<Problem>) {
    let mut skipped = raw.skipped.clone();
    let mut skipped6 = Vec::new();
    let mut nodes: Vec<Node> = Vec::with_capacity(raw.nodes.len());
    for rn in &raw.nodes {
        let (node, node_problems) = read_node(rn);
        let (v6, v6_problems) = read_half(rn);
        // Live data keeps a node whose IPv6 half is incomplete, without that half.
        if raw.origin.lenient() {
            skipped6.extend(v6_problems);
        } else {
            problems.extend(v6_problems);
        }
        match node {
            Some(n) if node_problems.is_empty() => nodes.push(Node { v6, ..n }),
            _ if raw.origin.lenient() && !is_own(rn, limits) => skipped.extend(node_problems),
            _ => problems.extend(node_problems),
        }
    }
    (nodes, skipped, skipped6)
}

/// How the problem of a state without this node begins.
pub(super) const NOT_IN_STATE: &str = "this node";

/// Why this node is not in the state, and what to do about it.
fn missing_own_node(nodes: &[Node], limits: &Limits) -> Option<Problem> {
    let name = limits.own_node.as_ref()?;
    // The address fallback adopts only nodes without a name (flanneld's leases): a named
    // node at one of this host's addresses is most likely this node under another name.
    let named_here = nodes
        .iter()
        .find(|n| !n.name.is_empty() && limits.own_addrs.contains(&n.address));
    let also = if let Some(n) = named_here {
        format!(
            "; node {:?} has this host's address {}: run with --node {} (the address fallback adopts only nodes without a name, as flanneld's leases are)",
            n.name, n.address, n.name
        )
    } else if limits.own_addrs.is_empty() {
        String::new()
    } else {
        let addrs: Vec<String> = limits.own_addrs.iter().map(ToString::to_string).collect();
        format!(
            ", nor an unnamed node (a flanneld lease) with one of this host's addresses ({}): give --node the name the cluster state uses for this host",
            addrs.join(", ")
        )
    };
    Some(problem(
        "nodes",
        format!("{NOT_IN_STATE} {name:?} is not in the cluster state{also}"),
    ))
}

/// Whether a raw node is this node (by name or address), whose problems reject the state.
fn is_own(rn: &RawNode, limits: &Limits) -> bool {
    let by_name = rn.name.is_some() && rn.name == limits.own_node;
    let by_addr = rn
        .address
        .as_deref()
        .and_then(|a| parse_address(a).ok())
        .is_some_and(|(a, _)| limits.own_addrs.contains(&a));
    by_name || by_addr
}

/// This node's name in the state: by name, else, among nodes that have no name of their own
/// (a lease flanneld wrote is named by its public IP), by one of this host's addresses.
fn own_node(nodes: &[Node], limits: &Limits) -> Option<String> {
    let name = limits.own_node.as_ref()?;
    let unnamed = |n: &&Node| n.name == n.address.to_string();
    nodes
        .iter()
        .find(|n| &n.name == name)
        .or_else(|| {
            nodes
                .iter()
                .filter(unnamed)
                .find(|n| limits.own_addrs.contains(&n.address))
        })
        .map(|n| n.name.clone())
}

/// One node checked on its own, as validation checks each: the node, or every problem found.
pub fn validate_node(rn: &RawNode) -> Result<Node, Vec<Problem>> {
    let (v6, v6_problems) = read_half(rn);
    match read_node(rn) {
        (Some(n), p) if p.is_empty() && v6_problems.is_empty() => Ok(Node { v6, ..n }),
        (_, mut p) => {
            p.extend(v6_problems);
            Err(p)
        }
    }
}

/// A node's IPv6 half (`six::read_half`), its problems at their paths.
fn read_half(rn: &RawNode) -> (Option<super::NodeV6>, Vec<Problem>) {
    let (v6, problems) = six::read_half(rn);
    let problems = problems.into_iter().map(|(field, reason)| Problem {
        path: node_path(rn.index, &rn.at, field),
        reason,
    });
    (v6, problems.collect())
}

/// One node's fields checked; the node when all are good, and every problem found.
fn read_node(rn: &RawNode) -> (Option<Node>, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut problem = |field: NodeField, reason: String| {
        problems.push(Problem {
            path: node_path(rn.index, &rn.at, field),
            reason,
        });
    };
    let name = rn.name.clone().filter(|n| !n.is_empty());
    if name.is_none() {
        problem(NodeField::Name, "missing".into());
    }
    let address = required(rn.address.as_deref().map(parse_address), |r| {
        problem(NodeField::Address, r)
    });
    let pod_cidr = required(rn.pod_cidr.as_deref().map(str::parse::<Cidr>), |r| {
        problem(NodeField::PodCidr, r)
    });
    let vtep_mac = match (rn.vtep_mac.as_deref().map(parse_mac), address) {
        (Some(Err(reason)), _) => {
            problem(NodeField::VtepMac, reason);
            None
        }
        (Some(Ok(m)), _) => Some(m),
        (None, Some((a, _))) => Some(derived_vtep_mac(a)),
        (None, None) => None,
    };
    let as_number = rn.as_number.filter(|n| match bgp::as_number_problem(*n) {
        Some(reason) => {
            problem(NodeField::AsNumber, reason);
            false
        }
        None => true,
    });
    let node = match (name, address, pod_cidr, vtep_mac) {
        (Some(name), Some((address, prefix_len)), Some(pod_cidr), Some(vtep_mac)) => Some(Node {
            index: rn.index,
            name,
            address,
            prefix_len,
            pod_cidr,
            vtep_mac,
            as_number,
            v6: None,
        }),
        _ => None,
    };
    (node, problems)
}

/// A required field's value, or `None` after reporting it missing or why it is wrong.
fn required<T>(parsed: Option<Result<T, String>>, mut problem: impl FnMut(String)) -> Option<T> {
    match parsed {
        None => {
            problem("missing".into());
            None
        }
        Some(Err(reason)) => {
            problem(reason);
            None
        }
        Some(Ok(v)) => Some(v),
    }
}

/// Names, addresses and pod CIDRs that two nodes claim, each reported at the later node.
/// O(n log n): a cluster of 10,000 nodes is checked in milliseconds.
fn conflicts(nodes: &[Node], path: &dyn Fn(usize, NodeField) -> String) -> Vec<Problem> {
    let mut problems: Vec<(usize, Problem)> = Vec::new();
    let mut report = |n: &Node, field: NodeField, reason: String| {
        let path = path(n.index, field);
        problems.push((n.index, Problem { path, reason }));
    };
    let mut names: HashMap<&str, &Node> = HashMap::new();
    let mut addrs: HashMap<Ipv4Addr, &Node> = HashMap::new();
    for n in nodes {
        if let Some(first) = names.get(n.name.as_str()) {
            let reason = format!("duplicate node {:?} (also nodes[{}])", n.name, first.index);
            report(n, NodeField::Name, reason);
        } else {
            names.insert(&n.name, n);
        }
        if let Some(first) = addrs.get(&n.address) {
            let reason = format!(
                "duplicate address {} (also node {:?})",
                n.address, first.name
            );
            report(n, NodeField::Address, reason);
        } else {
            addrs.insert(n.address, n);
        }
    }
    // Sorted by first address, a CIDR overlaps an earlier one iff it starts before the
    // furthest end seen so far.
    let mut by_start: Vec<&Node> = nodes.iter().collect();
    by_start.sort_by_key(|n| (n.pod_cidr.range().0, n.index));
    let mut furthest: Option<&Node> = None;
    for n in by_start {
        if let Some(f) = furthest {
            if n.pod_cidr.range().0 <= f.pod_cidr.range().1 {
                let (first, later) = if f.index < n.index { (f, n) } else { (n, f) };
                let reason = format!(
                    "{} overlaps {} of node {:?}",
                    later.pod_cidr, first.pod_cidr, first.name
                );
                report(later, NodeField::PodCidr, reason);
            }
            if n.pod_cidr.range().1 <= f.pod_cidr.range().1 {
                continue;
            }
        }
        furthest = Some(n);
    }
    problems.sort_by_key(|(i, _)| *i);
    problems.into_iter().map(|(_, p)| p).collect()
}

/// Pod CIDRs and cluster CIDRs that hold a node's underlay address: routing them toward the
/// datapath would capture the underlay's own traffic.
fn cidrs_holding_nodes(
    nodes: &[Node],
    cluster_cidrs: &[Cidr],
    path: &dyn Fn(usize, NodeField) -> String,
) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut by_start: Vec<(u32, u32, &Node)> = nodes
        .iter()
        .map(|n| {
            let (a, b) = n.pod_cidr.range();
            (a, b, n)
        })
        .collect();
    by_start.sort_by_key(|(a, _, _)| *a);
    let mut reported = std::collections::HashSet::new();
    for n in nodes {
        let addr = u32::from(n.address);
        let i = by_start.partition_point(|(a, _, _)| *a <= addr);
        // Pod CIDRs do not overlap (or that was reported): the one starting last before the
        // address is the only candidate.
        if let Some((_, end, owner)) = i.checked_sub(1).map(|i| by_start[i])
            && addr <= end
            && reported.insert(owner.index)
        {
            out.push(Problem {
                path: path(owner.index, NodeField::PodCidr),
                reason: format!(
                    "{} holds the underlay address {} of node {:?}",
                    owner.pod_cidr, n.address, n.name
                ),
            });
        }
        for c in cluster_cidrs.iter().filter(|c| c.contains(n.address)) {
            out.push(Problem {
                path: "clusterCIDR".into(),
                reason: format!(
                    "{c} holds the underlay address {} of node {:?}",
                    n.address, n.name
                ),
            });
        }
    }
    out
}

fn parse_address(s: &str) -> Result<(Ipv4Addr, Option<u8>), String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (
            a,
            Some(
                l.parse::<u8>()
                    .ok()
                    .filter(|l| *l <= 32)
                    .ok_or_else(|| format!("{s:?}: prefix length must be 0-32"))?,
            ),
        ),
        None => (s, None),
    };
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 address"))?;
    if addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast() {
        return Err(format!("{addr} cannot be a node address"));
    }
    Ok((addr, len))
}

#[cfg(test)]
mod tests;

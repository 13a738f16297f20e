//! Reading a cluster text before validation: the cluster-file format (every unknown field
//! reported with its path and a likely meant name, every field of the wrong type), a Kubernetes
//! NodeList (with Flannel's annotations), or a single Node recognised and explained. The
//! result is raw strings and numbers with the path each came from.
use serde::Deserialize;

use crate::cluster::bgp::RawBgp;
use crate::cluster::{
    Problem,
    raw::{
        CALICO_AS_NUMBER, FLANNEL_BACKEND_DATA, FLANNEL_BACKEND_TYPE, FLANNEL_BACKEND_V6_DATA,
        FLANNEL_PUBLIC_IP, FLANNEL_PUBLIC_IPV6, NodeAt, NodeField, Origin, RawNode, RawSettings,
        RawState, node_path,
    },
};

fn problem(path: impl Into<String>, reason: impl Into<String>) -> Problem {
    Problem {
        path: path.into(),
        reason: reason.into(),
    }
}

/// The cluster-file format, read straight from JSON on the fast path (a 10,000-node file).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileDoc {
    encapsulation: Option<String>,
    cross_subnet: Option<bool>,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<String>,
    #[serde(rename = "clusterCIDRv6")]
    cluster_cidr6: Option<String>,
    vxlan: Option<FileVxlan>,
    bgp: Option<RawBgp>,
    nodes: Option<Vec<FileNode>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileVxlan {
    vni: Option<u32>,
    port: Option<u16>,
    udp_checksum: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNode {
    name: Option<String>,
    address: Option<String>,
    #[serde(rename = "podCIDR")]
    pod_cidr: Option<String>,
    #[serde(rename = "vtepMAC")]
    vtep_mac: Option<String>,
    #[serde(rename = "asNumber")]
    as_number: Option<u32>,
    #[serde(rename = "addressV6")]
    address6: Option<String>,
    #[serde(rename = "podCIDRv6")]
    pod_cidr6: Option<String>,
    #[serde(rename = "vtepMACv6")]
    vtep_mac6: Option<String>,
}

const TOP_FIELDS: &[&str] = &[
    "encapsulation",
    "crossSubnet",
    "clusterCIDR",
    "clusterCIDRv6",
    "vxlan",
    "bgp",
    "nodes",
];
const VXLAN_FIELDS: &[&str] = &["vni", "port", "udpChecksum"];
const NODE_FIELDS: &[&str] = &[
    "name",
    "address",
    "podCIDR",
    "vtepMAC",
    "asNumber",
    "addressV6",
    "podCIDRv6",
    "vtepMACv6",
];

/// Reads a cluster text. Problems of shape (unknown fields, wrong types, not a cluster at all)
/// are all collected, not only the first.
pub fn read(text: &str) -> RawState {
    if text.trim_start().starts_with('{')
        && let Ok(doc) = serde_json::from_str::<FileDoc>(text)
    {
        return from_file_doc(doc);
    }
    // JSON is YAML; serde_json is faster on a large NodeList, YAML's parser explains errors.
    let value: Result<serde_yaml::Value, String> = match serde_json::from_str(text) {
        Ok(v) => Ok(v),
        Err(_) => serde_yaml::from_str(text).map_err(|e| e.to_string()),
    };
    let value = match value {
        Ok(v) => v,
        Err(e) => return whole(format!("not parsable as YAML or JSON: {e}")),
    };
    match value.get("kind").and_then(|k| k.as_str()) {
        Some("NodeList") => from_nodelist(&value),
        Some("List") if value.get("items").is_some() => from_nodelist(&value),
        Some("Node") => whole(
            "a single Node object (kind: Node); a NodeList is expected: `kubectl get nodes -o json`, \
             not `kubectl get node NAME -o json`"
                .into(),
        ),
        Some(other) => whole(format!(
            "a Kubernetes {other} object; expected a cluster file or a NodeList (`kubectl get nodes -o json`)"
        )),
        None if value.get("items").is_some() && value.get("nodes").is_none() => {
            from_nodelist(&value)
        }
        None => from_file_value(&value),
    }
}

fn whole(reason: String) -> RawState {
    RawState::unusable("(file)", reason)
}

fn from_file_doc(doc: FileDoc) -> RawState {
    let vx = doc.vxlan.unwrap_or(FileVxlan {
        vni: None,
        port: None,
        udp_checksum: None,
    });
    let nodes = doc
        .nodes
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, n)| RawNode {
            index: i,
            name: n.name,
            address: n.address,
            pod_cidr: n.pod_cidr,
            vtep_mac: n.vtep_mac,
            as_number: n.as_number,
            address6: n.address6,
            pod_cidr6: n.pod_cidr6,
            vtep_mac6: n.vtep_mac6,
            at: NodeAt::File,
        })
        .collect();
    RawState {
        origin: Origin::File,
        settings: RawSettings {
            encap: doc.encapsulation,
            cross_subnet: doc.cross_subnet,
            cluster_cidr: doc.cluster_cidr,
            vni: vx.vni,
            port: vx.port,
            udp_checksum: vx.udp_checksum,
            bgp: doc.bgp,
            cluster_cidr6: doc.cluster_cidr6,
        },
        nodes,
        problems: Vec::new(),
        skipped: Vec::new(),
    }
}

/// The field names of `map` that are not in `known`, each a problem at `path` with the name
/// probably meant.
fn unknown_fields(map: &serde_yaml::Mapping, path: &str, known: &[&str], out: &mut Vec<Problem>) {
    for key in map.keys() {
        let Some(k) = key.as_str() else {
            out.push(problem(
                path.trim_end_matches('.'),
                "a field name that is not a string",
            ));
            continue;
        };
        if known.contains(&k) {
            continue;
        }
        let reason = match did_you_mean(k, known) {
            Some(m) => format!("unknown field, did you mean {m}"),
            None => format!("unknown field (expected one of {})", known.join(", ")),
        };
        out.push(problem(format!("{path}{k}"), reason));
    }
}

/// The known name closest to `k`: the same ignoring case, dashes and underscores, or within
/// two edits.
fn did_you_mean<'a>(k: &str, known: &[&'a str]) -> Option<&'a str> {
    let norm = |s: &str| s.to_lowercase().replace(['-', '_'], "");
    known
        .iter()
        .find(|c| norm(c) == norm(k))
        .or_else(|| {
            known
                .iter()
                .find(|c| strsim::levenshtein(&norm(c), &norm(k)) <= 2)
        })
        .copied()
}

/// A field of `map` as `T`; a problem at `path` when it has another type.
fn field<T: serde::de::DeserializeOwned>(
    map: &serde_yaml::Mapping,
    name: &str,
    path: &str,
    what: &str,
    out: &mut Vec<Problem>,
) -> Option<T> {
    let v = map.get(name)?;
    if v.is_null() {
        return None;
    }
    match serde_yaml::from_value(v.clone()) {
        Ok(t) => Some(t),
        Err(_) => {
            out.push(problem(format!("{path}{name}"), format!("expected {what}")));
            None
        }
    }
}

fn from_file_value(value: &serde_yaml::Value) -> RawState {
    let mut problems = Vec::new();
    let Some(top) = value.as_mapping() else {
        return whole("expected a cluster file (a mapping with nodes:) or a NodeList".into());
    };
    unknown_fields(top, "", TOP_FIELDS, &mut problems);
    let mut settings = RawSettings {
        encap: field(top, "encapsulation", "", "a string", &mut problems),
        cross_subnet: field(top, "crossSubnet", "", "true or false", &mut problems),
        cluster_cidr: field(top, "clusterCIDR", "", "a CIDR string", &mut problems),
        cluster_cidr6: field(top, "clusterCIDRv6", "", "a CIDR string", &mut problems),
        bgp: bgp_block(top, &mut problems),
        ..RawSettings::default()
    };
    match top.get("vxlan").map(|v| (v, v.as_mapping())) {
        None => {}
        Some((v, _)) if v.is_null() => {}
        Some((_, None)) => problems.push(problem("vxlan", "expected a mapping (vni, port)")),
        Some((_, Some(vx))) => {
            unknown_fields(vx, "vxlan.", VXLAN_FIELDS, &mut problems);
            settings.vni = field(vx, "vni", "vxlan.", "a number", &mut problems);
            settings.port = field(vx, "port", "vxlan.", "a port number", &mut problems);
            settings.udp_checksum =
                field(vx, "udpChecksum", "vxlan.", "true or false", &mut problems);
        }
    }
    let mut nodes = Vec::new();
    match top.get("nodes") {
        None => {}
        Some(v) if v.is_null() => {}
        Some(v) => match v.as_sequence() {
            None => problems.push(problem("nodes", "expected a list")),
            Some(list) => {
                for (i, item) in list.iter().enumerate() {
                    let path = format!("nodes[{i}].");
                    let Some(m) = item.as_mapping() else {
                        problems.push(problem(format!("nodes[{i}]"), "expected a mapping"));
                        continue;
                    };
                    unknown_fields(m, &path, NODE_FIELDS, &mut problems);
                    nodes.push(RawNode {
                        index: i,
                        name: field(m, "name", &path, "a string", &mut problems),
                        address: field(m, "address", &path, "a string", &mut problems),
                        pod_cidr: field(m, "podCIDR", &path, "a string", &mut problems),
                        vtep_mac: field(m, "vtepMAC", &path, "a string", &mut problems),
                        as_number: field(m, "asNumber", &path, "an AS number", &mut problems),
                        address6: field(m, "addressV6", &path, "a string", &mut problems),
                        pod_cidr6: field(m, "podCIDRv6", &path, "a string", &mut problems),
                        vtep_mac6: field(m, "vtepMACv6", &path, "a string", &mut problems),
                        at: NodeAt::File,
                    });
                }
            }
        },
    }
    RawState {
        origin: Origin::File,
        settings,
        nodes,
        problems,
        skipped: Vec::new(),
    }
}

/// The `bgp` block, read whole by serde: its error names the field (an unknown one with the
/// fields it could be, a wrong type with what was expected).
fn bgp_block(top: &serde_yaml::Mapping, problems: &mut Vec<Problem>) -> Option<RawBgp> {
    let v = top.get("bgp").filter(|v| !v.is_null())?;
    match serde_yaml::from_value::<RawBgp>(v.clone()) {
        Ok(b) => Some(b),
        Err(e) => {
            problems.push(problem("bgp", e.to_string()));
            None
        }
    }
}

/// Flannel's `backend-data` annotation: `{"VNI":1,"VtepMAC":"..."}`.
#[derive(Deserialize)]
struct BackendData {
    #[serde(rename = "VNI")]
    vni: Option<u32>,
    #[serde(rename = "VtepMAC")]
    vtep_mac: Option<String>,
}

/// Reads the nodes of a `kubectl get nodes -o json` NodeList: name, `spec.podCIDR`, the
/// InternalIP address, and Flannel's `public-ip`, `backend-type` and `backend-data`
/// annotations (VNI, VtepMAC).
fn from_nodelist(v: &serde_yaml::Value) -> RawState {
    let mut state = RawState {
        origin: Origin::NodeList,
        settings: RawSettings::default(),
        nodes: Vec::new(),
        problems: Vec::new(),
        skipped: Vec::new(),
    };
    let Some(items) = v.get("items").and_then(|i| i.as_sequence()) else {
        state
            .problems
            .push(problem("items", "missing or not a list"));
        return state;
    };
    for (i, item) in items.iter().enumerate() {
        let s = |v: Option<&serde_yaml::Value>| v.and_then(|x| x.as_str()).map(String::from);
        let annotations = item.get("metadata").and_then(|m| m.get("annotations"));
        let note = |key: &str| s(annotations.and_then(|a| a.get(key)));
        let (pod_cidr, pod_cidr6) = pod_cidrs(item);
        let mut raw = RawNode {
            index: i,
            name: s(item.get("metadata").and_then(|m| m.get("name"))),
            pod_cidr,
            pod_cidr6,
            at: NodeAt::Item,
            ..RawNode::default()
        };
        raw.address = note(FLANNEL_PUBLIC_IP).or_else(|| internal_ip(item, false));
        raw.address6 = note(FLANNEL_PUBLIC_IPV6).or_else(|| internal_ip(item, true));
        if let Some(bd) = note(FLANNEL_BACKEND_V6_DATA) {
            match serde_json::from_str::<BackendData>(&bd) {
                Ok(d) => raw.vtep_mac6 = d.vtep_mac,
                Err(_) => state.problems.push(problem(
                    node_path(i, &NodeAt::Item, NodeField::VtepMac6),
                    "not Flannel's backend data (a JSON object)",
                )),
            }
        }
        if let Some(asn) = note(CALICO_AS_NUMBER) {
            match asn.parse::<u32>() {
                Ok(n) => raw.as_number = Some(n),
                Err(_) => state.problems.push(problem(
                    node_path(i, &NodeAt::Item, NodeField::AsNumber),
                    format!("{asn:?} is not an AS number"),
                )),
            }
        }
        if let Some(kind) = note(FLANNEL_BACKEND_TYPE) {
            state.origin = Origin::FlannelNodeList;
            state.settings.encap.get_or_insert(kind);
        }
        if let Some(bd) = note(FLANNEL_BACKEND_DATA) {
            state.origin = Origin::FlannelNodeList;
            match serde_json::from_str::<BackendData>(&bd) {
                Ok(d) => {
                    raw.vtep_mac = d.vtep_mac;
                    if let Some(vni) = d.vni {
                        state.settings.vni.get_or_insert(vni);
                    }
                }
                Err(_) => state.problems.push(problem(
                    node_path(i, &NodeAt::Item, NodeField::VtepMac),
                    "not Flannel's backend data (a JSON object)",
                )),
            }
        }
        state.nodes.push(raw);
    }
    state
}

/// A node's IPv4 and IPv6 pod CIDRs: `spec.podCIDRs` (dual-stack, one of each family), else
/// `spec.podCIDR`. A list with IPv6 only gives its first entry as the IPv4 one too, for
/// validation to name.
fn pod_cidrs(item: &serde_yaml::Value) -> (Option<String>, Option<String>) {
    let spec = item.get("spec");
    let list: Vec<String> = match spec.and_then(|sp| sp.get("podCIDRs")?.as_sequence()) {
        Some(seq) => seq
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        None => spec
            .and_then(|sp| sp.get("podCIDR")?.as_str())
            .map(String::from)
            .into_iter()
            .collect(),
    };
    let v6 = |c: &&String| c.contains(':');
    let v4 = list.iter().find(|c| !v6(c)).or(list.first()).cloned();
    (v4, list.iter().find(v6).cloned())
}

/// A node's InternalIP of one family.
fn internal_ip(item: &serde_yaml::Value, ipv6: bool) -> Option<String> {
    let addrs = item.get("status")?.get("addresses")?.as_sequence()?;
    addrs
        .iter()
        .filter(|a| a.get("type").and_then(|t| t.as_str()) == Some("InternalIP"))
        .filter_map(|a| a.get("address")?.as_str())
        .find(|a| match a.parse::<std::net::IpAddr>() {
            Ok(ip) => ip.is_ipv6() == ipv6,
            Err(_) => false,
        })
        .map(String::from)
}

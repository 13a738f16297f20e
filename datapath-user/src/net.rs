//! The node's interfaces and the kernel routes the agent owns, through iproute2's JSON output.
use std::{net::Ipv4Addr, process::Command};

use serde_json::Value;

use crate::cluster::Cidr;

/// Routing protocol number of the routes the agent installs (`ip route show proto 199`), so
/// they can be told apart from everyone else's and flushed on detach.
pub const ROUTE_PROTO: u8 = 199;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("running `ip {args}`: {source}")]
    Spawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`ip {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("`ip {args}` printed JSON this agent cannot read: {source}")]
    Json {
        args: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("no interface holds {0}")]
    NoInterfaceFor(Ipv4Addr),
    #[error("interface {0} not found")]
    NoInterface(String),
}

fn ip(args: &[&str]) -> Result<String, NetError> {
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| NetError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetError::Failed {
            args: joined,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip_json(args: &[&str]) -> Result<Vec<Value>, NetError> {
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    let text = ip(&full)?;
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(&text).map_err(|source| NetError::Json {
        args: full.join(" "),
        source,
    })
}

/// An interface and its first IPv4 address.
#[derive(Clone, Debug)]
pub struct Iface {
    pub name: String,
    pub ifindex: u32,
    pub mtu: u32,
    pub addr: Option<Ipv4Addr>,
    pub prefix_len: Option<u8>,
}

fn ifaces() -> Result<Vec<Iface>, NetError> {
    Ok(ip_json(&["addr", "show"])?
        .iter()
        .map(|l| {
            let inet = l["addr_info"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["family"] == "inet"));
            Iface {
                name: l["ifname"].as_str().unwrap_or_default().to_string(),
                ifindex: l["ifindex"].as_u64().unwrap_or(0) as u32,
                mtu: l["mtu"].as_u64().unwrap_or(1500) as u32,
                addr: inet.and_then(|x| x["local"].as_str()?.parse().ok()),
                prefix_len: inet.and_then(|x| x["prefixlen"].as_u64()).map(|p| p as u8),
            }
        })
        .collect())
}

/// The interface named `name`.
pub fn iface(name: &str) -> Result<Iface, NetError> {
    ifaces()?
        .into_iter()
        .find(|i| i.name == name)
        .ok_or_else(|| NetError::NoInterface(name.to_string()))
}

/// The interface that holds `addr`.
pub fn iface_with_addr(addr: Ipv4Addr) -> Result<Iface, NetError> {
    ifaces()?
        .into_iter()
        .find(|i| i.addr == Some(addr))
        .ok_or(NetError::NoInterfaceFor(addr))
}

/// The gateway the kernel uses toward `dst`, or `None` when `dst` is on a connected subnet.
pub fn gateway_to(dst: Ipv4Addr) -> Result<Option<Ipv4Addr>, NetError> {
    let r = ip_json(&["route", "get", &dst.to_string()])?;
    Ok(r.first()
        .and_then(|x| x["gateway"].as_str())
        .and_then(|g| g.parse().ok()))
}

/// A route the agent owns: pod CIDR of a remote node via a next hop on the underlay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRouteSpec {
    pub cidr: Cidr,
    pub via: Ipv4Addr,
    pub dev: String,
    /// Route MTU: the pod MTU for encapsulated peers, so the kernel sends "fragmentation
    /// needed" for DF packets that would not fit once encapsulated. `None` for native peers.
    pub mtu: Option<u32>,
}

/// The routes with the agent's protocol number, keyed by destination.
pub fn owned_routes() -> Result<Vec<PodRouteSpec>, NetError> {
    let proto = ROUTE_PROTO.to_string();
    Ok(ip_json(&["route", "show", "proto", &proto])?
        .iter()
        .filter_map(|r| {
            Some(PodRouteSpec {
                cidr: r["dst"].as_str()?.parse().ok()?,
                via: r["gateway"].as_str()?.parse().ok()?,
                dev: r["dev"].as_str()?.to_string(),
                mtu: r["metrics"]
                    .as_array()
                    .and_then(|m| m.iter().find_map(|x| x["mtu"].as_u64()))
                    .map(|m| m as u32),
            })
        })
        .collect())
}

/// Installs or replaces a route the agent owns.
pub fn replace_route(r: &PodRouteSpec) -> Result<(), NetError> {
    let (cidr, via, proto) = (
        r.cidr.to_string(),
        r.via.to_string(),
        ROUTE_PROTO.to_string(),
    );
    let mtu = r.mtu.map(|m| m.to_string());
    let mut args = vec![
        "route", "replace", &cidr, "via", &via, "dev", &r.dev, "onlink", "proto", &proto,
    ];
    if let Some(m) = &mtu {
        args.extend_from_slice(&["mtu", m]);
    }
    ip(&args).map(drop)
}

/// Removes one route the agent owns.
pub fn delete_route(cidr: &Cidr) -> Result<(), NetError> {
    let (cidr, proto) = (cidr.to_string(), ROUTE_PROTO.to_string());
    ip(&["route", "del", &cidr, "proto", &proto]).map(drop)
}

/// Removes every route the agent owns.
pub fn flush_routes() -> Result<(), NetError> {
    let proto = ROUTE_PROTO.to_string();
    ip(&["route", "flush", "proto", &proto]).map(drop)
}

/// Name of the metadata-mode kernel VXLAN device that carries GSO packets when outer UDP
/// checksums are on (see `NodeConfig::csum_ifindex`).
pub const CSUM_DEV: &str = "dp-vxcsum";

/// Makes sure the checksum path's device exists for `port`: VXLAN in metadata mode
/// (`external`: the program's tunnel key gives peer and VNI), no learning, up. A device with
/// another port is replaced. Returns its ifindex and whether it was (re)created.
pub fn ensure_csum_device(port: u16) -> Result<(u32, bool), NetError> {
    // `ip link show` fails when the device does not exist.
    let existing = ip_json(&["-d", "link", "show", "dev", CSUM_DEV]).unwrap_or_default();
    if let Some(l) = existing.first() {
        if l["linkinfo"]["info_data"]["port"].as_u64() == Some(port as u64) {
            return Ok((l["ifindex"].as_u64().unwrap_or(0) as u32, false));
        }
        remove_csum_device()?;
    }
    let port = port.to_string();
    ip(&[
        "link",
        "add",
        CSUM_DEV,
        "type",
        "vxlan",
        "external",
        "dstport",
        &port,
        "nolearning",
    ])?;
    ip(&["link", "set", CSUM_DEV, "up"])?;
    Ok((iface(CSUM_DEV)?.ifindex, true))
}

/// Removes the checksum path's device if it exists.
pub fn remove_csum_device() -> Result<(), NetError> {
    match ip(&["link", "del", CSUM_DEV]) {
        Err(NetError::Failed { stderr, .. }) if stderr.contains("Cannot find device") => Ok(()),
        r => r.map(drop),
    }
}

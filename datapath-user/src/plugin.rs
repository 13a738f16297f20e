//! The `datapath` binary run by a container runtime as a CNI plugin (`CNI_COMMAND` set): on
//! ADD it records the pod's addresses in `DP_ENDPOINTS` (IPv4) and `DP_ENDPOINTS6` (IPv6) and
//! attaches the pod programs to the pod's host-side veth; on DEL it undoes both. Also lists the
//! endpoints it recorded.
use std::{
    io::Read as _,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::maps::{HashMap, Map, MapData};
use maps_common::{Endpoint, map_names};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    kernel::{loader, pods},
    outputs::cni::{CNI_VERSION, PLUGIN},
};

/// Whether this process was started by a container runtime as a CNI plugin.
pub fn invoked_as_plugin() -> bool {
    std::env::var_os("CNI_COMMAND").is_some()
}

/// Runs as the CNI plugin: reads the configuration on stdin, acts on `CNI_COMMAND`, prints the
/// result. A failure is printed as a CNI error object, exit code 1.
pub fn plugin_main() -> std::process::ExitCode {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut input = String::new();
    let result = std::io::stdin()
        .read_to_string(&mut input)
        .context("reading the configuration")
        .and_then(|_| run_plugin(&command, &input));
    match result {
        Ok(Some(out)) => {
            println!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Ok(None) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let err = json!({ "cniVersion": CNI_VERSION, "code": 999, "msg": format!("{e:#}") });
            println!("{err}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The network configuration the runtime passes on stdin: this plugin's own keys (the agent
/// writes them into the list) and the previous plugin's result.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: Option<String>,
    pin_dir: Option<PathBuf>,
    tc_attach: Option<String>,
    /// Echoed back on ADD as it came, with this configuration's version.
    prev_result: Option<Value>,
}

/// The parts of a CNI result this plugin reads.
#[derive(Default, Deserialize)]
struct PrevResult {
    #[serde(default)]
    interfaces: Vec<Interface>,
    #[serde(default)]
    ips: Vec<IpConfig>,
}

#[derive(Deserialize)]
struct Interface {
    name: String,
    #[serde(default)]
    mac: String,
    /// Set for the container's interface, absent for the host's.
    #[serde(default)]
    sandbox: Option<String>,
}

#[derive(Deserialize)]
struct IpConfig {
    address: String,
    interface: Option<usize>,
}

fn run_plugin(command: &str, input: &str) -> anyhow::Result<Option<String>> {
    if command == "VERSION" {
        let v = json!({
            "cniVersion": CNI_VERSION,
            "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"],
        });
        return Ok(Some(v.to_string()));
    }
    let conf: NetConf = serde_json::from_str(input).context("the configuration is not JSON")?;
    let pin_dir = conf
        .pin_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(loader::DEFAULT_PIN_DIR));
    let tc_mode = match conf.tc_attach.as_deref() {
        Some("netlink") => loader::TcAttach::Netlink,
        _ => loader::TcAttach::Tcx,
    };
    // Lenient, as DEL must be: what cannot be read names no pod.
    let prev: PrevResult = conf
        .prev_result
        .clone()
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    match command {
        "ADD" => {
            let Some(mut out) = conf.prev_result.clone().filter(Value::is_object) else {
                anyhow::bail!("{PLUGIN} must be chained after ptp: no prevResult");
            };
            let pods = pods(&prev);
            for pod in &pods {
                record(&pin_dir, pod)?;
            }
            // One veth for every address of the pod: its hooks attached once.
            if let Some(pod) = pods.first() {
                pods::attach_pod(&pin_dir, &pod.host_if, tc_mode)
                    .with_context(|| format!("attaching the pod program to {}", pod.host_if))?;
            }
            out["cniVersion"] = json!(conf.cni_version);
            Ok(Some(out.to_string()))
        }
        "DEL" => {
            let pods = pods(&prev);
            for pod in &pods {
                forget(&pin_dir, pod);
            }
            if let Some(pod) = pods.first() {
                pods::detach_pod(&pin_dir, &pod.host_if);
            }
            Ok(None)
        }
        "CHECK" | "STATUS" | "GC" => Ok(None),
        other => anyhow::bail!("unknown CNI_COMMAND {other:?}"),
    }
}

/// One pod address from a previous result: its host-side interface and both MACs.
struct PodIf {
    ip: IpAddr,
    host_if: String,
    host_mac: [u8; 6],
    pod_mac: [u8; 6],
}

/// The addresses of `prev` (both families) with the interfaces ptp made: the container's (the
/// one the address names) and the host's (the one without a sandbox), which all share.
fn pods(prev: &PrevResult) -> Vec<PodIf> {
    let mac = |i: &Interface| crate::cluster::parse_mac(&i.mac).ok();
    let Some(host) = prev
        .interfaces
        .iter()
        .find(|i| i.sandbox.as_deref().unwrap_or("").is_empty())
    else {
        return Vec::new();
    };
    let Some(host_mac) = mac(host) else {
        return Vec::new();
    };
    prev.ips
        .iter()
        .filter_map(|ip| {
            let addr: IpAddr = ip.address.split('/').next()?.parse().ok()?;
            let pod_if = prev.interfaces.get(ip.interface?)?;
            Some(PodIf {
                ip: addr,
                host_if: host.name.clone(),
                host_mac,
                pod_mac: mac(pod_if)?,
            })
        })
        .collect()
}

fn opened<K: aya::Pod>(
    pin_dir: &Path,
    name: &str,
) -> anyhow::Result<HashMap<MapData, K, Endpoint>> {
    let path = loader::map_pin_path(pin_dir, name);
    let md = MapData::from_pin(&path).with_context(|| {
        format!(
            "no datapath pinned at {} (is the agent running?)",
            path.display()
        )
    })?;
    Ok(Map::from_map_data(md)?.try_into()?)
}

/// Records the pod's address in its family's endpoint map. An IPv6 address where the running
/// agent pinned no IPv6 endpoints (before map ABI 6) is left out: that pod's IPv6 traffic
/// takes the host's stack.
fn record(pin_dir: &Path, pod: &PodIf) -> anyhow::Result<()> {
    let c = std::ffi::CString::new(pod.host_if.as_str())?;
    // SAFETY: a NUL-terminated interface name.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    anyhow::ensure!(ifindex != 0, "host interface {} not found", pod.host_if);
    let ep = Endpoint {
        ifindex,
        pod_mac: pod.pod_mac,
        host_mac: pod.host_mac,
    };
    match pod.ip {
        IpAddr::V4(a) => {
            opened::<[u8; 4]>(pin_dir, map_names::ENDPOINTS)?.insert(a.octets(), ep, 0)?
        }
        IpAddr::V6(a) => {
            if let Ok(mut m) = opened::<[u8; 16]>(pin_dir, map_names::ENDPOINTS6) {
                m.insert(a.octets(), ep, 0)?;
            }
        }
    }
    Ok(())
}

/// Undoes `record`; whatever is already gone is fine (DEL may come more than once).
fn forget(pin_dir: &Path, pod: &PodIf) {
    match pod.ip {
        IpAddr::V4(a) => {
            if let Ok(mut m) = opened::<[u8; 4]>(pin_dir, map_names::ENDPOINTS) {
                let _ = m.remove(&a.octets());
            }
        }
        IpAddr::V6(a) => {
            if let Ok(mut m) = opened::<[u8; 16]>(pin_dir, map_names::ENDPOINTS6) {
                let _ = m.remove(&a.octets());
            }
        }
    }
}

/// One row of `datapath endpoints`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EndpointRow {
    pub pod_ip: IpAddr,
    pub ifindex: u32,
    pub host_if: String,
    pub pod_mac: String,
    pub host_mac: String,
}

/// What `DP_ENDPOINTS` and `DP_ENDPOINTS6` hold, with interface names: IPv4 pods first.
pub fn list_endpoints(pin_dir: &Path) -> anyhow::Result<Vec<EndpointRow>> {
    // The maps as `stats` opens them: nothing pinned, or no right to read, said plainly.
    let maps = crate::kernel::maps::DatapathMaps::open_pinned(pin_dir)?;
    let mut rows = Vec::new();
    for item in maps.endpoints.iter() {
        let (ip, ep) = item?;
        rows.push(row(IpAddr::V4(Ipv4Addr::from(ip)), &ep));
    }
    for item in maps.endpoints6.iter().flat_map(|m| m.iter()) {
        let (ip, ep) = item?;
        rows.push(row(IpAddr::from(ip), &ep));
    }
    rows.sort_by_key(|r| r.pod_ip);
    Ok(rows)
}

fn row(pod_ip: IpAddr, ep: &Endpoint) -> EndpointRow {
    EndpointRow {
        pod_ip,
        ifindex: ep.ifindex,
        host_if: crate::underlay::netlink::if_name(ep.ifindex).unwrap_or_else(|| "(gone)".into()),
        pod_mac: crate::cluster::format_mac(&ep.pod_mac),
        host_mac: crate::cluster::format_mac(&ep.host_mac),
    }
}

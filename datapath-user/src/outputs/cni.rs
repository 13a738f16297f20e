//! The node's CNI configuration list (the reference plugins `ptp`, `host-local`, `portmap`,
//! with this project's own plugin chained after `ptp`), the plugin binary installed beside
//! them, and a check that the reference plugins are there.
use std::path::PathBuf;

use anyhow::Context as _;
use serde_json::{Value, json};

use super::write_atomic;
use crate::{
    cluster::{Cidr, Cidr6},
    kernel::loader,
};
/// Name of the network and of the configuration file.
pub const NETWORK: &str = "datapath";
/// The configuration list's default name: it sorts before the lists it replaces
/// (`10-calico.conflist`, `10-flannel.conflist`), and a runtime uses the first.
pub const CONFLIST: &str = "05-datapath.conflist";
/// The name earlier releases wrote; removed once the list is written under another.
const OLD_CONFLIST: &str = "10-datapath.conflist";
/// The reference plugins the list names beside this project's (Debian's and kubeadm's
/// containernetworking-plugins): the runtime runs them from the CNI bin directory.
pub const REFERENCE_PLUGINS: [&str; 3] = ["ptp", "host-local", "portmap"];

/// The reference plugins absent from `opts.bin_dir`, or not executable there, as a bit mask
/// in `REFERENCE_PLUGINS` order (`AgentInfo::cni_missing`).
pub fn missing_plugins(opts: &CniOptions) -> u8 {
    use std::os::unix::fs::PermissionsExt as _;
    REFERENCE_PLUGINS
        .iter()
        .enumerate()
        .filter(|(_, p)| {
            !std::fs::metadata(opts.bin_dir.join(p))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .fold(0, |mask, (i, _)| mask | (1 << i))
}

/// The names of a `missing_plugins` mask.
pub fn plugin_names(mask: u8) -> Vec<&'static str> {
    REFERENCE_PLUGINS
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, p)| *p)
        .collect()
}

/// The project's plugin: its `type` in the list and its file name in the CNI bin directory.
pub const PLUGIN: &str = "datapath";
pub const CNI_VERSION: &str = "1.0.0";

/// Where the agent installs CNI configuration and what it puts in it (`datapath run`'s CNI
/// flags; the pin directory and attach mode are the agent's own, set by `placed`).
#[derive(clap::Args, Clone, Debug)]
pub struct CniOptions {
    /// Where the node's CNI configuration list is written.
    #[arg(long = "cni-conf-dir", default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// The configuration list's file name. The runtime uses the first list in the
    /// directory by name: the default sorts before 10-calico.conflist and
    /// 10-flannel.conflist, which it replaces.
    #[arg(long = "cni-conf-name", default_value = CONFLIST)]
    pub conf_name: String,
    /// Where this binary is installed as the `datapath` CNI plugin.
    #[arg(long = "cni-bin-dir", default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// host-local IPAM's data directory (pod IP leases).
    #[arg(long = "cni-ipam-dir", default_value = "/var/lib/cni/networks")]
    pub ipam_dir: PathBuf,
    #[arg(skip)]
    pub pin_dir: PathBuf,
    /// How the plugin attaches the pod program (the agent's resolved mode).
    #[arg(skip = loader::TcAttach::Auto)]
    pub tc_attach: loader::TcAttach,
}

impl CniOptions {
    /// The options with the agent's pin directory and TC attach mode, which the plugin uses.
    pub fn placed(&self, pin_dir: &std::path::Path, tc_attach: loader::TcAttach) -> Self {
        Self {
            pin_dir: pin_dir.to_path_buf(),
            tc_attach,
            ..self.clone()
        }
    }
}

/// The configuration list for a node with `pod_cidr` (and `pod_cidr6`, dual-stack: pods get
/// an address of each family) whose pods use `mtu`.
pub fn conflist(opts: &CniOptions, pod_cidr: &Cidr, pod_cidr6: Option<&Cidr6>, mtu: u32) -> Value {
    let mut ranges = vec![json!([{ "subnet": pod_cidr.to_string() }])];
    let mut routes = vec![json!({ "dst": "0.0.0.0/0" })];
    if let Some(c6) = pod_cidr6 {
        ranges.push(json!([{ "subnet": c6.to_string() }]));
        routes.push(json!({ "dst": "::/0" }));
    }
    json!({
        "cniVersion": CNI_VERSION,
        "name": NETWORK,
        "plugins": [
            {
                "type": "ptp",
                "mtu": mtu,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": ranges,
                    "routes": routes,
                    "dataDir": opts.ipam_dir,
                },
            },
            { "type": PLUGIN, "pinDir": opts.pin_dir, "tcAttach": opts.tc_attach.resolve().name() },
            { "type": "portmap", "capabilities": { "portMappings": true }, "snat": true },
        ],
    })
}

/// Installs this binary as the plugin in the CNI bin directory (when it differs).
pub fn install_plugin(opts: &CniOptions) -> anyhow::Result<()> {
    let exe =
        std::fs::read("/proc/self/exe").context("reading this program for the CNI bin dir")?;
    write_atomic(&opts.bin_dir.join(PLUGIN), &exe, 0o755).map(drop)
}

/// Installs the configuration list for `pod_cidr` (and `pod_cidr6`) and `mtu` when it changed;
/// returns whether it wrote.
pub fn install_conflist(
    opts: &CniOptions,
    (pod_cidr, pod_cidr6): (&Cidr, Option<&Cidr6>),
    mtu: u32,
) -> anyhow::Result<bool> {
    let text = serde_json::to_string_pretty(&conflist(opts, pod_cidr, pod_cidr6, mtu))? + "\n";
    let wrote = write_atomic(&opts.conf_dir.join(&opts.conf_name), text.as_bytes(), 0o644)?;
    let old = opts.conf_dir.join(OLD_CONFLIST);
    if opts.conf_name != OLD_CONFLIST && old.exists() {
        std::fs::remove_file(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(wrote)
}

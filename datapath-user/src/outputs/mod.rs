//! What the node gets written besides the datapath's own state, apart from it: the CNI
//! configuration list and plugin, Flannel's `subnet.env` and masquerade rules, and the
//! checksum device. A write that fails is logged with its path and retried; it never stops
//! the agent.
use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::Context as _;
use tracing::{info, warn};

use crate::cluster::{Cidr, covering};

pub mod cni;
pub mod flannel;
pub mod plugins;

/// What the outputs are written from: this node's pod CIDR, the pod MTU, the cluster's
/// networks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    pub pod_cidr: Option<Cidr>,
    /// This node's IPv6 pod CIDR, when it carries IPv6 pods.
    pub pod_cidr6: Option<crate::cluster::Cidr6>,
    pub mtu: u32,
    pub networks: Vec<Cidr>,
}

/// The node's outputs and what was last asked of them.
pub struct Outputs {
    pub cni: cni::CniOptions,
    /// Where `subnet.env` is written (Flannel's `/run/flannel/subnet.env`).
    pub subnet_file: PathBuf,
    /// Masquerade pod traffic leaving the cluster network, as flanneld's `--ip-masq`.
    pub ip_masq: bool,
    wanted: Wanted,
    plugin_installed: bool,
    /// Some output failed to be written: `retry` tries again.
    pending: bool,
}

impl Outputs {
    pub fn new(cni: cni::CniOptions, subnet_file: PathBuf, ip_masq: bool) -> Self {
        Self {
            cni,
            subnet_file,
            ip_masq,
            wanted: Wanted::default(),
            plugin_installed: false,
            pending: true,
        }
    }

    /// Writes what `wanted` changes; what fails is logged with its path and retried.
    pub fn apply(&mut self, wanted: Wanted) {
        self.wanted = wanted;
        self.write_all();
    }

    /// Tries again what failed, and (with `ip_masq`) puts back masquerade rules someone
    /// flushed, as flanneld re-checks its own every 5 s.
    pub fn retry(&mut self) {
        if self.pending || self.ip_masq {
            self.write_all();
        }
    }

    fn write_all(&mut self) {
        let mut failed = false;
        if !self.plugin_installed {
            match cni::install_plugin(&self.cni) {
                Ok(()) => self.plugin_installed = true,
                Err(e) => failed |= report("the CNI plugin", &e),
            }
        }
        if let Some(cidr) = self.wanted.pod_cidr {
            if let Err(e) = self.write_conflist(&cidr) {
                failed |= report("the CNI configuration", &e);
            }
            if let Err(e) = self.write_flannel(&cidr) {
                failed |= report("Flannel's outputs", &e);
            }
        }
        if failed && !self.pending {
            warn!("outputs that failed are tried again every 5 s");
        }
        self.pending = failed;
    }

    fn write_conflist(&self, cidr: &Cidr) -> anyhow::Result<()> {
        let mtu = self.wanted.mtu;
        let cidr6 = self.wanted.pod_cidr6.as_ref();
        if cni::install_conflist(&self.cni, (cidr, cidr6), mtu)? {
            let path = self.cni.conf_dir.join(&self.cni.conf_name);
            let pod_cidr6 = cidr6.map(ToString::to_string).unwrap_or_default();
            info!(path = %path.display(), pod_cidr = %cidr, pod_cidr6, mtu, "CNI configuration written");
        }
        Ok(())
    }

    /// Writes `subnet.env` for this node and, with `--ip-masq`, makes sure the masquerade
    /// rules for the cluster network are in place.
    fn write_flannel(&self, subnet: &Cidr) -> anyhow::Result<()> {
        let Some(network) = covering(&self.wanted.networks) else {
            return Ok(());
        };
        let env = flannel::SubnetEnv {
            network,
            subnet: *subnet,
            mtu: self.wanted.mtu,
            ip_masq: self.ip_masq,
        };
        if env.write(&self.subnet_file)? {
            info!(path = %self.subnet_file.display(), %network, %subnet, "subnet.env written");
        }
        if self.ip_masq && flannel::ensure_masq(&network)? {
            info!(%network, "masquerade rules for traffic leaving the cluster network (re)written");
        }
        Ok(())
    }
}

/// Logs a failed output (its error names the path); true.
fn report(what: &str, e: &anyhow::Error) -> bool {
    warn!("writing {what} failed, will retry: {e:#}");
    true
}

/// Writes `text` to `path` through a temporary file and a rename, so a reader never sees half
/// of it; does nothing when the file already holds it. Returns whether it wrote.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<bool> {
    use std::os::unix::fs::PermissionsExt as _;
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(false);
    }
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // One temporary file per writer and write: two agents sharing a filesystem (two nodes
    // emulated on one host) must not rename each other's.
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id(),
        WRITES.fetch_add(1, Ordering::Relaxed)
    ));
    let written = std::fs::write(&tmp, bytes)
        .with_context(|| format!("writing {}", tmp.display()))
        .and_then(|()| {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("setting the mode of {}", tmp.display()))
        })
        .and_then(|()| {
            std::fs::rename(&tmp, path)
                .with_context(|| format!("renaming {} onto {}", tmp.display(), path.display()))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map(|()| true)
}

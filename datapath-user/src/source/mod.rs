//! Where cluster state comes from: the cluster file or a NodeList (watched), and Flannel's
//! layout in etcd (watched, leases applied as they change). Each source sends typed raw
//! states down one channel; none knows who consumes them. `cluster::validate` is next.
use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use tokio::sync::mpsc;
use tracing::error;

use crate::cluster::{Cluster, Defaults, Invalid, Limits, raw::RawState, validate};

pub mod document;
pub mod etcd;
pub mod file;

/// Where the cluster state comes from (`datapath run`'s source flags).
#[derive(clap::Args, Clone, Debug)]
pub struct Source {
    /// Cluster file (YAML/JSON) or `kubectl get nodes -o json` output. Watched for changes;
    /// SIGHUP reloads too.
    #[arg(
        long,
        required_unless_present = "etcd_endpoints",
        conflicts_with = "etcd_endpoints"
    )]
    pub cluster: Option<PathBuf>,
    #[command(flatten)]
    pub etcd: etcd::EtcdOptions,
}

impl Source {
    /// Whether the state comes from etcd (no cluster file given).
    pub fn is_etcd(&self) -> bool {
        self.cluster.is_none()
    }
}

/// Why a source sent a state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Start,
    FileChanged,
    Sighup,
    /// etcd read whole: at the start, after an outage.
    EtcdRead,
    /// etcd keys other than leases changed (the network configuration).
    EtcdChange,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::FileChanged => "file changed",
            Self::Sighup => "SIGHUP",
            Self::EtcdRead => "etcd read",
            Self::EtcdChange => "etcd change",
        }
    }
}

/// One change of cluster state from a source.
pub enum Update {
    /// A whole state (or why the source has none).
    Full {
        state: anyhow::Result<RawState>,
        reason: Reason,
        /// etcd's revision; 0 for a file.
        revision: i64,
    },
    /// etcd lease keys changed: new value, or `None` when deleted.
    Leases {
        events: Vec<(String, Option<String>)>,
        revision: i64,
    },
}

/// Starts the source; for etcd, returns the keys it keeps.
pub fn start(
    source: &Source,
    register: Option<etcd::Registration>,
    tx: mpsc::Sender<Update>,
    etcd_status: &Arc<Mutex<etcd::EtcdStatus>>,
) -> Option<etcd::Snapshot> {
    let Some(path) = &source.cluster else {
        return Some(etcd::start(&source.etcd, register, tx, etcd_status));
    };
    let file = file::file_source(path.clone(), tx);
    tokio::spawn(async move {
        if let Err(e) = file.await {
            error!("cluster file source stopped: {e:#}");
        }
    });
    None
}

/// A cluster text (a cluster file or a NodeList) read and validated.
pub fn parse_text(text: &str, defaults: &Defaults, limits: &Limits) -> Result<Cluster, Invalid> {
    validate(document::read(text), defaults, limits)
}

//! The kernel side of the node: loading and attaching the programs, the host's bpffs and
//! privileges, the pinned maps, and carrying them across upgrades.
use std::{io, path::PathBuf};

pub mod host;
pub mod loader;
pub mod maps;
pub mod pods;
pub mod upgrade;

/// The pin tree's folders under `--pin-dir`, named once for every reader and writer.
pub mod pin_tree {
    /// The maps the programs use.
    pub const MAPS: &str = "maps";
    /// New maps being filled beside the old ones during a migration.
    pub const MAPS_PENDING: &str = "maps-pending";
    /// The old maps, between the swap and their removal.
    pub const MAPS_OLD: &str = "maps-old";
    /// Links (attachments), by program, and per pod veth below.
    pub const LINKS: &str = "links";
    /// Programs pinned for the CNI plugin to attach to pod veths.
    pub const PROGS: &str = "progs";
}

/// An I/O error and the path it happened on, for the kernel side's error types.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct PathIo {
    pub what: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

//! The node agent's library, one folder per room: where cluster state comes from (`source`),
//! what it means once checked (`cluster`), how the node is brought to it (`reconcile`), what
//! else the node gets written (`outputs`), the kernel objects (`kernel`), the underlay's
//! routes and rules (`underlay`), what operators read (`observe`), the agent's loop (`agent`)
//! and the command line (`cli`).
pub mod agent;
pub mod bgp;
pub mod cli;
pub mod cluster;
pub mod kernel;
pub mod observe;
pub mod outputs;
pub mod plugin;
pub mod reconcile;
pub mod source;
pub mod underlay;

/// This build's version, as the agent records it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// This build's version, NUL-padded, as `AgentInfo::version` holds it.
pub fn version_bytes() -> [u8; 16] {
    kernel::maps::fixed(VERSION)
}

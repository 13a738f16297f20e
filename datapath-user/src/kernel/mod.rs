//! The kernel side of the node: loading and attaching the programs, the host's bpffs and
//! privileges, the pinned maps, and carrying them across upgrades.
pub mod host;
pub mod loader;
pub mod maps;
pub mod pods;
pub mod upgrade;

//! The node agent's library: cluster state, loading and attaching, map sync, counters.
pub mod agent;
pub mod cluster;
pub mod clusterdoc;
pub mod cni;
pub mod dataplane;
pub mod etcd;
pub mod flannel;
pub mod http;
pub mod loader;
pub mod maps;
pub mod net;
pub mod progbench;
pub mod ruleset;
pub mod stats;
pub mod status;
pub mod upgrade;
pub mod watch;

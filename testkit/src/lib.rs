//! The test kit: one topology builder (namespaces, underlay bridges and router, nodes, pods),
//! one cluster-file builder, one packet builder and one BPF_PROG_TEST_RUN harness, shared by
//! `tests/`, the demo's lab and the benchmark. Depends on nothing of the agent, so `xtask`
//! (built before the kernel toolchain is installed) can use it.
pub mod cluster;
pub mod net;
pub mod packet;
#[cfg(feature = "prog")]
pub mod progrun;

//! The node's own network: netlink (interfaces, routes, neighbours, their change events), ICMP
//! probes of the peers, and the netfilter ruleset the accepted-flows fast path defers to.
pub mod netlink;
pub mod netlink6;
pub mod probe;
pub mod ruleset;

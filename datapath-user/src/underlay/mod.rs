//! The node's own network: netlink (interfaces, routes, neighbours, their change events; the
//! agent's own routes of both families in `routes`), ICMP probes of the peers, and the
//! netfilter ruleset the accepted-flows fast path defers to.
pub mod netlink;
pub mod probe;
pub mod routes;
pub mod ruleset;

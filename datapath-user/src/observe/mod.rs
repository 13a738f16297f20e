//! What operators read: counters, status, the HTTP probes and metrics, and `check`'s verdict.
pub mod check;
pub mod http;
pub mod monitor;
pub mod stats;
pub mod status;

//! `datapath check`: a cluster state judged as the agent would judge it, for people and for
//! scripts (`--json`), with an exit status that tells a clean state, one accepted with
//! warnings or nodes left out, and one rejected apart.
use std::process::ExitCode;

use serde::Serialize;

use crate::cluster::{Cluster, Encap, Invalid, Problem};

/// Exit status of a state accepted with warnings or skipped nodes (1 is a rejected state,
/// 2 a usage error).
pub const EXIT_WARNINGS: u8 = 3;

/// How a state fared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    /// Accepted, with warnings or nodes left out.
    Warnings,
    /// Rejected whole.
    Invalid,
}

/// What `check` found.
#[derive(Debug, Serialize)]
pub struct Report {
    pub verdict: Verdict,
    /// Nodes the agent would use.
    pub nodes: usize,
    /// Nodes of live data left out as incomplete or unreadable.
    pub skipped: Vec<Finding>,
    /// Nodes with an IPv6 half (dual-stack), and IPv6 halves of live data left out.
    pub ipv6_nodes: usize,
    pub skipped_ipv6: Vec<Finding>,
    pub warnings: Vec<String>,
    /// Why the state is rejected, every problem with its path.
    pub errors: Vec<Finding>,
    /// The mode in effect (absent when rejected); `vni` and `port` only for VXLAN.
    pub encapsulation: Option<&'static str>,
    pub vni: Option<u32>,
    pub port: Option<u16>,
    pub cross_subnet: Option<bool>,
    /// The `bgp` block: AS, mesh, explicit peers.
    pub bgp: Option<BgpReport>,
}

#[derive(Debug, Serialize)]
pub struct BgpReport {
    pub as_number: u32,
    pub node_to_node_mesh: bool,
    pub peers: usize,
}

/// A problem at a place in the state.
#[derive(Debug, Serialize)]
pub struct Finding {
    pub path: String,
    pub reason: String,
}

impl From<&Problem> for Finding {
    fn from(p: &Problem) -> Self {
        Self {
            path: p.path.clone(),
            reason: p.reason.clone(),
        }
    }
}

impl Report {
    pub fn of(result: &Result<Cluster, Invalid>) -> Self {
        match result {
            Ok(c) => {
                let vxlan = c.encap == Encap::Vxlan;
                let clean = c.warnings.is_empty() && c.skipped.is_empty() && c.skipped6.is_empty();
                Self {
                    verdict: if clean {
                        Verdict::Ok
                    } else {
                        Verdict::Warnings
                    },
                    nodes: c.nodes.len(),
                    skipped: c.skipped.iter().map(Finding::from).collect(),
                    ipv6_nodes: c.nodes.iter().filter(|n| n.v6.is_some()).count(),
                    skipped_ipv6: c.skipped6.iter().map(Finding::from).collect(),
                    warnings: c.warnings.clone(),
                    errors: Vec::new(),
                    encapsulation: Some(c.encap.name()),
                    vni: vxlan.then_some(c.vni),
                    port: vxlan.then_some(c.port),
                    cross_subnet: Some(c.cross_subnet),
                    bgp: c.bgp.as_ref().map(|b| BgpReport {
                        as_number: b.as_number,
                        node_to_node_mesh: b.node_to_node_mesh,
                        peers: b.peers.len(),
                    }),
                }
            }
            Err(invalid) => Self {
                verdict: Verdict::Invalid,
                nodes: 0,
                skipped: Vec::new(),
                ipv6_nodes: 0,
                skipped_ipv6: Vec::new(),
                warnings: Vec::new(),
                errors: invalid.0.iter().map(Finding::from).collect(),
                encapsulation: None,
                vni: None,
                port: None,
                cross_subnet: None,
                bgp: None,
            },
        }
    }

    pub fn exit_code(&self) -> ExitCode {
        match self.verdict {
            Verdict::Ok => ExitCode::SUCCESS,
            Verdict::Warnings => ExitCode::from(EXIT_WARNINGS),
            Verdict::Invalid => ExitCode::FAILURE,
        }
    }

    /// The report for people: a verdict line, then one line per finding.
    pub fn text(&self) -> String {
        let mode = match (self.encapsulation, self.vni, self.port) {
            (Some(e), Some(vni), Some(port)) => format!("{e} (vni {vni}, port {port})"),
            (Some(e), ..) => e.to_string(),
            (None, ..) => String::new(),
        };
        let cross = match &self.bgp {
            Some(b) => format!(
                "{}, BGP AS {} (mesh {}, {} peers)",
                self.cross_subnet.unwrap_or(false),
                b.as_number,
                if b.node_to_node_mesh { "on" } else { "off" },
                b.peers
            ),
            None => self.cross_subnet.unwrap_or(false).to_string(),
        };
        let six = match self.ipv6_nodes {
            0 => String::new(),
            n => format!(", dual-stack ({n} with IPv6)"),
        };
        let mut out = match self.verdict {
            Verdict::Ok => format!(
                "ok: {} nodes{six}, {mode}, crossSubnet {cross}\n",
                self.nodes
            ),
            Verdict::Warnings => format!(
                "accepted with warnings: {} of {} nodes in use{six}, {mode}, crossSubnet {cross}\n",
                self.nodes,
                self.nodes + self.skipped.len()
            ),
            Verdict::Invalid => format!(
                "invalid: {} problem(s); rejected whole\n",
                self.errors.len()
            ),
        };
        for w in &self.warnings {
            out += &format!("warning: {w}\n");
        }
        for s in &self.skipped {
            out += &format!("skipped: {}: {}\n", s.path, s.reason);
        }
        for s in &self.skipped_ipv6 {
            out += &format!("skipped IPv6 half: {}: {}\n", s.path, s.reason);
        }
        for e in &self.errors {
            out += &format!("{}: {}\n", e.path, e.reason);
        }
        out
    }
}

//! What the node's BIRD says through its control socket: its BGP sessions (as `calicoctl node
//! status` lists them) and the prefixes it learned, with the sessions that taught each.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    str::FromStr,
};

use birdc::{Client, Message, ProtoSpecificInfo, ShowProtocolDetailsMessage};
use serde::Serialize;

use super::config::{MESH_PREFIX, PEER_PREFIX};
use crate::{
    cluster::{Cidr, Cidr6},
    reconcile::dataplane::Fabric,
};

/// One BGP session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Session {
    /// BIRD's name of the session (`node_<name>` for the mesh, `peer_<address>` for a peer).
    pub name: String,
    /// `node-to-node mesh` or `global`/`node-specific` peer, as calicoctl says.
    pub kind: &'static str,
    pub peer: String,
    pub peer_as: u32,
    /// BGP's state: Established, Active, Connect, OpenSent, Idle...
    pub state: String,
    /// When the session last changed state (BIRD's clock).
    pub since: String,
    /// BIRD's note: the last error when the session is down.
    pub info: String,
    pub received: u32,
    pub advertised: u32,
}

impl Session {
    pub fn established(&self) -> bool {
        self.state == "Established"
    }
}

/// BIRD's sessions and its BGP routes, read once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    pub sessions: Vec<Session>,
    /// Each learned prefix and the sessions it came over.
    pub learned: BTreeMap<Cidr, BTreeSet<String>>,
    /// The same for IPv6 prefixes.
    pub learned6: BTreeMap<Cidr6, BTreeSet<String>>,
}

impl Reading {
    /// Prefixes learned from an explicit peer (a router of the fabric, or its route reflector):
    /// the fabric can route them.
    pub fn fabric_routes(&self) -> Fabric {
        Fabric {
            v4: from_peers(&self.learned),
            v6: from_peers(&self.learned6),
        }
    }
}

/// The prefixes of `learned` that came over an explicit peer's session.
fn from_peers<C: Copy + Ord>(learned: &BTreeMap<C, BTreeSet<String>>) -> BTreeSet<C> {
    learned
        .iter()
        .filter(|(_, from)| from.iter().any(|p| p.starts_with(PEER_PREFIX)))
        .map(|(c, _)| *c)
        .collect()
}

/// Reads BIRD's sessions and routes through its control socket.
pub fn read(socket: &Path) -> anyhow::Result<Reading> {
    let mut conn = Client::for_unix_socket(socket).connect_sync()?;
    let details = conn.show_protocols_details(None)?;
    let sessions = details.iter().filter_map(session).collect();
    let routes = conn.send_request("show route where source = RTS_BGP")?;
    Ok(Reading {
        sessions,
        learned: learned(&routes),
        learned6: learned(&routes),
    })
}

fn session(d: &ShowProtocolDetailsMessage) -> Option<Session> {
    let p = &d.protocol;
    if p.proto != "BGP" {
        return None;
    }
    let detail = d.detail.as_ref();
    let bgp = detail.and_then(|x| match &x.proto_info {
        Some(ProtoSpecificInfo::Bgp(b)) => Some(b),
        _ => None,
    });
    let stats = detail
        .and_then(|x| x.channels.first())
        .and_then(|c| c.route_stats.as_ref());
    let peer = match bgp.map(|b| &b.neighbor) {
        Some(birdc::BgpNeighbor::Address(a) | birdc::BgpNeighbor::Range(a)) => {
            a.split('%').next().unwrap_or(a).to_string()
        }
        None => String::new(),
    };
    let kind = if p.name.starts_with(MESH_PREFIX) {
        "node-to-node mesh"
    } else {
        "peer"
    };
    let info = p.info.clone().unwrap_or_default();
    Some(Session {
        name: p.name.clone(),
        kind,
        peer,
        peer_as: bgp.map_or(0, |b| b.neighbor_as),
        state: bgp.map_or_else(|| p.state.clone(), |b| b.state.clone()),
        since: p.since.clone(),
        info,
        received: stats.map_or(0, |s| s.imported),
        advertised: stats.map_or(0, |s| s.exported),
    })
}

/// The prefixes of `show route` of one family (`C`) and the protocols each came from: a
/// route's first line names its prefix, lines of further routes for it start with blanks.
fn learned<C: FromStr + Copy + Ord>(messages: &[Message]) -> BTreeMap<C, BTreeSet<String>> {
    let mut out: BTreeMap<C, BTreeSet<String>> = BTreeMap::new();
    let mut current = None;
    for m in messages {
        let Message::RouteList(text) = m else {
            continue;
        };
        for line in text.lines() {
            // A prefix of the other family ends the current one without starting another.
            if let Some(t) = line.split_whitespace().next().filter(|t| t.contains('/')) {
                current = t.parse().ok();
            }
            let proto = line
                .split_once('[')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            if let (Some(c), Some(p)) = (current, proto) {
                out.entry(c).or_default().insert(p.to_string());
            }
        }
    }
    out
}

/// The speaker for `datapath status`: where it lives, whether it answers, its sessions.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub socket: String,
    pub running: bool,
    pub sessions: Vec<Session>,
    pub error: Option<String>,
}

impl Summary {
    /// Reads the speaker behind `socket`; `None` when there is none (the state has no BGP).
    pub fn read(socket: &Path) -> Option<Self> {
        if !socket.exists() {
            return None;
        }
        let (sessions, error) = match read(socket) {
            Ok(r) => (r.sessions, None),
            Err(e) => (Vec::new(), Some(format!("{e:#}"))),
        };
        Some(Self {
            socket: socket.display().to_string(),
            running: error.is_none(),
            sessions,
            error,
        })
    }

    /// The sessions as `calicoctl node status` lists them.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        if let Some(e) = &self.error {
            let _ = writeln!(
                s,
                "  bgp       speaker at {} not answering: {e}",
                self.socket
            );
            return s;
        }
        let up = self.sessions.iter().filter(|x| x.established()).count();
        let _ = writeln!(
            s,
            "  bgp       BIRD at {}: {up} of {} sessions established",
            self.socket,
            self.sessions.len()
        );
        let _ = writeln!(
            s,
            "    {:<16} {:<18} {:>10} {:<12} {:<20} {:>8} {:>10}  INFO",
            "PEER ADDRESS", "PEER TYPE", "PEER AS", "STATE", "SINCE", "RECEIVED", "ADVERTISED"
        );
        for x in &self.sessions {
            let _ = writeln!(
                s,
                "    {:<16} {:<18} {:>10} {:<12} {:<20} {:>8} {:>10}  {}",
                x.peer, x.kind, x.peer_as, x.state, x.since, x.received, x.advertised, x.info
            );
        }
        s
    }
}

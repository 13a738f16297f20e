//! `datapath status`: whether the datapath is attached and on which hooks, the state it runs,
//! and what the agent last did, read from the pins alone: it answers with no agent running.
use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    path::Path,
};

use maps_common::{ABI_VERSION, AgentInfo, HealthState, node_flags, prog_names, route_mode};
use serde::Serialize;

use crate::{
    VERSION,
    kernel::loader::{self, DecapHook, TcAttach},
    kernel::maps::{DatapathMaps, MapsError},
};

#[derive(Clone, Debug, Serialize)]
pub struct Hook {
    pub program: &'static str,
    pub hook: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub node_addr: Ipv4Addr,
    /// The underlay interface the programs are attached to, by name (or its index).
    pub underlay: String,
    pub mode: &'static str,
    pub vni: u32,
    pub vxlan_port: u16,
    pub cross_subnet: bool,
    pub host_routing: &'static str,
    pub decap: &'static str,
    pub tc_attach: &'static str,
}

#[derive(Clone, Debug, Serialize)]
pub struct Reload {
    pub unix: u64,
    /// The same in this host's local time, for people.
    pub local_time: String,
    pub ok: bool,
    pub reloads: u64,
    pub failures: u64,
    /// Why the last state was rejected, when the last reload was a rejection.
    pub rejected: Option<String>,
}

/// This node's IPv6 half as the programs have it.
#[derive(Clone, Debug, Serialize)]
pub struct Ipv6Status {
    pub node_addr: std::net::Ipv6Addr,
    pub pod_cidr: String,
    /// Peers with an IPv6 half.
    pub peers: usize,
    /// Of those, the ones this node has no IPv6 route toward.
    pub unreachable: usize,
}

impl Ipv6Status {
    /// The status line of `v6` (none: IPv6 pods are not carried).
    fn line(v6: Option<&Self>) -> String {
        match v6 {
            Some(v6) => {
                let down = match v6.unreachable {
                    0 => String::new(),
                    n => format!(", {n} unreachable over IPv6"),
                };
                format!(
                    "  ipv6      node {}  pod CIDR {}  {} peers with IPv6 (VXLAN over IPv6){down}",
                    v6.node_addr, v6.pod_cidr, v6.peers
                )
            }
            None => "  ipv6      not carried (no IPv6 half for this node)".into(),
        }
    }

    fn read(maps: &DatapathMaps) -> Option<Self> {
        let m = maps.six.as_ref()?;
        let c = m.config.get(&0, 0).ok().filter(|c| c.pod_prefix_len != 0)?;
        let cidr = std::net::Ipv6Addr::from(c.pod_cidr);
        let flags: Vec<u8> = m.nodes.iter().flatten().map(|(_, e)| e.flags).collect();
        Some(Self {
            node_addr: c.node_addr.into(),
            pod_cidr: format!("{cidr}/{}", c.pod_prefix_len),
            peers: flags.len(),
            unreachable: (flags.iter())
                .filter(|f| *f & node_flags::UNREACHABLE != 0)
                .count(),
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub attached: bool,
    pub pin_dir: String,
    /// Why the datapath is not attached, when it is not.
    pub reason: Option<String>,
    pub hooks: Vec<Hook>,
    pub config: Option<Config>,
    /// IPv6 pods, when this node carries them (dual-stack, map ABI 5 on).
    pub ipv6: Option<Ipv6Status>,
    pub nodes_known: usize,
    pub peers_unreachable: usize,
    /// The agent's last health probes: peers answering through the tunnel, and those that do
    /// not (by address, with whether the underlay answers).
    pub health: HealthSummary,
    pub nodes_skipped: u32,
    pub pods: usize,
    pub pod_mtu: u32,
    pub last_reload: Option<Reload>,
    pub agent_version: String,
    pub agent_pid: u32,
    pub agent_running: bool,
    /// The agent got SIGTERM and is on its way out (its programs stay).
    pub agent_stopping: bool,
    /// Reference CNI plugins the agent found missing from its CNI bin directory: no pod can
    /// be created on this node until they are there.
    pub cni_plugins_missing: Vec<&'static str>,
    /// Map ABI of the pinned maps (as the agent that wrote them recorded it).
    pub map_abi: u32,
    /// This binary's version and map ABI.
    pub cli_version: &'static str,
    pub cli_map_abi: u32,
    /// The node's BGP speaker and its sessions, when it runs one (`bgp` in the cluster state).
    pub bgp: Option<crate::bgp::sessions::Summary>,
}

/// The peers' last health probes in a few numbers and names: their IPv4 halves, and their
/// IPv6 halves apart.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HealthSummary {
    #[serde(flatten)]
    pub v4: HealthCounts,
    /// The peers' IPv6 halves, once this node probes any (dual-stack).
    pub ipv6: Option<HealthCounts>,
}

/// One family's probes.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HealthCounts {
    pub probed: usize,
    pub ok: usize,
    /// Unreachable through the tunnel while the underlay answers: a VNI or port mismatch, a
    /// firewall.
    pub tunnel_down: Vec<IpAddr>,
    /// Answering neither through the tunnel nor on the underlay.
    pub down: Vec<IpAddr>,
}

impl HealthCounts {
    /// `N of M peers answer through the tunnel`, and those that do not.
    fn words(&self) -> String {
        let names = |v: &[IpAddr]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        let mut s = format!(
            "{} of {} peers answer through the tunnel",
            self.ok, self.probed
        );
        if !self.tunnel_down.is_empty() {
            s += &format!(
                "; unreachable through the tunnel while the underlay answers (VNI or port mismatch, firewall): {}",
                names(&self.tunnel_down).join(", ")
            );
        }
        if !self.down.is_empty() {
            s += &format!("; down (neither answers): {}", names(&self.down).join(", "));
        }
        s
    }

    fn add(&mut self, addr: IpAddr, p: &maps_common::PeerHealth) {
        self.probed += 1;
        match p.state() {
            HealthState::Ok => self.ok += 1,
            HealthState::TunnelDown => self.tunnel_down.push(addr),
            HealthState::Down => self.down.push(addr),
        }
    }
}

impl HealthSummary {
    /// `  health    ...`, as `datapath status` prints it.
    fn line(&self) -> String {
        let six =
            (self.ipv6.as_ref()).map_or(String::new(), |h| format!("; over IPv6 {}", h.words()));
        format!("  health    {}{six}", self.v4.words())
    }

    fn read(maps: &DatapathMaps) -> Self {
        let mut h = Self::default();
        for (addr, p) in maps.read_health() {
            match addr {
                IpAddr::V4(_) => h.v4.add(addr, &p),
                IpAddr::V6(_) => h.ipv6.get_or_insert_default().add(addr, &p),
            }
        }
        h
    }
}

/// The hooks the pins (or, for netlink TC, the agent's record) say are in use.
fn hooks(pin_dir: &Path, info: &AgentInfo) -> Vec<Hook> {
    let netlink = TcAttach::from_code(info.tc_attach) == TcAttach::Netlink;
    let tc = |dir: &str| {
        if netlink {
            format!("netlink tc {dir}")
        } else {
            format!("tcx {dir}")
        }
    };
    let mut out = Vec::new();
    let pinned = |p: &str| loader::link_pin_path(pin_dir, p).exists();
    if pinned(prog_names::TC_ENCAP_EGRESS) || (netlink && info.abi_version != 0) {
        out.push(Hook {
            program: prog_names::TC_ENCAP_EGRESS,
            hook: tc("egress"),
        });
    }
    if pinned(prog_names::XDP_DECAP_INGRESS) {
        out.push(Hook {
            program: prog_names::XDP_DECAP_INGRESS,
            hook: "xdp".into(),
        });
    } else if pinned(prog_names::TC_DECAP_INGRESS)
        || (netlink && DecapHook::from_code(info.decap_hook) == Some(DecapHook::Tc))
    {
        out.push(Hook {
            program: prog_names::TC_DECAP_INGRESS,
            hook: tc("ingress"),
        });
    }
    if pinned(prog_names::TC_CSUM_DEV_INGRESS) {
        out.push(Hook {
            program: prog_names::TC_CSUM_DEV_INGRESS,
            hook: format!(
                "{} on {}",
                tc("ingress"),
                crate::underlay::netlink::CSUM_DEV
            ),
        });
    }
    out
}

impl Status {
    /// Reads everything from the pins under `pin_dir`; a pin directory without a datapath is
    /// a status too (not attached, and where it looked).
    pub fn read(pin_dir: &Path) -> Self {
        let mut st = Status {
            attached: false,
            pin_dir: pin_dir.display().to_string(),
            reason: None,
            hooks: Vec::new(),
            config: None,
            ipv6: None,
            nodes_known: 0,
            peers_unreachable: 0,
            health: HealthSummary::default(),
            nodes_skipped: 0,
            pods: 0,
            pod_mtu: 0,
            last_reload: None,
            agent_version: String::new(),
            agent_pid: 0,
            agent_running: false,
            agent_stopping: false,
            cni_plugins_missing: Vec::new(),
            map_abi: 0,
            cli_version: VERSION,
            cli_map_abi: ABI_VERSION,
            bgp: None,
        };
        if let Err(e) = st.fill(pin_dir) {
            st.reason = Some(e.to_string());
        }
        st
    }

    fn fill(&mut self, pin_dir: &Path) -> Result<(), MapsError> {
        let maps = DatapathMaps::open_pinned(pin_dir)?;
        let cfg = maps.read_config()?;
        let info = maps.read_agent()?;
        let nodes = maps.read_nodes()?;
        self.hooks = hooks(pin_dir, &info);
        self.nodes_known = nodes.len();
        self.peers_unreachable = nodes
            .values()
            .filter(|e| e.flags & node_flags::UNREACHABLE != 0)
            .count();
        self.pods = maps.endpoints.keys().count();
        self.health = HealthSummary::read(&maps);
        self.pod_mtu = info.pod_mtu;
        self.nodes_skipped = info.nodes_skipped;
        self.agent_version = crate::kernel::maps::from_fixed(&info.version);
        self.agent_pid = info.pid;
        // SAFETY: kill with signal 0 only checks that the process exists.
        self.agent_running = info.pid != 0 && unsafe { libc::kill(info.pid as i32, 0) } == 0;
        self.agent_stopping = self.agent_running && info.stopping == 1;
        self.cni_plugins_missing = crate::outputs::cni::plugin_names(info.cni_missing);
        self.map_abi = info.abi_version;
        if info.abi_version != 0 {
            self.last_reload = Some(Reload {
                unix: info.last_reload_unix,
                local_time: local_time(info.last_reload_unix),
                ok: info.last_reload_ok == 1,
                reloads: info.reloads,
                failures: info.reload_failures,
                rejected: (info.last_reload_ok != 1)
                    .then(|| maps.read_agent_note().unwrap_or_default())
                    .filter(|why| !why.is_empty()),
            });
        }
        if cfg.node_addr != [0; 4] {
            self.config = Some(Config {
                node_addr: Ipv4Addr::from(cfg.node_addr),
                underlay: crate::underlay::netlink::if_name(cfg.underlay_ifindex)
                    .unwrap_or_else(|| format!("ifindex {}", cfg.underlay_ifindex)),
                mode: route_mode::name(info.mode),
                vni: cfg.vni,
                vxlan_port: cfg.vxlan_port,
                cross_subnet: info.cross_subnet == 1,
                host_routing: maps_common::host_routing::name(info.host_routing),
                decap: DecapHook::from_code(info.decap_hook).map_or("unknown", DecapHook::name),
                tc_attach: TcAttach::from_code(info.tc_attach).name(),
            });
        }
        self.ipv6 = Ipv6Status::read(&maps);
        self.attached = self.config.is_some()
            && self
                .hooks
                .iter()
                .any(|h| h.program == prog_names::TC_ENCAP_EGRESS);
        if !self.attached {
            self.reason = Some(format!(
                "maps are pinned under {} but no encapsulation hook is (detached, or the agent never finished starting)",
                pin_dir.display()
            ));
        }
        Ok(())
    }

    /// The status as a person reads it.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if !self.attached {
            let _ = writeln!(
                s,
                "datapath: not attached: {}",
                self.reason.as_deref().unwrap_or("unknown")
            );
            return s;
        }
        let _ = writeln!(s, "datapath: attached (pins under {})", self.pin_dir);
        for h in &self.hooks {
            let _ = writeln!(s, "  hook      {:<20} {}", h.program, h.hook);
        }
        if let Some(c) = &self.config {
            let _ = writeln!(
                s,
                "  config    node {} on {}  mode {}  vni {}  port {}  crossSubnet {}  host routing {}  decap {}  tc attach {}",
                c.node_addr,
                c.underlay,
                c.mode,
                c.vni,
                c.vxlan_port,
                c.cross_subnet,
                c.host_routing,
                c.decap,
                c.tc_attach
            );
        }
        let _ = writeln!(s, "{}", Ipv6Status::line(self.ipv6.as_ref()));
        let _ = writeln!(
            s,
            "  nodes     {} known, {} unreachable, {} skipped; {} local pods; pod MTU {}",
            self.nodes_known, self.peers_unreachable, self.nodes_skipped, self.pods, self.pod_mtu
        );
        let _ = writeln!(s, "{}", self.health.line());
        if let Some(b) = &self.bgp {
            s.push_str(&b.render());
        }
        if let Some(r) = &self.last_reload {
            let _ = writeln!(
                s,
                "  reload    last at {} {}; {} reloads, {} failed",
                r.local_time,
                match (r.ok, &r.rejected) {
                    (true, _) => "succeeded".to_string(),
                    (false, Some(why)) => format!("FAILED (the last good state stays): {why}"),
                    (false, None) => "FAILED (the last good state stays)".to_string(),
                },
                r.reloads,
                r.failures
            );
        }
        if !self.cni_plugins_missing.is_empty() {
            let _ = writeln!(
                s,
                "  cni       plugins {} missing from the agent's --cni-bin-dir: no pod can be created here",
                self.cni_plugins_missing.join(", ")
            );
        }
        let _ = writeln!(
            s,
            "  agent     {} (pid {}, {}), map ABI {}; this binary {} (map ABI {})",
            self.agent_version,
            self.agent_pid,
            match (self.agent_running, self.agent_stopping) {
                (true, false) => "running",
                (true, true) => "stopping",
                _ => "not running",
            },
            self.map_abi,
            self.cli_version,
            self.cli_map_abi
        );
        s
    }
}

/// `unix` (seconds) as this host's local time and how long ago, e.g.
/// `2026-12-03 10:16:33 +0000 (42 s ago)`.
fn local_time(unix: u64) -> String {
    let t = unix as libc::time_t;
    // SAFETY: all-zero is a valid tm; localtime_r writes into it and reads only `t`.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return format!("unix {unix}");
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let off = tm.tm_gmtoff / 60;
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} {}{:02}{:02} ({} s ago)",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        if off < 0 { '-' } else { '+' },
        off.abs() / 60,
        off.abs() % 60,
        now.saturating_sub(unix)
    )
}

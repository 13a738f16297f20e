//! `datapath monitor`: the programs' events (`DP_EVENTS`, a pinned ring buffer) as they come,
//! decoded and filtered: which packet was dropped, where, why, from whom to whom. Works
//! whether the agent runs or not; a ring buffer has one reader, so a second monitor is refused
//! with the reason. Traces of forwarded packets are sampled only while a monitor asks.
use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use aya::maps::{Map, MapData, RingBuf};
use maps_common::{DropReason, Event, event_hook, event_kind, map_names};
use serde::Serialize;

use crate::kernel::{loader, maps::DatapathMaps};

/// Which events to show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Drop,
    Trace,
    All,
}

/// `datapath monitor`'s flags.
#[derive(clap::Args, Clone, Debug)]
pub struct MonitorArgs {
    /// drop: packets the programs dropped; trace: a sample of forwarded packets (one in
    /// --trace-every, on only while this monitor runs); all: both.
    #[arg(long = "type", value_enum, default_value = "drop")]
    pub kind: Kind,
    /// One JSON object per event, one per line.
    #[arg(long)]
    pub json: bool,
    /// Only events whose outer (underlay) source or destination is this node address (IPv4
    /// or IPv6).
    #[arg(long)]
    pub node: Option<IpAddr>,
    /// Only events whose (inner, or only) source or destination is this pod address (IPv4 or
    /// IPv6).
    #[arg(long)]
    pub pod: Option<IpAddr>,
    /// Only drops for this reason (the names `datapath stats` uses, e.g. wrong_vni).
    #[arg(long)]
    pub reason: Option<String>,
    /// With --type trace or all: trace one forwarded packet in this many.
    #[arg(long, default_value_t = 100)]
    pub trace_every: u32,
    /// Stop after this many events (default: until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this many seconds (default: until interrupted).
    #[arg(long)]
    pub duration: Option<u64>,
    /// Where the agent pinned its maps (its --pin-dir).
    #[arg(long, default_value = loader::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

/// One decoded event, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct Shown {
    /// Wall-clock time, RFC 3339 with microseconds (UTC).
    pub time: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The drop reason (the counters' names); absent for traces.
    pub reason: Option<&'static str>,
    pub program: &'static str,
    pub hook: &'static str,
    pub ifindex: u32,
    pub iface: Option<String>,
    pub len: u32,
    /// The packet's first IPv4 or IPv6 header (the outer one of a tunnel packet).
    pub outer: Option<Headers>,
    /// VXLAN's VNI.
    pub vni: Option<u32>,
    /// The inner IP header of an IPIP or VXLAN packet.
    pub inner: Option<Headers>,
    /// The node at the other end of the underlay, when the maps know the address.
    pub peer: Option<IpAddr>,
    /// That node's name, once the agent has probed it (`DP_HEALTH`, `DP_HEALTH6`).
    pub peer_name: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Headers {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: &'static str,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Reads and prints events until interrupted (or `--count`, `--duration`); returns how many
/// were shown.
pub fn run(args: &MonitorArgs) -> anyhow::Result<u64> {
    let path = loader::map_pin_path(&args.pin_dir, map_names::EVENTS);
    let _reader = ReaderLock::take(&args.pin_dir, &path)?;
    let md = MapData::from_pin(&path).with_context(|| {
        format!(
            "no event ring pinned at {} (no agent of map ABI 4 or later ran with this --pin-dir)",
            path.display()
        )
    })?;
    let mut ring = RingBuf::try_from(Map::RingBuf(md))?;
    let maps = DatapathMaps::open_pinned(&args.pin_dir)?;
    let tracing = args.kind != Kind::Drop;
    let _trace = TraceSampling::start(&args.pin_dir, if tracing { args.trace_every } else { 0 })?;
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let started = Instant::now();
    let mut shown = 0u64;
    while !STOP.load(Ordering::Relaxed) {
        if args
            .duration
            .is_some_and(|d| started.elapsed() >= Duration::from_secs(d))
            || args.count.is_some_and(|c| shown >= c)
        {
            break;
        }
        // The programs write without waking the reader (a wakeup per event costs them
        // microseconds under a flood): poll every 50 ms.
        wait_readable(&ring, 50);
        while let Some(item) = ring.next() {
            let Some(ev) = parse(&item) else { continue };
            if let Some(s) = show(&ev, args, &maps) {
                print(&s, args.json)?;
                shown += 1;
            }
            if args.count.is_some_and(|c| shown >= c) {
                break;
            }
        }
    }
    Ok(shown)
}

/// Waits up to `ms` for the ring to hold events.
fn wait_readable(ring: &RingBuf<MapData>, ms: i32) {
    let mut pfd = libc::pollfd {
        fd: ring.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}

fn parse(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < size_of::<Event>() {
        return None;
    }
    // SAFETY: Event is plain old data of that size; read unaligned from the ring's bytes.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

/// The event decoded, or `None` when a filter leaves it out.
fn show(ev: &Event, args: &MonitorArgs, maps: &DatapathMaps) -> Option<Shown> {
    let is_drop = ev.kind == event_kind::DROP;
    let wanted = match args.kind {
        Kind::Drop => is_drop,
        Kind::Trace => !is_drop,
        Kind::All => true,
    };
    let reason = is_drop.then(|| drop_name(ev.reason));
    let outer = headers(ev.family, (ev.src, ev.dst), ev.proto, (ev.sport, ev.dport));
    let inner = headers(
        ev.inner_family,
        (ev.inner_src, ev.inner_dst),
        ev.inner_proto,
        (ev.inner_sport, ev.inner_dport),
    );
    let node_ok = args
        .node
        .is_none_or(|n| outer.as_ref().is_some_and(|o| o.src == n || o.dst == n));
    let pod_hdr = inner.as_ref().or(outer.as_ref());
    let pod_ok = args
        .pod
        .is_none_or(|p| pod_hdr.is_some_and(|h| h.src == p || h.dst == p));
    let reason_ok = args.reason.as_deref().is_none_or(|r| reason == Some(r));
    if !(wanted && node_ok && pod_ok && reason_ok) {
        return None;
    }
    let peer = outer
        .as_ref()
        .and_then(|o| [o.src, o.dst].into_iter().find(|a| known_node(maps, *a)));
    let peer_name = peer.and_then(|p| {
        let h = maps.health_of(p)?;
        Some(crate::kernel::maps::from_fixed(&h.name)).filter(|n| !n.is_empty())
    });
    let (program, hook) = event_hook::name(ev.hook)
        .split_once(" (")
        .map_or(("unknown", "unknown"), |(p, h)| {
            (p, h.trim_end_matches(')'))
        });
    Some(Shown {
        time: wall_clock(ev.ts_ns),
        kind: if is_drop { "drop" } else { "trace" },
        reason,
        program,
        hook,
        ifindex: ev.ifindex,
        iface: crate::underlay::netlink::if_name(ev.ifindex),
        len: ev.len,
        outer,
        vni: (ev.vni != 0 || (inner.is_some() && ev.proto == 17)).then_some(ev.vni),
        inner,
        peer,
        peer_name,
    })
}

fn drop_name(code: u8) -> &'static str {
    DropReason::ALL
        .iter()
        .find(|r| **r as u32 == u32::from(code))
        .map_or("unknown", |r| r.name())
}

/// Whether `a` is a node the maps know (either family).
fn known_node(maps: &DatapathMaps, a: IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => maps.nodes.get(&a.octets(), 0).is_ok(),
        IpAddr::V6(a) => (maps.six.as_ref()).is_some_and(|m| m.nodes.get(&a.octets(), 0).is_ok()),
    }
}

/// One header as the event holds it: `None` when the family is neither 4 nor 6 (no header).
fn headers(
    family: u8,
    (src, dst): ([u8; 16], [u8; 16]),
    proto: u8,
    (sport, dport): ([u8; 2], [u8; 2]),
) -> Option<Headers> {
    let addr = |a: [u8; 16]| match family {
        4 => Some(IpAddr::from(Ipv4Addr::new(a[0], a[1], a[2], a[3]))),
        6 => Some(IpAddr::from(Ipv6Addr::from(a))),
        _ => None,
    };
    let ports = matches!(proto, 6 | 17);
    Some(Headers {
        src: addr(src)?,
        dst: addr(dst)?,
        proto: match proto {
            1 => "icmp",
            4 => "ipip",
            6 => "tcp",
            17 => "udp",
            58 => "icmpv6",
            _ => "other",
        },
        sport: ports.then(|| u16::from_be_bytes(sport)),
        dport: ports.then(|| u16::from_be_bytes(dport)),
    })
}

/// An event's CLOCK_MONOTONIC nanoseconds as wall-clock time.
fn wall_clock(ts_ns: u64) -> String {
    let mut mono = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime into a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut mono) };
    let now_mono = mono.tv_sec as u64 * 1_000_000_000 + mono.tv_nsec as u64;
    let ago = Duration::from_nanos(now_mono.saturating_sub(ts_ns));
    let t = SystemTime::now() - ago;
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, dd) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Days since 1970-01-01 as (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn print(s: &Shown, json: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(s)?)?;
    } else {
        writeln!(out, "{}", text(s))?;
    }
    out.flush()?;
    Ok(())
}

/// One line: time, type and reason, program, interface, length, headers, peer.
fn text(s: &Shown) -> String {
    let hdr = |h: &Headers| match (h.sport, h.dport) {
        (Some(sp), Some(dp)) => {
            let (from, to) = (SocketAddr::new(h.src, sp), SocketAddr::new(h.dst, dp));
            format!("{from} > {to} {}", h.proto)
        }
        _ => format!("{} > {} {}", h.src, h.dst, h.proto),
    };
    let mut line = format!(
        "{} {} {} {} {} len {}",
        s.time,
        s.kind,
        s.reason.unwrap_or("-"),
        s.program,
        s.iface.as_deref().unwrap_or("?"),
        s.len
    );
    if let Some(o) = &s.outer {
        line += &format!(": {}", hdr(o));
    }
    if let Some(v) = s.vni {
        line += &format!(" vni {v}");
    }
    if let Some(i) = &s.inner {
        line += &format!(" | {}", hdr(i));
    }
    line += &match (s.peer, &s.peer_name) {
        (Some(p), Some(n)) => format!("  peer {n} ({p})"),
        (Some(p), None) => format!("  peer {p}"),
        (None, _) => "  peer unknown".to_string(),
    };
    line
}

/// The one reader of a ring buffer: an exclusive lock, held while reading, on the directory
/// of the pinned maps (a pinned map itself cannot be opened as a file).
struct ReaderLock(#[expect(dead_code, reason = "held for its lock")] File);

impl ReaderLock {
    fn take(pin_dir: &Path, ring: &Path) -> anyhow::Result<Self> {
        let dir = pin_dir.join(crate::kernel::pin_tree::MAPS);
        let f = File::open(&dir).with_context(|| {
            format!(
                "no maps pinned at {} (is the agent's --pin-dir another?)",
                dir.display()
            )
        })?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            anyhow::bail!(
                "another `datapath monitor` is reading {} already: a ring buffer has one reader (two would each see part of the events); stop that one, or read its output",
                ring.display()
            );
        }
        Ok(Self(f))
    }
}

/// Trace sampling on while the monitor runs (`MonitorConf::trace_every`), off again after.
struct TraceSampling(Option<PathBuf>);

impl TraceSampling {
    fn start(pin_dir: &Path, every: u32) -> anyhow::Result<Self> {
        if every == 0 {
            return Ok(Self(None));
        }
        set_trace_every(pin_dir, every)?;
        Ok(Self(Some(pin_dir.to_path_buf())))
    }
}

impl Drop for TraceSampling {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            let _ = set_trace_every(dir, 0);
        }
    }
}

/// Writes `trace_every` into the pinned `DP_MONITOR_CONF`, keeping the rate limit.
pub fn set_trace_every(pin_dir: &Path, every: u32) -> anyhow::Result<()> {
    let mut maps = DatapathMaps::open_pinned(pin_dir)?;
    let present = maps.update_monitor_conf(|c| c.trace_every = every)?;
    anyhow::ensure!(
        present,
        "no {} pinned under {} (an agent before map ABI 4)",
        map_names::MONITOR_CONF,
        pin_dir.display()
    );
    Ok(())
}

//! Notices changes of the host's netfilter ruleset, so that flows BPF host routing carries on
//! netfilter's earlier verdict (`--host-routing accepted-flows`) are judged again: nftables
//! (and iptables-nft, which is nftables underneath) announce every committed transaction on
//! the `NFNLGRP_NFTABLES` netlink group; iptables-legacy and ip6tables-legacy announce nothing,
//! so their tables are read (counters masked) and compared every `LEGACY_POLL`.
use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash as _, Hasher as _},
    io,
    os::fd::AsRawFd as _,
    path::Path,
    time::Duration,
};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// nfnetlink's multicast group of nf_tables events (`NFNLGRP_NFTABLES`).
const NFNLGRP_NFTABLES: u32 = 7;
/// How often iptables-legacy's tables are read: a change reaches established flows within it.
pub const LEGACY_POLL: Duration = Duration::from_millis(250);
/// How to read one family's legacy tables: the loaded tables' names (one a line in this
/// network namespace), the socket family and option level, and in the kernel's rule entries
/// (`struct ipt_entry`, `struct ip6t_entry`) the offset of `next_offset` and the 16 bytes of
/// counters.
struct Legacy {
    names: &'static str,
    domain: libc::c_int,
    level: libc::c_int,
    next_offset: usize,
    counters: std::ops::Range<usize>,
}

/// iptables-legacy (after `struct ipt_ip`, 84 bytes) and ip6tables-legacy (after
/// `struct ip6t_ip6`, 136 bytes; counters 8-aligned).
const LEGACY: [Legacy; 2] = [
    Legacy {
        names: "/proc/net/ip_tables_names",
        domain: libc::AF_INET,
        level: libc::IPPROTO_IP,
        next_offset: 90,
        counters: 96..112,
    },
    Legacy {
        names: "/proc/net/ip6_tables_names",
        domain: libc::AF_INET6,
        level: libc::IPPROTO_IPV6,
        next_offset: 142,
        counters: 152..168,
    },
];
/// `nf_conntrack_tcp_be_liberal`: see `keep_tcp_tracking_liberal`.
const TCP_BE_LIBERAL: &str = "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal";

/// What changed, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Nftables,
    IptablesLegacy,
}

/// Starts watching the ruleset; every change is sent on the returned channel (a burst of
/// notifications from one transaction may arrive as several).
pub fn watch() -> mpsc::Receiver<Change> {
    let (tx, rx) = mpsc::channel(16);
    let nft = tx.clone();
    std::thread::Builder::new()
        .name("nft-events".into())
        .spawn(move || {
            if let Err(e) = nft_events(&nft) {
                warn!(
                    "nftables change notifications unavailable ({e}): nftables and iptables-nft changes reach accepted flows only at their next 10 s verdict"
                );
            }
        })
        .expect("spawning the nftables watcher");
    tokio::spawn(poll_legacy(tx));
    rx
}

/// Blocks reading nf_tables notifications; each message (or a lost one: ENOBUFS) is a change.
fn nft_events(tx: &mpsc::Sender<Change>) -> io::Result<()> {
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind(&SocketAddr::new(0, 0))?;
    sock.add_membership(NFNLGRP_NFTABLES)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match sock.recv(&mut &mut buf[..], 0) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        if tx.try_send(Change::Nftables).is_err() && tx.is_closed() {
            return Ok(());
        }
    }
}

/// Compares iptables-legacy's and ip6tables-legacy's tables with their last reading every `LEGACY_POLL`.
async fn poll_legacy(tx: mpsc::Sender<Change>) {
    let mut last = legacy_fingerprint();
    let mut tick = tokio::time::interval(LEGACY_POLL);
    loop {
        tick.tick().await;
        let now = legacy_fingerprint();
        if now != last {
            last = now;
            if tx.send(Change::IptablesLegacy).await.is_err() {
                return;
            }
        }
    }
}

/// A hash of every loaded iptables-legacy and ip6tables-legacy table with its counters masked;
/// 0 without any. Only tables already loaded are read: asking for another would load its
/// module.
fn legacy_fingerprint() -> u64 {
    let mut h = DefaultHasher::new();
    let mut any = false;
    for family in &LEGACY {
        let Ok(names) = std::fs::read_to_string(family.names) else {
            continue;
        };
        for name in names.lines().filter(|n| !n.is_empty()) {
            any = true;
            (family.domain, name).hash(&mut h);
            match legacy_table(family, name) {
                Ok(rules) => rules.hash(&mut h),
                Err(e) => e.raw_os_error().hash(&mut h),
            }
        }
    }
    if any { h.finish() } else { 0 }
}

/// `IPT_SO_GET_INFO` / `IP6T_SO_GET_INFO` and the entries after them (the same numbers).
const SO_GET_INFO: libc::c_int = 64;
const SO_GET_ENTRIES: libc::c_int = 65;
/// `struct ipt_getinfo` (and ip6t's): name[32], valid_hooks, hook_entry[5], underflow[5],
/// num_entries, size.
const GETINFO_LEN: usize = 84;
/// `struct ipt_get_entries` before its entries: name[32], size, padding to 8.
const GET_ENTRIES_HDR: usize = 40;

/// One legacy table's rules as the kernel returns them, packet and byte counters zeroed.
fn legacy_table(family: &Legacy, name: &str) -> io::Result<Vec<u8>> {
    // SAFETY: plain socket call; the descriptor is owned below.
    let fd = unsafe { libc::socket(family.domain, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by nothing else.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let get = |opt, buf: &mut [u8]| getsockopt(sock.as_raw_fd(), family.level, opt, buf);
    let mut info = [0u8; GETINFO_LEN];
    let n = name.len().min(31);
    info[..n].copy_from_slice(&name.as_bytes()[..n]);
    get(SO_GET_INFO, &mut info)?;
    let size = u32::from_ne_bytes(info[80..84].try_into().expect("4 bytes")) as usize;
    let mut entries = vec![0u8; GET_ENTRIES_HDR + size];
    entries[..n].copy_from_slice(&name.as_bytes()[..n]);
    entries[32..36].copy_from_slice(&(size as u32).to_ne_bytes());
    get(SO_GET_ENTRIES, &mut entries)?;
    let mut rules = entries.split_off(GET_ENTRIES_HDR);
    let (next_at, counters) = (family.next_offset, family.counters.clone());
    let mut off = 0;
    while off + counters.end <= rules.len() {
        let next = u16::from_ne_bytes([rules[off + next_at], rules[off + next_at + 1]]) as usize;
        rules[off + counters.start..off + counters.end].fill(0);
        if next == 0 {
            break;
        }
        off += next;
    }
    Ok(rules)
}

fn getsockopt(
    fd: libc::c_int,
    level: libc::c_int,
    opt: libc::c_int,
    buf: &mut [u8],
) -> io::Result<()> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: buf is valid for len bytes; the kernel writes at most len.
    let rc = unsafe { libc::getsockopt(fd, level, opt, buf.as_mut_ptr().cast(), &mut len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes conntrack accept TCP segments outside the window it last saw
/// (`nf_conntrack_tcp_be_liberal=1`, what kube-proxy's `--conntrack-tcp-be-liberal` sets):
/// conntrack does not see an accepted flow's packets while they bypass the stack, so the
/// segment that takes the stack at the next verdict lies far beyond that window, and would be
/// INVALID (and dropped by rules such as kube-proxy's `--ctstate INVALID -j DROP`) without it.
/// Netfilter's own flowtables reset the window the same way when a flow leaves them. Nothing
/// to do while conntrack is not loaded; checked again on every ruleset change.
pub fn keep_tcp_tracking_liberal() {
    let path = Path::new(TCP_BE_LIBERAL);
    match std::fs::read_to_string(path) {
        Ok(v) if v.trim() == "1" => {}
        Ok(_) => match std::fs::write(path, "1") {
            Ok(()) => info!(
                path = %path.display(),
                "conntrack's TCP window tracking set liberal: flows BPF host routing carried past conntrack stay ESTABLISHED when netfilter judges them again"
            ),
            Err(e) => warn!(
                path = %path.display(),
                "cannot make conntrack's TCP tracking liberal ({e}): accepted TCP flows may turn INVALID at their next verdict"
            ),
        },
        Err(_) => {}
    }
}

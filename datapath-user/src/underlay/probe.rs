//! ICMP and ICMPv6 echo probes of many targets at once, from raw sockets: every request is
//! sent, then replies are collected until a deadline, matched by identifier, sequence and
//! source. The node-to-node health check uses two rounds: to each peer's probe addresses
//! (through the tunnel, from this node's own) and to each peer's underlay addresses.
use std::{
    io,
    mem::MaybeUninit,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const ICMP_ECHO: u8 = 8;
const ICMP_ECHOREPLY: u8 = 0;
const ICMPV6_ECHO: u8 = 128;
const ICMPV6_ECHOREPLY: u8 = 129;

/// This node's source address per family (none: the kernel's choice).
#[derive(Clone, Copy, Debug, Default)]
pub struct Sources {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

/// A raw ICMP (or ICMPv6) socket, non-blocking, bound to `source` when given.
fn open(v6: bool, source: Option<IpAddr>) -> io::Result<Socket> {
    let (domain, proto) = match v6 {
        false => (Domain::IPV4, Protocol::ICMPV4),
        true => (Domain::IPV6, Protocol::ICMPV6),
    };
    let sock = Socket::new(domain, Type::RAW, Some(proto))?;
    if let Some(src) = source {
        sock.bind(&SocketAddr::new(src, 0).into())?;
    }
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// An echo request: identifier `id`, sequence `seq`, 16 bytes of payload. The kernel fills
/// an ICMPv6 checksum (RFC 3542); an ICMP one is computed here.
fn echo_request(v6: bool, id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![if v6 { ICMPV6_ECHO } else { ICMP_ECHO }, 0, 0, 0];
    p.extend(id.to_be_bytes());
    p.extend(seq.to_be_bytes());
    p.extend(b"datapath-health!");
    if !v6 {
        let c = checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
    }
    p
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// (identifier, sequence) of an echo reply in `datagram`: an IPv4 raw socket's datagrams start
/// with the IPv4 header, an IPv6 one's with the ICMPv6 message.
fn echo_reply(v6: bool, datagram: &[u8]) -> Option<(u16, u16)> {
    let (off, reply) = match v6 {
        false => (usize::from(*datagram.first()? & 0x0f) * 4, ICMP_ECHOREPLY),
        true => (0, ICMPV6_ECHOREPLY),
    };
    let icmp = datagram.get(off..off + 8)?;
    (icmp[0] == reply).then(|| {
        let id = u16::from_be_bytes([icmp[4], icmp[5]]);
        (id, u16::from_be_bytes([icmp[6], icmp[7]]))
    })
}

/// Every datagram waiting on `sock`: (source, identifier, sequence) of its echo replies.
fn drain(sock: &Socket, v6: bool) -> Vec<(IpAddr, u16, u16)> {
    let mut out = Vec::new();
    let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
    while let Ok((n, from)) = sock.recv_from(&mut buf) {
        // SAFETY: recv_from initialised the first n bytes.
        let data = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
        let src = from.as_socket().map(|a| a.ip());
        if let (Some(src), Some((id, seq))) = (src, echo_reply(v6, data)) {
            out.push((src.to_canonical(), id, seq));
        }
    }
    out
}

/// Waits up to `wait` for any of `socks` to be readable.
fn wait_readable(socks: &[(&Socket, bool)], wait: Duration) {
    let mut fds: Vec<libc::pollfd> = socks
        .iter()
        .map(|(s, _)| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: a valid array of pollfds of its length.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
}

/// Pings every target once (IPv4 ones from `sources.v4`, IPv6 ones from `sources.v6`, when
/// given) and waits up to `timeout` for the replies; each target's round trip, `None` when
/// unanswered. `id` tells concurrent rounds apart. At most 65,536 targets.
pub fn echo_all(
    sources: Sources,
    targets: &[IpAddr],
    id: u16,
    timeout: Duration,
) -> io::Result<Vec<Option<Duration>>> {
    let v4 = match targets.iter().any(IpAddr::is_ipv4) {
        true => Some(open(false, sources.v4.map(IpAddr::V4))?),
        false => None,
    };
    let v6 = match targets.iter().any(IpAddr::is_ipv6) {
        true => Some(open(true, sources.v6.map(IpAddr::V6))?),
        false => None,
    };
    let mut sent_at = Vec::with_capacity(targets.len());
    for (seq, t) in targets.iter().enumerate() {
        sent_at.push(Instant::now());
        let sock = if t.is_ipv4() { &v4 } else { &v6 };
        let request = echo_request(t.is_ipv6(), id, seq as u16);
        if let Some(sock) = sock {
            // An unreachable target (no route) is simply unanswered.
            let _ = sock.send_to(&request, &SockAddr::from(SocketAddr::new(*t, 0)));
        }
    }
    let socks: Vec<(&Socket, bool)> = [(&v4, false), (&v6, true)]
        .into_iter()
        .filter_map(|(s, six)| s.as_ref().map(|s| (s, six)))
        .collect();
    let mut rtt = vec![None; targets.len()];
    let deadline = Instant::now() + timeout;
    let mut left = targets.len();
    while left > 0 {
        let Some(wait) = deadline.checked_duration_since(Instant::now()) else {
            break;
        };
        wait_readable(&socks, wait);
        for (src, rid, seq) in socks.iter().flat_map(|(s, six)| drain(s, *six)) {
            let i = usize::from(seq);
            if rid == id && targets.get(i) == Some(&src) && rtt[i].is_none() {
                rtt[i] = Some(sent_at[i].elapsed());
                left -= 1;
            }
        }
    }
    Ok(rtt)
}

//! ICMP echo probes of many targets at once, from a raw socket: every request is sent, then
//! replies are collected until a deadline, matched by identifier, sequence and source. The
//! node-to-node health check uses two rounds: to each peer's probe address (through the
//! tunnel, from this node's own) and to each peer's underlay address.
use std::{
    io,
    mem::size_of,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

const ICMP_ECHO: u8 = 8;
const ICMP_ECHOREPLY: u8 = 0;

/// A raw ICMP socket, optionally bound to a source address.
struct RawIcmp(OwnedFd);

impl RawIcmp {
    fn open(source: Option<Ipv4Addr>) -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor no one else owns.
        let sock = Self(unsafe { OwnedFd::from_raw_fd(fd) });
        if let Some(src) = source {
            let sa = sockaddr(src);
            // SAFETY: bind with a valid sockaddr_in of its size.
            let rc = unsafe {
                libc::bind(
                    fd,
                    (&sa as *const libc::sockaddr_in).cast(),
                    size_of::<libc::sockaddr_in>() as u32,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(sock)
    }

    fn send(&self, to: Ipv4Addr, packet: &[u8]) -> io::Result<()> {
        let sa = sockaddr(to);
        // SAFETY: sendto with a valid buffer and sockaddr_in.
        let rc = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&sa as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// One datagram (IPv4 header included) within `wait`, or `None`.
    fn recv(&self, wait: Duration, buf: &mut [u8]) -> Option<usize> {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            return None;
        }
        // SAFETY: recv into a buffer of its length.
        let n = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        (n > 0).then_some(n as usize)
    }
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    }
}

/// An echo request: identifier `id`, sequence `seq`, 16 bytes of payload.
fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![ICMP_ECHO, 0, 0, 0];
    p.extend(id.to_be_bytes());
    p.extend(seq.to_be_bytes());
    p.extend(b"datapath-health!");
    let c = checksum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
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

/// (source, identifier, sequence) of an echo reply in `datagram` (IPv4 header first).
fn echo_reply(datagram: &[u8]) -> Option<(Ipv4Addr, u16, u16)> {
    let ihl = usize::from(*datagram.first()? & 0x0f) * 4;
    let icmp = datagram.get(ihl..ihl + 8)?;
    if icmp[0] != ICMP_ECHOREPLY {
        return None;
    }
    let src = Ipv4Addr::new(datagram[12], datagram[13], datagram[14], datagram[15]);
    let id = u16::from_be_bytes([icmp[4], icmp[5]]);
    let seq = u16::from_be_bytes([icmp[6], icmp[7]]);
    Some((src, id, seq))
}

/// Pings every target once (from `source` when given) and waits up to `timeout` for the
/// replies; each target's round trip, `None` when unanswered. `id` tells concurrent rounds
/// apart. At most 65,536 targets.
pub fn echo_all(
    source: Option<Ipv4Addr>,
    targets: &[Ipv4Addr],
    id: u16,
    timeout: Duration,
) -> io::Result<Vec<Option<Duration>>> {
    let sock = RawIcmp::open(source)?;
    let mut sent_at = Vec::with_capacity(targets.len());
    for (seq, t) in targets.iter().enumerate() {
        sent_at.push(Instant::now());
        // An unreachable target (no route) is simply unanswered.
        let _ = sock.send(*t, &echo_request(id, seq as u16));
    }
    let mut rtt = vec![None; targets.len()];
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    let mut left = targets.len();
    while left > 0 {
        let now = Instant::now();
        let Some(wait) = deadline.checked_duration_since(now) else {
            break;
        };
        let Some(n) = sock.recv(wait, &mut buf) else {
            continue;
        };
        let Some((src, rid, seq)) = echo_reply(&buf[..n]) else {
            continue;
        };
        let i = usize::from(seq);
        if rid == id && targets.get(i) == Some(&src) && rtt[i].is_none() {
            rtt[i] = Some(sent_at[i].elapsed());
            left -= 1;
        }
    }
    Ok(rtt)
}

//! A UDP ping-pong for the benchmark's latency figures where sockperf (3.7 in Debian) cannot
//! go: IPv6. One datagram in flight, its round trip timed with the monotonic clock.
use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

/// Echoes every datagram back to its sender until killed.
pub fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let sock = UdpSocket::bind(addr)?;
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = sock.recv_from(&mut buf)?;
        sock.send_to(&buf[..n], from)?;
    }
}

/// Half round trips in microseconds, as sockperf's `--full-rtt` figures halved: the 50th and
/// 99th percentiles of `secs` seconds of `size`-byte ping-pongs with `server`.
pub fn measure(server: SocketAddr, secs: u64, size: usize) -> anyhow::Result<(f64, f64)> {
    let bind: SocketAddr = if server.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let sock = UdpSocket::bind(bind)?;
    sock.connect(server)?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let (msg, mut buf) = (vec![0x5au8; size], vec![0u8; 2048]);
    let mut rtts = Vec::new();
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        let t0 = Instant::now();
        sock.send(&msg)?;
        match sock.recv(&mut buf) {
            Ok(n) if n == size => rtts.push(t0.elapsed().as_secs_f64() * 1e6 / 2.0),
            // A lost datagram or a stray one: no figure from this exchange.
            _ => continue,
        }
    }
    anyhow::ensure!(!rtts.is_empty(), "no reply from {server}");
    rtts.sort_by(f64::total_cmp);
    let pct = |p: f64| rtts[((rtts.len() - 1) as f64 * p) as usize];
    Ok((pct(0.50), pct(0.99)))
}

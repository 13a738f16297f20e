//! Node-to-node health, as cilium-health does it: every 10 s (`--health-interval`) the agent
//! pings each tunnel peer's probe address (the first address of its pod CIDR, which every
//! agent puts on `lo`) from its own, so the request and the reply each cross a tunnel, both
//! datapaths included; and pings the peer's underlay address. A peer the underlay reaches but
//! the tunnel does not has a VNI or port mismatch, or a firewall dropping the tunnel's
//! packets, and is named as such. A dual-stack peer is probed in each family, over each
//! underlay.
use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use maps_common::{HealthState, PeerHealth};
use tracing::{info, warn};

use crate::{
    reconcile::state::{SharedRef, lock, now},
    underlay::{
        netlink::Netlink,
        probe::{self, Sources},
    },
};

/// How long a probe's reply is waited for.
const TIMEOUT: Duration = Duration::from_secs(1);

/// Probes every tunnel peer every `period` (`--health-interval`), for ever.
pub async fn watch(shared: SharedRef, nl: Netlink, period: Duration) {
    let mut last: BTreeMap<IpAddr, PeerHealth> = BTreeMap::new();
    loop {
        if let Err(e) = round(&shared, &nl, &mut last).await {
            warn!("probing the peers' health: {e:#}");
        }
        tokio::time::sleep(period).await;
    }
}

/// One round: the probe addresses in place, both pings, the results recorded and logged.
async fn round(
    shared: &SharedRef,
    nl: &Netlink,
    last: &mut BTreeMap<IpAddr, PeerHealth>,
) -> anyhow::Result<()> {
    let (own, peers) = {
        let s = lock(shared);
        (s.dp.own_probe_addrs(), s.dp.tunnel_peers())
    };
    if own.v4.is_none() {
        return Ok(());
    }
    let want: Vec<IpAddr> = (own.v4.map(IpAddr::V4).into_iter())
        .chain(own.v6.map(IpAddr::V6))
        .collect();
    nl.ensure_probe_addrs(&want).await?;
    let tunnel_targets: Vec<IpAddr> = peers.iter().map(|p| p.probe).collect();
    let underlay_targets: Vec<IpAddr> = peers.iter().map(|p| p.underlay).collect();
    let id = (std::process::id() & 0x7fff) as u16;
    let (tunnel, underlay) = tokio::task::spawn_blocking(move || {
        let t = probe::echo_all(own, &tunnel_targets, id, TIMEOUT);
        let u = probe::echo_all(Sources::default(), &underlay_targets, id | 0x8000, TIMEOUT);
        (t, u)
    })
    .await?;
    let (tunnel, underlay) = (tunnel?, underlay?);
    let at = now() as u64;
    let mut s = lock(shared);
    for (i, p) in peers.iter().enumerate() {
        let us = |d: Option<Duration>| d.map_or(0, |d| (d.as_micros() as u32).max(1));
        let mut h = PeerHealth {
            checked_unix: at,
            tunnel_rtt_us: us(tunnel[i]),
            underlay_rtt_us: us(underlay[i]),
            since_unix: at,
            name: crate::kernel::maps::fixed(&p.name),
        };
        let before = last.get(&p.underlay);
        match before {
            Some(b) if (b.tunnel_rtt_us != 0) == (h.tunnel_rtt_us != 0) => {
                h.since_unix = b.since_unix
            }
            _ => log_change(&p.name, p.underlay, &h, before.is_some()),
        }
        s.dp.maps.write_health(p.underlay, &h)?;
        last.insert(p.underlay, h);
    }
    let keep: Vec<IpAddr> = peers.iter().map(|p| p.underlay).collect();
    last.retain(|a, _| keep.contains(a));
    s.dp.maps.retain_health(&keep);
    Ok(())
}

fn log_change(name: &str, addr: IpAddr, h: &PeerHealth, known: bool) {
    match h.state() {
        HealthState::Ok if known => {
            info!(peer = %name, %addr, "peer reachable through the tunnel again")
        }
        HealthState::Ok => {}
        HealthState::TunnelDown => warn!(
            peer = %name,
            %addr,
            "peer unreachable through the tunnel, though its underlay address answers: a VNI or UDP port that differs between the two nodes, or a firewall dropping the tunnel's packets (IP protocol 4, or UDP to the VXLAN port)"
        ),
        HealthState::Down => warn!(
            peer = %name,
            %addr,
            "peer unreachable through the tunnel and on the underlay: the node is down or cut off"
        ),
    }
}

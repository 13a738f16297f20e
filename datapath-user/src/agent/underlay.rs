//! The underlay's side of the agent: each peer's reachability kept in step with the kernel's
//! routes and neighbours, and the programs' next-hop cache invalidated when they change.
use std::{collections::HashSet, net::IpAddr, sync::Arc, time::Duration};

use tokio::sync::Notify;
use tracing::{info, warn};

use crate::{
    reconcile::state::{SharedRef, lock},
    underlay::netlink::{self, Netlink, PeerPath},
};

/// Keeps each peer's reachability flag in step with the kernel's routes toward it: checked
/// after every change of the underlay's routes or links (netlink notifications), after new
/// peers, and every 30 s (neighbour resolution fails without a route change). Every route,
/// link or neighbour notification, and every 30 s check, also invalidates the programs'
/// next-hop cache (`DP_NEXTHOPS`).
pub async fn watch(shared: SharedRef, nl: Netlink, wake: Arc<Notify>) {
    let kick = wake.clone();
    let cache = shared.clone();
    tokio::spawn(async move {
        let events = netlink::route_events(move |event| {
            // Any change may move a peer's next hop: the programs look each up again at once.
            if let Err(e) = lock(&cache).dp.bump_underlay_gen() {
                warn!("underlay changed, but the next-hop cache was not invalidated: {e}");
            }
            if event == netlink::UnderlayEvent::Route {
                kick.notify_one();
            }
        });
        if let Err(e) = events.await {
            warn!("underlay route notifications unavailable, checking every 30 s: {e:#}");
        }
    });
    loop {
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        // Let a burst of route changes settle before looking.
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Err(e) = check_peers(&shared, &nl).await {
            warn!("checking peer reachability: {e:#}");
        }
        // Bounds the cache's age where notifications are missing or were lost.
        if let Err(e) = lock(&shared).dp.bump_underlay_gen() {
            warn!("the next-hop cache was not invalidated: {e}");
        }
    }
}

/// Whether the kernel has no usable path toward `addr`: no route, or a next hop whose
/// neighbour resolution failed (`failed`).
async fn unreachable(
    nl: &Netlink,
    addr: IpAddr,
    failed: &HashSet<(u32, IpAddr)>,
) -> anyhow::Result<bool> {
    Ok(match nl.route_to(addr).await? {
        PeerPath::NoRoute => true,
        PeerPath::Reachable { gateway, oif } => failed.contains(&(oif, gateway.unwrap_or(addr))),
    })
}

/// The peers (name, address, marked unreachable) whose reachability is no longer what they are
/// marked, with the new verdict.
async fn changed<A: Copy + Into<IpAddr>>(
    nl: &Netlink,
    peers: Vec<(String, A, bool)>,
    failed: &HashSet<(u32, IpAddr)>,
) -> anyhow::Result<Vec<(String, A, bool)>> {
    let mut out = Vec::new();
    for (name, addr, was_down) in peers {
        let down = unreachable(nl, addr.into(), failed).await?;
        if down != was_down {
            out.push((name, addr, down));
        }
    }
    Ok(out)
}

/// Asks the kernel's FIB about every peer (both halves) and marks the unreachable ones.
async fn check_peers(shared: &SharedRef, nl: &Netlink) -> anyhow::Result<()> {
    let (peers, peers6) = {
        let s = lock(shared);
        (s.dp.peer_addrs(), s.dp.peer_addrs6())
    };
    let failed = nl.failed_neighbours().await?;
    let verdicts = changed(nl, peers, &failed).await?;
    let verdicts6 = changed(nl, peers6, &failed).await?;
    let mut s = lock(shared);
    for (name, addr, down) in verdicts6 {
        if s.dp.set_unreachable6(addr, down)? {
            if down {
                warn!(peer = %name, %addr, "peer unreachable over IPv6: no IPv6 route toward it; its IPv6 pods' traffic is dropped and counted until there is");
            } else {
                info!(peer = %name, %addr, "peer reachable over IPv6 again");
            }
        }
    }
    for (name, addr, down) in verdicts {
        if s.dp.set_unreachable(&name, down)? {
            if down {
                warn!(peer = %name, %addr, "peer unreachable: no route toward it; its pods' traffic is dropped and counted until there is");
            } else {
                info!(peer = %name, %addr, "peer reachable again");
            }
        }
    }
    Ok(())
}

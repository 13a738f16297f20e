//! The agent's kernel routes (aggregates toward the datapath, crossSubnet's direct routes):
//! what it installed, so that only differences are sent, and repair of what others removed.
use std::{collections::BTreeMap, net::Ipv6Addr};

use tracing::{info, warn};

use super::dataplane::Changes;
use crate::{
    cluster::{Cidr, Cidr6},
    underlay::netlink::{Netlink, RouteSpec},
};

/// The agent's side of its kernel routes: what it installed, so only differences are sent.
pub struct Routes {
    pub nl: Netlink,
    pub installed: BTreeMap<Cidr, RouteSpec>,
    /// The aggregate routes' next-hop neighbour entry is known to be in place.
    neigh_ready: bool,
    /// The IPv6 routes installed: next hop (`None`: the aggregate's) and MTU.
    installed6: BTreeMap<Cidr6, Route6>,
    /// The IPv6 next-hop neighbour entry is known to be in place.
    neigh6_ready: bool,
}

/// An installed IPv6 route: next hop (`None`: `ROUTE_NEXTHOP6`) and route MTU.
type Route6 = (Option<Ipv6Addr>, Option<u32>);

/// The IPv6 routes the maps ask for: aggregates on the underlay, with the pod MTU for IPv6.
pub struct Want6 {
    /// Pod networks and their next hop (`None`: toward the encap program).
    pub cidrs: BTreeMap<Cidr6, Option<Ipv6Addr>>,
    pub ifindex: u32,
    pub mtu: u32,
}

impl Routes {
    /// Starts from the routes of the agent's protocol the kernel holds now.
    pub async fn read(nl: Netlink) -> anyhow::Result<Self> {
        let installed = nl
            .owned_routes()
            .await?
            .into_iter()
            .map(|r| (r.cidr, r))
            .collect();
        let installed6 = (nl.owned_routes6().await?.into_iter())
            .map(|c| (c, (None, None)))
            .collect();
        Ok(Self {
            nl,
            installed,
            neigh_ready: false,
            installed6,
            neigh6_ready: false,
        })
    }

    /// Brings the agent's routes to `want`, the aggregate routes' next-hop neighbour entry
    /// first (once; `reconcile` checks it again, since a link flap removes it).
    pub async fn sync(
        &mut self,
        want: &BTreeMap<Cidr, RouteSpec>,
        ifindex: u32,
        ch: &mut Changes,
    ) -> anyhow::Result<()> {
        if !self.neigh_ready {
            self.nl.ensure_nexthop_neigh(ifindex).await?;
            self.neigh_ready = true;
        }
        for r in want.values() {
            if self.installed.get(&r.cidr) != Some(r) {
                self.nl.replace_route(r).await?;
                self.installed.insert(r.cidr, r.clone());
                ch.routes_replaced += 1;
            }
        }
        let stale: Vec<Cidr> = self
            .installed
            .keys()
            .filter(|c| !want.contains_key(c))
            .copied()
            .collect();
        for c in stale {
            self.nl.delete_route(&c).await?;
            self.installed.remove(&c);
            ch.routes_removed += 1;
        }
        Ok(())
    }

    /// Brings the agent's IPv6 routes to `want`, their next-hop neighbour entry first.
    pub async fn sync6(&mut self, want: &Want6, ch: &mut Changes) -> anyhow::Result<()> {
        if !want.cidrs.is_empty() && !self.neigh6_ready {
            self.nl.ensure_nexthop_neigh6(want.ifindex).await?;
            self.neigh6_ready = true;
        }
        for (c, via) in &want.cidrs {
            // A native route carries no MTU: the peer gets the packet as it is.
            let spec = (*via, via.is_none().then_some(want.mtu));
            if self.installed6.get(c) != Some(&spec) {
                self.nl.replace_route6(c, want.ifindex, spec).await?;
                self.installed6.insert(*c, spec);
                ch.routes_replaced += 1;
            }
        }
        let stale: Vec<Cidr6> = (self.installed6.keys())
            .filter(|c| !want.cidrs.contains_key(c))
            .copied()
            .collect();
        for c in stale {
            self.nl.delete_route6(&c).await?;
            self.installed6.remove(&c);
            ch.routes_removed += 1;
        }
        Ok(())
    }

    /// Reads the kernel's view again (someone may have flushed the routes) and re-syncs.
    pub async fn reconcile(
        &mut self,
        (want, ifindex): (&BTreeMap<Cidr, RouteSpec>, u32),
        want6: &Want6,
    ) {
        let mut ch = Changes::default();
        (self.neigh_ready, self.neigh6_ready) = (false, false);
        let result = async {
            self.installed = self
                .nl
                .owned_routes()
                .await?
                .into_iter()
                .map(|r| (r.cidr, r))
                .collect();
            self.sync(want, ifindex, &mut ch).await?;
            self.installed6 = (self.nl.owned_routes6().await?.into_iter())
                .map(|c| (c, (None, None)))
                .collect();
            self.sync6(want6, &mut ch).await
        }
        .await;
        match result {
            Err(e) => warn!("reconciling routes: {e:#}"),
            Ok(()) if ch != Changes::default() => info!(?ch, "routes repaired"),
            Ok(()) => {}
        }
    }
}

//! The agent's kernel routes (aggregates toward the datapath, crossSubnet's direct routes):
//! what it installed, so that only differences are sent, and repair of what others removed.
use std::collections::BTreeMap;

use tracing::{info, warn};

use super::dataplane::Changes;
use crate::{
    cluster::Cidr,
    underlay::netlink::{Netlink, RouteSpec},
};

/// The agent's side of its kernel routes: what it installed, so only differences are sent.
pub struct Routes {
    pub nl: Netlink,
    pub installed: BTreeMap<Cidr, RouteSpec>,
    /// The aggregate routes' next-hop neighbour entry is known to be in place.
    neigh_ready: bool,
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
        Ok(Self {
            nl,
            installed,
            neigh_ready: false,
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

    /// Reads the kernel's view again (someone may have flushed the routes) and re-syncs.
    pub async fn reconcile(&mut self, want: &BTreeMap<Cidr, RouteSpec>, ifindex: u32) {
        let mut ch = Changes::default();
        self.neigh_ready = false;
        let result = async {
            self.installed = self
                .nl
                .owned_routes()
                .await?
                .into_iter()
                .map(|r| (r.cidr, r))
                .collect();
            self.sync(want, ifindex, &mut ch).await
        }
        .await;
        match result {
            Err(e) => warn!("reconciling routes: {e:#}"),
            Ok(()) if ch != Changes::default() => info!(?ch, "routes repaired"),
            Ok(()) => {}
        }
    }
}

//! The one netlink path the agent's own routes of both families take (dump by protocol,
//! replace with a route MTU, delete where already gone is fine), and its IPv6 routes: the
//! aggregates of IPv6 pod CIDRs toward the encap program (through a link-local next hop whose
//! permanent neighbour entry carries the datapath's next-hop MAC), as `netlink` has for IPv4.
use std::net::{IpAddr, Ipv6Addr};

use futures::TryStreamExt as _;
use libc::{ENOENT, ESRCH};
use rtnetlink::{
    RouteMessageBuilder,
    packet_route::{
        neighbour::NeighbourState,
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteProtocol},
    },
};

use super::netlink::{NetError, Netlink, ROUTE_PROTO, errno, nl_err};
use crate::cluster::Cidr6;

/// The IPv6 next hop of the aggregate routes: a link-local address no host uses, resolved by a
/// permanent neighbour entry to `ROUTE_NEXTHOP_MAC`, which the encap program recognises.
pub const ROUTE_NEXTHOP6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0xd9, 1);

impl Netlink {
    /// The routes of the family `dump` asks for that carry the agent's protocol number.
    pub(super) async fn owned_route_messages(
        &self,
        dump: RouteMessage,
    ) -> Result<Vec<RouteMessage>, NetError> {
        let all: Vec<RouteMessage> = self
            .handle
            .route()
            .get(dump)
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("route dump"))?;
        Ok(all
            .into_iter()
            .filter(|r| r.header.protocol == RouteProtocol::from(ROUTE_PROTO))
            .collect())
    }

    /// Removes the route `msg` names (`what`, for the error); one already gone is not an error.
    pub(super) async fn delete_owned(
        &self,
        msg: RouteMessage,
        what: &dyn std::fmt::Display,
    ) -> Result<(), NetError> {
        match self.handle.route().del(msg).execute().await {
            Err(e) if matches!(errno(&e), Some(ESRCH | ENOENT)) => Ok(()),
            r => r.map_err(nl_err(format!("deleting route {what}"))),
        }
    }

    /// Installs or replaces the route `msg` names (`what`, for the error) with route MTU `mtu`.
    pub(super) async fn replace_owned(
        &self,
        mut msg: RouteMessage,
        mtu: Option<u32>,
        what: &dyn std::fmt::Display,
    ) -> Result<(), NetError> {
        if let Some(mtu) = mtu {
            let metric = RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]);
            msg.attributes.push(metric);
        }
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(nl_err(format!("replacing route {what}")))
    }

    /// The IPv6 routes with the agent's protocol number in the main table.
    pub async fn owned_routes6(&self) -> Result<Vec<Cidr6>, NetError> {
        let dump = RouteMessageBuilder::<Ipv6Addr>::new().build();
        let owned = self.owned_route_messages(dump).await?;
        Ok(owned
            .iter()
            .filter_map(|r| {
                let addr = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet6(d)) => Some(*d),
                    _ => None,
                })?;
                let len = r.header.destination_prefix_length;
                Some(Cidr6 { addr, len })
            })
            .collect())
    }

    /// Installs or replaces an IPv6 route the agent owns on `ifindex`: via `ROUTE_NEXTHOP6`
    /// toward the encap program (an aggregate), or via a same-subnet peer (crossSubnet); with
    /// route MTU `mtu` where given (the aggregates: the host answers Packet Too Big for what
    /// would not fit once encapsulated, as IPv6 routers never fragment).
    pub async fn replace_route6(
        &self,
        cidr: &Cidr6,
        ifindex: u32,
        (via, mtu): (Option<Ipv6Addr>, Option<u32>),
    ) -> Result<(), NetError> {
        let msg = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(cidr.addr, cidr.len)
            .gateway(via.unwrap_or(ROUTE_NEXTHOP6))
            .output_interface(ifindex)
            .protocol(RouteProtocol::from(ROUTE_PROTO))
            .build();
        self.replace_owned(msg, mtu, cidr).await
    }

    /// Removes one IPv6 route the agent owns; one already gone is not an error.
    pub async fn delete_route6(&self, cidr: &Cidr6) -> Result<(), NetError> {
        let msg = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(cidr.addr, cidr.len)
            .protocol(RouteProtocol::from(ROUTE_PROTO))
            .build();
        self.delete_owned(msg, cidr).await
    }

    /// Removes every IPv6 route the agent owns.
    pub async fn flush_routes6(&self) -> Result<usize, NetError> {
        let owned = self.owned_routes6().await?;
        for c in &owned {
            self.delete_route6(c).await?;
        }
        Ok(owned.len())
    }

    /// The permanent neighbour entry of `ROUTE_NEXTHOP6` on `ifindex`.
    pub async fn ensure_nexthop_neigh6(&self, ifindex: u32) -> Result<(), NetError> {
        self.handle
            .neighbours()
            .add(ifindex, IpAddr::V6(ROUTE_NEXTHOP6))
            .link_layer_address(&maps_common::ROUTE_NEXTHOP_MAC)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(nl_err("adding the IPv6 next-hop neighbour entry"))
    }
}

//! The node's interfaces, the agent's few kernel routes and neighbour entry, route lookups
//! toward peers, and the checksum path's VXLAN device: all through rtnetlink, no `ip` process.
use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures::TryStreamExt as _;
use rtnetlink::{
    Handle, LinkVxlan, RouteMessageBuilder,
    packet_core::ErrorMessage,
    packet_route::{
        AddressFamily,
        address::{AddressAttribute, AddressMessage},
        link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
        route::{
            RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteProtocol, RouteType,
        },
    },
};

use crate::cluster::Cidr;

/// The first of netlink `$attrs` that matches `$pat`, mapped to `$val`.
macro_rules! attr {
    ($attrs:expr, $pat:pat => $val:expr) => {
        $attrs.iter().find_map(|a| match a {
            $pat => Some($val),
            _ => None,
        })
    };
}

/// Routing protocol number of the routes the agent installs (`ip route show proto 199`), so
/// they can be told apart from everyone else's and flushed on detach.
pub const ROUTE_PROTO: u8 = 199;

/// Name of the metadata-mode kernel VXLAN device that carries GSO packets when outer UDP
/// checksums are on (see `NodeConfig::csum_ifindex`).
pub const CSUM_DEV: &str = "dp-vxcsum";

use libc::{EACCES, EADDRNOTAVAIL, EHOSTUNREACH, EINVAL, ENETUNREACH, ENODEV, ENOENT, ESRCH};

/// The label of the health probe address the agent puts on `lo`.
pub const PROBE_LABEL: &str = "lo:dp-health";

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("netlink {what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("no interface holds {0}")]
    NoInterfaceFor(Ipv4Addr),
    #[error("interface {0} not found")]
    NoInterface(String),
}

pub(super) fn nl_err(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

/// The kernel's errno in a netlink error answer, if that is what `e` is.
pub(super) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(ErrorMessage { code, .. }) => {
            code.map(|c| -c.get()).filter(|c| *c > 0)
        }
        _ => None,
    }
}

/// An interface and its first IPv4 address.
#[derive(Clone, Debug)]
pub struct Iface {
    pub name: String,
    pub ifindex: u32,
    pub mtu: u32,
    pub addr: Option<Ipv4Addr>,
    pub prefix_len: Option<u8>,
    /// A virtual device (veth, bridge, VXLAN...: the kernel names its kind), not a NIC.
    pub virtual_dev: bool,
}

/// A route the agent owns: an aggregate of pod CIDRs toward the encap program (via
/// `ROUTE_NEXTHOP`), or a same-subnet peer's pod CIDR sent natively (via the peer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    pub cidr: Cidr,
    pub via: Ipv4Addr,
    pub ifindex: u32,
    /// Route MTU: the pod MTU for encapsulated destinations, so the kernel sends
    /// "fragmentation needed" for DF packets that would not fit once encapsulated.
    pub mtu: Option<u32>,
}

/// What the kernel would do with a packet to a peer's underlay address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerPath {
    /// A unicast route: through `gateway` (or directly) out of `oif`.
    Reachable { gateway: Option<IpAddr>, oif: u32 },
    /// No route, or an unreachable, blackhole or prohibit one.
    NoRoute,
}

/// One rtnetlink connection, its task running on the current tokio runtime.
#[derive(Clone)]
pub struct Netlink {
    pub(super) handle: Handle,
}

impl Netlink {
    pub fn connect() -> Result<Self, NetError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// Every interface with its MTU and first IPv4 address.
    pub async fn ifaces(&self) -> Result<Vec<Iface>, NetError> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("link dump"))?;
        let addrs = self.address_dump().await?;
        Ok(links
            .iter()
            .map(|l| {
                let inet = addrs.iter().find_map(|a| {
                    if a.header.index != l.header.index {
                        return None;
                    }
                    attr!(a.attributes,
                        AddressAttribute::Local(IpAddr::V4(v4))
                        | AddressAttribute::Address(IpAddr::V4(v4)) => (*v4, a.header.prefix_len))
                });
                Iface {
                    name: link_name(l).unwrap_or_default(),
                    ifindex: l.header.index,
                    mtu: attr!(l.attributes, LinkAttribute::Mtu(m) => *m).unwrap_or(1500),
                    addr: inet.map(|(a, _)| a),
                    prefix_len: inet.map(|(_, p)| p),
                    virtual_dev: l.attributes.iter().any(|a| {
                        matches!(a, LinkAttribute::LinkInfo(i)
                            if i.iter().any(|x| matches!(x, LinkInfo::Kind(_))))
                    }),
                }
            })
            .collect())
    }

    /// Every IPv4 address this host holds.
    pub async fn addresses(&self) -> Result<Vec<Ipv4Addr>, NetError> {
        let addrs = self.address_dump().await?;
        Ok(addrs
            .iter()
            .flat_map(|a| &a.attributes)
            .filter_map(|x| match x {
                AddressAttribute::Local(IpAddr::V4(v4)) => Some(*v4),
                _ => None,
            })
            .collect())
    }

    async fn address_dump(&self) -> Result<Vec<AddressMessage>, NetError> {
        self.handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("address dump"))
    }

    async fn neighbour_dump(&self) -> Result<Vec<NeighbourMessage>, NetError> {
        self.handle
            .neighbours()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("neighbour dump"))
    }

    /// The interface the default route leaves by (flanneld's choice without `--iface`).
    pub async fn default_iface(&self) -> Result<Iface, NetError> {
        let oif = match self.route_to(Ipv4Addr::new(1, 1, 1, 1).into()).await? {
            PeerPath::Reachable { oif, .. } => oif,
            PeerPath::NoRoute => 0,
        };
        self.ifaces()
            .await?
            .into_iter()
            .find(|i| i.ifindex == oif && oif != 0)
            .ok_or_else(|| NetError::NoInterface("(the default route's)".into()))
    }

    /// The interface named `name`.
    pub async fn iface(&self, name: &str) -> Result<Iface, NetError> {
        self.ifaces()
            .await?
            .into_iter()
            .find(|i| i.name == name)
            .ok_or_else(|| NetError::NoInterface(name.to_string()))
    }

    /// The interface that holds `addr`.
    pub async fn iface_with_addr(&self, addr: Ipv4Addr) -> Result<Iface, NetError> {
        self.ifaces()
            .await?
            .into_iter()
            .find(|i| i.addr == Some(addr))
            .ok_or(NetError::NoInterfaceFor(addr))
    }

    /// The routes with the agent's protocol number in the main table.
    pub async fn owned_routes(&self) -> Result<Vec<RouteSpec>, NetError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let owned = self.owned_route_messages(msg).await?;
        Ok(owned.iter().filter_map(route_spec).collect())
    }

    /// Installs or replaces a route the agent owns (`onlink`: the next hop need not be in a
    /// connected subnet).
    pub async fn replace_route(&self, r: &RouteSpec) -> Result<(), NetError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(r.cidr.addr, r.cidr.len)
            .gateway(r.via)
            .output_interface(r.ifindex)
            .protocol(RouteProtocol::from(ROUTE_PROTO))
            .onlink()
            .build();
        self.replace_owned(msg, r.mtu, &r.cidr).await
    }

    /// Removes one route the agent owns; a route already gone is not an error.
    pub async fn delete_route(&self, cidr: &Cidr) -> Result<(), NetError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(cidr.addr, cidr.len)
            .protocol(RouteProtocol::from(ROUTE_PROTO))
            .build();
        self.delete_owned(msg, cidr).await
    }

    /// Removes every route the agent owns.
    pub async fn flush_routes(&self) -> Result<usize, NetError> {
        let owned = self.owned_routes().await?;
        for r in &owned {
            self.delete_route(&r.cidr).await?;
        }
        Ok(owned.len())
    }

    /// The permanent neighbour entry of `ROUTE_NEXTHOP` on `ifindex` (see `maps_common`).
    pub async fn ensure_nexthop_neigh(&self, ifindex: u32) -> Result<(), NetError> {
        self.handle
            .neighbours()
            .add(ifindex, IpAddr::V4(maps_common::ROUTE_NEXTHOP.into()))
            .link_layer_address(&maps_common::ROUTE_NEXTHOP_MAC)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(nl_err("adding the next-hop neighbour entry"))
    }

    /// Removes `ROUTE_NEXTHOP`'s (and `ROUTE_NEXTHOP6`'s) neighbour entry from every
    /// interface that has one.
    pub async fn remove_nexthop_neigh(&self) -> Result<(), NetError> {
        let nexthop = Ipv4Addr::from(maps_common::ROUTE_NEXTHOP);
        let neighs = self.neighbour_dump().await?;
        for n in neighs {
            let ours = n.attributes.iter().any(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => *ip == nexthop,
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                    *ip == super::routes::ROUTE_NEXTHOP6
                }
                _ => false,
            });
            if ours {
                match self.handle.neighbours().del(n).execute().await {
                    Err(e) if matches!(errno(&e), Some(ENOENT)) => {}
                    r => r.map_err(nl_err("removing the next-hop neighbour entry"))?,
                }
            }
        }
        Ok(())
    }

    /// Puts each of `want` on `lo` (/32, /128) as this node's health probe addresses (as
    /// flanneld puts its subnet's first address on flannel.1), marked as the agent's (address
    /// protocol `ROUTE_PROTO`; IPv4 also labelled `PROBE_LABEL`); removes any other it left.
    pub async fn ensure_probe_addrs(&self, want: &[IpAddr]) -> Result<(), NetError> {
        let lo = self.iface("lo").await?;
        let mut missing = want.to_vec();
        for (msg, have) in self.probe_addrs().await? {
            if missing.contains(&have) {
                missing.retain(|w| *w != have);
                continue;
            }
            let req = self.handle.address().del(msg).execute().await;
            req.map_err(nl_err("removing an old probe address"))?;
        }
        for addr in missing {
            let mut req = self
                .handle
                .address()
                .add(lo.ifindex, addr, max_prefix(addr));
            let attrs = &mut req.message_mut().attributes;
            attrs.push(AddressAttribute::Protocol(ROUTE_PROTO.into()));
            if addr.is_ipv4() {
                attrs.push(AddressAttribute::Label(PROBE_LABEL.into()));
            }
            let done = req.replace().execute().await;
            done.map_err(nl_err("adding a probe address on lo"))?;
        }
        Ok(())
    }

    /// Removes the probe addresses the agent put on `lo`.
    pub async fn remove_probe_addrs(&self) -> Result<(), NetError> {
        for (msg, _) in self.probe_addrs().await? {
            match self.handle.address().del(msg).execute().await {
                Err(e) if matches!(errno(&e), Some(ENOENT | EADDRNOTAVAIL)) => {}
                r => r.map_err(nl_err("removing the probe address"))?,
            }
        }
        Ok(())
    }

    /// The addresses marked as the agent's probe addresses, of both families.
    async fn probe_addrs(&self) -> Result<Vec<(AddressMessage, IpAddr)>, NetError> {
        let ours = |x: &AddressAttribute| match x {
            AddressAttribute::Label(l) => l == PROBE_LABEL,
            AddressAttribute::Protocol(p) => u8::from(*p) == ROUTE_PROTO,
            _ => false,
        };
        let addrs = self.address_dump().await?;
        Ok(addrs
            .into_iter()
            .filter(|a| a.attributes.iter().any(ours))
            .filter_map(|a| {
                // IPv4 names its own address in IFA_LOCAL; IPv6 in IFA_ADDRESS alone.
                let ip = attr!(a.attributes, AddressAttribute::Local(ip) => *ip)
                    .or(attr!(a.attributes, AddressAttribute::Address(ip) => *ip))?;
                Some((a, ip))
            })
            .collect())
    }

    /// What the kernel's FIB says of `dst`, as `bpf_fib_lookup` would see it.
    pub async fn route_to(&self, dst: IpAddr) -> Result<PeerPath, NetError> {
        let msg = match dst {
            IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(a, 32)
                .build(),
            IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(a, 128)
                .build(),
        };
        let answer: Result<Vec<RouteMessage>, _> =
            self.handle.route().get(msg).execute().try_collect().await;
        let routes = match answer {
            Ok(r) => r,
            Err(e) if matches!(errno(&e), Some(ENETUNREACH | EHOSTUNREACH | ESRCH)) => {
                return Ok(PeerPath::NoRoute);
            }
            // IPv6 answers a blackhole route with EINVAL and a prohibit one with EACCES.
            Err(e) if dst.is_ipv6() && matches!(errno(&e), Some(EINVAL | EACCES)) => {
                return Ok(PeerPath::NoRoute);
            }
            Err(e) => return Err(nl_err(format!("route lookup of {dst}"))(e)),
        };
        let Some(r) = routes.first() else {
            return Ok(PeerPath::NoRoute);
        };
        if r.header.kind != RouteType::Unicast && r.header.kind != RouteType::Local {
            return Ok(PeerPath::NoRoute);
        }
        Ok(PeerPath::Reachable {
            gateway: attr!(r.attributes, RouteAttribute::Gateway(g) => g).and_then(|g| match g {
                RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
                RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
                _ => None,
            }),
            oif: attr!(r.attributes, RouteAttribute::Oif(i) => *i).unwrap_or(0),
        })
    }

    /// Neighbour entries known to have failed resolution, by (interface, address).
    pub async fn failed_neighbours(&self) -> Result<HashSet<(u32, IpAddr)>, NetError> {
        let neighs = self.neighbour_dump().await?;
        Ok(neighs
            .iter()
            .filter(|n| n.header.state == NeighbourState::Failed)
            .filter_map(|n| {
                let ip = attr!(n.attributes, NeighbourAttribute::Destination(a) => a)?;
                match ip {
                    NeighbourAddress::Inet(a) => Some((n.header.ifindex, IpAddr::V4(*a))),
                    NeighbourAddress::Inet6(a) => Some((n.header.ifindex, IpAddr::V6(*a))),
                    _ => None,
                }
            })
            .collect())
    }

    /// Makes sure the checksum path's device exists for `port`: VXLAN in metadata mode
    /// (`external`: the program's tunnel key gives peer and VNI), no learning, up. A device
    /// with another port is replaced. Returns its ifindex and whether it was (re)created.
    pub async fn ensure_csum_device(&self, port: u16) -> Result<(u32, bool), NetError> {
        if let Some(l) = self.link(CSUM_DEV).await? {
            if vxlan_port(&l) == Some(port) {
                return Ok((l.header.index, false));
            }
            self.remove_csum_device().await?;
        }
        let msg = LinkVxlan::new(CSUM_DEV, 0)
            .port(port)
            .learning(false)
            .collect_metadata(true)
            .up()
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(nl_err(format!("creating {CSUM_DEV}")))?;
        let l = self
            .link(CSUM_DEV)
            .await?
            .ok_or_else(|| NetError::NoInterface(CSUM_DEV.into()))?;
        Ok((l.header.index, true))
    }

    /// Removes the checksum path's device if it exists.
    pub async fn remove_csum_device(&self) -> Result<(), NetError> {
        let Some(l) = self.link(CSUM_DEV).await? else {
            return Ok(());
        };
        match self.handle.link().del(l.header.index).execute().await {
            Err(e) if matches!(errno(&e), Some(ENODEV)) => Ok(()),
            r => r.map_err(nl_err(format!("removing {CSUM_DEV}"))),
        }
    }

    async fn link(&self, name: &str) -> Result<Option<LinkMessage>, NetError> {
        match self
            .handle
            .link()
            .get()
            .match_name(name)
            .execute()
            .try_next()
            .await
        {
            Ok(l) => Ok(l),
            Err(e) if matches!(errno(&e), Some(ENODEV)) => Ok(None),
            Err(e) => Err(nl_err(format!("looking up {name}"))(e)),
        }
    }
}

fn link_name(l: &LinkMessage) -> Option<String> {
    attr!(l.attributes, LinkAttribute::IfName(n) => n.clone())
}

fn vxlan_port(l: &LinkMessage) -> Option<u16> {
    let infos = attr!(l.attributes, LinkAttribute::LinkInfo(i) => i)?;
    let vxlan = attr!(infos, LinkInfo::Data(InfoData::Vxlan(v)) => v)?;
    attr!(vxlan, InfoVxlan::Port(p) => *p)
}

fn route_spec(r: &RouteMessage) -> Option<RouteSpec> {
    if r.header.address_family != AddressFamily::Inet {
        return None;
    }
    let mut spec = RouteSpec {
        cidr: Cidr {
            addr: Ipv4Addr::UNSPECIFIED,
            len: r.header.destination_prefix_length,
        },
        via: Ipv4Addr::UNSPECIFIED,
        ifindex: 0,
        mtu: None,
    };
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => spec.cidr.addr = *d,
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => spec.via = *g,
            RouteAttribute::Oif(i) => spec.ifindex = *i,
            RouteAttribute::Metrics(m) => {
                spec.mtu = attr!(m, RouteMetric::Mtu(v) => *v);
            }
            _ => {}
        }
    }
    Some(spec)
}

/// What changed on the underlay, from a netlink notification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnderlayEvent {
    /// An IPv4 route or a link: which peers are reachable may have changed.
    Route,
    /// A neighbour entry: a next hop's MAC or state.
    Neighbour,
}

/// Calls `kick` for every change of IPv4 or IPv6 routes, links or neighbours the kernel
/// announces (netlink multicast), for ever; returns only when the subscription fails.
pub async fn route_events(kick: impl Fn(UnderlayEvent)) -> Result<(), NetError> {
    use futures::StreamExt as _;
    use rtnetlink::{
        MulticastGroup,
        packet_core::NetlinkPayload,
        packet_route::RouteNetlinkMessage::{DelNeighbour, NewNeighbour},
    };
    let (conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
        MulticastGroup::Link,
        MulticastGroup::Neigh,
    ])
    .map_err(NetError::Socket)?;
    tokio::spawn(conn);
    while let Some((msg, _)) = messages.next().await {
        kick(match msg.payload {
            NetlinkPayload::InnerMessage(NewNeighbour(_) | DelNeighbour(_)) => {
                UnderlayEvent::Neighbour
            }
            _ => UnderlayEvent::Route,
        });
    }
    Err(NetError::Socket(std::io::Error::other(
        "netlink notification stream ended",
    )))
}

/// The name of interface `ifindex`, if it exists.
pub fn if_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf holds IF_NAMESIZE bytes, as if_indextoname requires.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if name.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    Some(
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// Runs `f` on a one-off current-thread runtime with a netlink connection: for the CLI's
/// commands that are not the agent.
pub fn blocking<T, F>(f: impl FnOnce(Netlink) -> F) -> anyhow::Result<T>
where
    F: Future<Output = anyhow::Result<T>>,
{
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move { f(Netlink::connect()?).await })
}

/// The prefix length of a single address of `addr`'s family.
fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

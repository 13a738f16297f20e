//! The one place for CIDR arithmetic: an IPv4 prefix with its host bits zero, and the
//! operations the agent needs on sets of them, built on `ipnet`.
use std::{fmt, net::Ipv4Addr, str::FromStr};

use ipnet::Ipv4Net;

/// An IPv4 prefix, host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    pub fn mask(len: u8) -> u32 {
        if len == 0 { 0 } else { u32::MAX << (32 - len) }
    }
    fn net(&self) -> Ipv4Net {
        Ipv4Net::new(self.addr, self.len).expect("prefix length checked when made")
    }
    fn of(net: Ipv4Net) -> Self {
        Self {
            addr: net.network(),
            len: net.prefix_len(),
        }
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.net().contains(&ip)
    }
    /// First and last address, host order.
    pub fn range(&self) -> (u32, u32) {
        let n = self.net();
        (u32::from(n.network()), u32::from(n.broadcast()))
    }
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.net().contains(&other.net()) || other.net().contains(&self.net())
    }
    /// The prefixes of length `len` inside this one, in order.
    pub fn subnets(&self, len: u8) -> impl Iterator<Item = Cidr> + use<> {
        self.net().subnets(len).into_iter().flatten().map(Self::of)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (expected a.b.c.d/len)"))?;
        if addr.parse::<std::net::Ipv6Addr>().is_ok() {
            return Err(format!(
                "{s:?} is an IPv6 CIDR where an IPv4 one belongs (a node's IPv6 pod CIDR is its podCIDRv6)"
            ));
        }
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR ({addr:?} is not an IPv4 address)"))?;
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| format!("{s:?} is not a CIDR (prefix length must be 0-32)"))?;
        if u32::from(addr) & !Self::mask(len) != 0 {
            return Err(format!("{s:?} has host bits set"));
        }
        Ok(Self { addr, len })
    }
}

/// `a.b.c.d/len[,a.b.c.d/len...]`.
pub fn parse_cidr_list(s: &str) -> Result<Vec<Cidr>, String> {
    parse_list(s)
}

/// `prefix[,prefix...]` of either family (`Cidr`, `Cidr6`).
pub fn parse_list<T: FromStr<Err = String>>(s: &str) -> Result<Vec<T>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::parse)
        .collect()
}

/// The fewest CIDRs that cover exactly the union of `cidrs`: contained ones dropped, sibling
/// halves merged into their parent.
pub fn aggregate(cidrs: Vec<Cidr>) -> Vec<Cidr> {
    let nets: Vec<Ipv4Net> = cidrs.iter().map(Cidr::net).collect();
    Ipv4Net::aggregate(&nets)
        .into_iter()
        .map(Cidr::of)
        .collect()
}

/// The smallest CIDR that holds all of `cidrs` (the network a Flannel pod is told about).
pub fn covering(cidrs: &[Cidr]) -> Option<Cidr> {
    let (first, rest) = cidrs.split_first()?;
    let mut c = first.net();
    for o in rest {
        while !c.contains(&o.net()) {
            c = c.supernet()?;
        }
    }
    Some(Cidr::of(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(s: &[&str]) -> Vec<Cidr> {
        s.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn aggregation_merges_siblings_and_drops_contained() {
        let got = aggregate(cidrs(&[
            "10.244.1.0/24",
            "10.244.0.0/24",
            "10.244.3.0/24",
            "10.244.2.0/24",
            "10.244.2.128/25",
            "10.245.0.0/24",
        ]));
        assert_eq!(got, cidrs(&["10.244.0.0/22", "10.245.0.0/24"]));
        let many: Vec<Cidr> = (0..10_000u32)
            .map(|k| Cidr {
                addr: Ipv4Addr::new(10, (k / 256) as u8, (k % 256) as u8, 0),
                len: 24,
            })
            .collect();
        assert!(aggregate(many).len() <= 8);
        assert_eq!(
            aggregate(cidrs(&["10.244.0.0/16", "10.244.7.0/24"])),
            cidrs(&["10.244.0.0/16"])
        );
    }

    #[test]
    fn covering_is_the_smallest_holding_all() {
        let c = |s: &str| s.parse::<Cidr>().unwrap();
        assert_eq!(
            covering(&[c("10.244.0.0/24"), c("10.244.3.0/24")]),
            Some(c("10.244.0.0/22"))
        );
    }
}

//! Under `encapsulation: none`, which peers go natively: those whose pod CIDR the node's BGP
//! speaker has learned (the fabric can route it); the others stay encapsulated meanwhile, so
//! a switch to native routing loses nothing while the fabric converges. Each family apart: a
//! peer's IPv6 half goes native once the fabric routes its IPv6 pod CIDR.
use std::collections::BTreeSet;

use super::{Changes, Dataplane};
use crate::{
    cluster::{Cidr, Cidr6},
    kernel::maps::MapsError,
};

/// The pod CIDRs the fabric can route, of both families.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fabric {
    pub v4: BTreeSet<Cidr>,
    pub v6: BTreeSet<Cidr6>,
}

impl Fabric {
    /// How many routes, of both families.
    pub fn count(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// Whether every route of `self` is in `other`.
    pub fn is_subset(&self, other: &Self) -> bool {
        self.v4.is_subset(&other.v4) && self.v6.is_subset(&other.v6)
    }
}

impl Dataplane {
    /// Records the pod CIDRs the fabric can route and moves the peers (and IPv6 halves) whose
    /// mode that changes.
    pub fn set_fabric(&mut self, learned: Fabric) -> Result<Changes, MapsError> {
        if learned == self.fabric {
            return Ok(Changes::default());
        }
        let v6_moved = learned.v6 != self.fabric.v6;
        self.fabric = learned;
        let halves6 = if v6_moved { self.sync6()? } else { 0 };
        let (Some(me), Some(settings)) = (self.me.clone(), self.settings.clone()) else {
            return Ok(Changes::default());
        };
        let moved: Vec<_> = self
            .peers
            .values()
            .filter(|p| self.mode_for(&p.node) != p.route.mode)
            .map(|p| p.node.clone())
            .collect();
        let mut ch = match moved.is_empty() {
            true => Changes::default(),
            false => self.commit(settings, me, moved, Vec::new(), false)?,
        };
        ch.cidrs_upserted += halves6;
        Ok(ch)
    }
}

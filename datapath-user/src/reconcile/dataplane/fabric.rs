//! Under `encapsulation: none`, which peers go natively: those whose pod CIDR the node's BGP
//! speaker has learned (the fabric can route it); the others stay encapsulated meanwhile, so
//! a switch to native routing loses nothing while the fabric converges.
use std::collections::BTreeSet;

use super::{Changes, Dataplane};
use crate::{cluster::Cidr, kernel::maps::MapsError};

impl Dataplane {
    /// Records the pod CIDRs the fabric can route and moves the peers whose mode that changes.
    pub fn set_fabric(&mut self, learned: BTreeSet<Cidr>) -> Result<Changes, MapsError> {
        if learned == self.fabric {
            return Ok(Changes::default());
        }
        self.fabric = learned;
        let (Some(me), Some(settings)) = (self.me.clone(), self.settings.clone()) else {
            return Ok(Changes::default());
        };
        let moved: Vec<_> = self
            .peers
            .values()
            .filter(|p| self.mode_for(&p.node) != p.route.mode)
            .map(|p| p.node.clone())
            .collect();
        if moved.is_empty() {
            return Ok(Changes::default());
        }
        self.commit(settings, me, moved, Vec::new(), false)
    }
}

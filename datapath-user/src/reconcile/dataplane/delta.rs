//! Whether a delta (etcd's lease events) can stand alone against what the dataplane holds:
//! the same conflicts a whole state is checked for, among the nodes it touches.
use std::collections::HashSet;

use super::Dataplane;
use crate::cluster::{Cidr, Invalid, Node, Problem};

impl Dataplane {
    pub(super) fn check_delta(
        &self,
        me: &Node,
        upserts: &[Node],
        removes: &[String],
    ) -> Result<(), Invalid> {
        let touched: HashSet<&str> = upserts
            .iter()
            .map(|n| n.name.as_str())
            .chain(removes.iter().map(String::as_str))
            .collect();
        let mut problems = Vec::new();
        let mut problem = |n: &Node, field: &str, reason: String| {
            problems.push(Problem {
                path: format!("node {:?}.{field}", n.name),
                reason,
            });
        };
        for (i, n) in upserts.iter().enumerate() {
            let earlier = &upserts[..i];
            let other_addr = self
                .by_addr
                .get(&n.address)
                .filter(|o| !touched.contains(o.as_str()))
                .cloned()
                .or_else(|| (me.address == n.address).then(|| me.name.clone()))
                .or_else(|| {
                    earlier
                        .iter()
                        .find(|e| e.address == n.address)
                        .map(|e| e.name.clone())
                });
            if let Some(o) = other_addr {
                let reason = format!("duplicate address {} (also node {o:?})", n.address);
                problem(n, "address", reason);
            }
            let overlap = self
                .overlapping(&n.pod_cidr)
                .into_iter()
                .find(|(_, o)| !touched.contains(o.as_str()) || *o == me.name)
                .or_else(|| {
                    earlier
                        .iter()
                        .find(|e| e.pod_cidr.overlaps(&n.pod_cidr))
                        .map(|e| (e.pod_cidr, e.name.clone()))
                });
            if let Some((c, o)) = overlap {
                let reason = format!("{} overlaps {c} of node {o:?}", n.pod_cidr);
                problem(n, "podCIDR", reason);
            }
        }
        let added = upserts
            .iter()
            .filter(|n| !self.peers.contains_key(&n.name))
            .count();
        let removed = removes
            .iter()
            .filter(|n| self.peers.contains_key(*n))
            .count();
        let total = self.node_count() + added - removed;
        if total > self.local.max_nodes as usize {
            problems.push(Problem {
                path: "nodes".into(),
                reason: format!(
                    "{total} nodes do not fit in maps sized for {} (raise --max-nodes)",
                    self.local.max_nodes
                ),
            });
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Invalid(problems))
        }
    }

    /// Pod CIDRs already applied (peers' and this node's) that overlap `c`.
    fn overlapping(&self, c: &Cidr) -> Vec<(Cidr, String)> {
        let (start, end) = c.range();
        let before = self.by_start.range(..start).next_back();
        before
            .filter(|(_, (o, _))| o.range().1 >= start)
            .into_iter()
            .chain(self.by_start.range(start..=end))
            .map(|(_, (o, name))| (*o, name.clone()))
            .collect()
    }
}

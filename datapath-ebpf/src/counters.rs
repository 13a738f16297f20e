//! Per-CPU counting of what the programs did: by counter id, by drop reason, by peer node.
use maps_common::{CounterId, DropReason};

use crate::{DP_COUNTERS, DP_DROPS, DP_PEER_STATS};

#[inline(always)]
fn bump(slot: Option<*mut maps_common::Counter>, bytes: u32) {
    if let Some(c) = slot {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        }
    }
}

/// Counts one packet of `bytes` under `id`.
#[inline(always)]
pub fn count(id: CounterId, bytes: u32) {
    bump(DP_COUNTERS.get_ptr_mut(id as u32), bytes);
}

/// Counts one dropped packet of `bytes` under `reason`.
#[inline(always)]
pub fn count_drop(reason: DropReason, bytes: u32) {
    bump(DP_DROPS.get_ptr_mut(reason as u32), bytes);
}

/// Counts one packet for the peer in slot `peer_idx` dropped because it was unreachable.
#[inline(always)]
pub fn count_peer_unreachable(peer_idx: u32, bytes: u32) {
    if let Some(p) = DP_PEER_STATS.get_ptr_mut(peer_idx) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*p).unreachable_packets += 1;
            (*p).unreachable_bytes += bytes as u64;
        }
    }
}

/// Counts one packet sent to (`tx`) or received from (`!tx`) the peer in slot `peer_idx`.
#[inline(always)]
pub fn count_peer(peer_idx: u32, tx: bool, bytes: u32) {
    if let Some(p) = DP_PEER_STATS.get_ptr_mut(peer_idx) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            if tx {
                (*p).tx_packets += 1;
                (*p).tx_bytes += bytes as u64;
            } else {
                (*p).rx_packets += 1;
                (*p).rx_bytes += bytes as u64;
            }
        }
    }
}

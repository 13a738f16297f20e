//! Which node owns a pod address: exact-match hash lookups, one per pod-CIDR prefix length in
//! use (longest first), so the cost does not grow with the number of nodes as an LPM trie's does.
use aya_ebpf::maps::lpm_trie::Key;
use maps_common::{MAX_PREFIX_LENS, NodeConfig, PodKey, PodRoute, config_flags, prefix_mask};

use crate::{DP_POD_CIDRS, DP_POD_ROUTES};

/// The route of the pod CIDR holding `addr` (wire order), or `None` when no node owns it.
///
/// Tries `DP_POD_ROUTES` with `addr` masked to each length of `cfg.prefix_lens` in turn; with
/// `LPM_LOOKUP` set (more lengths in use than the list holds) asks the LPM trie instead.
#[inline(always)]
pub fn pod_route(cfg: &NodeConfig, addr: [u8; 4]) -> Option<PodRoute> {
    if cfg.flags & config_flags::LPM_LOOKUP != 0 {
        return DP_POD_CIDRS.get(&Key::new(32, addr)).copied();
    }
    let host = u32::from_be_bytes(addr);
    for i in 0..MAX_PREFIX_LENS {
        let len = cfg.prefix_lens[i];
        if len == 0 {
            break;
        }
        let key = PodKey {
            prefix_len: len as u32,
            addr: (host & prefix_mask(len)).to_be_bytes(),
        };
        if let Some(r) = DP_POD_ROUTES.get_ptr(key) {
            // SAFETY: a value pointer from the map, copied right away.
            return Some(unsafe { *r });
        }
    }
    None
}

/// Whether `addr` (wire order) lies in `cidr`/`len` (wire order).
#[inline(always)]
pub fn in_cidr(addr: [u8; 4], cidr: [u8; 4], len: u8) -> bool {
    let mask = prefix_mask(len);
    u32::from_be_bytes(addr) & mask == u32::from_be_bytes(cidr) & mask
}

//! The outer next hop of an encapsulated packet: the kernel's FIB and neighbour table asked
//! for the peer's underlay address, the answer cached per peer in `DP_NEXTHOPS` while the
//! underlay generation holds (one slot per peer, tagged with the family); then the MACs
//! written and the packet sent or redirected.
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_PROHIBIT, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LKUP_RET_UNREACHABLE, TC_ACT_OK, bpf_fib_lookup, bpf_redir_neigh,
    },
    helpers::{bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use maps_common::{DropReason, NextHop, NodeConfig};
use network_types::eth::EthHdr;

use crate::{DP_NEXTHOPS, parse::ptr_at_mut};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// A VLAN tag, which `is_skb_forwardable` allows beyond the MTU.
const VLAN_HLEN: u32 = 4;

/// Sends the encapsulated packet to the outer next hop that the kernel's FIB and neighbour
/// table give for the peer, looked up from the underlay interface (a pod's veth sends there).
/// `slot` is the peer's `peer_idx`: its next hop is cached in `DP_NEXTHOPS` for as long as the
/// underlay generation holds (the agent bumps it on every route, link or neighbour change).
///
/// Returns `TC_ACT_OK` when the next hop is on this interface (MACs rewritten), the redirect
/// verdict when it is on another interface or its neighbour entry must first be resolved;
/// `TooBig` when the packet exceeds the outgoing interface's MTU, `PeerUnreachable` when no
/// route (or an unreachable, blackhole or prohibit route) leads to the peer, `FibLookupFailed`
/// otherwise.
#[inline(always)]
pub fn forward(
    ctx: &TcContext,
    cfg: &NodeConfig,
    peer: [u8; 4],
    slot: Option<u32>,
) -> Result<i32, DropReason> {
    via_fib(ctx, cfg, (slot, cfg.underlay_gen), |params| {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(cfg.node_addr);
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(peer);
    })
}

/// `forward` for an IPv6 peer (`peer`, wire order) from this node's IPv6 address `src`: the
/// FIB asked with AF_INET6, an unresolved neighbour left to `bpf_redirect_neigh`, which runs
/// NDP. The answer is cached in the peer's slot too, tagged `NEXTHOP_IPV6`: a peer whose two
/// halves both carry traffic swaps the slot between them, each swap one lookup.
#[inline(always)]
pub fn forward6(
    ctx: &TcContext,
    cfg: &NodeConfig,
    (src, peer): (&[u8; 16], &[u8; 16]),
    slot: Option<u32>,
) -> Result<i32, DropReason> {
    let tag = cfg.underlay_gen | maps_common::NEXTHOP_IPV6;
    via_fib(ctx, cfg, (slot, tag), |params| {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = words(src);
        params.__bindgen_anon_4.ipv6_dst = words(peer);
    })
}

/// Either family: the next hop cached in `slot` under `tag`, else the FIB's answer to the
/// lookup `fill` writes (family and addresses; only on a miss), cached there. A neighbour
/// still unresolved is left to `bpf_redirect_neigh`.
#[inline(always)]
fn via_fib(
    ctx: &TcContext,
    cfg: &NodeConfig,
    (slot, tag): (Option<u32>, u32),
    fill: impl FnOnce(&mut bpf_fib_lookup),
) -> Result<i32, DropReason> {
    let cached = slot.and_then(|i| DP_NEXTHOPS.get_ptr_mut(i));
    if let Some(nh) = cached_hop(cached, tag) {
        return send_to(ctx, nh);
    }
    // SAFETY: all-zero is a valid bpf_fib_lookup.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fill(&mut params);
    params.ifindex = lookup_ifindex(ctx, cfg);
    let rc = fib_lookup(ctx, &mut params);
    if rc == BPF_FIB_LKUP_RET_SUCCESS {
        return send_to(ctx, &resolved(cached, tag, &params));
    }
    unresolved(rc, &params)
}

/// The next hop cached in `slot` when it was looked up under `tag` (the underlay generation,
/// with the family's bit); never for generation 0, an empty slot.
#[inline(always)]
fn cached_hop(slot: Option<*mut NextHop>, tag: u32) -> Option<&'static NextHop> {
    // SAFETY: a value pointer into this CPU's copy of the map, read in place while this
    // program runs on this CPU (nothing else writes it meanwhile).
    let nh = unsafe { &*slot? };
    (nh.underlay_gen & !maps_common::NEXTHOP_IPV6 != 0 && nh.underlay_gen == tag).then_some(nh)
}

/// An address as the kernel's structures hold it: four words, bytes in wire order.
#[inline(always)]
pub fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// The interface the FIB is asked from: the underlay (a pod's veth sends there), else the
/// packet's own.
#[inline(always)]
fn lookup_ifindex(ctx: &TcContext, cfg: &NodeConfig) -> u32 {
    if cfg.underlay_ifindex != 0 {
        cfg.underlay_ifindex
    } else {
        // SAFETY: ctx.skb.skb is the program's __sk_buff.
        unsafe { (*ctx.skb.skb).ifindex }
    }
}

/// Asks the kernel's FIB and neighbour table; returns its `BPF_FIB_LKUP_RET_*` code.
#[inline(always)]
fn fib_lookup(ctx: &TcContext, params: &mut bpf_fib_lookup) -> u32 {
    // SAFETY: params lives on the caller's stack for the call.
    unsafe {
        aya_ebpf::helpers::bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        ) as u32
    }
}

/// The next hop a successful lookup gave, cached in `slot` (if any) under `tag`.
#[inline(always)]
fn resolved(slot: Option<*mut NextHop>, tag: u32, params: &bpf_fib_lookup) -> NextHop {
    let nh = NextHop {
        underlay_gen: tag,
        ifindex: params.ifindex,
        dmac: params.dmac,
        smac: params.smac,
        // SAFETY: on success, with tot_len left 0, the FIB writes the device's MTU here.
        mtu: unsafe { params.__bindgen_anon_1.mtu_result } as u32,
    };
    if let Some(slot) = slot {
        // SAFETY: this CPU's copy of the slot; nothing else runs on this CPU meanwhile.
        unsafe { *slot = nh };
    }
    nh
}

/// The verdict for a lookup other than a success: the neighbour left to the kernel
/// (`bpf_redirect_neigh` toward the next hop the FIB wrote into the destination, on its
/// interface) or the reason to drop.
#[inline(always)]
fn unresolved(rc: u32, params: &bpf_fib_lookup) -> Result<i32, DropReason> {
    match rc {
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            // SAFETY: all-zero is a valid bpf_redir_neigh.
            let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
            nh.nh_family = params.family as u32;
            // SAFETY: on NO_NEIGH the FIB wrote the next hop's address, of its family, there.
            unsafe {
                if params.family == AF_INET6 {
                    nh.__bindgen_anon_1.ipv6_nh = params.__bindgen_anon_4.ipv6_dst;
                } else {
                    nh.__bindgen_anon_1.ipv4_nh = params.__bindgen_anon_4.ipv4_dst;
                }
            }
            let size = core::mem::size_of::<bpf_redir_neigh>() as i32;
            // SAFETY: nh lives on the stack for the call.
            Ok(unsafe { bpf_redirect_neigh(params.ifindex, &mut nh, size, 0) } as i32)
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(DropReason::TooBig),
        BPF_FIB_LKUP_RET_NOT_FWDED
        | BPF_FIB_LKUP_RET_UNREACHABLE
        | BPF_FIB_LKUP_RET_BLACKHOLE
        | BPF_FIB_LKUP_RET_PROHIBIT => Err(DropReason::PeerUnreachable),
        _ => Err(DropReason::FibLookupFailed),
    }
}

/// Addresses the packet to a resolved next hop and sends it there: on the interface it is on
/// (`TC_ACT_OK`) or redirected to another. Refuses what the FIB would: a packet other than GSO
/// longer than the interface's MTU plus its Ethernet and VLAN headers (`is_skb_forwardable`).
#[inline(always)]
fn send_to(ctx: &TcContext, nh: &NextHop) -> Result<i32, DropReason> {
    // SAFETY: ctx.skb.skb is the program's __sk_buff.
    let (gso_size, ifindex) = unsafe { ((*ctx.skb.skb).gso_size, (*ctx.skb.skb).ifindex) };
    if gso_size == 0 && ctx.len() > nh.mtu + EthHdr::LEN as u32 + VLAN_HLEN {
        return Err(DropReason::TooBig);
    }
    let eth = ptr_at_mut::<EthHdr, _>(ctx, 0).ok_or(DropReason::Truncated)?;
    // SAFETY: bounds checked just above.
    unsafe {
        (*eth).dst_addr = nh.dmac;
        (*eth).src_addr = nh.smac;
    }
    if nh.ifindex == ifindex {
        Ok(TC_ACT_OK)
    } else {
        // SAFETY: plain helper call.
        Ok(unsafe { bpf_redirect(nh.ifindex, 0) } as i32)
    }
}

//! The one bounds-checked way to reach packet memory, for both XDP and TC contexts.
use aya_ebpf::programs::{TcContext, XdpContext};

pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// Fragment offset bits of the IPv4 flags/fragment-offset field.
pub const IP_OFFSET: u16 = 0x1fff;

/// The source and destination ports (wire order) of a TCP or UDP packet whose IPv4 header `ip`
/// stands behind the Ethernet header, and the L4 header's offset; `None` for other protocols,
/// a non-first fragment, or ports beyond the linear area.
#[inline(always)]
pub fn l4_ports(ctx: &TcContext, ip: &network_types::ip::Ipv4Hdr) -> Option<([[u8; 2]; 2], usize)> {
    let first = u16::from_be_bytes(ip.frags) & IP_OFFSET == 0;
    if !first || (ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP) {
        return None;
    }
    let off = network_types::eth::EthHdr::LEN + ((ip.vihl & 0x0f) as usize) * 4;
    let ports = ptr_at::<[[u8; 2]; 2], _>(ctx, off)?;
    // SAFETY: ptr_at checked the bounds.
    Some((unsafe { *ports }, off))
}

/// A context whose packet bytes lie between `data()` and `data_end()`.
pub trait Packet {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// A GSO packet: its length fields are the kernel's and describe the segments to be, not
    /// this buffer (a sender's GSO packet crosses a veth whole).
    fn is_gso(&self) -> bool;
    /// The whole packet's length, also what lies beyond `data_end()` in paged buffers.
    fn packet_len(&self) -> usize;
    /// The interface the packet is on.
    fn ifindex(&self) -> u32;
}

impl Packet for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn is_gso(&self) -> bool {
        // SAFETY: skb.skb is the program's __sk_buff.
        unsafe { (*self.skb.skb).gso_size != 0 }
    }
    #[inline(always)]
    fn packet_len(&self) -> usize {
        self.len() as usize
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: skb.skb is the program's __sk_buff.
        unsafe { (*self.skb.skb).ifindex }
    }
}

impl Packet for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn is_gso(&self) -> bool {
        false
    }
    #[inline(always)]
    fn packet_len(&self) -> usize {
        XdpContext::data_end(self) - XdpContext::data(self)
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: ctx is the program's xdp_md.
        unsafe { (*self.ctx).ingress_ifindex }
    }
}

/// Returns a pointer to a `T` at `offset`, or `None` when the packet is shorter than
/// `offset + size_of::<T>()`. Re-call after any change of the packet's head: old pointers are
/// invalid then.
#[inline(always)]
pub fn ptr_at<T, P: Packet>(ctx: &P, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Mutable variant of [`ptr_at`], same contract.
#[inline(always)]
pub fn ptr_at_mut<T, P: Packet>(ctx: &P, offset: usize) -> Option<*mut T> {
    ptr_at::<T, P>(ctx, offset).map(|p| p as *mut T)
}

//! The checksum device (`CSUM_DEV`): a VXLAN device whose TX path computes the outer UDP
//! checksum the programs ask for (and sends every IPv6 VXLAN frame), with a program that drops
//! whatever else reaches it.
//! Created while the cluster asks for checksums, removed when `DP_CONFIG` stops naming it.
use super::state::{Shared, SharedRef, lock};
use crate::{
    cluster::{self, Cluster},
    kernel::loader,
    underlay::netlink::{self, Netlink},
};

/// Creates the checksum device and its drop program when the cluster asks for outer UDP
/// checksums (VXLAN), or this node carries IPv6 pods (`v6`, VXLAN or native routing: it sends
/// every IPv6 VXLAN frame); returns its ifindex, 0 when none is wanted.
pub async fn with_csum_device(
    shared: &SharedRef,
    nl: &Netlink,
    cluster: &Cluster,
    v6: bool,
) -> anyhow::Result<u32> {
    let wanted = match cluster.encap {
        cluster::Encap::Vxlan => cluster.udp_checksum || v6,
        // Native routing's IPv6 halves go in VXLAN over IPv6 until the fabric routes them.
        cluster::Encap::None => v6,
        cluster::Encap::Ipip => false,
    };
    if !wanted {
        return Ok(0);
    }
    let (ifindex, fresh) = nl.ensure_csum_device(cluster.port).await?;
    let mut s = lock(shared);
    if fresh || s.csum_dev != Some(true) {
        let Shared {
            ebpf,
            pin_dir,
            tc_mode,
            ..
        } = &mut *s;
        loader::attach_csum_dev(ebpf, netlink::CSUM_DEV, fresh, *tc_mode, pin_dir)?;
        s.csum_dev = Some(true);
    }
    Ok(ifindex)
}

/// Removes the checksum device once `DP_CONFIG` no longer names it.
pub async fn drop_csum_device(shared: &SharedRef, nl: &Netlink) -> anyhow::Result<()> {
    let pin_dir = {
        let s = lock(shared);
        if s.dp.local.csum_ifindex != 0 || s.csum_dev == Some(false) {
            return Ok(());
        }
        s.pin_dir.clone()
    };
    loader::detach_csum_dev(&pin_dir);
    nl.remove_csum_device().await?;
    lock(shared).csum_dev = Some(false);
    Ok(())
}

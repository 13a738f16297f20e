//! The kernel programs loaded (not attached) with node1's view of a two-node cluster, in a
//! namespace of the test thread's own (`testkit::progrun::ThreadNetns`): what the
//! BPF_PROG_TEST_RUN tests (`prog_test_run`, `fuzz`, `accepted_flows`) share. Packets come
//! from `testkit::packet`, runs from `testkit::progrun`.
use aya::Ebpf;
use datapath_user::{
    cluster::{Defaults, Limits},
    kernel::loader::{self, LoadOptions},
    kernel::maps::DatapathMaps,
    reconcile::dataplane::{Dataplane, HostRouting, LocalOptions},
    underlay::netlink::Iface,
};
use maps_common::{DropReason, prog_names};
use testkit::{cluster, progrun};
pub use testkit::{
    packet::*,
    progrun::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, ThreadNetns, XDP_DROP, XDP_PASS},
};

/// The datapath loaded (not attached) with node1's view of a two-node cluster.
pub struct Env {
    pub ebpf: Ebpf,
    pub dp: Dataplane,
    pub _ns: ThreadNetns,
    pub ifindex: u32,
}

impl Env {
    pub fn new(encap: &str) -> Self {
        Self::with(encap, "")
    }

    /// `extra` goes into the cluster file before `nodes:`.
    pub fn with(encap: &str, extra: &str) -> Self {
        Self::routed(encap, extra, HostRouting::Kernel)
    }

    /// With `host_routing` in the programs' configuration.
    pub fn routed(encap: &str, extra: &str, host_routing: HostRouting) -> Self {
        let text = cluster::yaml(encap, extra, &cluster::two_nodes());
        Self::of_cluster(&text, host_routing, |_| 0)
    }

    /// Node1's view of a dual-stack VXLAN cluster: node2 also at fd00:1::11 (a permanent
    /// neighbour on ul0, `PEER_MAC`), IPv6 pod CIDR fd00:10:244:1::/64, VTEP MAC
    /// `PEER_VTEP6`. The kernel VXLAN device the IPv6 GSO path hands packets to is ul0's
    /// peer here, a stand-in no test run reaches with a packet the program writes itself.
    pub fn dual() -> Self {
        let mut text = cluster::yaml("vxlan", "", &cluster::two_nodes());
        text = text.replace(
            "    podCIDR: 10.244.0.0/24\n",
            "    podCIDR: 10.244.0.0/24\n    addressV6: \"fd00:1::10\"\n    podCIDRv6: \"fd00:10:244::/64\"\n",
        );
        text = text.replace(
            "    podCIDR: 10.244.1.0/24\n",
            "    podCIDR: 10.244.1.0/24\n    addressV6: \"fd00:1::11\"\n    podCIDRv6: \"fd00:10:244:1::/64\"\n    vtepMACv6: \"66:00:00:00:00:06\"\n",
        );
        Self::of_cluster(&text, HostRouting::Kernel, |ns| ns.ifindex_of("ul1"))
    }

    /// Node1's view of the cluster file `text`; `csum_ifindex` names the kernel VXLAN device.
    fn of_cluster(
        text: &str,
        host_routing: HostRouting,
        csum_ifindex: impl Fn(&ThreadNetns) -> u32,
    ) -> Self {
        let ns = ThreadNetns::enter();
        let ifindex = ns.ifindex();
        let csum_ifindex = csum_ifindex(&ns);
        let limits = Limits {
            max_nodes: 64,
            own_node: Some("node1".into()),
            own_addrs: Vec::new(),
        };
        let cluster = datapath_user::source::parse_text(text, &Defaults::default(), &limits)
            .expect("cluster");
        let mut ebpf = loader::load(&LoadOptions {
            max_nodes: 64,
            log_level: 0,
            pin_dir: None,
            maps_dir: "maps",
        })
        .expect("load object");
        let maps = DatapathMaps::take(&mut ebpf).expect("maps");
        let local = LocalOptions {
            node: "node1".into(),
            iface: Iface {
                name: "ul0".into(),
                ifindex,
                mtu: 1500,
                addr: Some(NODE.into()),
                prefix_len: Some(24),
                virtual_dev: true,
            },
            inner_src_check: true,
            max_nodes: 64,
            csum_ifindex,
            host_routing,
        };
        let mut dp = Dataplane::new(maps, local).expect("dataplane");
        dp.apply_full(&cluster).expect("fill the maps");
        let tc = [
            prog_names::TC_ENCAP_EGRESS,
            prog_names::TC_DECAP_INGRESS,
            prog_names::TC_POD_INGRESS,
            prog_names::TC_POD_EGRESS,
        ];
        progrun::load_programs(&mut ebpf, &tc, &[prog_names::XDP_DECAP_INGRESS])
            .unwrap_or_else(|e| panic!("{e}"));
        Self {
            ebpf,
            dp,
            _ns: ns,
            ifindex,
        }
    }

    /// Runs a TC program with the packet on ul0; returns (action, output bytes).
    pub fn run_tc(&self, prog: &str, input: &[u8]) -> (u32, Vec<u8>) {
        self.try_run_tc(prog, input)
            .unwrap_or_else(|e| panic!("test run of {prog} on {}: {e}", hex(input)))
    }

    /// `run_tc`, or the kernel's refusal: it will not build an skb for every frame (an
    /// IPv4/IPv6 ethertype with less than the network header behind it, for one).
    pub fn try_run_tc(&self, prog: &str, input: &[u8]) -> Result<(u32, Vec<u8>), String> {
        let r = progrun::run(&self.ebpf, prog, self.ifindex, input)?;
        Ok((r.verdict, r.out))
    }

    pub fn run_xdp(&self, input: &[u8]) -> (u32, Vec<u8>) {
        let r = progrun::run(&self.ebpf, prog_names::XDP_DECAP_INGRESS, 0, input)
            .unwrap_or_else(|e| panic!("test run: {e}"));
        (r.verdict, r.out)
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        DatapathMaps::sum_counters(&self.dp.maps.drops)[reason as usize].packets
    }

    /// Packets counted under `id`.
    pub fn counter(&self, id: maps_common::CounterId) -> u64 {
        DatapathMaps::sum_counters(&self.dp.maps.counters)[id as usize].packets
    }
}

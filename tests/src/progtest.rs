//! The kernel programs loaded (not attached) in a namespace of the test thread's own, and
//! packet builders written independently of the kernel code: what the BPF_PROG_TEST_RUN tests
//! (`prog_test_run`, `fuzz`) share.
//!
//! ```text
//!   test thread ── setns ──► netns: ul0 192.168.1.10/24 mac 02:00:00:00:00:0a (veth to ul1)
//!                                   neighbour 192.168.1.11 lladdr 02:00:00:00:00:0b PERMANENT
//! ```
//! The FIB and neighbour lookups of the encap program resolve in that namespace, so the output
//! MACs are known.
use std::{fs::File, os::fd::AsRawFd as _};

use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use datapath_user::{
    cluster::{Defaults, Limits},
    kernel::loader::{self, LoadOptions},
    kernel::maps::DatapathMaps,
    reconcile::dataplane::{Dataplane, HostRouting, LocalOptions},
    underlay::netlink::Iface,
};
use maps_common::{DropReason, prog_names};

use crate::{sh, unique};

pub const NODE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0a];
pub const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0b];
pub const NODE: [u8; 4] = [192, 168, 1, 10];
pub const PEER: [u8; 4] = [192, 168, 1, 11];
pub const POD1: [u8; 4] = [10, 244, 0, 2];
pub const POD2: [u8; 4] = [10, 244, 1, 2];
/// VTEP MACs as the cluster file derives them (0e:00 + address).
pub const NODE_VTEP: [u8; 6] = [0x0e, 0, 192, 168, 1, 10];
pub const PEER_VTEP: [u8; 6] = [0x0e, 0, 192, 168, 1, 11];
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// A namespace the calling thread lives in until drop, then returns to its own.
pub struct ThreadNetns {
    name: String,
    home: File,
}

impl ThreadNetns {
    pub fn enter() -> Self {
        let name = unique("ptr");
        sh(&format!("ip netns add {name}"));
        let setup = format!(
            "ip -n {name} link add ul0 address 02:00:00:00:00:0a type veth peer name ul1 && \
             ip -n {name} link set ul0 up && ip -n {name} link set ul1 up && ip -n {name} link set lo up && \
             ip -n {name} addr add 192.168.1.10/24 dev ul0 && \
             ip -n {name} neigh add 192.168.1.11 lladdr 02:00:00:00:00:0b dev ul0 nud permanent && \
             ip netns exec {name} sysctl -qw net.ipv4.conf.all.forwarding=1"
        );
        let home = File::open("/proc/thread-self/ns/net").expect("own netns");
        let me = Self { name, home };
        sh(&setup);
        let target = File::open(format!("/run/netns/{}", me.name)).expect("netns file");
        // SAFETY: setns on this thread only, with valid fds.
        assert_eq!(
            unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        me
    }
}

impl Drop for ThreadNetns {
    fn drop(&mut self) {
        // SAFETY: back to the namespace the thread came from.
        unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
        let _ = crate::sh_out(&format!("ip netns del {}", self.name));
    }
}

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
        let ns = ThreadNetns::enter();
        let ifindex: u32 = std::fs::read_to_string("/sys/class/net/ul0/ifindex")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| {
                // /sys still shows the old namespace: ask iproute2 inside the new one.
                sh("ip -j link show ul0")
                    .split("\"ifindex\":")
                    .nth(1)
                    .and_then(|r| r.split(',').next())
                    .and_then(|n| n.trim().parse().ok())
                    .expect("ifindex of ul0")
            });
        let text = format!(
            "encapsulation: {encap}\n{extra}nodes:\n  - name: node1\n    address: 192.168.1.10\n    podCIDR: 10.244.0.0/24\n  - name: node2\n    address: 192.168.1.11\n    podCIDR: 10.244.1.0/24\n"
        );
        let limits = Limits {
            max_nodes: 64,
            own_node: Some("node1".into()),
            own_addrs: Vec::new(),
        };
        let cluster = datapath_user::source::parse_text(&text, &Defaults::default(), &limits)
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
            csum_ifindex: 0,
            host_routing,
        };
        let mut dp = Dataplane::new(maps, local).expect("dataplane");
        dp.apply_full(&cluster).expect("fill the maps");
        for name in [
            prog_names::TC_ENCAP_EGRESS,
            prog_names::TC_DECAP_INGRESS,
            prog_names::TC_POD_INGRESS,
            prog_names::TC_POD_EGRESS,
        ] {
            let p: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            p.load().expect("verifier accepts the TC program");
        }
        let p: &mut Xdp = ebpf
            .program_mut(prog_names::XDP_DECAP_INGRESS)
            .unwrap()
            .try_into()
            .unwrap();
        p.load().expect("verifier accepts the XDP program");
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
        let p: &SchedClassifier = self.ebpf.program(prog).unwrap().try_into().unwrap();
        // __sk_buff with only ifindex (offset 40) set.
        let mut ctx = [0u8; 192];
        ctx[40..44].copy_from_slice(&self.ifindex.to_ne_bytes());
        let mut out = vec![0u8; input.len() + 128];
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            })
            .map_err(|e| format!("{e:?}"))?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    pub fn run_xdp(&self, input: &[u8]) -> (u32, Vec<u8>) {
        let p: &Xdp = self
            .ebpf
            .program(prog_names::XDP_DECAP_INGRESS)
            .unwrap()
            .try_into()
            .unwrap();
        let mut out = vec![0u8; input.len() + 128];
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("test run");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        DatapathMaps::sum_counters(&self.dp.maps.drops)[reason as usize].packets
    }

    /// Packets counted under `id`.
    pub fn counter(&self, id: maps_common::CounterId) -> u64 {
        DatapathMaps::sum_counters(&self.dp.maps.counters)[id as usize].packets
    }
}

// ---- packet builders, written independently of the kernel code ----

pub fn csum(bytes: &[u8]) -> [u8; 2] {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    (!(sum as u16)).to_be_bytes()
}

pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    [&dst[..], &src, &ethertype.to_be_bytes(), payload].concat()
}

pub struct Ip {
    pub tos: u8,
    pub id: u16,
    pub df: bool,
    pub ttl: u8,
    pub proto: u8,
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

pub fn ipv4(h: &Ip, payload: &[u8]) -> Vec<u8> {
    let len = (20 + payload.len()) as u16;
    let mut hdr = vec![0x45, h.tos];
    hdr.extend(len.to_be_bytes());
    hdr.extend(h.id.to_be_bytes());
    hdr.extend(if h.df { [0x40, 0] } else { [0, 0] });
    hdr.extend([h.ttl, h.proto, 0, 0]);
    hdr.extend(h.src);
    hdr.extend(h.dst);
    let c = csum(&hdr);
    hdr[10..12].copy_from_slice(&c);
    [hdr, payload.to_vec()].concat()
}

pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    [
        &sport.to_be_bytes()[..],
        &dport.to_be_bytes(),
        &len.to_be_bytes(),
        &[0, 0],
        payload,
    ]
    .concat()
}

pub fn tcp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![];
    h.extend(sport.to_be_bytes());
    h.extend(dport.to_be_bytes());
    h.extend(1000u32.to_be_bytes()); // seq
    h.extend(0u32.to_be_bytes()); // ack
    h.extend([0x50, 0x02, 0xff, 0xff, 0x12, 0x34, 0, 0]); // SYN, window, checksum, urg
    [h, payload.to_vec()].concat()
}

pub fn icmp_echo(id: u16, seq: u16) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0];
    m.extend(id.to_be_bytes());
    m.extend(seq.to_be_bytes());
    m.extend(b"abcdefghijklmnop");
    let c = csum(&m);
    m[2..4].copy_from_slice(&c);
    m
}

pub fn vxlan_hdr(vni: u32) -> Vec<u8> {
    vec![
        0x08,
        0,
        0,
        0,
        (vni >> 16) as u8,
        (vni >> 8) as u8,
        vni as u8,
        0,
    ]
}

/// Inner packets of the three protocols, as pod1 would send them to pod2.
pub fn inner_packets() -> Vec<(&'static str, Vec<u8>)> {
    let ip = |proto, df, payload: &[u8]| {
        ipv4(
            &Ip {
                tos: 0xb8 | 0x01, // DSCP EF, ECN ECT(1)
                id: 0x1234,
                df,
                ttl: 63,
                proto,
                src: POD1,
                dst: POD2,
            },
            payload,
        )
    };
    vec![
        ("tcp", ip(6, true, &tcp(40000, 80, b"GET / HTTP/1.1\r\n"))),
        ("udp", ip(17, false, &udp(5353, 53, b"query"))),
        ("icmp", ip(1, true, &icmp_echo(7, 1))),
    ]
}

/// The outer header the datapath must write: DSCP/ECN, ID and DF from the inner header.
pub fn outer_ip(inner: &[u8], proto: u8) -> Ip {
    Ip {
        tos: inner[1],
        id: u16::from_be_bytes([inner[4], inner[5]]),
        df: inner[6] & 0x40 != 0,
        ttl: 64,
        proto,
        src: NODE,
        dst: PEER,
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn assert_bytes(what: &str, got: &[u8], want: &[u8]) {
    if got != want {
        let at = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: output differs at byte {at} (len got {}, want {})\n got: {}\nwant: {}",
            got.len(),
            want.len(),
            hex(got),
            hex(want)
        );
    }
}

/// A frame node2 would send node1: outer headers around `inner`.
pub fn from_peer(vxlan: bool, inner: &[u8], vni: u32, src: [u8; 4]) -> Vec<u8> {
    let (proto, payload) = if vxlan {
        let frame = eth(NODE_VTEP, PEER_VTEP, 0x0800, inner);
        (17, udp(45000, 4789, &[vxlan_hdr(vni), frame].concat()))
    } else {
        (4, inner.to_vec())
    };
    let ip = Ip {
        tos: 0,
        id: 1,
        df: true,
        ttl: 64,
        proto,
        src,
        dst: NODE,
    };
    eth(NODE_MAC, PEER_MAC, 0x0800, &ipv4(&ip, &payload))
}

pub fn reply_packets() -> Vec<(&'static str, Vec<u8>)> {
    inner_packets()
        .into_iter()
        .map(|(p, mut ip)| {
            // pod2 -> pod1: swap the addresses, fix the checksum.
            ip[12..16].copy_from_slice(&POD2);
            ip[16..20].copy_from_slice(&POD1);
            ip[10..12].copy_from_slice(&[0, 0]);
            let c = csum(&ip[..20]);
            ip[10..12].copy_from_slice(&c);
            (p, ip)
        })
        .collect()
}

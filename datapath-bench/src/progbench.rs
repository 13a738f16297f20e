//! Per-packet cost of each program from BPF_PROG_TEST_RUN, beside programs that only return,
//! with 2 or many nodes in the maps. Each run gets a fresh packet (repeat would re-run on the
//! packet the program already changed), and the kernel-reported duration of single runs is
//! averaged. Runs inside a namespace where `ul0` holds 192.168.1.10/16 and fd00:1::10/64, and
//! 192.168.1.11 and fd00:1::11 have permanent neighbour entries (`cargo xtask bench` makes it).
use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context as _, Result};
use aya::Ebpf;
use maps_common::prog_names;
use testkit::{cluster::ClusterNode, packet, progrun};

use datapath_user::{
    cluster::{self, Defaults, Limits},
    kernel::loader::{self, LoadOptions},
    kernel::maps::DatapathMaps,
    reconcile::dataplane::{Dataplane, HostRouting, LocalOptions},
    underlay::netlink,
};

/// A generated cluster of `nodes` nodes as JSON, with node `k`'s VTEP MAC set to `mac` when
/// given.
pub fn cluster_json(encap: &str, nodes: u32, changed: Option<(u32, [u8; 6])>) -> String {
    let list: Vec<ClusterNode> = (0..nodes)
        .map(|k| {
            let mut n = testkit::cluster::generated(k);
            if let Some((_, mac)) = changed.filter(|(c, _)| *c == k) {
                n.vtep_mac = Some(cluster::format_mac(&mac));
            }
            n
        })
        .collect();
    testkit::cluster::json(encap, &list)
}

/// Changes one node's VTEP MAC in the cluster file `path` `samples` times, each written beside
/// it and renamed over it (as editors and ConfigMap updates do), and times each from the
/// rename to when the agent's pinned DP_POD_CIDRS holds the new MAC. Milliseconds.
pub fn file_latency(
    path: &std::path::Path,
    nodes: u32,
    pin_dir: &std::path::Path,
    samples: u32,
) -> Result<Vec<f64>> {
    let maps = DatapathMaps::open_pinned(pin_dir)?;
    let tmp = path.with_extension("new");
    let mut out = Vec::new();
    for s in 0..samples {
        let k = 2 + s % (nodes - 2);
        let mac = [0x66, 0, 0, (s >> 16) as u8, (s >> 8) as u8, s as u8];
        std::fs::write(&tmp, cluster_json("vxlan", nodes, Some((k, mac))))?;
        let key = aya::maps::lpm_trie::Key::new(24, pod_cidr(k).addr.octets());
        let start = std::time::Instant::now();
        std::fs::rename(&tmp, path)?;
        wait_for_mac(&maps, &key, mac, start, s)?;
        out.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}

/// Polls the pinned pod-CIDR map every 50 µs until `key` holds `mac` (10 s at most).
fn wait_for_mac(
    maps: &DatapathMaps,
    key: &aya::maps::lpm_trie::Key<[u8; 4]>,
    mac: [u8; 6],
    start: std::time::Instant,
    sample: u32,
) -> Result<()> {
    loop {
        if maps.pod_cidrs.get(key, 0).is_ok_and(|r| r.vtep_mac == mac) {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "change {sample} not in the map after 10 s"
        );
        // A blocking sleep: tokio's timer would round 50 µs up to a millisecond.
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

/// A cluster file of `nodes` nodes (`testkit::cluster::generated`): node1 192.168.1.10, node2
/// 192.168.1.11, the rest 250 to a /24 from 192.168.2.0 on (10,000 nodes fill 40 subnets),
/// pod CIDRs 10.(k/256).(k%256).0/24.
pub fn cluster_text(encap: &str, nodes: u32) -> String {
    let list: Vec<ClusterNode> = (0..nodes).map(testkit::cluster::generated).collect();
    testkit::cluster::yaml(encap, "", &list)
}

/// Underlay address of generated node `k` (0-based).
fn node_addr(k: u32) -> Ipv4Addr {
    testkit::cluster::generated_addr(k)
}

/// Pod CIDR of generated node `k`.
fn pod_cidr(k: u32) -> cluster::Cidr {
    let (addr, len) = testkit::cluster::generated_pod_cidr(k);
    cluster::Cidr { addr, len }
}

fn flannel_lease(k: u32, mac: [u8; 6]) -> String {
    format!(
        r#"{{"PublicIP":"{}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{}"}},"NodeName":"node{}"}}"#,
        node_addr(k),
        cluster::format_mac(&mac),
        k + 1
    )
}

/// Writes Flannel's configuration and the leases of `nodes` generated nodes under `prefix`.
pub async fn etcd_fill(endpoints: &[String], prefix: &str, nodes: u32) -> Result<()> {
    let mut c = etcd_client::Client::connect(endpoints, None).await?;
    c.put(
        format!("{prefix}/config"),
        r#"{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan","VNI":1,"Port":8472}}"#,
        None,
    )
    .await?;
    for k in 0..nodes {
        let key = datapath_user::source::etcd::lease_key(prefix, &pod_cidr(k));
        c.put(
            key,
            flannel_lease(k, cluster::derived_vtep_mac(node_addr(k))),
            None,
        )
        .await?;
    }
    Ok(())
}

/// Changes `samples` leases one at a time (a new VTEP MAC) and times each from just before the
/// write to when the agent's pinned DP_POD_CIDRS holds the new MAC, polled every 50 µs.
/// Returns the latencies in milliseconds.
pub async fn etcd_latency(
    endpoints: &[String],
    prefix: &str,
    nodes: u32,
    pin_dir: &std::path::Path,
    samples: u32,
) -> Result<Vec<f64>> {
    let mut c = etcd_client::Client::connect(endpoints, None).await?;
    let maps = DatapathMaps::open_pinned(pin_dir)?;
    let mut out = Vec::new();
    for s in 0..samples {
        let k = 2 + s % (nodes - 2);
        let mac = [0x66, 0, 0, (s >> 16) as u8, (s >> 8) as u8, s as u8];
        let key = aya::maps::lpm_trie::Key::new(24, pod_cidr(k).addr.octets());
        let start = std::time::Instant::now();
        c.put(
            datapath_user::source::etcd::lease_key(prefix, &pod_cidr(k)),
            flannel_lease(k, mac),
            None,
        )
        .await?;
        wait_for_mac(&maps, &key, mac, start, s)?;
        out.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}

struct View {
    ebpf: Ebpf,
    _dp: Dataplane,
    ifindex: u32,
}

/// Node `me`'s view of `nodes` generated nodes in `encap`; with `six`, node1 and node2 carry
/// IPv6 halves too (`with_ipv6`), and ul0's peer stands in for the kernel VXLAN device that
/// IPv6 GSO packets take (no single run here reaches it).
fn view(encap: &str, nodes: u32, me: &str, host_routing: HostRouting, six: bool) -> Result<View> {
    let max = nodes.max(2) + 8;
    let limits = Limits {
        max_nodes: max,
        own_node: Some(me.into()),
        own_addrs: Vec::new(),
    };
    let mut text = cluster_text(encap, nodes);
    if six {
        text = with_ipv6(&text);
    }
    let c = datapath_user::source::parse_text(&text, &Defaults::default(), &limits)?;
    let mut ebpf = loader::load(&LoadOptions {
        max_nodes: max,
        log_level: 0,
        pin_dir: None,
        maps_dir: datapath_user::kernel::pin_tree::MAPS,
    })?;
    let maps = DatapathMaps::take(&mut ebpf)?;
    let iface = netlink::blocking(|nl| async move { Ok(nl.iface("ul0").await?) })?;
    let local = LocalOptions {
        node: me.into(),
        iface: netlink::Iface {
            prefix_len: Some(16),
            ..iface.clone()
        },
        inner_src_check: true,
        max_nodes: max,
        csum_ifindex: if six {
            netlink::blocking(|nl| async move { Ok(nl.iface("ul1").await?) })?.ifindex
        } else {
            0
        },
        host_routing,
    };
    let mut dp = Dataplane::new(maps, local)?;
    dp.apply_full(&c)?;
    let tc = [
        prog_names::TC_ENCAP_EGRESS,
        prog_names::TC_DECAP_INGRESS,
        prog_names::TC_POD_INGRESS,
        prog_names::TC_FLOOR,
    ];
    let xdp = [prog_names::XDP_DECAP_INGRESS, prog_names::XDP_FLOOR];
    progrun::load_programs(&mut ebpf, &tc, &xdp).map_err(anyhow::Error::msg)?;
    Ok(View {
        ebpf,
        _dp: dp,
        ifindex: iface.ifindex,
    })
}

impl View {
    /// Runs a program once; returns (output, kernel-reported ns).
    fn run(&self, prog: &str, input: &[u8]) -> Result<(Vec<u8>, u64)> {
        let r = progrun::run(&self.ebpf, prog, self.ifindex, input).map_err(anyhow::Error::msg)?;
        Ok((r.out, r.ns))
    }

    /// Lets every event through the monitor's token bucket.
    fn lift_event_limit(&mut self) -> Result<()> {
        let conf = self
            ._dp
            .maps
            .monitor_conf
            .as_mut()
            .context("DP_MONITOR_CONF")?;
        conf.set(
            0,
            maps_common::MonitorConf {
                rate: u32::MAX,
                burst: u32::MAX,
                ..Default::default()
            },
            0,
        )?;
        Ok(())
    }

    /// `testkit::progrun::trimmed_ns` of `prog` on `input`.
    fn trimmed_ns(&self, prog: &str, input: &[u8], iterations: u32) -> Result<f64> {
        progrun::trimmed_ns(&self.ebpf, prog, self.ifindex, input, iterations)
            .map_err(anyhow::Error::msg)
    }
}

/// A TCP segment (ACK) pod1 (10.0.0.2) → pod2 (10.0.1.2) with 64 bytes of payload, in
/// Ethernet, as generated node1's pod sends it to generated node2's.
fn pod_packet() -> Vec<u8> {
    let mut tcp = packet::tcp(40000, 80, &[0x61; 64]);
    tcp[13] = 0x10; // ACK, not SYN: a segment of an established flow
    let ip = packet::Ip {
        tos: 0,
        id: 0x1234,
        df: true,
        ttl: 63,
        proto: 6,
        src: [10, 0, 0, 2],
        dst: [10, 0, 1, 2],
    };
    packet::eth(
        packet::NODE_MAC,
        packet::NODE_MAC,
        0x0800,
        &packet::ipv4(&ip, &tcp),
    )
}

/// `text` (a generated cluster file) with IPv6 halves for node1 (fd00:1::10, pod CIDR
/// fd00:10:244::/64) and node2 (fd00:1::11, fd00:10:244:1::/64, VTEP MAC `PEER_VTEP6`).
fn with_ipv6(text: &str) -> String {
    let half = |addr: &str, cidr: &str, mac: &str| {
        format!("    addressV6: \"{addr}\"\n    podCIDRv6: \"{cidr}\"\n{mac}")
    };
    let node = |k: u32| {
        let (a, l) = testkit::cluster::generated_pod_cidr(k);
        format!("    address: {}\n    podCIDR: {a}/{l}\n", node_addr(k))
    };
    let peer_mac = format!(
        "    vtepMACv6: \"{}\"\n",
        cluster::format_mac(&packet::PEER_VTEP6)
    );
    text.replacen(
        &node(0),
        &format!("{}{}", node(0), half("fd00:1::10", "fd00:10:244::/64", "")),
        1,
    )
    .replacen(
        &node(1),
        &format!(
            "{}{}",
            node(1),
            half("fd00:1::11", "fd00:10:244:1::/64", &peer_mac)
        ),
        1,
    )
}

/// `pod_packet` in IPv6: pod fd00:10:244::2 → fd00:10:244:1::2, TCP checksum valid.
fn pod_packet6() -> Vec<u8> {
    let mut tcp = packet::tcp(40000, 80, &[0x61; 64]);
    tcp[13] = 0x10; // ACK
    let tcp = packet::with_csum6(packet::POD1_6, packet::POD2_6, 6, tcp, 16);
    let ip = packet::ipv6(0, 0, 6, 63, packet::POD1_6, packet::POD2_6, &tcp);
    packet::eth(packet::NODE_MAC, packet::NODE_MAC, 0x86dd, &ip)
}

/// Mean per-packet cost in ns of each program, and of the floors, at `nodes` nodes.
pub fn measure(nodes: u32, iterations: u32) -> Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for (encap, six) in [("ipip", false), ("vxlan", false), ("vxlan", true)] {
        let input = if six { pod_packet6() } else { pod_packet() };
        let sender = view(encap, nodes, "node1", HostRouting::Kernel, six)?;
        let receiver = view(encap, nodes, "node2", HostRouting::Kernel, six)?;
        let (encapsulated, _) = sender.run(prog_names::TC_ENCAP_EGRESS, &input)?;
        let encap = if six { "vxlan/ipv6" } else { encap };
        anyhow::ensure!(
            encapsulated.len() > input.len(),
            "{encap}: the encap program did not encapsulate (FIB or maps not set up?)"
        );
        out.insert(
            format!("tc_encap_egress {encap}"),
            sender.trimmed_ns(prog_names::TC_ENCAP_EGRESS, &input, iterations)?,
        );
        out.insert(
            format!("xdp_decap_ingress {encap}"),
            receiver.trimmed_ns(prog_names::XDP_DECAP_INGRESS, &encapsulated, iterations)?,
        );
        out.insert(
            format!("tc_decap_ingress {encap}"),
            receiver.trimmed_ns(prog_names::TC_DECAP_INGRESS, &encapsulated, iterations)?,
        );
        if encap == "vxlan" {
            out.extend(drop_costs(nodes, &encapsulated, iterations)?);
        }
        for routing in [HostRouting::Bpf, HostRouting::AcceptedFlows] {
            out.insert(
                format!("tc_pod_ingress {encap} {}", routing.name()),
                pod_ingress_ns((encap, six), nodes, routing, &input, iterations)?,
            );
        }
        if encap == "ipip" {
            out.insert(
                "tc_floor".into(),
                sender.trimmed_ns(prog_names::TC_FLOOR, &input, iterations)?,
            );
            out.insert(
                "xdp_floor".into(),
                sender.trimmed_ns(prog_names::XDP_FLOOR, &input, iterations)?,
            );
        }
    }
    Ok(out)
}

/// The cost of dropping a hostile packet (VXLAN with another VNI) at `tc_decap_ingress`: with
/// the monitor's default rate limit (nearly every event refused by the token bucket), and
/// with every drop an event written to the ring while a reader drains it (a monitor under a
/// flood with the limit lifted).
fn drop_costs(nodes: u32, vxlan: &[u8], iterations: u32) -> Result<BTreeMap<String, f64>> {
    let mut hostile = vxlan.to_vec();
    // VNI: the 3 bytes after the VXLAN flags (Ethernet 14 + IPv4 20 + UDP 8 + 4).
    hostile[46] ^= 0x01;
    let mut out = BTreeMap::new();
    let mut limited = view("vxlan", nodes, "node2", HostRouting::Kernel, false)?;
    out.insert(
        "tc_decap_ingress vxlan drop (events limited)".to_string(),
        limited.trimmed_ns(prog_names::TC_DECAP_INGRESS, &hostile, iterations)?,
    );
    limited.lift_event_limit()?;
    let ring = limited
        .ebpf
        .take_map(maps_common::map_names::EVENTS)
        .context("DP_EVENTS")?;
    let mut ring = aya::maps::RingBuf::try_from(ring)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drained = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                while ring.next().is_some() {
                    n += 1;
                }
                std::thread::yield_now();
            }
            n
        })
    };
    let every = limited.trimmed_ns(prog_names::TC_DECAP_INGRESS, &hostile, iterations);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let events = drained
        .join()
        .map_err(|_| anyhow::anyhow!("ring reader panicked"))?;
    anyhow::ensure!(
        events > 0,
        "no event reached the ring with the limit lifted"
    );
    out.insert(
        "tc_decap_ingress vxlan drop (every event, ring drained)".to_string(),
        every?,
    );
    Ok(out)
}

/// The cost of BPF host routing at a pod's veth for a flow on the fast path: with
/// accepted-flows, once the flow's first packet went by the stack (`tc_pod_ingress` handing it
/// on, the underlay's `tc_encap_egress` accepting it), as every later packet finds it.
fn pod_ingress_ns(
    (encap, six): (&str, bool),
    nodes: u32,
    routing: HostRouting,
    input: &[u8],
    iterations: u32,
) -> Result<f64> {
    let pod = view(
        encap.split('/').next().unwrap_or(encap),
        nodes,
        "node1",
        routing,
        six,
    )?;
    if routing == HostRouting::AcceptedFlows {
        let (first, _) = pod.run(prog_names::TC_POD_INGRESS, input)?;
        anyhow::ensure!(
            first == input,
            "{encap}: a new flow's first packet bypassed the stack"
        );
        pod.run(prog_names::TC_ENCAP_EGRESS, input)?;
    }
    let (bypassed, _) = pod.run(prog_names::TC_POD_INGRESS, input)?;
    anyhow::ensure!(
        bypassed.len() > input.len(),
        "{encap}, {}: tc_pod_ingress did not encapsulate",
        routing.name()
    );
    pod.trimmed_ns(prog_names::TC_POD_INGRESS, input, iterations)
}

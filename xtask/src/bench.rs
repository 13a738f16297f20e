//! `cargo xtask bench`: native routing, the Linux VXLAN device set up as Flannel does, and this
//! datapath (IPIP and VXLAN; kernel, accepted-flows or bpf host routing; BGP native routing
//! with BIRD's node-to-node mesh) measured side
//! by side in one run, on bare nodes and on nodes carrying kube-proxy's iptables rules,
//! configurations alternated round by round, medians reported with ratios to native and to the
//! Linux VXLAN device; markdown tables and SVG charts in `bench-results/`.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::lab::{Lab, sh};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Config {
    Native,
    LinuxVxlan,
    DpIpipKernel,
    DpIpipFlows,
    DpIpipBpf,
    DpVxlanKernel,
    DpVxlanFlows,
    DpVxlanBpf,
    DpBgpFlows,
    Native6,
    DpVxlan6Kernel,
    DpVxlan6Flows,
    DpVxlan6Bpf,
}

impl Config {
    /// What IPv4 pods are measured in.
    const FOUR: [Config; 9] = [
        Self::Native,
        Self::LinuxVxlan,
        Self::DpIpipKernel,
        Self::DpIpipFlows,
        Self::DpIpipBpf,
        Self::DpVxlanKernel,
        Self::DpVxlanFlows,
        Self::DpVxlanBpf,
        Self::DpBgpFlows,
    ];
    /// What IPv6 pods are measured in: native IPv6 routing, and VXLAN over the IPv6 underlay.
    const SIX: [Config; 4] = [
        Self::Native6,
        Self::DpVxlan6Kernel,
        Self::DpVxlan6Flows,
        Self::DpVxlan6Bpf,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Native => "native routing",
            Self::LinuxVxlan => "Linux VXLAN (Flannel-style)",
            Self::DpIpipKernel => "datapath IPIP, kernel host routing",
            Self::DpIpipFlows => "datapath IPIP, accepted-flows (default)",
            Self::DpIpipBpf => "datapath IPIP, bpf host routing",
            Self::DpVxlanKernel => "datapath VXLAN, kernel host routing",
            Self::DpVxlanFlows => "datapath VXLAN, accepted-flows (default)",
            Self::DpVxlanBpf => "datapath VXLAN, bpf host routing",
            Self::DpBgpFlows => "datapath BGP native (BIRD mesh), accepted-flows (default)",
            Self::Native6 => "native IPv6 routing",
            Self::DpVxlan6Kernel => "datapath VXLAN/IPv6, kernel host routing",
            Self::DpVxlan6Flows => "datapath VXLAN/IPv6, accepted-flows (default)",
            Self::DpVxlan6Bpf => "datapath VXLAN/IPv6, bpf host routing",
        }
    }

    /// The agent's encapsulation and `--host-routing` for a datapath configuration (TC decap:
    /// XDP on a veth turns off GSO on its peer, whatever the program does).
    fn datapath(self) -> Option<(&'static str, &'static str)> {
        match self {
            Self::DpIpipKernel => Some(("ipip", "kernel")),
            Self::DpIpipFlows => Some(("ipip", "accepted-flows")),
            Self::DpIpipBpf => Some(("ipip", "bpf")),
            Self::DpVxlanKernel => Some(("vxlan", "kernel")),
            Self::DpVxlanFlows => Some(("vxlan", "accepted-flows")),
            Self::DpVxlanBpf => Some(("vxlan", "bpf")),
            Self::DpBgpFlows => Some(("none", "accepted-flows")),
            Self::DpVxlan6Kernel => Some(("vxlan", "kernel")),
            Self::DpVxlan6Flows => Some(("vxlan", "accepted-flows")),
            Self::DpVxlan6Bpf => Some(("vxlan", "bpf")),
            Self::Native | Self::LinuxVxlan | Self::Native6 => None,
        }
    }

    /// Whether its pods talk IPv6.
    fn ipv6(self) -> bool {
        Self::SIX.contains(&self)
    }

    /// The `bpf` configuration of the same encapsulation, for a default one.
    fn bpf_twin(self) -> Config {
        match self {
            Self::DpIpipFlows => Self::DpIpipBpf,
            Self::DpVxlan6Flows => Self::DpVxlan6Bpf,
            _ => Self::DpVxlanBpf,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Metric {
    Tcp1,
    Tcp4,
    Udp64Pps,
    LatP50,
    LatP99,
}

impl Metric {
    const ALL: [Metric; 5] = [
        Self::Tcp1,
        Self::Tcp4,
        Self::Udp64Pps,
        Self::LatP50,
        Self::LatP99,
    ];
    fn name(self) -> &'static str {
        match self {
            Self::Tcp1 => "TCP 1 flow (Gbit/s)",
            Self::Tcp4 => "TCP 4 flows (Gbit/s)",
            Self::Udp64Pps => "UDP 64 B (kpps received)",
            Self::LatP50 => "latency p50 (µs)",
            Self::LatP99 => "latency p99 (µs)",
        }
    }
}

/// What the nodes carry besides the networking under test.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Nodes {
    /// No netfilter rules: the host's forwarding at its cheapest.
    Bare,
    /// The rules kube-proxy's iptables mode installs for one ClusterIP Service, as on every
    /// Kubernetes node: conntrack and the filter chains see every packet the host forwards.
    KubeProxy,
    /// `Bare`, measured between the pods' IPv6 addresses.
    Bare6,
    /// `KubeProxy` with its IPv6 half (ip6tables), measured between the pods' IPv6 addresses.
    KubeProxy6,
}

impl Nodes {
    const ALL: [Nodes; 4] = [Self::Bare, Self::KubeProxy, Self::Bare6, Self::KubeProxy6];

    fn ipv6(self) -> bool {
        matches!(self, Self::Bare6 | Self::KubeProxy6)
    }

    fn configs(self) -> &'static [Config] {
        if self.ipv6() {
            &Config::SIX
        } else {
            &Config::FOUR
        }
    }

    /// The baseline of the ratios.
    fn native(self) -> Config {
        if self.ipv6() {
            Config::Native6
        } else {
            Config::Native
        }
    }

    /// The configurations the agent runs with its default host routing (accepted flows).
    fn defaults(self) -> &'static [Config] {
        if self.ipv6() {
            &[Config::DpVxlan6Flows]
        } else {
            &[Config::DpIpipFlows, Config::DpVxlanFlows]
        }
    }

    /// The server pod's address in this setup's family.
    fn server(self) -> &'static str {
        if self.ipv6() {
            crate::lab::POD2_V6
        } else {
            "10.244.1.2"
        }
    }

    /// The issue's targets for the default configuration, as ratios to native routing:
    /// (TCP 1 flow at least, UDP 64 B at least, latency p50 at most).
    fn targets(self) -> (f64, f64, f64) {
        match self {
            Self::Bare | Self::Bare6 => (1.00, 1.10, 0.95),
            Self::KubeProxy | Self::KubeProxy6 => (1.20, 1.20, 0.85),
        }
    }

    fn title(self) -> &'static str {
        match self {
            Self::Bare => "Bare nodes (no netfilter rules)",
            Self::KubeProxy => "Nodes with kube-proxy's iptables rules (one ClusterIP Service)",
            Self::Bare6 => "IPv6 pods, bare nodes (no netfilter rules)",
            Self::KubeProxy6 => {
                "IPv6 pods, nodes with kube-proxy's iptables and ip6tables rules (one ClusterIP Service each)"
            }
        }
    }

    /// The file name of this setup's chart in `bench-results/`.
    fn chart(self) -> &'static str {
        match self {
            Self::Bare => "chart.svg",
            Self::KubeProxy => "chart-kube-proxy.svg",
            Self::Bare6 => "chart-ipv6.svg",
            Self::KubeProxy6 => "chart-ipv6-kube-proxy.svg",
        }
    }

    /// Installs (or, for the bare setups, removes) the setup's rules on both nodes, both
    /// families (a dual-stack kube-proxy node has both); `iptables-restore` and
    /// `ip6tables-restore` replace the nat and filter tables whole.
    fn apply(self, lab: &Lab) -> Result<()> {
        let empty = "*nat\nCOMMIT\n*filter\nCOMMIT\n".to_string();
        let (four, six) = match self {
            Self::Bare | Self::Bare6 => (empty.clone(), empty),
            Self::KubeProxy | Self::KubeProxy6 => {
                (KUBE_PROXY_RULES.to_string(), kube_proxy_rules6())
            }
        };
        restore(lab, "iptables-restore", &four)?;
        restore(lab, "ip6tables-restore", &six)
    }
}

/// Loads `rules` with `tool` (iptables-restore or ip6tables-restore) on both nodes.
fn restore(lab: &Lab, tool: &str, rules: &str) -> Result<()> {
    for n in ["n1", "n2"] {
        let mut restore = Command::new("ip")
            .args(["netns", "exec", &lab.ns(n), tool, "-w"])
            .stdin(Stdio::piped())
            .spawn()?;
        restore
            .stdin
            .take()
            .expect("stdin")
            .write_all(rules.as_bytes())?;
        if !restore.wait()?.success() {
            bail!("{tool} on {n} failed");
        }
    }
    Ok(())
}

/// `KUBE_PROXY_RULES` for the IPv6 Service fd00:96::10 backed by the server pod's IPv6 address.
fn kube_proxy_rules6() -> String {
    KUBE_PROXY_RULES
        .replace("10.96.0.10/32", "fd00:96::10/128")
        .replace("10.244.0.0/16", "fd00:10:244::/56")
        .replace(
            "10.244.1.2:5201",
            &format!("[{}]:5201", crate::lab::POD2_V6),
        )
}

/// kube-proxy's iptables mode on the client's and the server's node for a ClusterIP
/// 10.96.0.10:5201 backed by the server pod: Service portals in PREROUTING and OUTPUT, the
/// masquerade mark, and KUBE-FORWARD's conntrack matches, as iptables-restore text.
const KUBE_PROXY_RULES: &str = concat!(
    "*nat\n",
    ":KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    ":KUBE-SVC-BENCH - [0:0]\n:KUBE-SEP-BENCH - [0:0]\n",
    "-A PREROUTING -j KUBE-SERVICES\n-A OUTPUT -j KUBE-SERVICES\n",
    "-A POSTROUTING -j KUBE-POSTROUTING\n",
    "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n",
    "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n",
    "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n",
    "-A KUBE-POSTROUTING -j MASQUERADE --random-fully\n",
    "-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 5201 -j KUBE-SVC-BENCH\n",
    "-A KUBE-SVC-BENCH ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m tcp --dport 5201 -j KUBE-MARK-MASQ\n",
    "-A KUBE-SVC-BENCH -j KUBE-SEP-BENCH\n",
    "-A KUBE-SEP-BENCH -p tcp -m tcp -j DNAT --to-destination 10.244.1.2:5201\n",
    "COMMIT\n",
    "*filter\n:KUBE-FORWARD - [0:0]\n",
    "-A FORWARD -j KUBE-FORWARD\n",
    "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
    "-A KUBE-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT\n",
    "-A KUBE-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
    "COMMIT\n",
);

/// Medians per configuration and metric, for one node setup.
type Medians = BTreeMap<(Config, Metric), f64>;

const NODE_MAC: [&str; 2] = ["0e:00:c0:a8:01:0a", "0e:00:c0:a8:01:0b"];

fn enable(lab: &Lab, c: Config, agents: &mut Vec<Child>) -> Result<()> {
    match c {
        Config::Native => {
            lab.in_ns(
                "n1",
                "ip route replace 10.244.1.0/24 via 192.168.1.11 dev eth0",
            )?;
            lab.in_ns(
                "n2",
                "ip route replace 10.244.0.0/24 via 192.168.1.10 dev eth0",
            )?;
        }
        Config::LinuxVxlan => {
            for (i, j) in [(0usize, 1usize), (1, 0)] {
                lab.in_ns(
                    &format!("n{}", i + 1),
                    &format!(
                        "sh -c 'ip link add flannel.1 type vxlan id 1 dstport 8472 local 192.168.1.1{i} dev eth0 nolearning && \
                         ip link set flannel.1 address {} mtu 1450 up && ip addr add 10.244.{i}.0/32 dev flannel.1 && \
                         ip neigh replace 10.244.{j}.0 lladdr {} dev flannel.1 nud permanent && \
                         bridge fdb append {} dev flannel.1 dst 192.168.1.1{j} && \
                         ip route replace 10.244.{j}.0/24 via 10.244.{j}.0 dev flannel.1 onlink'",
                        NODE_MAC[i], NODE_MAC[j], NODE_MAC[j]
                    ),
                )?;
            }
        }
        Config::Native6 => {
            for (i, j) in [(1, 2), (2, 1)] {
                lab.in_ns(
                    &format!("n{i}"),
                    &format!(
                        "ip -6 route replace fd00:10:244:{}::/64 via fd00:1::1{}",
                        j - 1,
                        j - 1
                    ),
                )?;
            }
        }
        _ => {
            let (encap, routing) = c.datapath().expect("a datapath configuration");
            if c.ipv6() {
                lab.write_dual_cluster(4096, 4789)?;
            } else {
                lab.write_cluster(encap, 4096, 4789)?;
            }
            for i in 1..=2 {
                agents.push(lab.start_agent(i, &["--decap", "tc", "--host-routing", routing])?);
            }
            if routing != "kernel" {
                lab.plug_pods()?;
            }
        }
    }
    Ok(())
}

fn disable(lab: &Lab, c: Config, agents: &mut Vec<Child>) {
    match c {
        Config::Native => {
            let _ = lab.in_ns("n1", "ip route del 10.244.1.0/24");
            let _ = lab.in_ns("n2", "ip route del 10.244.0.0/24");
        }
        Config::LinuxVxlan => {
            let _ = lab.in_ns("n1", "ip link del flannel.1");
            let _ = lab.in_ns("n2", "ip link del flannel.1");
        }
        Config::Native6 => {
            let _ = lab.in_ns("n1", "ip -6 route del fd00:10:244:1::/64");
            let _ = lab.in_ns("n2", "ip -6 route del fd00:10:244::/64");
        }
        _ => {
            lab.stop_agents();
            for mut a in agents.drain(..) {
                let _ = a.wait();
            }
        }
    }
}

fn spawn_in(lab: &Lab, ns: &str, cmd: &str) -> Result<Child> {
    Ok(Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns(ns),
            "sh",
            "-c",
            &format!("exec {cmd}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

fn iperf_json(lab: &Lab, server: &str, args: &str) -> Result<serde_json::Value> {
    let out = lab.in_ns("p1", &format!("iperf3 -c {server} -J {args}"))?;
    serde_json::from_str(&out).context("iperf3 JSON")
}

/// The CPU both ends of the latency test run on. Across CPUs, a ping-pong on this VM mostly
/// measures the hypervisor waking the other CPU (an IPI and a VM exit each way, p50 moving by
/// ±15% between runs); on one CPU it measures the network path (±3%). Two real nodes have no
/// such cross-CPU wakeup: each one's NIC interrupts its own CPU.
const LATENCY_CPU: u32 = 0;

/// One round of every metric in the current configuration, toward the server pod's address
/// `server`.
fn measure(lab: &Lab, server: &str, secs: u32) -> Result<BTreeMap<Metric, f64>> {
    let mut m = BTreeMap::new();
    // A figure iperf3 did not report is an error, never a zero that drags the median down.
    let field = |v: &serde_json::Value, what: &str| {
        v.as_f64()
            .filter(|x| x.is_finite())
            .with_context(|| format!("iperf3 reported no {what}"))
    };
    for (metric, flows) in [(Metric::Tcp1, 1), (Metric::Tcp4, 4)] {
        let tcp = iperf_json(lab, server, &format!("-t {secs} -P {flows}"))?;
        let bps = field(&tcp["end"]["sum_received"]["bits_per_second"], "TCP rate")?;
        m.insert(metric, bps / 1e9);
    }
    let udp = iperf_json(lab, server, &format!("-t {secs} -u -l 64 -b 0"))?;
    let sum = &udp["end"]["sum"];
    let received =
        field(&sum["packets"], "UDP packets")? - field(&sum["lost_packets"], "UDP loss")?;
    let seconds = field(&sum["seconds"], "UDP duration")?.max(0.001);
    if received <= 0.0 {
        bail!("no UDP datagram arrived");
    }
    m.insert(Metric::Udp64Pps, received / seconds / 1e3);
    let (p50, p99) = latency(lab, server, secs)?;
    m.insert(Metric::LatP50, p50);
    m.insert(Metric::LatP99, p99);
    Ok(m)
}

/// Half round trips (p50, p99) in µs of 64-byte UDP ping-pongs with the server pod: sockperf
/// for IPv4; for IPv6, which Debian's sockperf 3.7 cannot address, `datapath-bench ping-pong`.
fn latency(lab: &Lab, server: &str, secs: u32) -> Result<(f64, f64)> {
    if server.contains(':') {
        let out = lab.in_ns(
            "p1",
            &format!(
                "taskset -c {LATENCY_CPU} {}-bench ping-pong --to [{server}]:{PING_PONG_PORT} --secs {secs}",
                lab.bin.display()
            ),
        )?;
        let v: serde_json::Value = serde_json::from_str(&out).context("ping-pong JSON")?;
        let get = |k: &str| v[k].as_f64().with_context(|| format!("ping-pong {k}"));
        return Ok((get("p50_us")?, get("p99_us")?));
    }
    let lat = lab.in_ns(
        "p1",
        &format!(
            "taskset -c {LATENCY_CPU} sockperf ping-pong -i {server} -p 11111 -t {secs} -m 64 --full-rtt 2>&1"
        ),
    )?;
    let pct = |p: &str| {
        lat.lines()
            .find(|l| l.contains(&format!("percentile {p}")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    // --full-rtt reports the round trip; a one-way-comparable figure is half of it.
    Ok((
        pct("50.000").context("sockperf p50")? / 2.0,
        pct("99.000").context("sockperf p99")? / 2.0,
    ))
}

/// The port of the IPv6 latency server (`datapath-bench ping-pong --serve`).
const PING_PONG_PORT: u16 = 11112;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    v[v.len() / 2]
}

/// Every round's figure per node setup, configuration and metric.
type Samples = BTreeMap<(Nodes, Config, Metric), Vec<f64>>;

pub fn run(bin: &Path, rounds: u32, secs: u32) -> Result<()> {
    let lab = Lab::new("dpbench", bin);
    lab.teardown();
    lab.teardown_on_ctrlc()?;
    let samples = lab
        .build()
        .and_then(|()| measure_rounds(&lab, rounds, secs));
    lab.teardown();
    write_results(bin, &samples?, rounds, secs)
}

/// Alternates every node setup and configuration, `rounds` times, with the servers running
/// in the second pod.
fn measure_rounds(lab: &Lab, rounds: u32, secs: u32) -> Result<Samples> {
    let mut servers = vec![
        spawn_in(lab, "p2", "iperf3 -s")?,
        spawn_in(
            lab,
            "p2",
            &format!("taskset -c {LATENCY_CPU} sockperf server -i 10.244.1.2 -p 11111"),
        )?,
        spawn_in(
            lab,
            "p2",
            &format!(
                "taskset -c {LATENCY_CPU} {}-bench ping-pong --serve [{}]:{PING_PONG_PORT}",
                lab.bin.display(),
                crate::lab::POD2_V6
            ),
        )?,
    ];
    thread::sleep(Duration::from_millis(500));
    let mut samples = Samples::new();
    let result = (|| -> Result<()> {
        for round in 1..=rounds {
            for nodes in Nodes::ALL {
                nodes.apply(lab)?;
                // A different order each round: no configuration always follows the same one.
                let mut order = nodes.configs().to_vec();
                let by = round as usize % order.len();
                order.rotate_left(by);
                for c in order {
                    println!(
                        "bench: round {round}/{rounds}: {nodes:?} nodes: {}",
                        c.name()
                    );
                    for (metric, v) in measure_config(lab, nodes, c, secs)? {
                        samples.entry((nodes, c, metric)).or_default().push(v);
                    }
                }
            }
        }
        Ok(())
    })();
    for s in &mut servers {
        let _ = s.kill();
        let _ = s.wait();
    }
    result.map(|()| samples)
}

/// Tables, charts and raw rounds into `bench-results/`, with the program and agent costs.
fn write_results(bin: &Path, samples: &Samples, rounds: u32, secs: u32) -> Result<()> {
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench-results");
    std::fs::create_dir_all(&out_dir)?;
    let mut table = render_preamble(rounds, secs);
    for nodes in Nodes::ALL {
        let med: Medians = samples
            .iter()
            .filter(|((n, ..), _)| *n == nodes)
            .map(|(&(_, c, m), v)| ((c, m), median(v.clone())))
            .collect();
        table += &render_table(nodes, &med);
        std::fs::write(out_dir.join(nodes.chart()), render_svg(nodes, &med))?;
    }
    let raw: Vec<serde_json::Value> = samples
        .iter()
        .map(|((n, c, m), v)| {
            serde_json::json!({ "nodes": format!("{n:?}"), "configuration": c.name(), "metric": m.name(), "rounds": v })
        })
        .collect();
    std::fs::write(
        out_dir.join("samples.json"),
        serde_json::to_string_pretty(&raw)?,
    )?;
    table += &program_costs(bin)?;
    std::fs::write(out_dir.join("results.md"), &table)?;
    println!("\n{table}");
    println!("bench: wrote bench-results/: results.md, the charts, every round in samples.json");
    Ok(())
}

/// Enables `c`, checks a pod reaches the other, measures one round, checks `c` was in effect,
/// disables `c`.
fn measure_config(lab: &Lab, nodes: Nodes, c: Config, secs: u32) -> Result<BTreeMap<Metric, f64>> {
    let mut agents = Vec::new();
    let server = nodes.server();
    let m = enable(lab, c, &mut agents)
        .and_then(|()| lab.in_ns("p1", &format!("ping -c 2 -W 1 {server}")))
        .and_then(|_| measure(lab, server, secs))
        .and_then(|m| in_effect(lab, c).map(|()| m));
    disable(lab, c, &mut agents);
    m.with_context(|| format!("measuring {}", c.name()))
}

/// Refuses a measurement whose configuration was not the one labelled: BPF host routing (both
/// modes) must have carried the traffic past both hosts' stacks, kernel host routing none of it.
fn in_effect(lab: &Lab, c: Config) -> Result<()> {
    let Some((_, routing)) = c.datapath() else {
        return Ok(());
    };
    let counter = |node: usize, direction: &str| -> Result<u64> {
        let stats: serde_json::Value = serde_json::from_str(&lab.datapath(node, "stats --json")?)?;
        stats["counters"]
            .as_array()
            .and_then(|cs| cs.iter().find(|x| x["direction"] == direction))
            .and_then(|x| x["packets"].as_u64())
            .with_context(|| format!("no {direction} counter on node{node}"))
    };
    let (out, delivered) = (counter(1, "host_route_out")?, counter(2, "host_route_in")?);
    let bypassed = out.min(delivered);
    match routing {
        "kernel" if out + delivered > 0 => {
            bail!(
                "kernel host routing, yet {out} packets out and {delivered} in bypassed the stack"
            )
        }
        "kernel" => Ok(()),
        _ if bypassed < 10_000 => bail!(
            "{routing} host routing not in effect: only {out} packets out and {delivered} in bypassed the stack"
        ),
        _ => Ok(()),
    }
}

/// What every table shares: rounds, duration, the lab, the kernel, how to read ratios.
fn render_preamble(rounds: u32, secs: u32) -> String {
    let kernel = sh("uname -r").unwrap_or_default();
    format!(
        "Medians of {rounds} round(s) ({secs} s per figure), configurations alternated each round; \
         two nodes and a pod each in network namespaces on veth, kernel {}. \
         Ratios: to native routing on the same nodes / to the Linux VXLAN device (for latency, \
         lower is better).\n\n",
        kernel.trim()
    )
}

fn render_table(nodes: Nodes, med: &Medians) -> String {
    let mut s = format!(
        "### {}\n\n![relative to native]({})\n\n",
        nodes.title(),
        nodes.chart()
    );
    let _ = write!(s, "| configuration |");
    for m in Metric::ALL {
        let _ = write!(s, " {} |", m.name());
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "|---|{}", "---|".repeat(Metric::ALL.len()));
    for &c in nodes.configs() {
        let _ = write!(s, "| {} |", c.name());
        for m in Metric::ALL {
            let v = med.get(&(c, m)).copied().unwrap_or(0.0);
            let native = med.get(&(nodes.native(), m)).copied().unwrap_or(0.0);
            let linux = med.get(&(Config::LinuxVxlan, m)).copied().unwrap_or(0.0);
            let ratio = |base: f64| {
                if base > 0.0 {
                    format!("{:.2}×", v / base)
                } else {
                    "–".into()
                }
            };
            let _ = write!(s, " {v:.2} ({} / {}) |", ratio(native), ratio(linux));
        }
        let _ = writeln!(s);
    }
    s += &render_targets(nodes, med);
    s + "\n"
}

/// The default configuration against native routing (the node setup's targets) and against
/// `bpf` host routing (within 5% on TCP 1 flow, UDP 64 B and latency p50).
fn render_targets(nodes: Nodes, med: &Medians) -> String {
    let get = |c, m| med.get(&(c, m)).copied().unwrap_or(0.0);
    let (tcp_min, udp_min, lat_max) = nodes.targets();
    let mut s = format!(
        "\nTargets for the default (accepted-flows), ratios in this run: to native routing TCP 1 flow ≥ {tcp_min:.2}×, UDP 64 B ≥ {udp_min:.2}×, latency p50 ≤ {lat_max:.2}×; to bpf host routing within 5% on each.\n\n",
    );
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    for &c in nodes.defaults() {
        let ratio = |m, base| get(c, m) / get(base, m).max(f64::MIN_POSITIVE);
        let native = |m| ratio(m, nodes.native());
        let bpf = |m| ratio(m, c.bpf_twin());
        let (tcp, udp, lat) = (
            native(Metric::Tcp1),
            native(Metric::Udp64Pps),
            native(Metric::LatP50),
        );
        let (btcp, budp, blat) = (
            bpf(Metric::Tcp1),
            bpf(Metric::Udp64Pps),
            bpf(Metric::LatP50),
        );
        let _ = writeln!(
            s,
            "- {}: to native TCP 1 flow {tcp:.2}× ({}), UDP 64 B {udp:.2}× ({}), latency p50 {lat:.2}× ({}); to bpf {btcp:.2}× / {budp:.2}× / {blat:.2}× ({})",
            c.name(),
            verdict(tcp >= tcp_min),
            verdict(udp >= udp_min),
            verdict(lat <= lat_max),
            verdict(btcp >= 0.95 && budp >= 0.95 && blat <= 1.05),
        );
    }
    if nodes.ipv6() {
        return s;
    }
    s + &render_bgp(nodes, med)
}

/// BGP native routing against plain native routing (its upper bound: the same path without
/// a program) and the overlays, with the issue's targets for the default.
fn render_bgp(nodes: Nodes, med: &Medians) -> String {
    let get = |c, m| med.get(&(c, m)).copied().unwrap_or(0.0);
    let (tcp_min, udp_min, lat_max) = nodes.targets();
    let ratio = |m, base| get(Config::DpBgpFlows, m) / get(base, m).max(f64::MIN_POSITIVE);
    let line = |base: Config| {
        format!(
            "TCP 1 flow {:.2}×, UDP 64 B {:.2}×, latency p50 {:.2}× to {}",
            ratio(Metric::Tcp1, base),
            ratio(Metric::Udp64Pps, base),
            ratio(Metric::LatP50, base),
            base.name()
        )
    };
    let met = ratio(Metric::Tcp1, Config::Native) >= tcp_min
        && ratio(Metric::Udp64Pps, Config::Native) >= udp_min
        && ratio(Metric::LatP50, Config::Native) <= lat_max;
    format!(
        "- {}: {} ({}); {}; {}\n",
        Config::DpBgpFlows.name(),
        line(Config::Native),
        if met { "targets met" } else { "targets missed" },
        line(Config::DpVxlanFlows),
        line(Config::DpIpipFlows),
    )
}

fn render_svg(nodes: Nodes, med: &Medians) -> String {
    let colors = [
        "#888888", "#d62728", "#1f77b4", "#17becf", "#ff7f0e", "#2ca02c", "#9467bd", "#e377c2",
        "#8c564b", "#555555", "#aec7e8", "#98df8a", "#c5b0d5",
    ];
    let (w, h, left, top, bottom) = (900.0, 420.0, 60.0, 40.0, 90.0);
    let plot_h = h - top - bottom;
    let group_w = (w - left - 20.0) / Metric::ALL.len() as f64;
    let configs = nodes.configs();
    let bar_w = group_w / (configs.len() as f64 + 1.0);
    // A configuration keeps its colour in every chart: IPv4's first, then IPv6's.
    let color = |c: &Config| {
        let at = match Config::FOUR.iter().position(|x| x == c) {
            Some(i) => i,
            None => Config::FOUR.len() + Config::SIX.iter().position(|x| x == c).unwrap_or(0),
        };
        colors[at]
    };
    let max = 1.6;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"20\" font-size=\"14\">{}: relative to native routing (1.0 = native; latency: lower is better)</text>\n",
        nodes.title()
    );
    for tick in [0.0, 0.5, 1.0, 1.5] {
        let y = top + plot_h * (1.0 - tick / max);
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{tick:.1}</text>",
            w - 20.0,
            left - 6.0,
            y + 4.0
        );
    }
    for (gi, m) in Metric::ALL.iter().enumerate() {
        let gx = left + gi as f64 * group_w;
        let native = med.get(&(nodes.native(), *m)).copied().unwrap_or(0.0);
        for (ci, c) in configs.iter().enumerate() {
            let v = med.get(&(*c, *m)).copied().unwrap_or(0.0);
            let r = if native > 0.0 {
                (v / native).min(max)
            } else {
                0.0
            };
            let bh = plot_h * r / max;
            let x = gx + bar_w * (ci as f64 + 0.5);
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"><title>{}: {v:.2}</title></rect>",
                top + plot_h - bh,
                bar_w * 0.9,
                color(c),
                c.name()
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            gx + group_w / 2.0,
            top + plot_h + 16.0,
            m.name()
        );
    }
    for (ci, c) in configs.iter().enumerate() {
        let x = left + (ci % 3) as f64 * 270.0;
        let y = h - 40.0 + (ci / 3) as f64 * 18.0;
        let _ = writeln!(
            s,
            "<rect x=\"{x}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{y:.1}\">{}</text>",
            y - 10.0,
            color(c),
            x + 16.0,
            c.name()
        );
    }
    s.push_str("</svg>\n");
    s
}

const PROG_NS: &str = "dpbench-prog";
const PROG_BPFFS: &str = "/run/dpbench-prog-bpffs";

fn prog_lab_teardown() {
    let _ = sh(&format!(
        "ip netns pids {PROG_NS} 2>/dev/null | xargs -r kill -9; ip netns del {PROG_NS} 2>/dev/null; \
         umount {PROG_BPFFS} 2>/dev/null; rmdir {PROG_BPFFS} 2>/dev/null; rm -rf /run/dpbench-prog-cni"
    ));
}

/// Nodes of the control-plane benchmark: 10,000, in 40 underlay subnets behind a router.
const BIG: u32 = 10_000;
/// `--max-nodes` for it (the maps' size).
const BIG_MAPS: &str = "16384";

/// Latencies in ms, as "median X ms, p99 Y ms over N changes".
fn latency_summary(mut ms: Vec<f64>) -> String {
    ms.sort_by(|a, b| a.total_cmp(b));
    let p99 = ms[(ms.len() * 99 / 100).min(ms.len() - 1)];
    format!(
        "median {:.2} ms, p99 {:.2} ms over {} changes",
        median(ms.clone()),
        p99,
        ms.len()
    )
}

/// Per-packet cost (BPF_PROG_TEST_RUN) at 2 and 10,000 nodes, and the agent's full-sync time,
/// memory and change-to-map latency at 10,000 nodes, as a markdown section.
fn program_costs(bin: &Path) -> Result<String> {
    prog_lab_teardown();
    let r = (|| -> Result<String> {
        sh(&format!(
            "ip netns add {PROG_NS} && ip -n {PROG_NS} link set lo up && \
             ip -n {PROG_NS} link add ul0 address 02:00:00:00:00:0a type veth peer name ul1 && \
             ip -n {PROG_NS} link set ul0 up && ip -n {PROG_NS} link set ul1 up && \
             ip -n {PROG_NS} addr add 192.168.1.10/24 dev ul0 && \
             ip -n {PROG_NS} neigh add 192.168.1.11 lladdr 02:00:00:00:00:0b dev ul0 nud permanent && \
             ip -n {PROG_NS} neigh add 192.168.1.1 lladdr 02:00:00:00:00:01 dev ul0 nud permanent && \
             ip -n {PROG_NS} route add default via 192.168.1.1 dev ul0 && \
             ip -n {PROG_NS} addr add fd00:1::10/64 dev ul0 nodad && \
             ip -n {PROG_NS} neigh add fd00:1::11 lladdr 02:00:00:00:00:0b dev ul0 nud permanent && \
             ip netns exec {PROG_NS} sysctl -qw net.ipv4.conf.all.forwarding=1 && \
             ip netns exec {PROG_NS} sysctl -qw net.ipv6.conf.all.forwarding=1"
        ))?;
        let costs = |nodes: u32| -> Result<BTreeMap<String, f64>> {
            let out = sh(&format!(
                "ip netns exec {PROG_NS} {}-bench bench-progs --nodes {nodes} --iterations 20000",
                bin.display()
            ))?;
            Ok(serde_json::from_str(&out)?)
        };
        println!("bench: per-packet cost, 2 nodes");
        let small = costs(2)?;
        println!("bench: per-packet cost, {BIG} nodes");
        let large = costs(BIG)?;
        let mut s = String::from(
            "\nPer-packet cost from BPF_PROG_TEST_RUN (mean of the middle 80% of 20,000 single runs, kernel-reported ns; \
             the floor is a program that only returns; decap inputs are the encap program's outputs):\n\n\
             | program | 2 nodes (ns) | above floor | 10,000 nodes (ns) | above floor | 10,000 / 2 (above floor) |\n|---|---|---|---|---|---|\n",
        );
        for (name, v) in &small {
            let floor_key = if name.starts_with("xdp") {
                "xdp_floor"
            } else {
                "tc_floor"
            };
            let (f2, f5) = (small[floor_key], large[floor_key]);
            let w = large.get(name).copied().unwrap_or(0.0);
            let (a2, a5) = ((v - f2).max(0.0), (w - f5).max(0.0));
            let ratio = if a2 > 0.0 { a5 / a2 } else { 0.0 };
            s += &format!("| {name} | {v:.0} | {a2:.0} | {w:.0} | {a5:.0} | {ratio:.2}× |\n");
        }

        println!("bench: agent full sync, memory and file change latency at {BIG} nodes");
        sh(&format!(
            "mkdir -p {PROG_BPFFS} && mount -t bpf bpf {PROG_BPFFS}"
        ))?;
        let cluster = "/run/dpbench-prog-cluster.json";
        sh(&format!(
            "{}-bench gen-cluster --json --nodes {BIG} > {cluster}",
            bin.display()
        ))?;
        let (synced, rss_kb, agent) = timed_agent(
            bin,
            &["--cluster", cluster, "--max-nodes", BIG_MAPS],
            "/tmp/dpbench-prog-agent.log",
        )?;
        let lat = sh(&format!(
            "ip netns exec {PROG_NS} {}-bench bench-file --cluster {cluster} --nodes {BIG} --latency 200 --pin-dir {PROG_BPFFS}/node1",
            bin.display()
        ));
        let routes = sh(&format!("ip -n {PROG_NS} route show proto 199 | wc -l"));
        stop_agent(bin, agent);
        let _ = sh(&format!("rm -f {cluster}"));
        s += &format!(
            "\nAgent at 10,000 nodes in 40 underlay subnets behind a router (cluster file, JSON): full sync (start to programs attached, every peer in the maps: load, 20,000 map entries, {} aggregate kernel routes) {:.2} s; resident memory {:.1} MiB; one node's change in the file to the map update {}.\n",
            routes?.trim(),
            synced.as_secs_f64(),
            rss_kb as f64 / 1024.0,
            latency_summary(serde_json::from_str(&lat?)?)
        );
        s += &etcd_costs(bin)?;
        Ok(s)
    })();
    prog_lab_teardown();
    r
}

const ETCD_DIR: &str = "/run/dpbench-etcd";
const ETCD_URL: &str = "http://127.0.0.1:23790";

/// The etcd source at 10,000 leases: full-sync time and memory, and the time from a lease
/// change to the map update (median, p99 over 200 changes), as a markdown paragraph.
fn etcd_costs(bin: &Path) -> Result<String> {
    println!("bench: etcd source: full sync at {BIG} leases, lease change to map update");
    let _ = sh(&format!("rm -rf {ETCD_DIR}"));
    let mut etcd = Command::new("ip")
        .args(["netns", "exec", PROG_NS, "etcd", "--data-dir", ETCD_DIR])
        .args([
            "--listen-client-urls",
            ETCD_URL,
            "--advertise-client-urls",
            ETCD_URL,
        ])
        .args(["--listen-peer-urls", "http://127.0.0.1:23800"])
        .args(["--initial-advertise-peer-urls", "http://127.0.0.1:23800"])
        .args(["--initial-cluster", "default=http://127.0.0.1:23800"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create("/tmp/dpbench-etcd.log")?)
        .spawn()?;
    let r = (|| -> Result<String> {
        let health = format!(
            "ip netns exec {PROG_NS} env ETCDCTL_API=3 etcdctl --endpoints {ETCD_URL} endpoint health"
        );
        let mut up = false;
        for _ in 0..100 {
            if sh(&health).is_ok() {
                up = true;
                break;
            }
            thread::sleep(Duration::from_millis(200));
        }
        anyhow::ensure!(up, "etcd did not start (see /tmp/dpbench-etcd.log)");
        sh(&format!(
            "ip netns exec {PROG_NS} {}-bench bench-etcd --etcd-endpoints {ETCD_URL} --nodes {BIG} --fill",
            bin.display()
        ))?;
        let (synced, rss_kb, agent) = timed_agent(
            bin,
            &["--etcd-endpoints", ETCD_URL, "--max-nodes", BIG_MAPS],
            "/tmp/dpbench-etcd-agent.log",
        )?;
        let lat = sh(&format!(
            "ip netns exec {PROG_NS} {}-bench bench-etcd --etcd-endpoints {ETCD_URL} --nodes {BIG} --latency 200 --pin-dir {PROG_BPFFS}/node1",
            bin.display()
        ));
        stop_agent(bin, agent);
        Ok(format!(
            "\netcd source (Flannel lease layout; etcd 3.4 on the same host): full sync at 10,000 leases (start to programs attached: read, parse, 20,000 map entries, the aggregate routes) {:.2} s; resident memory {:.1} MiB. Lease change to map update (from issuing the write to the new VTEP MAC in the pinned map): {}.\n",
            synced.as_secs_f64(),
            rss_kb as f64 / 1024.0,
            latency_summary(serde_json::from_str(&lat?)?)
        ))
    })();
    let _ = etcd.kill();
    let _ = etcd.wait();
    let _ = sh(&format!("rm -rf {ETCD_DIR}"));
    r
}

/// Starts the agent for node1 in the program lab with `source` arguments; returns the time from
/// start to "programs attached", its resident memory then, and the process.
fn timed_agent(bin: &Path, source: &[&str], log: &str) -> Result<(Duration, u64, Child)> {
    let started = std::time::Instant::now();
    let agent = Command::new("ip")
        .args(["netns", "exec", PROG_NS])
        .arg(bin)
        .args(["run", "--node", "node1", "--iface", "ul0"])
        .args(source)
        .args([
            "--pin-dir",
            &format!("{PROG_BPFFS}/node1"),
            "--log-level",
            "info",
            // Keep the agent's CNI and Flannel files off this machine's own directories.
            "--cni-conf-dir",
            "/run/dpbench-prog-cni/net.d",
            "--cni-bin-dir",
            "/run/dpbench-prog-cni/bin",
            "--cni-ipam-dir",
            "/run/dpbench-prog-cni/ipam",
            "--subnet-file",
            "/run/dpbench-prog-cni/subnet.env",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()?;
    let mut synced = None;
    for _ in 0..1200 {
        if std::fs::read_to_string(log)?.contains("programs attached") {
            synced = Some(started.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let rss_kb = std::fs::read_to_string(format!("/proc/{}/status", agent.id()))
        .ok()
        .and_then(|st| {
            st.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    match synced {
        Some(d) => Ok((d, rss_kb, agent)),
        None => {
            stop_agent(bin, agent);
            bail!("agent did not finish its sync within 60 s (see {log})")
        }
    }
}

/// Stops the lab's agent and removes what it left.
fn stop_agent(bin: &Path, mut agent: Child) {
    let _ = sh(&format!("kill -TERM {}", agent.id()));
    let _ = agent.wait();
    let _ = sh(&format!(
        "ip netns exec {PROG_NS} {} detach --pin-dir {PROG_BPFFS}/node1",
        bin.display()
    ));
}

pub fn check_tools() -> Result<()> {
    for t in ["iperf3", "sockperf"] {
        if sh(&format!("command -v {t}")).is_err() {
            bail!("{t} missing: run cargo xtask setup");
        }
    }
    Ok(())
}

//! `datapath`: the node agent's command line (run, check, stats, routes, detach).
use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use datapath_user::{
    agent::{self, AgentOptions},
    check::Report,
    cluster::{self, Defaults, Encap, Limits},
    etcd,
    loader::{self, DecapHook},
    maps::DatapathMaps,
    net,
    stats::Snapshot,
};

#[derive(Parser)]
#[command(
    name = "datapath",
    version = env!("DATAPATH_VERSION"),
    about = "eBPF IPIP/VXLAN encapsulation datapath for Kubernetes pod networking"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Settings for cluster states that do not carry them. A state's own value wins (with a
/// warning when a flag says otherwise); without either, Flannel's defaults apply to Flannel's
/// data (VNI 1, port 8472) and Calico's otherwise (VNI 4096, port 4789).
#[derive(clap::Args, Clone)]
struct ModeArgs {
    /// Encapsulation: ipip or vxlan [default: vxlan].
    #[arg(long)]
    encapsulation: Option<Encap>,
    /// Reach same-subnet peers natively (Calico CrossSubnet, Flannel DirectRouting).
    #[arg(long)]
    cross_subnet: bool,
    /// VXLAN network identifier [default: 4096 (Calico); 1 for Flannel's data].
    #[arg(long)]
    vni: Option<u32>,
    /// VXLAN UDP port [default: 4789 (IANA, Calico); 8472 for Flannel's data].
    #[arg(long)]
    vxlan_port: Option<u16>,
    /// Compute the outer UDP checksum of VXLAN packets (default zero, as Calico and Cilium).
    #[arg(long)]
    vxlan_udp_checksum: bool,
    /// The cluster's pod network(s), comma-separated (Kubernetes' --cluster-cidr): one route
    /// each toward the datapath. Default: the nodes' pod CIDRs, merged.
    #[arg(long, value_parser = cluster::parse_cidr_list)]
    cluster_cidr: Option<Vec<cluster::Cidr>>,
}

impl ModeArgs {
    fn defaults(&self) -> Defaults {
        Defaults {
            encap: self.encapsulation,
            cross_subnet: self.cross_subnet.then_some(true),
            vni: self.vni,
            port: self.vxlan_port,
            udp_checksum: self.vxlan_udp_checksum.then_some(true),
            cluster_cidrs: self.cluster_cidr.clone(),
        }
    }
}

/// Where the read-only commands look, and how they print.
#[derive(clap::Args)]
struct ReadArgs {
    /// Print one JSON document instead of text.
    #[arg(long)]
    json: bool,
    /// Where the agent pinned its maps and links (its --pin-dir).
    #[arg(long, default_value = loader::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
}

#[derive(Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once per process; boxing would only obscure the CLI"
)]
enum Cmd {
    /// Run the node agent: load and attach the programs, keep the maps in step with the
    /// cluster state (a file or NodeList, or etcd in Flannel's layout).
    #[command(
        after_help = "Example:\n  datapath run --cluster /etc/datapath/cluster.yaml --node node1 --metrics 127.0.0.1:9464"
    )]
    Run {
        /// Cluster file (YAML/JSON) or `kubectl get nodes -o json` output. Watched for changes;
        /// SIGHUP reloads too.
        #[arg(
            long,
            required_unless_present = "etcd_endpoints",
            conflicts_with = "etcd_endpoints"
        )]
        cluster: Option<PathBuf>,
        /// Read the cluster from etcd instead, in Flannel's layout (`<prefix>/config`,
        /// `<prefix>/subnets/<a.b.c.d-len>`), watched: comma-separated URLs.
        #[arg(long, value_delimiter = ',')]
        etcd_endpoints: Vec<String>,
        /// The etcd key prefix of Flannel's layout (flanneld's --etcd-prefix).
        #[arg(long, default_value = "/coreos.com/network")]
        etcd_prefix: String,
        /// TLS: CA bundle that signed the etcd servers' certificates.
        #[arg(long)]
        etcd_cafile: Option<PathBuf>,
        /// TLS: client certificate and key.
        #[arg(long, requires = "etcd_keyfile")]
        etcd_certfile: Option<PathBuf>,
        /// TLS: the client certificate's private key.
        #[arg(long, requires = "etcd_certfile")]
        etcd_keyfile: Option<PathBuf>,
        /// Write and keep alive this node's own lease (as flanneld does): for `--pod-cidr`, or
        /// else the lease that already carries this node's public IP, or else a free subnet
        /// of the config's Network claimed atomically.
        #[arg(long, requires = "etcd_endpoints")]
        register: bool,
        /// This node's pod CIDR, for `--register`.
        #[arg(long)]
        pod_cidr: Option<String>,
        /// This node's underlay address, for `--register`; default: the address of `--iface`.
        #[arg(long)]
        public_ip: Option<std::net::Ipv4Addr>,
        /// TTL of the registered lease, in seconds; renewed every third of it.
        #[arg(long, default_value_t = 60)]
        lease_ttl: i64,
        /// This node's name in the cluster state [default: the host name]. A state without
        /// it (leases flanneld wrote name no node) is searched for one of this host's
        /// addresses.
        #[arg(long)]
        node: Option<String>,
        /// Where to write Flannel's subnet.env (FLANNEL_NETWORK, FLANNEL_SUBNET, FLANNEL_MTU,
        /// FLANNEL_IPMASQ), which the pods' CNI setup on a Flannel node reads.
        #[arg(long, default_value = "/run/flannel/subnet.env")]
        subnet_file: PathBuf,
        /// Masquerade pod traffic leaving the cluster network, as flanneld's --ip-masq (needs
        /// the iptables tool on the node).
        #[arg(long)]
        ip_masq: bool,
        /// Underlay interface; defaults to the one that holds the node's address.
        #[arg(long)]
        iface: Option<String>,
        /// Directory (on bpffs, mounted if needed) for pinned maps and links.
        #[arg(long, default_value = loader::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Serve /healthz, /readyz and /metrics (Prometheus) on this address, e.g. 0.0.0.0:9464.
        #[arg(long)]
        metrics: Option<SocketAddr>,
        /// Where decapsulation runs (auto: native XDP on NICs that have it, TC on veth and
        /// other virtual devices; the log says which and why).
        #[arg(long, value_enum, default_value = "auto")]
        decap: DecapHook,
        /// accepted-flows: the first packets of every pod flow go through the host's routing
        /// and netfilter (iptables, nftables: NetworkPolicy), and only the flows netfilter
        /// forwarded then go straight between the pod's veth and the underlay, judged again
        /// when the ruleset changes; bpf: every pod-to-remote-pod packet skips the host's
        /// routing and netfilter (for nodes whose policy is enforced elsewhere); kernel:
        /// everything through the host's stack.
        #[arg(long, value_enum, default_value = "accepted-flows")]
        host_routing: agent::HostRouting,
        /// How TC programs are attached: tcx (kernel 6.6+), netlink (clsact filters, older
        /// kernels), or auto (tcx where the kernel has it).
        #[arg(long, value_enum, default_value = "auto")]
        tc_attach: loader::TcAttach,
        /// Where the node's CNI configuration list is written.
        #[arg(long, default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
        /// The configuration list's file name. The runtime uses the first list in the
        /// directory by name: the default sorts before 10-calico.conflist and
        /// 10-flannel.conflist, which it replaces.
        #[arg(long, default_value = datapath_user::cni::CONFLIST)]
        cni_conf_name: String,
        /// Where this binary is installed as the `datapath` CNI plugin.
        #[arg(long, default_value = "/opt/cni/bin")]
        cni_bin_dir: PathBuf,
        /// host-local IPAM's data directory (pod IP leases).
        #[arg(long, default_value = "/var/lib/cni/networks")]
        cni_ipam_dir: PathBuf,
        /// Agent log level (error, warn, info, debug, trace); debug and trace also turn on the
        /// kernel programs' logs.
        #[arg(long, default_value = "info")]
        log_level: String,
        /// Entries of the per-node maps.
        #[arg(long, default_value_t = maps_common::DEFAULT_MAX_NODES)]
        max_nodes: u32,
        /// Do not require a decapsulated packet's inner source to lie in the sender's pod CIDR.
        #[arg(long)]
        no_inner_src_check: bool,
        /// Ignored: the cluster file is watched with inotify (kept so older command lines run).
        #[arg(long, hide = true)]
        watch_ms: Option<u64>,
        #[command(flatten)]
        mode: ModeArgs,
    },
    /// Validate a cluster file as the agent would: print every problem with its path. Exit
    /// status 0: valid; 3: accepted with warnings or nodes left out; 1: rejected.
    #[command(
        after_help = "Example:\n  kubectl get nodes -o json > nodes.json && datapath check --cluster nodes.json --node node1\n  datapath check --cluster cluster.yaml --json | jq .verdict"
    )]
    Check {
        /// The cluster file, or `kubectl get nodes -o json` output, to check.
        #[arg(long)]
        cluster: PathBuf,
        /// One JSON object: verdict (ok, warnings, invalid), nodes, skipped, warnings,
        /// errors (each with its path), and the mode.
        #[arg(long)]
        json: bool,
        /// Also require this node to be present.
        #[arg(long)]
        node: Option<String>,
        /// Nodes the maps would hold (the agent's --max-nodes): more nodes are an error.
        #[arg(long, default_value_t = maps_common::DEFAULT_MAX_NODES)]
        max_nodes: u32,
        #[command(flatten)]
        mode: ModeArgs,
    },
    /// Say whether the datapath is attached and how: hooks, pin directory, the configuration
    /// in effect, nodes, the last reload, pod MTU, agent version and map ABI.
    #[command(after_help = "Example:\n  datapath status --json | jq .attached")]
    Status {
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Print the datapath's counters, read from the pinned maps.
    #[command(after_help = "Example:\n  datapath stats --json | jq .drops")]
    Stats {
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Print the local pods the CNI plugin recorded: pod IP -> host-side interface, MACs.
    #[command(after_help = "Example:\n  datapath endpoints --json")]
    Endpoints {
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Print what the kernel maps hold: pod CIDR -> node, VTEP MAC, mode.
    #[command(after_help = "Example:\n  datapath routes --pin-dir /sys/fs/bpf/datapath")]
    Routes {
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Remove the programs, links, pins and routes the agent made.
    #[command(after_help = "Example:\n  datapath detach --pin-dir /sys/fs/bpf/datapath")]
    Detach {
        /// Where the agent pinned its maps and links (its --pin-dir).
        #[arg(long, default_value = loader::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Mount bpffs where the host has none, so that pins outlive the agent (the DaemonSet's
    /// init container, with mountPropagation: Bidirectional). Does nothing where bpffs is
    /// mounted already; refuses a mount that would stay private to this mount namespace.
    #[command(after_help = "Example:\n  datapath mount-bpffs --path /sys/fs/bpf")]
    MountBpffs {
        /// Where bpffs belongs.
        #[arg(long, default_value = "/sys/fs/bpf")]
        path: PathBuf,
    },
}

fn kernel_log_level(level: &str) -> u8 {
    match level {
        "trace" => 5,
        "debug" => 4,
        _ => 0,
    }
}

fn main() -> ExitCode {
    // A container runtime runs the CNI plugin with CNI_COMMAND set and no arguments.
    if datapath_user::cni::invoked_as_plugin() {
        return datapath_user::cni::plugin_main();
    }
    let cli = Cli::parse();
    let level = match &cli.cmd {
        Cmd::Run { log_level, .. } => log_level.clone(),
        _ => "warn".into(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Run {
            cluster,
            etcd_endpoints,
            etcd_prefix,
            etcd_cafile,
            etcd_certfile,
            etcd_keyfile,
            register,
            pod_cidr,
            public_ip,
            lease_ttl,
            node,
            iface,
            pin_dir,
            metrics,
            decap,
            host_routing,
            tc_attach,
            cni_conf_dir,
            cni_conf_name,
            cni_bin_dir,
            cni_ipam_dir,
            log_level,
            max_nodes,
            no_inner_src_check,
            watch_ms: _,
            subnet_file,
            ip_masq,
            mode,
        } => {
            // A lease names its node only when told to (flanneld's leases name none): without
            // --node, this node is found by name (its host name) or else by its address.
            let lease_name = node.clone();
            let node = match node {
                Some(n) => n,
                None => datapath_user::flannel::host_name()?,
            };
            let source = match cluster {
                Some(path) => agent::Source::File { path },
                None => {
                    let register = if register {
                        let public_ip = match (public_ip, &iface) {
                            (Some(ip), _) => ip,
                            (None, Some(name)) => {
                                net::blocking(|nl| async move { Ok(nl.iface(name).await?) })?
                                    .addr
                                    .with_context(|| format!("{name} has no IPv4 address"))?
                            }
                            // As flanneld: the interface of the default route.
                            (None, None) => net::blocking(|nl| async move {
                                nl.default_iface().await?.addr.context(
                                    "the default route's interface has no IPv4 address: give --public-ip or --iface",
                                )
                            })?,
                        };
                        let pod_cidr = pod_cidr
                            .map(|c| c.parse().map_err(|e| anyhow::anyhow!("--pod-cidr: {e}")))
                            .transpose()?;
                        Some(etcd::Registration {
                            node: lease_name,
                            pod_cidr,
                            public_ip,
                            ttl_secs: lease_ttl,
                        })
                    } else {
                        None
                    };
                    agent::Source::Etcd(etcd::EtcdOptions {
                        endpoints: etcd_endpoints,
                        prefix: etcd_prefix,
                        ca: etcd_cafile,
                        cert: etcd_certfile,
                        key: etcd_keyfile,
                        register,
                    })
                }
            };
            let opts = AgentOptions {
                source,
                node,
                iface,
                cni: datapath_user::cni::CniOptions {
                    conf_dir: cni_conf_dir,
                    conf_name: cni_conf_name,
                    bin_dir: cni_bin_dir,
                    ipam_dir: cni_ipam_dir,
                    pin_dir: pin_dir.clone(),
                    tc_attach,
                },
                host_routing,
                tc_attach,
                subnet_file,
                ip_masq,
                pin_dir,
                metrics,
                decap,
                log_level: kernel_log_level(&log_level),
                max_nodes,
                inner_src_check: !no_inner_src_check,
                defaults: mode.defaults(),
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(agent::run(opts))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check {
            cluster,
            json,
            node,
            max_nodes,
            mode,
        } => {
            let limits = Limits {
                max_nodes,
                own_node: node,
                own_addrs: Vec::new(),
            };
            let text = std::fs::read_to_string(&cluster)
                .with_context(|| format!("reading {}", cluster.display()))?;
            let report = Report::of(&cluster::parse(&text, &mode.defaults(), &limits));
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.text());
            }
            Ok(report.exit_code())
        }
        Cmd::Stats {
            read: ReadArgs { json, pin_dir },
        }
        | Cmd::Routes {
            read: ReadArgs { json, pin_dir },
        } if json => {
            let maps = DatapathMaps::open_pinned(&pin_dir)?;
            println!("{}", serde_json::to_string_pretty(&Snapshot::read(&maps)?)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Stats {
            read: ReadArgs { pin_dir, .. },
        } => {
            let maps = DatapathMaps::open_pinned(&pin_dir)?;
            print!("{}", Snapshot::read(&maps)?.render_stats());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Routes {
            read: ReadArgs { pin_dir, .. },
        } => {
            let maps = DatapathMaps::open_pinned(&pin_dir)?;
            print!("{}", Snapshot::read(&maps)?.render_routes());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status {
            read: ReadArgs { json, pin_dir },
        } => {
            let st = datapath_user::status::Status::read(&pin_dir);
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print!("{}", st.render());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Endpoints {
            read: ReadArgs { json, pin_dir },
        } => {
            let rows = datapath_user::cni::list_endpoints(&pin_dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<15} {:<16} {:>7} {:<17} {:<17}",
                    "pod ip", "host interface", "ifindex", "pod mac", "host mac"
                );
                for r in rows {
                    println!(
                        "{:<15} {:<16} {:>7} {:<17} {:<17}",
                        r.pod_ip, r.host_if, r.ifindex, r.pod_mac, r.host_mac
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::MountBpffs { path } => {
            if loader::mount_bpffs_once(&path)? {
                println!(
                    "mounted bpffs on {} (it outlives this process)",
                    path.display()
                );
            } else {
                println!("bpffs is mounted on {} already", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Detach { pin_dir } => {
            // Netlink TC filters have no pins: find their interfaces before the maps go.
            if let Ok(maps) = DatapathMaps::open_pinned(&pin_dir) {
                let mut ifaces: Vec<u32> = maps
                    .endpoints
                    .iter()
                    .flatten()
                    .map(|(_, e)| e.ifindex)
                    .collect();
                ifaces.extend(maps.read_config().map(|c| c.underlay_ifindex));
                for name in ifaces.into_iter().filter_map(net::if_name) {
                    loader::detach_netlink_filters(&name);
                }
            }
            let removed = loader::remove_pins(&pin_dir)?;
            let routes = net::blocking(|nl| async move {
                let n = nl.flush_routes().await?;
                nl.remove_nexthop_neigh().await?;
                nl.remove_csum_device().await?;
                Ok(n)
            })?;
            datapath_user::flannel::remove_masq()?;
            println!(
                "detached: removed {} pins under {}, {routes} routes of proto {}, the next-hop neighbour entry and {} if present",
                removed.len(),
                pin_dir.display(),
                net::ROUTE_PROTO,
                net::CSUM_DEV
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

//! `datapath`'s command line: the subcommands and their flags. `run`'s flags are the agent's
//! own options (`agent::AgentOptions`), parsed straight into them; the other commands are in
//! `commands`.
use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::{agent::AgentOptions, cluster::Defaults, kernel::loader};

mod commands;

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

/// Where the read-only commands look, and how they print.
#[derive(clap::Args)]
struct ReadArgs {
    /// Print one JSON document instead of text.
    #[arg(long)]
    json: bool,
    /// Where the agent pinned its maps and links (its --pin-dir).
    #[arg(long, default_value = loader::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Directory of the node's BGP speaker (the agent's --bgp-dir) [default: derived from
    /// --pin-dir, as the agent derives it].
    #[arg(long)]
    bgp_dir: Option<PathBuf>,
}

/// `datapath check`'s flags.
#[derive(clap::Args)]
struct CheckArgs {
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
    mode: Defaults,
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
    Run(AgentOptions),
    /// Validate a cluster file as the agent would: print every problem with its path. Exit
    /// status 0: valid; 3: accepted with warnings or nodes left out; 1: rejected.
    #[command(
        after_help = "Example:\n  kubectl get nodes -o json > nodes.json && datapath check --cluster nodes.json --node node1\n  datapath check --cluster cluster.yaml --json | jq .verdict"
    )]
    Check(CheckArgs),
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
    /// Show packets as the programs drop them (and, with --type trace, a sample of those they
    /// forward): time, program and hook, interface, reason, outer and inner headers, peer.
    #[command(
        after_help = "Example:\n  datapath monitor --json --reason wrong_vni\n  datapath monitor --type all --pod 10.244.1.2"
    )]
    Monitor(crate::observe::monitor::MonitorArgs),
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
    /// Install the reference CNI plugins the image carries (ptp, host-local, portmap) where the
    /// node has none, each with its own C library (the DaemonSet's init container).
    #[command(after_help = "Example:\n  datapath install-cni-plugins --to /host/opt/cni/bin")]
    InstallCniPlugins {
        /// The node's CNI bin directory (mounted from the host).
        #[arg(long)]
        to: PathBuf,
        /// Where the image keeps the plugins.
        #[arg(long, default_value = "/usr/lib/cni")]
        from: PathBuf,
        /// The root of the image's files (its loader and C library are below it).
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
}

/// The binary's entry: the CNI plugin when a container runtime runs it, else the command line.
pub fn main() -> ExitCode {
    // A container runtime runs the CNI plugin with CNI_COMMAND set and no arguments.
    if crate::plugin::invoked_as_plugin() {
        return crate::plugin::plugin_main();
    }
    let cli = Cli::parse();
    let level = match &cli.cmd {
        Cmd::Run(opts) => opts.log_level.clone(),
        _ => "warn".into(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match dispatch(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Run(opts) => commands::run(opts),
        Cmd::Check(args) => commands::check(args),
        Cmd::Stats { read } => commands::stats(read),
        Cmd::Routes { read } => commands::routes(read),
        Cmd::Status { read } => commands::status(read),
        Cmd::Endpoints { read } => commands::endpoints(read),
        Cmd::MountBpffs { path } => commands::mount_bpffs(&path),
        Cmd::InstallCniPlugins { to, from, root } => {
            commands::install_cni_plugins(&root, &from, &to)
        }
        Cmd::Monitor(args) => commands::monitor(&args),
        Cmd::Detach { pin_dir } => commands::detach(&pin_dir),
    }
}

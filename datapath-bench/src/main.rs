//! `datapath-bench`: the benchmark's drivers (`cargo xtask bench` runs them), kept out of the
//! `datapath` binary a node runs.
use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use datapath_user::kernel::loader;

mod pingpong;
mod progbench;

#[derive(Parser)]
#[command(
    name = "datapath-bench",
    version,
    about = "Benchmark drivers for cargo xtask bench"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Per-packet cost of each program via BPF_PROG_TEST_RUN (used by `cargo xtask bench`).
    BenchProgs {
        #[arg(long, default_value_t = 2)]
        nodes: u32,
        #[arg(long, default_value_t = 20000)]
        iterations: u32,
    },
    /// Fill etcd with N generated Flannel leases (`--fill`), or time lease changes until the
    /// agent's pinned map holds them (`--latency SAMPLES`); used by `cargo xtask bench`.
    BenchEtcd {
        #[arg(long, value_delimiter = ',')]
        etcd_endpoints: Vec<String>,
        #[arg(long, default_value = "/coreos.com/network")]
        etcd_prefix: String,
        #[arg(long)]
        nodes: u32,
        #[arg(long)]
        fill: bool,
        #[arg(long)]
        latency: Option<u32>,
        #[arg(long, default_value = loader::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// UDP ping-pong latency (IPv4 or IPv6): `--serve ADDR` echoes; `--to ADDR` measures for
    /// `--secs` and prints the half round trip's p50 and p99 in µs as JSON.
    PingPong {
        #[arg(long)]
        serve: Option<std::net::SocketAddr>,
        #[arg(long)]
        to: Option<std::net::SocketAddr>,
        #[arg(long, default_value_t = 5)]
        secs: u64,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// Print a generated cluster file of N nodes (used by `cargo xtask bench`).
    GenCluster {
        #[arg(long)]
        nodes: u32,
        #[arg(long, default_value = "vxlan")]
        encapsulation: String,
        #[arg(long)]
        json: bool,
    },
    /// Time one-node changes of a generated JSON cluster file until the agent's pinned map
    /// holds them (used by `cargo xtask bench`).
    BenchFile {
        #[arg(long)]
        cluster: PathBuf,
        #[arg(long)]
        nodes: u32,
        #[arg(long)]
        latency: u32,
        #[arg(long, default_value = loader::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::BenchProgs { nodes, iterations } => {
            let costs = progbench::measure(nodes, iterations)?;
            println!("{}", serde_json::to_string(&costs)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::BenchEtcd {
            etcd_endpoints,
            etcd_prefix,
            nodes,
            fill,
            latency,
            pin_dir,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            if fill {
                rt.block_on(progbench::etcd_fill(&etcd_endpoints, &etcd_prefix, nodes))?;
            }
            if let Some(samples) = latency {
                let ms = rt.block_on(progbench::etcd_latency(
                    &etcd_endpoints,
                    &etcd_prefix,
                    nodes,
                    &pin_dir,
                    samples,
                ))?;
                println!("{}", serde_json::to_string(&ms)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::PingPong {
            serve,
            to,
            secs,
            size,
        } => {
            if let Some(addr) = serve {
                pingpong::serve(addr)?;
            }
            if let Some(server) = to {
                let (p50, p99) = pingpong::measure(server, secs, size)?;
                println!("{}", serde_json::json!({ "p50_us": p50, "p99_us": p99 }));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::GenCluster {
            nodes,
            encapsulation,
            json,
        } => {
            let text = if json {
                progbench::cluster_json(&encapsulation, nodes, None)
            } else {
                progbench::cluster_text(&encapsulation, nodes)
            };
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::BenchFile {
            cluster,
            nodes,
            latency,
            pin_dir,
        } => {
            let ms = progbench::file_latency(&cluster, nodes, &pin_dir, latency)?;
            println!("{}", serde_json::to_string(&ms)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

//! The subcommands' bodies: each reads what it needs, prints, and returns its exit status.
use std::{path::Path, process::ExitCode};

use anyhow::Context as _;

use super::{CheckArgs, ReadArgs};
use crate::{
    agent::{self, AgentOptions},
    bgp,
    cluster::Limits,
    kernel::{host, loader, maps::DatapathMaps},
    observe::{check::Report, stats::Snapshot, status::Status},
    outputs::flannel,
    plugin, source,
    underlay::netlink,
};

pub fn run(opts: AgentOptions) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(agent::run(opts))?;
    Ok(ExitCode::SUCCESS)
}

pub fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let limits = Limits {
        max_nodes: args.max_nodes,
        own_node: args.node,
        own_addrs: Vec::new(),
    };
    let text = std::fs::read_to_string(&args.cluster)
        .with_context(|| format!("reading {}", args.cluster.display()))?;
    let report = Report::of(&source::parse_text(&text, &args.mode, &limits));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(report.exit_code())
}

/// Prints the maps' snapshot as JSON, or as `text` renders it.
fn snapshot(read: ReadArgs, text: fn(&Snapshot) -> String) -> anyhow::Result<ExitCode> {
    let snap = Snapshot::read(&DatapathMaps::open_pinned(&read.pin_dir)?)?;
    if read.json {
        println!("{}", serde_json::to_string_pretty(&snap)?);
    } else {
        print!("{}", text(&snap));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn stats(read: ReadArgs) -> anyhow::Result<ExitCode> {
    snapshot(read, Snapshot::render_stats)
}

pub fn routes(read: ReadArgs) -> anyhow::Result<ExitCode> {
    snapshot(read, Snapshot::render_routes)
}

pub fn status(read: ReadArgs) -> anyhow::Result<ExitCode> {
    let mut st = Status::read(&read.pin_dir);
    let dir = (read.bgp_dir.clone()).unwrap_or_else(|| bgp::bird::default_dir(&read.pin_dir));
    let bird = bgp::bird::Bird {
        bin: "bird".into(),
        dir,
    };
    st.bgp = bgp::sessions::Summary::read(&bird.socket());
    if read.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print!("{}", st.render());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn endpoints(read: ReadArgs) -> anyhow::Result<ExitCode> {
    let rows = plugin::list_endpoints(&read.pin_dir)?;
    if read.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<16} {:>7} {:<17} {:<17}",
        "pod ip", "host interface", "ifindex", "pod mac", "host mac"
    );
    for r in rows {
        println!(
            "{:<24} {:<16} {:>7} {:<17} {:<17}",
            r.pod_ip.to_string(),
            r.host_if,
            r.ifindex,
            r.pod_mac,
            r.host_mac
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn mount_bpffs(path: &Path) -> anyhow::Result<ExitCode> {
    if host::mount_bpffs_once(path)? {
        println!(
            "mounted bpffs on {} (it outlives this process)",
            path.display()
        );
    } else {
        println!("bpffs is mounted on {} already", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn install_cni_plugins(root: &Path, from: &Path, to: &Path) -> anyhow::Result<ExitCode> {
    use crate::outputs::plugins::{Installed, install};
    for done in install(root, from, to)? {
        match done {
            Installed::Written(p) => println!("installed {}", p.display()),
            Installed::Present(p) => println!("{} is there already: left as it is", p.display()),
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn detach(pin_dir: &Path) -> anyhow::Result<ExitCode> {
    // Netlink TC filters have no pins: find their interfaces before the maps go.
    if let Ok(maps) = DatapathMaps::open_pinned(pin_dir) {
        let mut ifaces: Vec<u32> = maps
            .endpoints
            .iter()
            .flatten()
            .map(|(_, e)| e.ifindex)
            .collect();
        ifaces.extend(maps.read_config().map(|c| c.underlay_ifindex));
        for name in ifaces.into_iter().filter_map(netlink::if_name) {
            loader::detach_netlink_filters(&name);
        }
    }
    let removed = loader::remove_pins(pin_dir)?;
    let routes = netlink::blocking(|nl| async move {
        let n = nl.flush_routes().await? + nl.flush_routes6().await?;
        nl.remove_nexthop_neigh().await?;
        nl.remove_csum_device().await?;
        nl.remove_probe_addrs().await?;
        Ok(n)
    })?;
    flannel::remove_masq()?;
    let bird = bgp::bird::Bird {
        bin: "bird".into(),
        dir: bgp::bird::default_dir(pin_dir),
    };
    if bird.alive() {
        bird.down()?;
        println!("stopped the BGP speaker (BIRD) at {}", bird.dir.display());
    }
    if bird.dir.exists() {
        std::fs::remove_dir_all(&bird.dir)
            .with_context(|| format!("removing {}", bird.dir.display()))?;
    }
    // The directory of every node's speaker, once the last is gone.
    if let Some(parent) = bird.dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    println!(
        "detached: removed {} pins under {}, {routes} routes of proto {}, the next-hop neighbour entry, the health probe address and {} if present",
        removed.len(),
        pin_dir.display(),
        netlink::ROUTE_PROTO,
        netlink::CSUM_DEV
    );
    Ok(ExitCode::SUCCESS)
}

pub fn monitor(args: &crate::observe::monitor::MonitorArgs) -> anyhow::Result<ExitCode> {
    let shown = crate::observe::monitor::run(args)?;
    let events = Snapshot::read(&DatapathMaps::open_pinned(&args.pin_dir)?)?.events;
    eprintln!(
        "{shown} events shown; the programs sent {}, the rate limit refused {}, a full ring lost {}",
        events.sent, events.limited, events.lost
    );
    Ok(ExitCode::SUCCESS)
}

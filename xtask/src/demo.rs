//! `cargo xtask demo`: two emulated nodes with a pod each, the agent on both, traffic pod to
//! pod in IPIP and then (by live reload) VXLAN, the counters, and a full teardown — also on
//! Ctrl-C or failure.
use std::{
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

const NS: [&str; 5] = [
    "dpdemo-ul",
    "dpdemo-n1",
    "dpdemo-n2",
    "dpdemo-p1",
    "dpdemo-p2",
];
const BPFFS: &str = "/run/datapath-demo";
const CLUSTER: &str = "/run/datapath-demo-cluster.yaml";

fn sh(cmd: &str) -> Result<String> {
    let out = Command::new("sh").arg("-c").arg(cmd).output()?;
    if !out.status.success() {
        bail!(
            "`{cmd}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn in_ns(ns: &str, cmd: &str) -> Result<String> {
    sh(&format!("ip netns exec {ns} {cmd}"))
}

fn teardown(bin: &Path) {
    let _ = sh("pkill -TERM -f 'datapath run --cluster /run/datapath-demo' ; sleep 0.3");
    for (i, ns) in ["dpdemo-n1", "dpdemo-n2"].iter().enumerate() {
        let _ = in_ns(
            ns,
            &format!("{} detach --pin-dir {BPFFS}/node{}", bin.display(), i + 1),
        );
    }
    for ns in NS {
        let _ = sh(&format!(
            "ip netns pids {ns} 2>/dev/null | xargs -r kill -9; ip netns del {ns} 2>/dev/null"
        ));
    }
    let _ = sh(&format!(
        "umount {BPFFS} 2>/dev/null; rmdir {BPFFS} 2>/dev/null; rm -f {CLUSTER}"
    ));
}

fn cluster(encap: &str) -> String {
    format!(
        "encapsulation: {encap}\nvxlan: {{ vni: 4096, port: 4789 }}\nnodes:\n  - name: node1\n    address: 192.168.1.10\n    podCIDR: 10.244.0.0/24\n  - name: node2\n    address: 192.168.1.11\n    podCIDR: 10.244.1.0/24\n"
    )
}

fn build_cluster() -> Result<()> {
    for ns in NS {
        sh(&format!("ip netns add {ns} && ip -n {ns} link set lo up"))?;
    }
    sh("ip -n dpdemo-ul link add br0 type bridge && ip -n dpdemo-ul link set br0 up")?;
    for i in 0..2 {
        let (n, p) = (format!("dpdemo-n{}", i + 1), format!("dpdemo-p{}", i + 1));
        sh(&format!(
            "ip link add eth0 netns {n} type veth peer name u{i} netns dpdemo-ul"
        ))?;
        sh(&format!("ip -n dpdemo-ul link set u{i} master br0 up"))?;
        sh(&format!(
            "ip -n {n} addr add 192.168.1.1{i}/24 dev eth0 && ip -n {n} link set eth0 up"
        ))?;
        in_ns(&n, "sysctl -qw net.ipv4.ip_forward=1")?;
        sh(&format!(
            "ip link add eth0 netns {p} type veth peer name pod0 netns {n}"
        ))?;
        sh(&format!(
            "ip -n {n} addr add 10.244.{i}.1/32 dev pod0 && ip -n {n} link set pod0 up && ip -n {n} route add 10.244.{i}.2/32 dev pod0"
        ))?;
        sh(&format!(
            "ip -n {p} addr add 10.244.{i}.2/24 dev eth0 && ip -n {p} link set eth0 up && ip -n {p} route add 10.244.{i}.1/32 dev eth0 && ip -n {p} route add 10.244.0.0/16 via 10.244.{i}.1"
        ))?;
    }
    sh(&format!("mkdir -p {BPFFS} && mount -t bpf bpf {BPFFS}"))?;
    Ok(())
}

fn start_agent(bin: &Path, i: usize) -> Result<Child> {
    let log = std::fs::File::create(format!("/tmp/datapath-demo-agent{}.log", i + 1))?;
    let child = Command::new("ip")
        .args(["netns", "exec", &format!("dpdemo-n{}", i + 1)])
        .arg(bin)
        .args([
            "run",
            "--cluster",
            CLUSTER,
            "--node",
            &format!("node{}", i + 1),
        ])
        .args([
            "--pin-dir",
            &format!("{BPFFS}/node{}", i + 1),
            "--watch-ms",
            "100",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    for _ in 0..100 {
        let text = std::fs::read_to_string(format!("/tmp/datapath-demo-agent{}.log", i + 1))?;
        if text.contains("programs attached") {
            return Ok(child);
        }
        thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "agent on node{} did not start; see /tmp/datapath-demo-agent{}.log",
        i + 1,
        i + 1
    )
}

fn traffic(bin: &Path, encap: &str) -> Result<()> {
    println!("\n--- {encap}: ping pod1 (10.244.0.2) -> pod2 (10.244.1.2)");
    print!("{}", in_ns("dpdemo-p1", "ping -c 3 -i 0.3 10.244.1.2")?);
    println!("--- {encap}: TCP pod1 -> pod2 (iperf3, 3 s)");
    let mut server = Command::new("ip")
        .args(["netns", "exec", "dpdemo-p2", "iperf3", "-s", "-1"])
        .stdout(Stdio::null())
        .spawn()?;
    thread::sleep(Duration::from_millis(400));
    let out = in_ns("dpdemo-p1", "iperf3 -c 10.244.1.2 -t 3")?;
    let _ = server.wait();
    for l in out
        .lines()
        .filter(|l| l.contains("sender") || l.contains("receiver"))
    {
        println!("{l}");
    }
    println!("--- {encap}: node1 counters (datapath stats)");
    print!(
        "{}",
        in_ns(
            "dpdemo-n1",
            &format!("{} stats --pin-dir {BPFFS}/node1", bin.display())
        )?
    );
    Ok(())
}

pub fn run(bin: &Path) -> Result<()> {
    let bin = bin.to_path_buf();
    teardown(&bin);
    {
        let bin = bin.clone();
        ctrlc::set_handler(move || {
            eprintln!("\ninterrupted: tearing down");
            teardown(&bin);
            std::process::exit(130);
        })
        .context("installing the Ctrl-C handler")?;
    }
    let result = (|| -> Result<()> {
        println!("demo: two nodes on 192.168.1.0/24, pods 10.244.0.2 and 10.244.1.2");
        build_cluster()?;
        std::fs::write(CLUSTER, cluster("ipip"))?;
        let _a1 = start_agent(&bin, 0)?;
        let _a2 = start_agent(&bin, 1)?;
        println!("agents running; routes on node1:");
        print!(
            "{}",
            in_ns(
                "dpdemo-n1",
                &format!("{} routes --pin-dir {BPFFS}/node1", bin.display())
            )?
        );
        traffic(&bin, "ipip")?;
        println!("\ndemo: switching the cluster file to vxlan (live reload, no restart)");
        std::fs::write(CLUSTER, cluster("vxlan"))?;
        thread::sleep(Duration::from_millis(600));
        print!(
            "{}",
            in_ns(
                "dpdemo-n1",
                &format!("{} routes --pin-dir {BPFFS}/node1", bin.display())
            )?
        );
        traffic(&bin, "vxlan")?;
        Ok(())
    })();
    teardown(&bin);
    println!("\ndemo: torn down (namespaces, pins, routes)");
    result
}

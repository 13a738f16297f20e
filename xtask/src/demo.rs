//! `cargo xtask demo`: two emulated nodes with a pod each, the agent on both, traffic pod to
//! pod in IPIP and then (by live reload) VXLAN, the counters, and a full teardown — also on
//! Ctrl-C or failure.
use std::{
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::Result;

use crate::lab::Lab;

fn traffic(lab: &Lab, encap: &str) -> Result<()> {
    println!("\n--- {encap}: ping pod1 (10.244.0.2) -> pod2 (10.244.1.2)");
    print!("{}", lab.in_ns("p1", "ping -c 3 -i 0.3 10.244.1.2")?);
    println!("--- {encap}: TCP pod1 -> pod2 (iperf3, 3 s)");
    let mut server = Command::new("ip")
        .args(["netns", "exec", &lab.ns("p2"), "iperf3", "-s", "-1"])
        .stdout(Stdio::null())
        .spawn()?;
    thread::sleep(Duration::from_millis(400));
    let out = lab.in_ns("p1", "iperf3 -c 10.244.1.2 -t 3")?;
    let _ = server.wait();
    for l in out
        .lines()
        .filter(|l| l.contains("sender") || l.contains("receiver"))
    {
        println!("{l}");
    }
    println!("--- {encap}: node1 counters (datapath stats)");
    print!("{}", lab.datapath(1, "stats")?);
    Ok(())
}

pub fn run(bin: &Path) -> Result<()> {
    let lab = Lab::new("dpdemo", bin);
    lab.teardown();
    lab.teardown_on_ctrlc()?;
    let result = (|| -> Result<()> {
        println!("demo: two nodes on 192.168.1.0/24, pods 10.244.0.2 and 10.244.1.2");
        lab.build()?;
        lab.write_cluster("ipip", 4096, 4789)?;
        let _a1 = lab.start_agent(1, &[])?;
        let _a2 = lab.start_agent(2, &[])?;
        println!("agents running; routes on node1:");
        print!("{}", lab.datapath(1, "routes")?);
        traffic(&lab, "ipip")?;
        println!("\ndemo: switching the cluster file to vxlan (live reload, no restart)");
        lab.write_cluster("vxlan", 4096, 4789)?;
        thread::sleep(Duration::from_millis(600));
        print!("{}", lab.datapath(1, "routes")?);
        traffic(&lab, "vxlan")?;
        Ok(())
    })();
    lab.teardown();
    println!("\ndemo: torn down (namespaces, pins, routes)");
    result
}

//! `cargo xtask demo`: two emulated nodes with a pod each; native routing measured first as
//! the yardstick, then the agent on both in IPIP and (by live reload) VXLAN with its defaults
//! (TC decapsulation on veth, BPF host routing for the flows netfilter accepted), a
//! NetworkPolicy-style FORWARD rule honoured, a spoofed packet dropped and counted, the
//! counters, and a full teardown — also on Ctrl-C or failure.
use std::{
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::lab::Lab;

fn step(text: &str) {
    println!("\n== {text}");
}

/// TCP pod1 -> pod2 for 3 s; returns the receiver's Gbit/s.
fn tcp_gbits(lab: &Lab) -> Result<f64> {
    let mut server = Command::new("ip")
        .args(["netns", "exec", &lab.ns("p2"), "iperf3", "-s", "-1"])
        .stdout(Stdio::null())
        .spawn()?;
    thread::sleep(Duration::from_millis(400));
    let out = lab.in_ns("p1", "iperf3 -c 10.244.1.2 -t 3 -J")?;
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 JSON")?;
    Ok(v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9)
}

fn ping(lab: &Lab) -> Result<()> {
    let out = lab.in_ns("p1", "ping -c 3 -i 0.3 10.244.1.2")?;
    let summary = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or("no summary");
    println!("   ping pod1 10.244.0.2 -> pod2 10.244.1.2: {summary}");
    Ok(())
}

fn traffic(lab: &Lab, encap: &str, native: f64) -> Result<()> {
    let how = if encap.starts_with("none") {
        "sent as it is from pod1's veth toward node2"
    } else {
        "encapsulated at pod1's veth"
    };
    step(&format!(
        "{encap}: pod1 -> pod2 through the datapath ({how}, delivered into pod2 by redirect_peer)"
    ));
    ping(lab)?;
    let gbits = tcp_gbits(lab)?;
    println!(
        "   TCP 1 flow, 3 s: {gbits:.2} Gbit/s with the datapath ({encap}) vs {native:.2} Gbit/s native routing ({:.2}×)",
        gbits / native.max(1e-9)
    );
    step(&format!(
        "{encap}: node1's counters (`datapath stats`, non-zero only)"
    ));
    print!("{}", lab.datapath(1, "stats")?);
    Ok(())
}

/// A NetworkPolicy-style rule in node2's FORWARD chain: with the default host routing, pod1's
/// next connection meets it although accepted flows bypass the host's stack.
fn policy(lab: &Lab) -> Result<()> {
    let rule = "FORWARD -d 10.244.1.2 -p tcp --dport 5201 -m conntrack --ctstate NEW -j DROP";
    step(&format!(
        "NetworkPolicy in netfilter: node2 runs `iptables -I {rule}`"
    ));
    lab.in_ns("n2", &format!("iptables -I {rule}"))?;
    let mut server = Command::new("ip")
        .args(["netns", "exec", &lab.ns("p2"), "iperf3", "-s", "-1"])
        .stdout(Stdio::null())
        .spawn()?;
    thread::sleep(Duration::from_millis(400));
    let refused = lab
        .in_ns("p1", "iperf3 -c 10.244.1.2 -t 1 --connect-timeout 1000")
        .is_err();
    lab.in_ns("n2", &format!("iptables -D {rule}"))?;
    let allowed = lab
        .in_ns("p1", "iperf3 -c 10.244.1.2 -t 1 --connect-timeout 1000")
        .is_ok();
    let _ = server.kill();
    let _ = server.wait();
    println!(
        "   pod1's new connection to pod2:5201 with the rule: {}; after `iptables -D`: {}",
        if refused {
            "dropped by node2's FORWARD"
        } else {
            "NOT dropped (unexpected)"
        },
        if allowed {
            "connected"
        } else {
            "failed (unexpected)"
        }
    );
    println!(
        "   (each flow's first packets take the host's stack for netfilter's verdict; the flows it\n    accepts then bypass it; see `flow_verify_*` and `flow_accepted_*` in the counters)"
    );
    Ok(())
}

/// Sends one IPIP packet from node2's address whose inner source is not in node2's pod CIDR:
/// node1 must drop it as `inner_src_spoofed`.
fn spoofed_packet(lab: &Lab) -> Result<()> {
    step("a spoofed packet: IPIP from node2's address, inner source 10.99.0.1 (not node2's pods)");
    lab.in_ns(
        "n2",
        "/usr/bin/python3 -c \"from scapy.all import *; \
         send(IP(src='192.168.1.11',dst='192.168.1.10')/IP(src='10.99.0.1',dst='10.244.0.2')/ICMP(), verbose=0)\"",
    )?;
    thread::sleep(Duration::from_millis(200));
    let stats: serde_json::Value = serde_json::from_str(&lab.datapath(1, "stats --json")?)?;
    let spoofed = stats["drops"]
        .as_array()
        .and_then(|d| d.iter().find(|r| r["reason"] == "inner_src_spoofed"))
        .and_then(|r| r["packets"].as_u64())
        .unwrap_or(0);
    println!(
        "   node1 dropped it before it reached pod1: drops{{reason=\"inner_src_spoofed\"}} = {spoofed}"
    );
    Ok(())
}

/// The third mode: `encapsulation: none` with a `bgp` block. Each node's BIRD (started and
/// configured by its agent) advertises its pod CIDR to the other over a node-to-node mesh.
fn bgp(lab: &Lab, native: f64) -> Result<()> {
    step(
        "switching to BGP native routing: encapsulation none, bgp { asNumber: 64512 } (a node-to-node mesh of BIRDs)",
    );
    lab.write_cluster("none", 4096, 4789)?;
    let established = |i: usize| -> bool {
        lab.datapath(i, "status --json")
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v["bgp"]["sessions"][0]["state"] == "Established")
    };
    for _ in 0..100 {
        if established(1) && established(2) {
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    println!("   node1's BGP sessions (`datapath status`):");
    let status = lab.datapath(1, "status")?;
    for l in status
        .lines()
        .skip_while(|l| !l.starts_with("  bgp"))
        .take(3)
    {
        println!("{l}");
    }
    print!("{}", lab.datapath(1, "routes")?);
    traffic(lab, "none (BGP)", native)
}

pub fn run(bin: &Path) -> Result<()> {
    let lab = Lab::new("dpdemo", bin);
    lab.teardown();
    lab.teardown_on_ctrlc()?;
    let result = (|| -> Result<()> {
        step(
            "two nodes (namespaces) on 192.168.1.0/24, a pod each: 10.244.0.2 on node1, 10.244.1.2 on node2",
        );
        lab.build()?;
        step("the yardstick: native routing (a route per peer, no encapsulation, no datapath)");
        lab.in_ns("n1", "ip route replace 10.244.1.0/24 via 192.168.1.11")?;
        lab.in_ns("n2", "ip route replace 10.244.0.0/24 via 192.168.1.10")?;
        let native = tcp_gbits(&lab)?;
        println!("   TCP 1 flow, 3 s: {native:.2} Gbit/s");
        lab.in_ns("n1", "ip route del 10.244.1.0/24")?;
        lab.in_ns("n2", "ip route del 10.244.0.0/24")?;

        step(
            "the agent on both nodes, IPIP, default settings (--decap auto, --host-routing accepted-flows)",
        );
        lab.write_cluster("ipip", 4096, 4789)?;
        let _a1 = lab.start_agent(1, &[])?;
        let _a2 = lab.start_agent(2, &[])?;
        let log = std::fs::read_to_string(format!("/tmp/{}-agent1.log", lab.prefix))?;
        if let Some(l) = log.lines().find(|l| l.contains("programs attached")) {
            println!("   node1's agent: {}", l.split("INFO ").last().unwrap_or(l));
        }
        lab.plug_pods()?;
        println!("   pods recorded by the CNI plugin (`datapath endpoints` on node1):");
        print!("{}", lab.datapath(1, "endpoints")?);
        println!("   what node1's maps hold (`datapath routes`):");
        print!("{}", lab.datapath(1, "routes")?);
        println!("   node1's kernel routes of the agent (`ip route show proto 199`):");
        print!("{}", lab.in_ns("n1", "ip route show proto 199")?);
        traffic(&lab, "ipip", native)?;
        policy(&lab)?;
        spoofed_packet(&lab)?;

        step("switching the cluster file to VXLAN: a live reload, no restart");
        lab.write_cluster("vxlan", 4096, 4789)?;
        thread::sleep(Duration::from_millis(600));
        print!("{}", lab.datapath(1, "routes")?);
        traffic(&lab, "vxlan", native)?;
        bgp(&lab, native)?;
        Ok(())
    })();
    lab.teardown();
    step("torn down: namespaces, pins, routes, CNI files");
    result
}

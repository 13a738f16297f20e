//! The DaemonSet's rollout replayed on one node with the manifest's own arguments (its metrics
//! port and one pin directory for both agents, as two pods of the DaemonSet on one host share
//! them) under a 200 pps ping: the manifest's order (the old pod ends, then the new one starts)
//! and the overlapping order a surge or a slow termination gives, where the new agent must stay
//! up, not ready, until the old one exits, then serve on the same port.
//!
//! ```text
//!   pod1 ── node1 (agent A, then agent B; same --metrics, same pins) ── node2 ── pod2
//! ```
use std::{fs, path::PathBuf, thread, time::Duration};

use integration_tests::{Topology, datapath_bin, sh, sh_out, unique, wait_for, wait_for_text};

/// The agent container's arguments and the rolling update of `deploy/daemonset.yaml`.
fn manifest() -> (Vec<String>, serde_yaml::Value) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    let text = fs::read_to_string(&path).unwrap();
    let ds = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .find(|d: &serde_yaml::Value| d["kind"] == "DaemonSet")
        .expect("a DaemonSet in the manifest");
    let spec = &ds["spec"]["template"]["spec"];
    let agent = spec["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "datapath")
        .expect("the datapath container");
    let args = agent["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    (args, ds["spec"]["updateStrategy"].clone())
}

/// The manifest's `--metrics` argument and its port.
fn metrics_arg(args: &[String]) -> (String, u16) {
    let arg = args
        .iter()
        .find(|a| a.starts_with("--metrics="))
        .expect("the manifest serves metrics")
        .clone();
    let port = arg.rsplit(':').next().unwrap().parse().unwrap();
    (arg, port)
}

fn readyz(t: &Topology, port: u16) -> String {
    t.nodes[0].ns.exec(&format!(
        "curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{port}/readyz"
    ))
}

/// Packets node1 sent to node2 as the pinned per-peer counters hold them.
fn tx_to_node2(t: &Topology) -> u64 {
    t.stats(0)["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node"] == t.nodes[1].addr)
        .and_then(|r| r["tx_packets"].as_u64())
        .expect("node2's row")
}

#[test]
fn a_daemonset_rollout_with_the_manifests_arguments_loses_nothing() {
    let (args, strategy) = manifest();
    // What the README says the manifest does: the old pod ends before the new one starts.
    assert_eq!(strategy["rollingUpdate"]["maxSurge"], 0, "{strategy:?}");
    assert_eq!(
        strategy["rollingUpdate"]["maxUnavailable"], 1,
        "{strategy:?}"
    );
    let (metrics, port) = metrics_arg(&args);
    let (mut t, cluster) = Topology::two_nodes_running("roll", "vxlan", "", &metrics);
    let source = format!("--cluster {} {metrics}", cluster.display());

    // The manifest's order: the old agent exits, the new one starts and adopts the pins.
    let ping = t.flood_ping(0, 1, 4);
    thread::sleep(Duration::from_millis(500));
    let tx_before = tx_to_node2(&t);
    let stopped = std::time::SystemTime::now();
    t.stop_agents(0);
    t.start_agent_with(0, &source);
    assert!(wait_for(Duration::from_secs(10), || readyz(&t, port) == "200"));
    let ready = std::time::SystemTime::now();
    let (sent, received) = t.flood_ping_result(0, 1, ping);
    assert!(sent >= 600, "ping sent only {sent}");
    assert_eq!(sent, received, "packets lost while no agent ran");
    assert!(
        t.ping_spanned(0, 1, stopped, ready),
        "the ping did not run from before the stop to after the new agent was ready"
    );
    let tx_after = tx_to_node2(&t);
    assert!(
        tx_after > tx_before,
        "node2's per-peer counter was not carried: {tx_before} before, {tx_after} after"
    );

    // Overlapping: a surge pod, or a new pod while the old one still terminates.
    let mut ping = t.flood_ping(0, 1, 8);
    let flowing = wait_for(Duration::from_secs(3), || t.ping_replies(0, 1) > 0);
    assert!(flowing, "the ping never got a reply");
    let old = t.agents.iter().rposition(|a| a.node == 0).unwrap();
    let new_log = t.spawn_agent(0, &source);
    for text in ["another agent holds this node", "port is in use"] {
        assert!(
            wait_for_text(&new_log, text, Duration::from_secs(10)),
            "the new agent did not log {text:?}:\n{}",
            fs::read_to_string(&new_log).unwrap_or_default()
        );
    }
    thread::sleep(Duration::from_secs(1));
    let new = t.agents.len() - 1;
    assert!(
        t.agents[new].child.try_wait().unwrap().is_none(),
        "the new agent exited while the old one held the node:\n{}",
        fs::read_to_string(&new_log).unwrap_or_default()
    );
    let tx_before = tx_to_node2(&t);
    let handed = std::time::SystemTime::now();
    t.stop_agent(old);
    t.wait_agent(0, &new_log);
    assert!(
        wait_for(Duration::from_secs(10), || readyz(&t, port) == "200"),
        "the new agent is not ready on port {port} after the old one exited"
    );
    let ready = std::time::SystemTime::now();
    assert!(
        ping.try_wait().unwrap().is_none(),
        "the ping ended before the new agent was ready: it did not span the hand-over"
    );
    let (sent, received) = t.flood_ping_result(0, 1, ping);
    assert!(
        t.ping_spanned(0, 1, handed, ready),
        "no replies both before the old agent stopped and after the new one was ready"
    );
    assert!(sent >= 1000, "ping sent only {sent}");
    assert_eq!(sent, received, "packets lost in the overlapping hand-over");
    assert!(tx_to_node2(&t) > tx_before, "per-peer counter not carried");
}

/// A directory of the test's (the host's) mount namespace made a shared mount point, as a
/// systemd host's mounts are; unmounted with everything below it when dropped.
struct SharedHostDir(PathBuf);

impl SharedHostDir {
    fn new(tag: &str) -> Self {
        let dir = PathBuf::from("/run/datapath-tests").join(unique(tag));
        fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        sh(&format!("mount --bind {d} {d} && mount --make-shared {d}"));
        Self(dir)
    }
}

impl Drop for SharedHostDir {
    fn drop(&mut self) {
        let d = self.0.display();
        let _ = sh_out(&format!("umount -R {d}"));
        let _ = fs::remove_dir_all(&self.0);
        if let Some(parent) = self.0.parent() {
            let _ = fs::remove_dir(parent);
        }
    }
}

/// Where the host has no bpffs: an agent that would have to mount one in a mount namespace of
/// its own refuses, saying why and what to change; with the manifest's arrangement (the
/// `mount-bpffs` init container propagating its mount to the host, the agent receiving it) the
/// pins outlive the agent and keep forwarding.
#[test]
fn pins_outlive_the_agent_only_on_a_bpffs_the_host_holds() {
    let (mut t, cluster) = Topology::two_nodes_running("bpffs", "ipip", "", "");
    let bin = datapath_bin();
    let cni = t.cni_dir(0);
    let cni_args = format!(
        "--cni-conf-dir {0}/net.d --cni-bin-dir {0}/bin --cni-ipam-dir {0}/ipam --subnet-file {0}/subnet.env",
        cni.display()
    );
    let source = format!("--cluster {} --node node1 {cni_args}", cluster.display());

    // A private mount namespace whose /sys/fs/bpf holds no bpffs (`ip netns exec` gives a
    // fresh /sys): the default pin directory would die with the agent.
    let out = t.nodes[0].ns.exec_out(&format!(
        "timeout 20 unshare --mount --propagation private {} run {source}",
        bin.display()
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the agent ran on a private bpffs:\n{err}"
    );
    assert!(
        err.contains("private to its mount namespace") && err.contains("mount-bpffs"),
        "the refusal does not say why and what to change:\n{err}"
    );

    // The manifest's arrangement.
    let host = SharedHostDir::new("bpffs-host");
    let bpf = host.0.join("bpf");
    let init = sh(&format!(
        "unshare --mount --propagation unchanged {} mount-bpffs --path {}",
        bin.display(),
        bpf.display()
    ));
    assert!(init.contains("mounted bpffs"), "{init}");
    let fs_type = sh(&format!("stat -f -c %T {}", bpf.display()));
    assert_eq!(
        fs_type.trim(),
        "bpf_fs",
        "the init container's mount did not reach the host"
    );
    let again = sh(&format!(
        "{} mount-bpffs --path {}",
        bin.display(),
        bpf.display()
    ));
    assert!(again.contains("already"), "{again}");

    t.stop_agents(0);
    t.detach(0);
    let pins = bpf.join("datapath");
    let log = t.workdir.join("agent-host-bpffs.log");
    t.spawn_raw(
        0,
        &format!(
            "unshare --mount --propagation slave {} run {source} --pin-dir {}",
            bin.display(),
            pins.display()
        ),
        &log,
    );
    t.wait_agent(0, &log);
    assert_eq!(t.ping(0, 1, 2), 2);
    t.stop_agents(0);
    assert!(
        pins.join("maps/DP_CONFIG").exists(),
        "the pins did not outlive the agent"
    );
    assert_eq!(t.ping(0, 1, 2), 2, "nothing forwards from the pins");
    t.nodes[0].ns.exec(&format!(
        "{} detach --pin-dir {}",
        bin.display(),
        pins.display()
    ));
}

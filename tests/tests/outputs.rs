//! The node's outputs (the CNI configuration list and plugin, `subnet.env`) when two agents
//! share them or they cannot be written: no agent exits over an output, a failed write is
//! logged with its path and retried.
//!
//! ```text
//!   pod1 ── node1 (agent) ── u0 ─ br0 ─ u1 ── node2 (agent) ── pod2
//!   both agents write the same /etc/cni/net.d, /opt/cni/bin, /run/flannel/subnet.env
//! ```
use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use integration_tests::{Topology, datapath_bin, wait_for, wait_for_text};

/// The default output paths as they were before the test: put back (or removed, with the
/// directories the test made) when dropped, also on failure.
struct Restore {
    files: Vec<(PathBuf, Option<Vec<u8>>)>,
    dirs: Vec<PathBuf>,
}

impl Restore {
    fn new(files: &[&str]) -> Self {
        let mut dirs = Vec::new();
        for f in files {
            let mut d = Path::new(f).parent();
            while let Some(dir) = d.filter(|d| !d.exists()) {
                dirs.push(dir.to_path_buf());
                d = dir.parent();
            }
        }
        let files = files
            .iter()
            .map(|f| (PathBuf::from(f), fs::read(f).ok()))
            .collect();
        Self { files, dirs }
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        for (path, before) in &self.files {
            let _ = match before {
                Some(bytes) => fs::write(path, bytes),
                None => fs::remove_file(path),
            };
        }
        // Deepest first; only what the test made, and only if nothing else came into it.
        for dir in &self.dirs {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// Whether agent `k` (in start order) is still running.
fn running(t: &mut Topology, k: usize) -> bool {
    matches!(t.agents[k].child.try_wait(), Ok(None))
}

#[test]
fn two_agents_started_together_with_the_default_output_paths_both_stay_up() {
    let mut t = Topology::two_nodes("outs");
    let cluster = t.write_cluster(&t.cluster_yaml("vxlan", ""));
    let conflist = "/etc/cni/net.d/05-datapath.conflist";
    let subnet_env = "/run/flannel/subnet.env";
    let _restore = Restore::new(&[conflist, "/opt/cni/bin/datapath", subnet_env]);
    // No --cni-* and no --subnet-file: both write the defaults, started at the same moment.
    let logs: Vec<PathBuf> = (0..2)
        .map(|i| {
            let log = t.workdir.join(format!("agent-{i}.log"));
            let cmd = format!(
                "{} run --node {} --pin-dir {} --cluster {}",
                datapath_bin().display(),
                t.nodes[i].name,
                t.pin_dir(i).display(),
                cluster.display()
            );
            t.spawn_raw(i, &cmd, &log);
            log
        })
        .collect();
    for (i, log) in logs.iter().enumerate() {
        t.wait_agent(i, log);
    }
    // Past a retry period of the outputs (5 s): both still up, both forwarding.
    thread::sleep(Duration::from_secs(6));
    for (k, log) in logs.iter().enumerate() {
        assert!(
            running(&mut t, k),
            "agent {k} exited:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
    }
    assert_eq!(t.ping(0, 1, 3), 3, "pods do not reach each other");
    assert_eq!(t.ping(1, 0, 3), 3, "pods do not reach each other");
    let text = fs::read_to_string(conflist).expect("the configuration list was written");
    assert!(
        text.contains("10.244.0.0/24") || text.contains("10.244.1.0/24"),
        "{text}"
    );
    let env = fs::read_to_string(subnet_env).expect("subnet.env was written");
    assert!(env.contains("FLANNEL_NETWORK=10.244.0.0/23"), "{env}");
    // Neither left a temporary file behind.
    let tmp = fs::read_dir("/etc/cni/net.d")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .count();
    assert_eq!(tmp, 0, "temporary files left in /etc/cni/net.d");
}

#[test]
fn an_output_that_cannot_be_written_is_named_and_retried() {
    let mut t = Topology::two_nodes("outf");
    let cluster = t.write_cluster(&t.cluster_yaml("vxlan", ""));
    // The CNI configuration directory is a file: nothing can be written into it.
    let conf_dir = t.cni_dir(0).join("net.d");
    fs::create_dir_all(conf_dir.parent().unwrap()).unwrap();
    fs::write(&conf_dir, "in the way").unwrap();
    let log = t.spawn_agent(0, &format!("--cluster {}", cluster.display()));
    t.wait_agent(0, &log);
    t.start_agent(1, &cluster, "");
    let named = wait_for_text(
        &log,
        &format!("{}", conf_dir.display()),
        Duration::from_secs(5),
    );
    let text = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        named && text.contains("writing the CNI configuration failed, will retry"),
        "the failed write is not logged with its path:\n{text}"
    );
    // The agent is up and forwarding meanwhile.
    assert!(running(&mut t, 0), "the agent exited:\n{text}");
    assert_eq!(t.ping(0, 1, 3), 3, "pods do not reach each other");
    // Once the directory can be made, the next retry writes the list.
    fs::remove_file(&conf_dir).unwrap();
    let conflist = conf_dir.join("05-datapath.conflist");
    assert!(
        wait_for(Duration::from_secs(12), || conflist.exists()),
        "the configuration list was not written on retry:\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(running(&mut t, 0));
}

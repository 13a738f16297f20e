//! Helpers of the namespace and BPF_PROG_TEST_RUN tests on top of the test kit (`testkit`:
//! namespaces, the topology builder, cluster files, packets): the agent under test, its
//! processes, CNI pods, captures and etcd. Everything made here is removed on drop, so a
//! failing test cleans up too.
pub mod dual;
pub mod fabric;
pub mod progtest;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Output},
    thread,
    time::{Duration, Instant},
};

use testkit::cluster::ClusterNode;
pub use testkit::net::{
    Bpffs, BuiltNode as Node, Netns, NodeSpec, sh, sh_out, spawn_in, try_sh, unique,
};

/// The `datapath` binary under test: `$DATAPATH_BIN`, or the one next to the test binary's
/// directory (`target/<profile>/datapath`).
pub fn datapath_bin() -> PathBuf {
    if let Ok(p) = std::env::var("DATAPATH_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("datapath");
    assert!(
        bin.exists(),
        "{} missing: build it first (cargo build -p datapath-user --features fault-injection)",
        bin.display()
    );
    bin
}

/// Two or three nodes on an underlay; the underlay namespace holds bridges and a router.
pub struct Topology {
    pub prefix: String,
    pub nodes: Vec<Node>,
    pub underlay: Netns,
    pub bpffs: Bpffs,
    pub agents: Vec<Agent>,
    pub workdir: PathBuf,
}

impl Topology {
    /// Builds `specs.len()` nodes; node i has pod CIDR 10.244.i.0/24 and pod 10.244.i.2.
    pub fn new(tag: &str, specs: &[NodeSpec]) -> Self {
        Self::build(tag, specs, true)
    }

    /// Nodes whose pods do not exist yet: `cni_add` makes each with the agent's CNI
    /// configuration list, as a container runtime would.
    pub fn with_cni(tag: &str, specs: &[NodeSpec]) -> Self {
        Self::build(tag, specs, false)
    }

    fn build(tag: &str, specs: &[NodeSpec], hand_made_pods: bool) -> Self {
        let prefix = unique(tag);
        let workdir = std::env::temp_dir().join(&prefix);
        fs::create_dir_all(&workdir).expect("workdir");
        let bpffs = Bpffs::new(&prefix);
        let built = testkit::net::build(&prefix, specs, hand_made_pods)
            .unwrap_or_else(|e| panic!("building the topology: {e}"));
        Self {
            prefix,
            nodes: built.nodes,
            underlay: built.underlay,
            bpffs,
            agents: Vec::new(),
            workdir,
        }
    }

    /// Two nodes on one subnet, 192.168.1.10 and .11.
    pub fn two_nodes(tag: &str) -> Self {
        Self::new(tag, &Self::first_two())
    }

    /// Two nodes with an agent each on a cluster file in `encap` (`extra` goes into the file
    /// before `nodes:`, `agent_args` onto both agents' command lines); returns the file too.
    pub fn two_nodes_running(
        tag: &str,
        encap: &str,
        extra: &str,
        agent_args: &str,
    ) -> (Self, PathBuf) {
        let mut t = Self::two_nodes(tag);
        let cluster = t.write_cluster(&t.cluster_yaml(encap, extra));
        t.start_agent(0, &cluster, agent_args);
        t.start_agent(1, &cluster, agent_args);
        (t, cluster)
    }

    /// Three nodes: two on subnet 0, the third on `third_subnet` (1 puts it behind the router).
    pub fn three_nodes(tag: &str, third_subnet: u8) -> Self {
        let [a, b] = Self::first_two();
        let host = if third_subnet == 0 { 12 } else { 10 };
        let third = NodeSpec {
            subnet: third_subnet,
            host,
        };
        Self::new(tag, &[a, b, third])
    }

    fn first_two() -> [NodeSpec; 2] {
        [10, 11].map(|host| NodeSpec { subnet: 0, host })
    }

    /// A cluster file for these nodes.
    pub fn cluster_yaml(&self, encap: &str, extra: &str) -> String {
        let nodes: Vec<ClusterNode> = self
            .nodes
            .iter()
            .map(|n| ClusterNode::new(&n.name, &n.addr, &n.pod_cidr))
            .collect();
        testkit::cluster::yaml(encap, extra, &nodes)
    }

    pub fn write_cluster(&self, text: &str) -> PathBuf {
        let p = self.workdir.join("cluster.yaml");
        // Write then rename, as an editor or a ConfigMap update does.
        let tmp = self.workdir.join("cluster.yaml.tmp");
        fs::write(&tmp, text).expect("write cluster");
        fs::rename(&tmp, &p).expect("rename cluster");
        p
    }

    pub fn pin_dir(&self, node: usize) -> PathBuf {
        self.bpffs.dir.join(&self.nodes[node].name)
    }

    /// Starts the agent on node `i` with extra flags and waits until its programs are attached.
    pub fn start_agent(&mut self, i: usize, cluster: &Path, extra: &str) {
        self.start_agent_with(
            i,
            &format!("--cluster {} --watch-ms 100 {extra}", cluster.display()),
        );
    }

    /// Node `i`'s CNI directory (`net.d`, `bin`, `ipam` below it): the agent writes there, not
    /// into the host's /etc/cni and /opt/cni.
    pub fn cni_dir(&self, i: usize) -> PathBuf {
        self.workdir.join(&self.nodes[i].name)
    }

    /// Starts the agent on node `i` with `source_args` (`--cluster F` or `--etcd-endpoints ..`)
    /// and waits until its programs are attached.
    pub fn start_agent_with(&mut self, i: usize, source_args: &str) {
        let log = self.spawn_agent(i, source_args);
        self.wait_agent(i, &log);
    }

    /// Starts the agent on node `i` without waiting; returns its log.
    pub fn spawn_agent(&mut self, i: usize, source_args: &str) -> PathBuf {
        self.spawn_agent_env(i, "", source_args)
    }

    /// The same with environment assignments (`K=V ...`) for the agent.
    pub fn spawn_agent_env(&mut self, i: usize, env: &str, source_args: &str) -> PathBuf {
        self.spawn_agent_bin(i, &datapath_bin(), env, source_args)
    }

    /// The same with another build of the agent (an earlier release).
    pub fn spawn_agent_bin(
        &mut self,
        i: usize,
        bin: &Path,
        env: &str,
        source_args: &str,
    ) -> PathBuf {
        let n = &self.nodes[i];
        let log = self
            .workdir
            .join(format!("agent-{}-{}.log", n.name, self.agents.len()));
        let cni = self.cni_dir(i);
        install_reference_plugins(&cni.join("bin"));
        // `--node` comes first so a test's own `--node` (or none: `NONODE`) can override it.
        let node = if source_args.contains("NONODE") {
            String::new()
        } else {
            format!("--node {}", n.name)
        };
        let cmd = format!(
            "env {env} {} run {node} --pin-dir {} --cni-conf-dir {} --cni-bin-dir {} --cni-ipam-dir {} --subnet-file {} {}",
            bin.display(),
            self.pin_dir(i).display(),
            cni.join("net.d").display(),
            cni.join("bin").display(),
            cni.join("ipam").display(),
            cni.join("subnet.env").display(),
            source_args.replace("NONODE", ""),
        );
        self.spawn_raw(i, &cmd, &log);
        log
    }

    /// Starts any command on node `i` as one of its agents (stopped with them), output to `log`.
    pub fn spawn_raw(&mut self, i: usize, cmd: &str, log: &Path) {
        let child = self.nodes[i].ns.spawn(cmd, log);
        self.agents.push(Agent {
            child,
            log: log.to_path_buf(),
            node: i,
        });
    }

    /// Stops agent `k` (in start order) alone.
    pub fn stop_agent(&mut self, k: usize) {
        self.agents[k].stop();
    }

    /// Waits until the agent of node `i` logging to `log` has attached its programs.
    pub fn wait_agent(&self, i: usize, log: &Path) {
        let n = &self.nodes[i];
        let attached = wait_for_text(log, "programs attached", Duration::from_secs(20));
        assert!(
            attached,
            "agent on {} did not attach:\n{}",
            n.name,
            fs::read_to_string(log).unwrap_or_default()
        );
    }

    /// Stops every agent of node `i` (SIGTERM) and waits for them; pins stay.
    pub fn stop_agents(&mut self, i: usize) {
        for a in self.agents.iter_mut().filter(|a| a.node == i) {
            a.stop();
        }
    }

    /// Runs `datapath <args>` inside node `i`'s namespace.
    pub fn datapath(&self, i: usize, args: &str) -> Output {
        self.nodes[i]
            .ns
            .exec_out(&format!("{} {args}", datapath_bin().display()))
    }

    /// `datapath detach` on node `i`'s pins, asserting it succeeded.
    pub fn detach(&self, i: usize) {
        let out = self.datapath(
            i,
            &format!("detach --pin-dir {}", self.pin_dir(i).display()),
        );
        assert!(out.status.success(), "detach on node{}: {out:?}", i + 1);
    }

    /// The JSON of `datapath stats --json` on node `i`.
    pub fn stats(&self, i: usize) -> serde_json::Value {
        self.json(i, "stats")
    }

    /// The rows of `datapath routes --json` on node `i`.
    pub fn routes(&self, i: usize) -> Vec<serde_json::Value> {
        let v = self.json(i, "routes");
        v["routes"].as_array().cloned().unwrap_or_default()
    }

    /// `datapath <command> --json` on node `i`, parsed; panics when the command fails.
    fn json(&self, i: usize, command: &str) -> serde_json::Value {
        let args = format!("{command} --json --pin-dir {}", self.pin_dir(i).display());
        let out = self.datapath(i, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{command} failed: {err}");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{command} JSON: {e}"))
    }

    /// A counter of node `i`'s `stats --json` (`direction`, `mode`) in packets.
    pub fn counter(&self, i: usize, direction: &str, mode: &str) -> u64 {
        self.counter_field(i, direction, mode, "packets")
    }

    /// The same counter in bytes.
    pub fn counter_bytes(&self, i: usize, direction: &str, mode: &str) -> u64 {
        self.counter_field(i, direction, mode, "bytes")
    }

    fn counter_field(&self, i: usize, direction: &str, mode: &str, field: &str) -> u64 {
        self.stats(i)["counters"]
            .as_array()
            .expect("counters")
            .iter()
            .find(|c| c["direction"] == direction && c["mode"] == mode)
            .and_then(|c| c[field].as_u64())
            .expect("counter")
    }

    /// A drop counter of node `i` by reason name, in packets.
    pub fn drops(&self, i: usize, reason: &str) -> u64 {
        self.stats(i)["drops"]
            .as_array()
            .expect("drops")
            .iter()
            .find(|c| c["reason"] == reason)
            .and_then(|c| c["packets"].as_u64())
            .expect("drop reason")
    }

    /// Sets node `i` up as flanneld sets up a VXLAN node: `flannel.1` (VNI `vni`, port `port`,
    /// MAC `mac`) holding the first address of the node's pod CIDR.
    pub fn flannel_device(&self, i: usize, vni: u32, port: u16, mac: &str) {
        let n = &self.nodes[i];
        let net = n.pod_cidr.split('/').next().unwrap();
        n.ns.exec(&format!(
            "ip link add flannel.1 type vxlan id {vni} dstport {port} local {} dev eth0 nolearning && \
             ip link set flannel.1 address {mac} mtu 1450 up && ip addr add {net}/32 dev flannel.1",
            n.addr
        ));
    }

    /// What flanneld programs on node `i` for a peer: neighbour and FDB entries for the peer's
    /// VTEP MAC, and the onlink route to its pod CIDR via its network address.
    pub fn flannel_peer(&self, i: usize, peer_addr: &str, peer_cidr: &str, peer_mac: &str) {
        let net = peer_cidr.split('/').next().unwrap();
        self.nodes[i].ns.exec(&format!(
            "ip neigh replace {net} lladdr {peer_mac} dev flannel.1 nud permanent && \
             bridge fdb append {peer_mac} dev flannel.1 dst {peer_addr} && \
             ip route replace {peer_cidr} via {net} dev flannel.1 onlink"
        ));
    }

    /// Runs `cni.py` (ADD or DEL) for node `i`'s pod with the agent's configuration list.
    fn cni(&self, i: usize, command: &str, runtime_config: &str) -> String {
        let dir = self.cni_dir(i);
        // As a runtime does: the first list by name (an earlier release wrote 10-datapath).
        let conflist = ["05-datapath.conflist", "10-datapath.conflist"]
            .iter()
            .map(|name| dir.join("net.d").join(name))
            .find(|p| p.exists())
            .unwrap_or_else(|| dir.join("net.d/05-datapath.conflist"));
        self.nodes[i].ns.exec(&format!(
            "/usr/bin/python3 {} {command} {} /var/run/netns/{} {}-pod eth0 /usr/lib/cni:{} {} '{runtime_config}'",
            script("cni.py").display(),
            conflist.display(),
            self.nodes[i].pod.name,
            self.nodes[i].pod.name,
            dir.join("bin").display(),
            dir.join("pod.result").display(),
        ))
    }

    /// Plugs node `i`'s pod in through the CNI plugins of the agent's list; returns the result.
    pub fn cni_add(&mut self, i: usize) -> serde_json::Value {
        self.cni_add_with(i, "{}")
    }

    /// The same with the runtime's dynamic settings (`{"portMappings": [...]}` for hostPorts),
    /// given to the plugins whose capabilities ask for them.
    pub fn cni_add_with(&mut self, i: usize, runtime_config: &str) -> serde_json::Value {
        let result: serde_json::Value =
            serde_json::from_str(&self.cni(i, "add", runtime_config)).expect("CNI result");
        let ip = result["ips"][0]["address"].as_str().expect("an address");
        self.nodes[i].pod_ip = ip.split('/').next().unwrap().to_string();
        result
    }

    /// Unplugs node `i`'s pod (CNI DEL through the list in reverse).
    pub fn cni_del(&self, i: usize) {
        self.cni(i, "del", "{}");
    }

    /// Starts a ping pod `from` → pod `to` every 5 ms for `secs` seconds; returns the child
    /// whose output ends with ping's own loss summary.
    pub fn flood_ping(&self, from: usize, to: usize, secs: u32) -> Child {
        let log = self.workdir.join(format!("ping-{from}-{to}.log"));
        self.nodes[from].pod.spawn(
            &format!("ping -D -i 0.005 -w {secs} -W 1 {}", self.nodes[to].pod_ip),
            &log,
        )
    }

    fn ping_log(&self, from: usize, to: usize) -> PathBuf {
        self.workdir.join(format!("ping-{from}-{to}.log"))
    }

    /// Whether a `flood_ping` from `from` to `to` (finished or running) got replies both
    /// before `start` and after `end`: the traffic spanned the event between them.
    pub fn ping_spanned(
        &self,
        from: usize,
        to: usize,
        start: std::time::SystemTime,
        end: std::time::SystemTime,
    ) -> bool {
        ping_log_spanned(&self.ping_log(from, to), start, end)
    }

    /// Replies a `flood_ping` from `from` to `to` has logged so far.
    pub fn ping_replies(&self, from: usize, to: usize) -> usize {
        ping_log_replies(&self.ping_log(from, to)).len()
    }

    /// Waits for a `flood_ping` and returns (sent, received) from ping's summary.
    pub fn flood_ping_result(&self, from: usize, to: usize, mut child: Child) -> (u32, u32) {
        let _ = child.wait();
        ping_log_summary(&self.ping_log(from, to))
    }

    /// Pings pod `to` from pod `from`; returns the number of replies.
    pub fn ping(&self, from: usize, to: usize, count: u32) -> u32 {
        let out = self.nodes[from].pod.exec_out(&format!(
            "ping -c {count} -i 0.2 -W 1 {}",
            self.nodes[to].pod_ip
        ));
        ping_received(&String::from_utf8_lossy(&out.stdout))
    }
}

/// The replies a finished `ping` counted ("N received" in its summary); 0 without a summary.
pub fn ping_received(text: &str) -> u32 {
    text.lines()
        .find_map(|l| {
            l.split(", ")
                .find(|p| p.ends_with("received"))
                .and_then(|p| p.split(' ').next()?.parse().ok())
        })
        .unwrap_or(0)
}

impl Drop for Topology {
    fn drop(&mut self) {
        for a in &mut self.agents {
            a.stop();
        }
        for (i, n) in self.nodes.iter().enumerate() {
            let _ = n.ns.exec_out(&format!(
                "{} detach --pin-dir {}",
                datapath_bin().display(),
                self.pin_dir(i).display()
            ));
        }
        if !std::thread::panicking() && std::env::var_os("DP_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.workdir);
        } else {
            eprintln!("logs kept in {}", self.workdir.display());
        }
    }
}

/// A running agent; stopped with SIGTERM on drop.
pub struct Agent {
    pub child: Child,
    pub log: PathBuf,
    pub node: usize,
}

impl Agent {
    pub fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = sh_out(&format!("kill -TERM {}", self.child.id()));
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The Unix times of the replies in the log of a `ping -D` (`[1764763000.123456] 64 bytes
/// from ...`).
pub fn ping_log_replies(log: &Path) -> Vec<f64> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect()
}

/// Whether a `ping -D` logging to `log` got replies both before `start` and after `end`.
pub fn ping_log_spanned(
    log: &Path,
    start: std::time::SystemTime,
    end: std::time::SystemTime,
) -> bool {
    let secs = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let replies = ping_log_replies(log);
    replies.iter().any(|t| *t < secs(start)) && replies.iter().any(|t| *t > secs(end))
}

/// (sent, received) from the summary of the finished ping logging to `log`.
pub fn ping_log_summary(log: &Path) -> (u32, u32) {
    let text = fs::read_to_string(log).unwrap_or_default();
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary:\n{text}"));
    let nums: Vec<u32> = line
        .split(", ")
        .take(2)
        .map(|p| p.split(' ').next().unwrap().parse().unwrap())
        .collect();
    (nums[0], nums[1])
}

/// Polls `f` until it is true (returns true) or `timeout` passes (returns false).
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    false
}

/// One counter of /proc/net/snmp in `ns`, e.g. `("Ip", "ForwDatagrams")`.
pub fn snmp(ns: &Netns, group: &str, name: &str) -> u64 {
    let text = ns.exec("cat /proc/net/snmp");
    let prefix = format!("{group}:");
    let mut rows = text.lines().filter(|l| l.starts_with(&prefix));
    let (names, values) = (rows.next().expect("names"), rows.next().expect("values"));
    let at = names
        .split_whitespace()
        .position(|n| n == name)
        .unwrap_or_else(|| panic!("no {group} {name} in /proc/net/snmp"));
    values
        .split_whitespace()
        .nth(at)
        .and_then(|v| v.parse().ok())
        .expect("a number")
}

/// Waits until the file at `path` contains `needle`; false when `timeout` passes first.
pub fn wait_for_text(path: &Path, needle: &str, timeout: Duration) -> bool {
    wait_for(timeout, || {
        fs::read_to_string(path)
            .unwrap_or_default()
            .contains(needle)
    })
}

/// A tcpdump capture running in a namespace, written to a pcap file.
pub struct Capture {
    child: Child,
    pub pcap: PathBuf,
}

impl Capture {
    pub fn start(ns: &Netns, iface: &str, filter: &str, pcap: &Path) -> Self {
        let log = pcap.with_extension("log");
        let child = ns.spawn(
            &format!(
                "tcpdump --immediate-mode -B 32768 -i {iface} -U -s 0 -w {} '{}'",
                pcap.display(),
                filter
            ),
            &log,
        );
        let listening = wait_for_text(&log, "listening on", Duration::from_secs(5));
        assert!(listening, "tcpdump did not start");
        Self {
            child,
            pcap: pcap.to_path_buf(),
        }
    }

    /// Stops the capture and returns the pcap path.
    pub fn stop(mut self) -> PathBuf {
        thread::sleep(Duration::from_millis(300));
        let _ = sh_out(&format!("kill -INT {}", self.child.id()));
        let _ = self.child.wait();
        self.pcap.clone()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs tshark on a pcap with `-T fields`, returning one Vec of fields per frame.
pub fn tshark_fields(pcap: &Path, decode_as: &str, fields: &[&str]) -> Vec<Vec<String>> {
    let mut cmd = format!(
        "tshark -r {} -o ip.check_checksum:TRUE -T fields -E separator=/t",
        pcap.display()
    );
    if !decode_as.is_empty() {
        cmd += &format!(" -d {decode_as}");
    }
    for f in fields {
        cmd += &format!(" -e {f}");
    }
    sh(&format!("{cmd} 2>/dev/null"))
        .lines()
        .map(|l| l.split('\t').map(String::from).collect())
        .collect()
}

/// The `datapath` binary of an earlier release, built once from this repository's history and
/// cached as /var/cache/datapath-tests/<commit>/datapath. Every release builds in one shared
/// target directory, so the dependencies they have in common compile once; without debug
/// information or incremental state, which nothing here reads.
pub fn release_bin(commit: &str) -> PathBuf {
    let root = PathBuf::from("/var/cache/datapath-tests");
    let cache = root.join(commit);
    let bin = cache.join("datapath");
    if bin.exists() {
        return bin;
    }
    let src = cache.join("src");
    let _ = fs::remove_dir_all(&src);
    fs::create_dir_all(&src).expect("cache dir");
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    sh(&format!(
        "git -C {} archive {commit} | tar -x -m -C {}",
        repo.display(),
        src.display()
    ));
    eprintln!(
        "building release {commit} once (cached in {})",
        cache.display()
    );
    let target = root.join("target");
    sh(&format!(
        "cd {} && CARGO_TARGET_DIR={} CARGO_PROFILE_DEV_DEBUG=0 CARGO_INCREMENTAL=0 \
         cargo build --quiet -p datapath-user",
        src.display(),
        target.display()
    ));
    let built = target.join("debug/datapath");
    assert!(built.exists(), "{} not built", built.display());
    // Copied under another name, then renamed: a binary is either whole or absent.
    let part = cache.join("datapath.part");
    fs::copy(&built, &part).expect("copying the release's binary");
    fs::rename(&part, &bin).expect("placing the release's binary");
    let _ = fs::remove_dir_all(&src);
    bin
}

/// Puts the reference CNI plugins (Debian's containernetworking-plugins) into a node's CNI
/// bin directory, as a node's package or install step does: the agent looks for them there.
pub fn install_reference_plugins(bin_dir: &Path) {
    fs::create_dir_all(bin_dir).expect("CNI bin dir");
    for p in ["ptp", "host-local", "portmap"] {
        let link = bin_dir.join(p);
        if !link.exists() {
            std::os::unix::fs::symlink(Path::new("/usr/lib/cni").join(p), &link)
                .expect("linking a reference plugin");
        }
    }
}

/// Starts the captures a wire check compares: node1's underlay port (`u0`, tunnel packets of
/// `encap` only) and pod1's `eth0`; returns (underlay, pod).
pub fn wire_captures(t: &Topology, encap: &str) -> (Capture, Capture) {
    let filter = if encap == "ipip" {
        "ip proto 4"
    } else {
        "udp port 4789"
    };
    let ul = Capture::start(&t.underlay, "u0", filter, &t.workdir.join("underlay.pcap"));
    let pod = Capture::start(&t.nodes[0].pod, "eth0", "ip", &t.workdir.join("pod.pcap"));
    (ul, pod)
}

/// Runs `tests/wire_check.py` (scapy) on a pod's and the underlay's captures in `encap`
/// (VNI 4096, port 4789; `extra` appended, e.g. `udpcsum`); panics unless the wire checks out.
pub fn wire_check(encap: &str, pod: &Path, underlay: &Path, extra: &str) -> String {
    let check = sh(&format!(
        "/usr/bin/python3 {} {encap} {} {} 4096 4789 {extra}",
        script("wire_check.py").display(),
        pod.display(),
        underlay.display(),
    ));
    assert!(check.contains("wire check ok"), "{check}");
    check
}

/// Path of a helper script in the `tests` directory.
pub fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(name)
}

/// How traffic.py is run: with Debian's python3, which has scapy.
pub fn traffic_py() -> String {
    format!("/usr/bin/python3 {}", script("traffic.py").display())
}

impl Topology {
    /// Echo servers (both families) in pod `i` on `ports`, for `secs` seconds.
    pub fn echo_servers(&self, i: usize, ports: &[u16], secs: u32) -> Vec<Child> {
        let children = (ports.iter())
            .map(|p| {
                self.nodes[i].pod.spawn(
                    &format!("{} echo-server {p} {secs}", traffic_py()),
                    &self.workdir.join(format!("echo-{i}-{p}.log")),
                )
            })
            .collect();
        thread::sleep(Duration::from_millis(300));
        children
    }

    /// Whether a new TCP connection from pod `from` to `addr`:`port` is answered with its echo.
    pub fn connects(&self, from: usize, addr: &str, port: u16) -> bool {
        let out = self.nodes[from]
            .pod
            .exec(&format!("{} connect {addr} {port}", traffic_py()));
        out.trim() == "connected"
    }
}

impl Topology {
    /// Runs traffic.py's `<proto>-server PORT <server_args> OUT` in pod `to` and then its
    /// `<proto>-client POD_IP PORT <client_args>` in pod `from`; returns (what the client
    /// printed, what the server wrote to OUT), both trimmed.
    fn traffic(
        &self,
        proto: &str,
        from: usize,
        to: usize,
        server_args: &str,
        client_args: &str,
    ) -> (String, String) {
        self.traffic_to(proto, from, to, None, server_args, client_args)
    }

    fn traffic_to(
        &self,
        proto: &str,
        from: usize,
        to: usize,
        via: Option<(&str, u16)>,
        server_args: &str,
        client_args: &str,
    ) -> (String, String) {
        let out = self.workdir.join(format!("{proto}-{from}-{to}.txt"));
        let _ = fs::remove_file(&out);
        let py = format!("/usr/bin/python3 {}", script("traffic.py").display());
        let port = if proto == "tcp" { 5001 } else { 5002 };
        let mut server = self.nodes[to].pod.spawn(
            &format!("{py} {proto}-server {port} {server_args} {}", out.display()),
            &self.workdir.join(format!("{proto}-server.log")),
        );
        thread::sleep(Duration::from_millis(300));
        let (addr, cport) = via.unwrap_or((&self.nodes[to].pod_ip, port));
        let printed = self.nodes[from]
            .pod
            .exec(&format!("{py} {proto}-client {addr} {cport} {client_args}"));
        let _ = server.wait();
        let written = fs::read_to_string(&out).unwrap_or_default();
        (printed.trim().to_string(), written.trim().to_string())
    }

    /// Sends `mb` MiB over TCP from pod `from` to pod `to`; returns (sent, received) SHA-256
    /// and byte counts as printed by traffic.py.
    pub fn tcp_transfer(&self, from: usize, to: usize, mb: u32) -> (String, String) {
        self.traffic("tcp", from, to, "", &mb.to_string())
    }

    /// The same, but the client in pod `from` connects to `addr:port` (a Service address
    /// the node translates to pod `to`'s port 5001).
    pub fn tcp_transfer_via(
        &self,
        from: usize,
        to: usize,
        addr: &str,
        port: u16,
        mb: u32,
    ) -> (String, String) {
        self.traffic_to("tcp", from, to, Some((addr, port)), "", &mb.to_string())
    }

    /// Sends `count` UDP datagrams from pod `from` to pod `to`; returns how many arrived intact.
    pub fn udp_exchange(&self, from: usize, to: usize, count: u32) -> u32 {
        let (_, got) = self.traffic("udp", from, to, &count.to_string(), &count.to_string());
        got.parse().unwrap_or(0)
    }
}

/// An etcd server (Debian's etcd-server) in the underlay namespace, on its loopback for the
/// test's etcdctl and on the bridge address 192.168.1.1 for the nodes; its data directory
/// survives `kill` so `start` again brings the same state back. Killed on drop.
pub struct Etcd {
    ns: String,
    dir: PathBuf,
    child: Option<Child>,
    starts: u32,
    /// Directory of the CA, server and client certificates when started with TLS.
    pub tls: Option<PathBuf>,
}

impl Etcd {
    /// The client URL the nodes use.
    pub const URL: &str = "http://192.168.1.1:2379";

    pub fn start(t: &Topology) -> Self {
        Self::launch(t, None)
    }

    /// The client URL with TLS.
    pub const TLS_URL: &str = "https://192.168.1.1:2379";

    /// Starts etcd serving clients over TLS only, requiring client certificates signed by a CA
    /// made here (`ca.pem`, `client.pem`/`client.key` under `tls`).
    pub fn start_tls(t: &Topology) -> Self {
        let dir = t.workdir.join("tls");
        fs::create_dir_all(&dir).expect("tls dir");
        let d = dir.display();
        sh(&format!(
            "cd {d} && openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 \
             -subj /CN=dpt-ca -addext basicConstraints=critical,CA:TRUE \
             -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null"
        ));
        for (name, eku) in [
            ("server", "serverAuth,clientAuth"),
            ("client", "clientAuth"),
        ] {
            sh(&format!(
                "cd {d} && printf 'subjectAltName=IP:192.168.1.1,IP:127.0.0.1\\nextendedKeyUsage={eku}\\nbasicConstraints=CA:FALSE\\n' > {name}.ext && \
                 openssl req -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr -subj /CN={name} 2>/dev/null && \
                 openssl x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out {name}.pem -days 1 -extfile {name}.ext 2>/dev/null"
            ));
        }
        Self::launch(t, Some(dir))
    }

    fn launch(t: &Topology, tls: Option<PathBuf>) -> Self {
        let mut e = Self {
            ns: t.underlay.name.clone(),
            dir: t.workdir.join("etcd"),
            child: None,
            starts: 0,
            tls,
        };
        e.restart();
        e
    }

    /// Starts the server (again) and waits until it answers.
    pub fn restart(&mut self) {
        let log = self.dir.with_extension(format!("{}.log", self.starts));
        self.starts += 1;
        let (scheme, url, tls) = match &self.tls {
            Some(d) => (
                "https",
                Self::TLS_URL,
                format!(
                    "--cert-file {d}/server.pem --key-file {d}/server.key --trusted-ca-file {d}/ca.pem --client-cert-auth",
                    d = d.display()
                ),
            ),
            None => ("http", Self::URL, String::new()),
        };
        let cmd = format!(
            "etcd --name dpt --data-dir {} --listen-client-urls {scheme}://127.0.0.1:2379,{url} \
             --advertise-client-urls {url} --listen-peer-urls http://127.0.0.1:2380 \
             --initial-advertise-peer-urls http://127.0.0.1:2380 \
             --initial-cluster dpt=http://127.0.0.1:2380 {tls}",
            self.dir.display(),
        );
        self.child = Some(spawn_in(&self.ns, &cmd, &log));
        let up = wait_for(Duration::from_secs(20), || {
            self.ctl_out("endpoint health").status.success()
        });
        assert!(
            up,
            "etcd did not start:\n{}",
            fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn ctl_out(&self, args: &str) -> Output {
        let (url, tls) = match &self.tls {
            Some(d) => (
                "https://127.0.0.1:2379",
                format!(
                    "--cacert {d}/ca.pem --cert {d}/client.pem --key {d}/client.key",
                    d = d.display()
                ),
            ),
            None => ("http://127.0.0.1:2379", String::new()),
        };
        sh_out(&format!(
            "ip netns exec {} env ETCDCTL_API=3 etcdctl --endpoints {url} {tls} {args}",
            self.ns
        ))
    }

    /// Runs etcdctl with `args`, panicking on failure; returns its output.
    pub fn ctl(&self, args: &str) -> String {
        let out = self.ctl_out(args);
        assert!(
            out.status.success(),
            "etcdctl {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes `value` at `key` (both single-quoted for the shell: a dual-stack lease key
    /// holds `&`).
    pub fn put(&self, key: &str, value: &str) {
        self.ctl(&format!("put '{key}' '{value}'"));
    }

    pub fn del(&self, key: &str) {
        self.ctl(&format!("del '{key}'"));
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

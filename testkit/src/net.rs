//! Shell commands, network namespaces and bpffs mounts that clean up after themselves, and
//! the one topology builder: an underlay namespace with two bridged subnets and a router,
//! nodes with an `eth0` on one of them, and a pod behind each node's `pod0` veth.
//!
//! ```text
//!   pod1 ─ node1 eth0 ─ u0 ┐                  ┌ u2 ─ node3 eth0 ─ pod3
//!   pod2 ─ node2 eth0 ─ u1 ┴ br0  <prefix>-ul  br1
//!          192.168.1.0/24, gw .1    (router)   192.168.2.0/24, gw .1
//! ```
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name no other test of this run (or another process) uses: `dpt<pid><seq>-<tag>`.
pub fn unique(tag: &str) -> String {
    format!(
        "dpt{}{}-{tag}",
        std::process::id() % 100000,
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command; its stdout, or why it failed (with its output).
pub fn try_sh(cmd: &str) -> Result<String, String> {
    let out = sh_out(cmd);
    if !out.status.success() {
        return Err(format!(
            "command failed: {cmd}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command, panicking with its output when it fails.
pub fn sh(cmd: &str) -> String {
    try_sh(cmd).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a command, returning its output whatever the status.
pub fn sh_out(cmd: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("spawn sh")
}

/// A network namespace, deleted (with every interface in it) on drop unless `keep` is called.
pub struct Netns {
    pub name: String,
    kept: bool,
}

impl Netns {
    pub fn try_new(name: &str) -> Result<Self, String> {
        try_sh(&format!("ip netns add {name}"))?;
        let ns = Self {
            name: name.to_string(),
            kept: false,
        };
        ns.try_exec("ip link set lo up")?;
        Ok(ns)
    }

    pub fn new(name: &str) -> Self {
        Self::try_new(name).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Leaves the namespace in place when dropped (whoever kept it deletes it by name).
    pub fn keep(mut self) -> String {
        self.kept = true;
        self.name.clone()
    }

    fn wrap(&self, cmd: &str) -> String {
        format!(
            "ip netns exec {} sh -c '{}'",
            self.name,
            cmd.replace('\'', "'\\''")
        )
    }

    /// Runs `cmd` inside the namespace.
    pub fn try_exec(&self, cmd: &str) -> Result<String, String> {
        try_sh(&self.wrap(cmd))
    }

    /// Runs `cmd` inside the namespace, panicking on failure.
    pub fn exec(&self, cmd: &str) -> String {
        sh(&self.wrap(cmd))
    }

    /// Runs `cmd` inside the namespace, returning its output whatever the status.
    pub fn exec_out(&self, cmd: &str) -> Output {
        sh_out(&self.wrap(cmd))
    }

    /// Starts `cmd` inside the namespace in the background.
    pub fn spawn(&self, cmd: &str, log: &Path) -> Child {
        spawn_in(&self.name, cmd, log)
    }
}

/// Starts `cmd` inside namespace `ns` in the background, output to `log`.
pub fn spawn_in(ns: &str, cmd: &str, log: &Path) -> Child {
    let f = fs::File::create(log).expect("log file");
    Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", &format!("exec {cmd}")])
        .stdin(Stdio::null())
        .stdout(f.try_clone().expect("dup"))
        .stderr(f)
        .spawn()
        .expect("spawn")
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        // Kill what still runs inside, then delete.
        let _ = sh_out(&format!("ip netns pids {} | xargs -r kill -9", self.name));
        let _ = sh_out(&format!("ip netns del {}", self.name));
    }
}

/// A bpffs mounted outside /sys (so pins survive across `ip netns exec`), unmounted on drop.
pub struct Bpffs {
    pub dir: PathBuf,
}

impl Bpffs {
    /// Mounts one on `dir`.
    pub fn at(dir: &Path) -> Result<Self, String> {
        fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        try_sh(&format!("mount -t bpf bpf {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Mounts one under `/run/datapath-tests`.
    pub fn new(tag: &str) -> Self {
        Self::at(&PathBuf::from("/run/datapath-tests").join(tag)).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = sh_out(&format!("umount {}", self.dir.display()));
        let _ = fs::remove_dir(&self.dir);
        // Empty once the last test's mount is gone; otherwise this fails and it stays.
        if let Some(parent) = self.dir.parent() {
            let _ = fs::remove_dir(parent);
        }
    }
}

/// Where a node sits: subnet 0 is 192.168.1.0/24 on bridge br0; subnet 1 is 192.168.2.0/24 on
/// br1, reached from subnet 0 through the underlay namespace acting as router.
#[derive(Clone, Copy, Debug)]
pub struct NodeSpec {
    pub subnet: u8,
    pub host: u8,
}

/// An emulated Kubernetes node: a namespace with an underlay interface `eth0` and (unless
/// pods are left to CNI) one pod, its own namespace, behind a veth `pod0`, routed as a CNI
/// would.
pub struct BuiltNode {
    pub name: String,
    pub addr: String,
    pub pod_cidr: String,
    /// Empty when pods are left to CNI.
    pub pod_ip: String,
    pub pod: Netns,
    pub ns: Netns,
}

/// The underlay namespace and the nodes on it.
pub struct Built {
    pub underlay: Netns,
    pub nodes: Vec<BuiltNode>,
}

/// Builds `specs.len()` nodes named `<prefix>-n1...`, pods `<prefix>-p1...`: node i has pod
/// CIDR 10.244.i.0/24 and (with `hand_made_pods`) pod 10.244.i.2.
pub fn build(prefix: &str, specs: &[NodeSpec], hand_made_pods: bool) -> Result<Built, String> {
    let underlay = Netns::try_new(&format!("{prefix}-ul"))?;
    underlay.try_exec("sysctl -qw net.ipv4.ip_forward=1")?;
    for (br, gw) in [("br0", "192.168.1.1/24"), ("br1", "192.168.2.1/24")] {
        underlay.try_exec(&format!(
            "ip link add {br} type bridge && ip addr add {gw} dev {br} && ip link set {br} up"
        ))?;
    }
    let mut nodes = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        nodes.push(build_node(prefix, &underlay, i, spec, hand_made_pods)?);
    }
    Ok(Built { underlay, nodes })
}

fn build_node(
    prefix: &str,
    underlay: &Netns,
    i: usize,
    spec: &NodeSpec,
    hand_made_pods: bool,
) -> Result<BuiltNode, String> {
    let ns = Netns::try_new(&format!("{prefix}-n{}", i + 1))?;
    let pod = Netns::try_new(&format!("{prefix}-p{}", i + 1))?;
    let addr = format!("192.168.{}.{}", spec.subnet + 1, spec.host);
    let gw = format!("192.168.{}.1", spec.subnet + 1);
    let port = format!("u{i}");
    try_sh(&format!(
        "ip link add eth0 netns {} type veth peer name {port} netns {}",
        ns.name, underlay.name
    ))?;
    underlay.try_exec(&format!("ip link set {port} master br{} up", spec.subnet))?;
    ns.try_exec(&format!(
        "ip addr add {addr}/24 dev eth0 && ip link set eth0 up && ip route add default via {gw} && sysctl -qw net.ipv4.ip_forward=1"
    ))?;
    let mut node = BuiltNode {
        name: format!("node{}", i + 1),
        addr,
        pod_cidr: format!("10.244.{i}.0/24"),
        pod_ip: String::new(),
        pod,
        ns,
    };
    if hand_made_pods {
        plug_pod(&mut node, i)?;
    }
    Ok(node)
}

/// A pod at 10.244.i.2 behind the node's `pod0`, with a /32 route each way (as Calico's).
fn plug_pod(node: &mut BuiltNode, i: usize) -> Result<(), String> {
    let pod_ip = format!("10.244.{i}.2");
    try_sh(&format!(
        "ip link add eth0 netns {} type veth peer name pod0 netns {}",
        node.pod.name, node.ns.name
    ))?;
    node.ns.try_exec(&format!(
        "ip addr add 10.244.{i}.1/32 dev pod0 && ip link set pod0 up && ip route add {pod_ip}/32 dev pod0"
    ))?;
    node.pod.try_exec(&format!(
        "ip addr add {pod_ip}/24 dev eth0 && ip link set eth0 up && ip route add 10.244.{i}.1/32 dev eth0 && ip route replace default via 10.244.{i}.1 src {pod_ip}"
    ))?;
    // The pod reaches other pods through its node, like Calico's /32 pod routes.
    node.pod
        .try_exec(&format!("ip route replace 10.244.0.0/16 via 10.244.{i}.1"))?;
    node.pod_ip = pod_ip;
    Ok(())
}

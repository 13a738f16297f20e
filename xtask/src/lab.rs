//! The two-node lab the demo and the benchmark build with the test kit's topology builder:
//! namespaces `<prefix>-ul` (bridges, router), `<prefix>-n1/-n2` (nodes 192.168.1.10/.11)
//! and `<prefix>-p1/-p2` (pods 10.244.0.2/1.2), each with an IPv6 half (nodes fd00:1::10/11,
//! pods fd00:10:244::2 and fd00:10:244:1::2), a bpffs for the agents' pins, and a teardown
//! that removes all of it.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Result, bail};
use testkit::net::NodeSpec;

pub fn sh(cmd: &str) -> Result<String> {
    let out = Command::new("sh").arg("-c").arg(cmd).output()?;
    if !out.status.success() {
        bail!(
            "`{cmd}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The second pod's IPv6 address (the benchmark's IPv6 server).
pub const POD2_V6: &str = "fd00:10:244:1::2";

pub struct Lab {
    pub prefix: &'static str,
    pub bin: PathBuf,
}

impl Lab {
    pub fn new(prefix: &'static str, bin: &Path) -> Self {
        Self {
            prefix,
            bin: bin.to_path_buf(),
        }
    }

    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    pub fn bpffs(&self) -> String {
        format!("/run/{}-bpffs", self.prefix)
    }

    pub fn cluster_path(&self) -> String {
        format!("/run/{}-cluster.yaml", self.prefix)
    }

    pub fn pin_dir(&self, node: usize) -> String {
        format!("{}/node{node}", self.bpffs())
    }

    /// Node `node`'s CNI directories (net.d, bin, ipam), so the agents write there rather than
    /// into this machine's /etc/cni and /opt/cni.
    pub fn cni_dir(&self, node: usize) -> String {
        format!("/run/{}-cni/node{node}", self.prefix)
    }

    pub fn in_ns(&self, ns: &str, cmd: &str) -> Result<String> {
        sh(&format!("ip netns exec {} {cmd}", self.ns(ns)))
    }

    /// Builds two nodes on one subnet with a pod each (the test kit's topology builder) and
    /// the agents' bpffs; `teardown` removes them by name.
    pub fn build(&self) -> Result<()> {
        let specs = [10, 11].map(|host| NodeSpec { subnet: 0, host });
        let built = testkit::net::build(self.prefix, &specs, true).map_err(anyhow::Error::msg)?;
        built.underlay.keep();
        for n in built.nodes {
            n.ns.keep();
            n.pod.keep();
        }
        sh(&format!(
            "mkdir -p {0} && mount -t bpf bpf {0}",
            self.bpffs()
        ))?;
        self.add_ipv6()
    }

    /// The IPv6 half: node addresses on the underlay (no duplicate address detection, so they
    /// work at once), IPv6 forwarding, each pod's address routed as its IPv4 one is.
    fn add_ipv6(&self) -> Result<()> {
        for i in 0..2 {
            let (n, p) = (format!("n{}", i + 1), format!("p{}", i + 1));
            self.in_ns(
                &n,
                &format!(
                    "sh -c 'sysctl -qw net.ipv6.conf.all.forwarding=1 && \
                     ip -6 addr add fd00:1::1{i}/64 dev eth0 nodad && \
                     ip -6 addr add fd00:10:244:{i}::1/128 dev pod0 nodad && \
                     ip -6 route add fd00:10:244:{i}::2/128 dev pod0'"
                ),
            )?;
            self.in_ns(
                &p,
                &format!(
                    "sh -c 'ip -6 addr add fd00:10:244:{i}::2/64 dev eth0 nodad && \
                     ip -6 route add fd00:10:244:{i}::1/128 dev eth0 && \
                     ip -6 route add default via fd00:10:244:{i}::1'"
                ),
            )?;
        }
        Ok(())
    }

    /// Stops the agents and removes their programs, pins and routes; the lab stays.
    pub fn stop_agents(&self) {
        let _ = sh(&format!(
            "pkill -TERM -f 'datapath run --cluster {}' ; sleep 0.3",
            self.cluster_path()
        ));
        for i in 1..=2 {
            let _ = self.in_ns(
                &format!("n{i}"),
                &format!(
                    "{} detach --pin-dir {}",
                    self.bin.display(),
                    self.pin_dir(i)
                ),
            );
        }
    }

    /// Tears the lab down and exits when Ctrl-C arrives.
    pub fn teardown_on_ctrlc(&self) -> Result<()> {
        let (prefix, bin) = (self.prefix, self.bin.clone());
        ctrlc::set_handler(move || {
            eprintln!("\ninterrupted: tearing down");
            Lab::new(prefix, &bin).teardown();
            std::process::exit(130);
        })?;
        Ok(())
    }

    pub fn teardown(&self) {
        self.stop_agents();
        for ns in ["ul", "n1", "n2", "p1", "p2"] {
            let ns = self.ns(ns);
            let _ = sh(&format!(
                "ip netns pids {ns} 2>/dev/null | xargs -r kill -9; ip netns del {ns} 2>/dev/null"
            ));
        }
        let _ = sh(&format!(
            "umount {0} 2>/dev/null; rmdir {0} 2>/dev/null; rm -f {1}; rm -rf /run/{2}-cni",
            self.bpffs(),
            self.cluster_path(),
            self.prefix
        ));
    }

    /// Records each node's pod with the agent the way its CNI plugin does when chained after
    /// ptp: the plugin is run with ADD and a previous result describing the lab's pod (host
    /// side `pod0`, pod side `eth0`), so BPF host routing knows it.
    pub fn plug_pods(&self) -> Result<()> {
        use std::io::Write as _;
        for i in 1..=2 {
            let (n, p) = (self.ns(&format!("n{i}")), self.ns(&format!("p{i}")));
            let mac = |ns: &str, dev: &str| -> Result<String> {
                let out = sh(&format!("ip -n {ns} -j link show {dev}"))?;
                let v: serde_json::Value = serde_json::from_str(&out)?;
                Ok(v[0]["address"].as_str().unwrap_or_default().to_string())
            };
            let conf = serde_json::json!({
                "cniVersion": "1.0.0", "name": "datapath", "type": "datapath",
                "pinDir": self.pin_dir(i),
                "prevResult": {
                    "cniVersion": "1.0.0",
                    "interfaces": [
                        { "name": "pod0", "mac": mac(&n, "pod0")? },
                        { "name": "eth0", "mac": mac(&p, "eth0")?, "sandbox": format!("/var/run/netns/{p}") },
                    ],
                    "ips": [
                        { "interface": 1, "address": format!("10.244.{}.2/24", i - 1) },
                        { "interface": 1, "address": format!("fd00:10:244:{}::2/64", i - 1) },
                    ],
                },
            });
            let mut child = Command::new("ip")
                .args(["netns", "exec", &n])
                .arg(&self.bin)
                .env("CNI_COMMAND", "ADD")
                .env("CNI_NETNS", format!("/var/run/netns/{p}"))
                .env("CNI_IFNAME", "eth0")
                .env("CNI_CONTAINERID", format!("lab-{i}"))
                .env("CNI_PATH", "/usr/lib/cni")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(conf.to_string().as_bytes())?;
            let out = child.wait_with_output()?;
            if !out.status.success() {
                bail!(
                    "CNI ADD on node{i}: {}",
                    String::from_utf8_lossy(&out.stdout)
                );
            }
        }
        Ok(())
    }

    pub fn write_cluster(&self, encap: &str, vni: u32, port: u16) -> Result<()> {
        // Native routing is BGP's: the nodes' BIRDs peer in a mesh and advertise their CIDRs.
        let bgp = if encap == "none" {
            "bgp: { asNumber: 64512 }\n"
        } else {
            ""
        };
        let text = testkit::cluster::yaml(
            encap,
            &format!("vxlan: {{ vni: {vni}, port: {port} }}\n{bgp}"),
            &testkit::cluster::two_nodes(),
        );
        let tmp = format!("{}.tmp", self.cluster_path());
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.cluster_path())?;
        Ok(())
    }

    /// A VXLAN cluster of both nodes with their IPv6 halves (VTEP MACs derived).
    pub fn write_dual_cluster(&self, vni: u32, port: u16) -> Result<()> {
        let mut text =
            format!("encapsulation: vxlan\nvxlan: {{ vni: {vni}, port: {port} }}\nnodes:\n");
        for (i, n) in testkit::cluster::two_nodes().iter().enumerate() {
            text += &format!(
                "  - name: {}\n    address: {}\n    podCIDR: {}\n    addressV6: \"fd00:1::1{i}\"\n    podCIDRv6: \"fd00:10:244:{i}::/64\"\n",
                n.name, n.address, n.pod_cidr
            );
        }
        let tmp = format!("{}.tmp", self.cluster_path());
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.cluster_path())?;
        Ok(())
    }

    /// Starts the agent on node `i` (1 or 2) and waits until its programs are attached.
    pub fn start_agent(&self, i: usize, extra: &[&str]) -> Result<Child> {
        let log_path = format!("/tmp/{}-agent{i}.log", self.prefix);
        // The reference plugins the agent's CNI list names, where it looks for them.
        let bin_dir = format!("{}/bin", self.cni_dir(i));
        std::fs::create_dir_all(&bin_dir)?;
        for p in ["ptp", "host-local", "portmap"] {
            let link = Path::new(&bin_dir).join(p);
            if !link.exists() {
                std::os::unix::fs::symlink(Path::new("/usr/lib/cni").join(p), link)?;
            }
        }
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(&format!("n{i}"))])
            .arg(&self.bin)
            .args([
                "run",
                "--cluster",
                &self.cluster_path(),
                "--node",
                &format!("node{i}"),
            ])
            .args(["--pin-dir", &self.pin_dir(i)])
            .args(["--cni-conf-dir", &format!("{}/net.d", self.cni_dir(i))])
            .args(["--cni-bin-dir", &format!("{}/bin", self.cni_dir(i))])
            .args(["--cni-ipam-dir", &format!("{}/ipam", self.cni_dir(i))])
            .args(["--subnet-file", &format!("{}/subnet.env", self.cni_dir(i))])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        for _ in 0..100 {
            if std::fs::read_to_string(&log_path)?.contains("programs attached") {
                return Ok(child);
            }
            thread::sleep(Duration::from_millis(100));
        }
        bail!("agent on node{i} did not start; see {log_path}")
    }

    pub fn datapath(&self, node: usize, args: &str) -> Result<String> {
        self.in_ns(
            &format!("n{node}"),
            &format!(
                "{} {args} --pin-dir {}",
                self.bin.display(),
                self.pin_dir(node)
            ),
        )
    }
}

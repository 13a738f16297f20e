//! The fabric of the BGP tests: FRR (zebra and bgpd, Debian's frr) running as the router in a
//! test's namespace, another BGP implementation than the agents' BIRD, and a host behind it.
use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use testkit::net::{Netns, sh_out, try_sh};

use crate::wait_for;

/// FRR's zebra and bgpd in one namespace, on their own files; killed on drop.
pub struct Frr {
    pub dir: PathBuf,
    ns: String,
}

impl Frr {
    /// Starts zebra and bgpd in `ns` with `config` (FRR's integrated configuration) and waits
    /// until bgpd answers.
    pub fn start(ns: &Netns, dir: &Path, config: &str) -> Self {
        fs::create_dir_all(dir).expect("frr dir");
        let conf = dir.join("frr.conf");
        fs::write(&conf, config).expect("frr.conf");
        let frr = Self {
            dir: dir.to_path_buf(),
            ns: ns.name.clone(),
        };
        for daemon in ["zebra", "bgpd"] {
            let d = dir.display();
            ns.exec(&format!(
                "/usr/lib/frr/{daemon} -d -u root -g root -f {} -i {d}/{daemon}.pid -z {d}/zserv.api --vty_socket {d} --log file:{d}/{daemon}.log",
                conf.display()
            ));
        }
        let up = wait_for(Duration::from_secs(10), || {
            try_sh(&frr.vtysh_cmd("show bgp summary")).is_ok()
        });
        assert!(up, "FRR did not start: {}", frr.logs());
        frr
    }

    fn vtysh_cmd(&self, cmd: &str) -> String {
        format!("vtysh --vty_socket {} -c '{cmd}'", self.dir.display())
    }

    /// Runs a vtysh command; its output.
    pub fn vtysh(&self, cmd: &str) -> String {
        try_sh(&self.vtysh_cmd(cmd)).unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    /// The router's kernel routes learned over BGP (what it forwards by), IPv4 then IPv6.
    pub fn kernel_routes(&self) -> String {
        ["-4", "-6"]
            .map(|f| {
                let out = sh_out(&format!("ip {f} -n {} route show proto bgp", self.ns));
                String::from_utf8_lossy(&out.stdout).into_owned()
            })
            .concat()
    }

    /// Waits until the router's kernel has `cidr` via `via` (or, with `via` empty, has no
    /// route for `cidr`); false on timeout.
    pub fn wait_route(&self, cidr: &str, via: &str, timeout: Duration) -> bool {
        wait_for(timeout, || {
            let routes = self.kernel_routes();
            let line = routes.lines().find(|l| l.starts_with(&format!("{cidr} ")));
            match line {
                Some(l) => !via.is_empty() && l.contains(&format!("via {via} ")),
                None => via.is_empty(),
            }
        })
    }

    pub fn logs(&self) -> String {
        ["zebra", "bgpd"]
            .iter()
            .map(|d| fs::read_to_string(self.dir.join(format!("{d}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Frr {
    fn drop(&mut self) {
        for d in ["bgpd", "zebra"] {
            if let Ok(pid) = fs::read_to_string(self.dir.join(format!("{d}.pid"))) {
                let _ = sh_out(&format!("kill -9 {}", pid.trim()));
            }
        }
    }
}

/// FRR's configuration for a router of AS `asn` with id `router_id`: each neighbour (address,
/// AS, either family: the family of its routes) a route-reflector client when iBGP; graceful
/// restart (RFC 4724) on; `networks` advertised.
pub fn frr_config(
    asn: u32,
    router_id: &str,
    neighbours: &[(&str, u32)],
    networks: &[&str],
) -> String {
    let mut c = format!(
        "frr defaults traditional\nhostname fabric\n!\nrouter bgp {asn}\n bgp router-id {router_id}\n no bgp ebgp-requires-policy\n no bgp network import-check\n bgp graceful-restart\n timers bgp 3 9\n"
    );
    for (addr, peer_as) in neighbours {
        c.push_str(&format!(" neighbor {addr} remote-as {peer_as}\n"));
    }
    for (family, v6) in [("ipv4", false), ("ipv6", true)] {
        c.push_str(&format!(" address-family {family} unicast\n"));
        for n in networks.iter().filter(|n| n.contains(':') == v6) {
            c.push_str(&format!("  network {n}\n"));
        }
        // Each family over sessions of its own (as Calico peers): an IPv6 neighbour carries
        // IPv6 routes.
        for (addr, peer_as) in neighbours {
            let ours = addr.contains(':') == v6;
            match ours {
                true if v6 => c.push_str(&format!("  neighbor {addr} activate\n")),
                false if !v6 => c.push_str(&format!("  no neighbor {addr} activate\n")),
                _ => {}
            }
            if ours && *peer_as == asn {
                c.push_str(&format!("  neighbor {addr} route-reflector-client\n"));
            }
        }
        c.push_str(" exit-address-family\n!\n");
    }
    c
}

/// A host behind the router: namespace `<prefix>-h`, 192.168.3.10/24, its gateway the
/// router's 192.168.3.1 on interface `uh`.
pub fn host_behind(underlay: &Netns, prefix: &str) -> Netns {
    let h = Netns::new(&format!("{prefix}-h"));
    testkit::net::sh(&format!(
        "ip link add eth0 netns {} type veth peer name uh netns {}",
        h.name, underlay.name
    ));
    underlay.exec("ip addr add 192.168.3.1/24 dev uh && ip link set uh up");
    h.exec("ip addr add 192.168.3.10/24 dev eth0 && ip link set eth0 up && ip route add default via 192.168.3.1");
    h
}

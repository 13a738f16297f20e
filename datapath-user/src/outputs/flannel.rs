//! What a Flannel node provides besides forwarding, so this agent can replace flanneld: the
//! `subnet.env` file the pods' CNI setup reads, and masquerading of pod traffic that leaves
//! the cluster network, with the exclusions flanneld's rules make.
use std::{net::Ipv4Addr, path::Path};

use anyhow::Context as _;

use super::write_atomic;
use crate::cluster::Cidr;

/// The values `subnet.env` carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetEnv {
    pub network: Cidr,
    pub subnet: Cidr,
    pub mtu: u32,
    pub ip_masq: bool,
}

impl SubnetEnv {
    /// The file's text: `FLANNEL_SUBNET` is the subnet's first address with its length, as
    /// flanneld writes it (the gateway the Flannel CNI plugin gives its bridge).
    pub fn text(&self) -> String {
        let gateway = Ipv4Addr::from(u32::from(self.subnet.addr) + 1);
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={gateway}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network, self.subnet.len, self.mtu, self.ip_masq
        )
    }

    /// Writes it to `path` (written beside and renamed) when it differs; true when written.
    pub fn write(&self, path: &Path) -> anyhow::Result<bool> {
        write_atomic(path, self.text().as_bytes(), 0o644)
    }
}

/// The nat table's chain holding the agent's masquerade rules; POSTROUTING jumps to it.
pub const MASQ_CHAIN: &str = "DATAPATH-POSTRTG";
const JUMP: &str = "-m comment --comment datapath-masquerade -j DATAPATH-POSTRTG";
/// kube-proxy's mark for packets it masquerades itself.
const KUBE_PROXY_MARK: &str = "0x4000/0x4000";

/// flanneld's masquerade rules for the cluster `network`: leave alone what kube-proxy marked
/// and pod-to-pod traffic; masquerade the host's traffic toward pods and pods' traffic to
/// anything outside the network but multicast.
fn masq_rules(network: &Cidr) -> Vec<String> {
    vec![
        format!("-m mark --mark {KUBE_PROXY_MARK} -j RETURN"),
        format!("-s {network} -d {network} -j RETURN"),
        format!("! -s {network} -d {network} -j MASQUERADE --random-fully"),
        format!("-s {network} ! -d 224.0.0.0/4 -j MASQUERADE --random-fully"),
    ]
}

/// IPv4 iptables, numeric: a listing (`-L`, which `chain_exists` runs) never waits on reverse
/// DNS for the rules' addresses (5 s a lookup on a node whose resolver does not answer: seen
/// as a 20 s `detach`).
fn ipt() -> anyhow::Result<iptables::IPTables> {
    let mut ipt = iptables::new(false).map_err(|e| anyhow::anyhow!("iptables: {e}"))?;
    ipt.set_numeric(true);
    Ok(ipt)
}

fn err(what: String) -> impl FnOnce(Box<dyn std::error::Error>) -> anyhow::Error {
    move |e| anyhow::anyhow!("iptables {what}: {e}")
}

/// Makes the nat table hold exactly the masquerade rules for `network`, re-creating whatever
/// someone flushed; returns whether anything had to be (re)written.
pub fn ensure_masq(network: &Cidr) -> anyhow::Result<bool> {
    let ipt = ipt()?;
    let want = masq_rules(network);
    let have = if ipt
        .chain_exists("nat", MASQ_CHAIN)
        .map_err(err("listing chains".into()))?
    {
        ipt.list("nat", MASQ_CHAIN)
            .map_err(err(format!("listing {MASQ_CHAIN}")))?
    } else {
        ipt.new_chain("nat", MASQ_CHAIN)
            .map_err(err(format!("creating {MASQ_CHAIN}")))?;
        Vec::new()
    };
    // Ours alone: every rule there (`iptables -C`) and nothing else means intact.
    let rules = have.iter().filter(|r| r.starts_with("-A ")).count();
    let mut intact = rules == want.len();
    for r in &want {
        intact = intact
            && ipt
                .exists("nat", MASQ_CHAIN, r)
                .map_err(err(format!("checking {r}")))?;
    }
    let mut changed = false;
    if !intact {
        ipt.flush_chain("nat", MASQ_CHAIN)
            .map_err(err(format!("flushing {MASQ_CHAIN}")))?;
        for r in &want {
            ipt.append("nat", MASQ_CHAIN, r)
                .map_err(err(format!("appending {r}")))?;
        }
        changed = true;
    }
    if !ipt
        .exists("nat", "POSTROUTING", JUMP)
        .map_err(err("checking POSTROUTING".into()))?
    {
        ipt.append("nat", "POSTROUTING", JUMP)
            .map_err(err("appending the POSTROUTING jump".into()))?;
        changed = true;
    }
    Ok(changed)
}

/// Removes the masquerade rules and their chain (`datapath detach`, or `--ip-masq` off).
pub fn remove_masq() -> anyhow::Result<()> {
    let Ok(ipt) = ipt() else {
        return Ok(()); // no iptables on this node: nothing of ours there either
    };
    if ipt.exists("nat", "POSTROUTING", JUMP).unwrap_or(false) {
        ipt.delete_all("nat", "POSTROUTING", JUMP)
            .map_err(err("removing the POSTROUTING jump".into()))?;
    }
    if ipt.chain_exists("nat", MASQ_CHAIN).unwrap_or(false) {
        ipt.flush_chain("nat", MASQ_CHAIN)
            .map_err(err(format!("flushing {MASQ_CHAIN}")))?;
        ipt.delete_chain("nat", MASQ_CHAIN)
            .map_err(err(format!("removing {MASQ_CHAIN}")))?;
    }
    Ok(())
}

/// The node's name when `--node` is not given: its host name, as kubelet and flanneld use.
pub fn host_name() -> anyhow::Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    anyhow::ensure!(rc == 0, "gethostname: {}", std::io::Error::last_os_error());
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8(buf[..end].to_vec()).context("host name is not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_env_as_flanneld_writes_it() {
        let env = SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.3.0/24".parse().unwrap(),
            mtu: 1450,
            ip_masq: true,
        };
        assert_eq!(
            env.text(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
    }
}

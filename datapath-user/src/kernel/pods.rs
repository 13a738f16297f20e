//! The pod veths' hooks: the pod program pinned once, attached to each pod's host-side veth
//! (by the CNI plugin, and again by the agent after an upgrade), and detached on DEL.
use std::path::{Path, PathBuf};

use aya::{
    Ebpf,
    programs::{SchedClassifier, TcAttachType},
};
use maps_common::prog_names;

use aya::programs::tc;

use super::loader::{LoadError, TcAttach, attach_classifier, create_parent, program};
use super::pin_tree;

/// The two hooks on a pod's host-side veth: what the pod sends (ingress) and what the host
/// sends into the pod (egress).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodHook {
    /// `tc_pod_ingress`: BPF host routing of the pod's packets.
    Ingress,
    /// `tc_pod_egress`: records the flows netfilter let through to the pod.
    Egress,
}

impl PodHook {
    pub const ALL: [Self; 2] = [Self::Ingress, Self::Egress];

    pub fn program(self) -> &'static str {
        match self {
            Self::Ingress => prog_names::TC_POD_INGRESS,
            Self::Egress => prog_names::TC_POD_EGRESS,
        }
    }

    fn kind(self) -> TcAttachType {
        match self {
            Self::Ingress => TcAttachType::Ingress,
            Self::Egress => TcAttachType::Egress,
        }
    }

    /// The folder of its links under `links/`: the ingress hook's kept the first release's name.
    fn links_dir(self) -> &'static str {
        match self {
            Self::Ingress => "pods",
            Self::Egress => "pods-egress",
        }
    }
}

/// Where a pod program is pinned for the CNI plugin to attach.
pub fn pod_prog_pin_path(pin_dir: &Path, hook: PodHook) -> PathBuf {
    pin_dir.join(pin_tree::PROGS).join(hook.program())
}

/// Where the link of a pod program on host-side interface `ifname` is pinned.
pub fn pod_link_pin_path(pin_dir: &Path, hook: PodHook, ifname: &str) -> PathBuf {
    pin_dir
        .join(pin_tree::LINKS)
        .join(hook.links_dir())
        .join(ifname)
}

/// Loads the pod programs and pins them, replacing what an earlier agent pinned, so the CNI
/// plugin attaches this agent's programs to new pods.
pub fn pin_pod_programs(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<(), LoadError> {
    for hook in PodHook::ALL {
        let name = hook.program();
        let path = pod_prog_pin_path(pin_dir, hook);
        let prog: &mut SchedClassifier = program(ebpf, name)?;
        if prog.fd().is_err() {
            prog.load().map_err(|e| LoadError::Program(name, e))?;
        }
        create_parent(&path)?;
        let _ = std::fs::remove_file(&path);
        prog.pin(&path)
            .map_err(|source| LoadError::Pin { path, source })?;
    }
    Ok(())
}

/// Attaches the pinned pod programs at TC ingress and egress of a pod's host-side interface
/// and pins the links (the CNI plugin's ADD). Earlier links of that interface are replaced in
/// place. An agent older than the egress hook pinned no program for it: that pod keeps only
/// the ingress hook, and its inbound flows take the host's stack.
pub fn attach_pod(pin_dir: &Path, ifname: &str, tc_mode: TcAttach) -> Result<(), LoadError> {
    for hook in PodHook::ALL {
        let name = hook.program();
        let prog_path = pod_prog_pin_path(pin_dir, hook);
        if hook == PodHook::Egress && !prog_path.exists() {
            continue;
        }
        let prog_err = |e| LoadError::Program(name, e);
        let mut prog = SchedClassifier::from_pin(prog_path).map_err(prog_err)?;
        let path = pod_link_pin_path(pin_dir, hook, ifname);
        attach_classifier(&mut prog, name, ifname, hook.kind(), tc_mode, &path)?;
    }
    Ok(())
}

/// Puts this agent's pod programs into every pod's hooks (their links, or their netlink
/// filters on `netlink_ifaces`), in place: after an upgrade the old programs would use the old
/// maps. Pods an earlier agent hooked at ingress only get the egress hook too. Returns how
/// many pods.
pub fn reattach_pods(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    tc_mode: TcAttach,
    netlink_ifaces: &[String],
) -> Result<usize, LoadError> {
    let ifaces: Vec<String> = if tc_mode.resolve() == TcAttach::Netlink {
        netlink_ifaces.to_vec()
    } else {
        std::fs::read_dir(
            pin_dir
                .join(pin_tree::LINKS)
                .join(PodHook::Ingress.links_dir()),
        )
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
    };
    for hook in PodHook::ALL {
        let name = hook.program();
        let prog: &mut SchedClassifier = program(ebpf, name)?;
        for ifname in &ifaces {
            let path = pod_link_pin_path(pin_dir, hook, ifname);
            attach_classifier(prog, name, ifname, hook.kind(), tc_mode, &path)?;
        }
    }
    Ok(ifaces.len())
}

/// Removes the pinned links of a pod's interface, detaching the programs (the CNI's DEL).
pub fn detach_pod(pin_dir: &Path, ifname: &str) {
    for hook in PodHook::ALL {
        let _ = std::fs::remove_file(pod_link_pin_path(pin_dir, hook, ifname));
        let _ = tc::qdisc_detach_program(ifname, hook.kind(), hook.program());
    }
}

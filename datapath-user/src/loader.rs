//! Loads the embedded kernel object, attaches its programs to the underlay interface and pins
//! maps and links under one directory, adopting what an earlier agent left there.
use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        xdp::XdpLink,
    },
    sys::SyscallError,
};
use maps_common::{map_names, prog_names};

/// The kernel object, built by build.rs from `datapath-ebpf`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/datapath"));

/// Default pin directory: one tree the agent owns.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/datapath";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the kernel object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {0}: {1}")]
    Program(&'static str, #[source] aya::programs::ProgramError),
    #[error("program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{0} holds no bpffs, and one mounted there by this process would be private to its mount namespace: the pins, and the one-agent-per-node lock with them, would vanish when it exits. Mount bpffs on the host first (`mount -t bpf bpf /sys/fs/bpf`; in a DaemonSet, the `datapath mount-bpffs` init container with mountPropagation: Bidirectional, as deploy/daemonset.yaml does), then give the agent that mount (mountPropagation: HostToContainer)"
    )]
    PrivateBpffs(PathBuf),
}

/// Where the decapsulation program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DecapHook {
    /// XDP in the driver where it runs natively and keeps GSO/GRO (physical NICs), TC
    /// elsewhere (veth and other virtual devices, drivers without native XDP).
    Auto,
    /// XDP on the underlay interface.
    Xdp,
    /// TC ingress on the underlay interface.
    Tc,
}

impl DecapHook {
    fn program(self) -> &'static str {
        match self {
            Self::Xdp | Self::Auto => prog_names::XDP_DECAP_INGRESS,
            Self::Tc => prog_names::TC_DECAP_INGRESS,
        }
    }
}

/// How the TC programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttach {
    /// tcx where the kernel has it (6.6 and later), netlink TC (clsact) before.
    Auto,
    /// tcx links, pinned: the kernel's newest TC attachment.
    Tcx,
    /// A clsact qdisc and a direct-action cls_bpf filter at a fixed priority and handle, which
    /// a restarted agent replaces in place: kernels before 6.6 (Debian 12, Ubuntu 22.04, RHEL 9).
    Netlink,
}

impl TcAttach {
    /// `Auto` resolved for the running kernel.
    pub fn resolve(self) -> Self {
        match self {
            Self::Auto => match aya::util::KernelVersion::current() {
                Ok(v) if v >= aya::util::KernelVersion::new(6, 6, 0) => Self::Tcx,
                _ => Self::Netlink,
            },
            other => other,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Tcx => "tcx",
            Self::Netlink => "netlink",
        }
    }
}

/// Priority and handle of the agent's netlink TC filters: fixed, so a restarted agent finds and
/// replaces its own filter instead of adding a second.
const NL_PRIORITY: u16 = 1;
const NL_HANDLE: TcHandle = TcHandle::new(0, 0xd47);

/// Settings fixed when the object is loaded.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Entries of the per-node maps.
    pub max_nodes: u32,
    /// aya-log level of the kernel programs (0 = off ... 5 = trace).
    pub log_level: u8,
    /// Pin maps here (reusing pins that exist). `None`: nothing is pinned (tests, benchmarks).
    pub pin_dir: Option<PathBuf>,
    /// The maps' directory under `pin_dir`: `maps`, or `maps-pending` while migrating.
    pub maps_dir: &'static str,
}

pub fn map_pin_path(pin_dir: &Path, map: &str) -> PathBuf {
    pin_dir.join("maps").join(map)
}

pub fn link_pin_path(pin_dir: &Path, prog: &str) -> PathBuf {
    pin_dir.join("links").join(prog)
}

/// Where bpffs is conventionally mounted; the default pin directory lies under it.
const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Makes sure `dir` is on a bpffs: mounts the conventional one first when `dir` lies under it
/// (nothing can be created there before), otherwise mounts one on `dir` itself if needed.
pub fn ensure_bpffs(dir: &Path) -> Result<(), LoadError> {
    let root = Path::new(BPFFS_ROOT);
    if dir.starts_with(root) && !is_bpffs(root)? {
        mount_lasting_bpffs(root)?;
    }
    std::fs::create_dir_all(dir).map_err(|source| LoadError::Io {
        what: "creating",
        path: dir.to_path_buf(),
        source,
    })?;
    if !is_bpffs(dir)? {
        mount_lasting_bpffs(dir)?;
    }
    Ok(())
}

/// Capabilities the agent cannot work without: (bit in `CapEff`, name). CAP_SYS_ADMIN stands
/// in for CAP_BPF and CAP_PERFMON on kernels before 5.8.
const NEEDED_CAPS: [(u32, &str); 3] = [
    (NET_ADMIN, "CAP_NET_ADMIN"),
    (39, "CAP_BPF"),
    (38, "CAP_PERFMON"),
];
const NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;

/// Refuses to start without the capabilities to load, pin and attach programs, naming those
/// missing, instead of failing later on the first map with a bare "Operation not permitted".
pub fn check_privileges() -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let Some(eff) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
    else {
        return Ok(());
    };
    let has = |bit: u32| eff & (1u64 << bit) != 0;
    // CAP_SYS_ADMIN grants what CAP_BPF and CAP_PERFMON do, not CAP_NET_ADMIN.
    let granted = |bit: u32| has(bit) || (bit != NET_ADMIN && has(CAP_SYS_ADMIN));
    let missing: Vec<&str> = NEEDED_CAPS
        .iter()
        .filter(|(bit, _)| !granted(*bit))
        .map(|(_, name)| *name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "the agent needs root, or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (CAP_SYS_ADMIN before kernel 5.8); this process lacks {}: run it with sudo, or grant them as deploy/daemonset.yaml does",
        missing.join(", ")
    )
}

/// Mounts bpffs on `dir` unless one is there already (`datapath mount-bpffs`, the DaemonSet's
/// init container). Returns whether it mounted one.
pub fn mount_bpffs_once(dir: &Path) -> Result<bool, LoadError> {
    std::fs::create_dir_all(dir).map_err(|source| LoadError::Io {
        what: "creating",
        path: dir.to_path_buf(),
        source,
    })?;
    if is_bpffs(dir)? {
        return Ok(false);
    }
    mount_lasting_bpffs(dir)?;
    Ok(true)
}

/// Mounts bpffs on `dir`, and takes it down again with `PrivateBpffs` when it would not
/// outlive this process: a mount that is neither in the host's mount namespace nor shared
/// with another (propagated) exists only as long as this process's namespace.
fn mount_lasting_bpffs(dir: &Path) -> Result<(), LoadError> {
    mount_bpffs(dir)?;
    if in_hosts_mount_namespace() || mount_is_shared(dir) {
        return Ok(());
    }
    let c = c_path(dir)?;
    // SAFETY: umount2 on a NUL-terminated path this function just mounted.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    Err(LoadError::PrivateBpffs(dir.to_path_buf()))
}

/// Whether this process shares the mount namespace of the host's init (PID 1 of the PID
/// namespace it sees, when that is not this process: in a container PID 1 is its own).
fn in_hosts_mount_namespace() -> bool {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    std::process::id() != 1 && ns("1").is_some() && ns("1") == ns("self")
}

/// Whether the mount at `dir` (the last one there in `/proc/self/mountinfo`) propagates to
/// a peer group (`shared:N`), and so to the namespace it was shared from.
fn mount_is_shared(dir: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let target = dir.to_string_lossy().replace(' ', "\\040");
    info.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            (fields.get(4) == Some(&target.as_str())).then_some(fields)
        })
        .next_back()
        .is_some_and(|fields| {
            fields[6..]
                .iter()
                .take_while(|f| **f != "-")
                .any(|f| f.starts_with("shared:"))
        })
}

fn c_path(dir: &Path) -> Result<std::ffi::CString, LoadError> {
    std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|e| LoadError::Io {
        what: "path",
        path: dir.to_path_buf(),
        source: io::Error::other(e),
    })
}

fn is_bpffs(dir: &Path) -> Result<bool, LoadError> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let c = c_path(dir)?;
    // SAFETY: statfs on a NUL-terminated path into a zeroed struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(LoadError::Io {
            what: "statfs",
            path: dir.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

fn mount_bpffs(dir: &Path) -> Result<(), LoadError> {
    let c = c_path(dir)?;
    let fstype = c"bpf";
    // SAFETY: mount(2) with NUL-terminated strings.
    if unsafe {
        libc::mount(
            fstype.as_ptr(),
            c.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(LoadError::Io {
            what: "mounting bpffs on",
            path: dir.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Loads the object: maps sized for `max_nodes`, kernel log level set, maps pinned (or reused
/// from their pins) when a pin directory is given.
pub fn load(opts: &LoadOptions) -> Result<Ebpf, LoadError> {
    let mut loader = EbpfLoader::new();
    for map in [
        map_names::POD_CIDRS,
        map_names::POD_ROUTES,
        map_names::NODES,
        map_names::PEER_STATS,
        map_names::NEXTHOPS,
    ] {
        loader.map_max_entries(map, opts.max_nodes);
    }
    loader.override_global(aya_log::LEVEL, &opts.log_level, false);
    let paths: Vec<(&str, PathBuf)> = match &opts.pin_dir {
        Some(dir) => {
            let maps_dir = dir.join(opts.maps_dir);
            std::fs::create_dir_all(&maps_dir).map_err(|source| LoadError::Io {
                what: "creating",
                path: maps_dir.clone(),
                source,
            })?;
            map_names::ALL
                .iter()
                .map(|m| (*m, maps_dir.join(m)))
                .collect()
        }
        None => Vec::new(),
    };
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    Ok(loader.load(OBJECT)?)
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(|e| LoadError::Program(name, e))
}

/// Opens the link pinned at `path`, `None` when there is none.
fn pinned_link(path: &Path) -> Result<Option<FdLink>, LoadError> {
    match PinnedLink::from_pin(path) {
        Ok(p) => Ok(Some(FdLink::from(p))),
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(source) => Err(LoadError::Link {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Creates the directory `path` is to be pinned in.
fn create_parent(path: &Path) -> Result<(), LoadError> {
    match path.parent() {
        Some(parent) => std::fs::create_dir_all(parent).map_err(|source| LoadError::Io {
            what: "creating",
            path: parent.to_path_buf(),
            source,
        }),
        None => Ok(()),
    }
}

/// Pins `link` at `path`, replacing an older pin of the same link.
fn repin(link: FdLink, path: &Path) -> Result<(), LoadError> {
    create_parent(path)?;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(LoadError::Io {
                what: "removing",
                path: path.to_path_buf(),
                source,
            });
        }
    }
    link.pin(path).map(drop).map_err(|source| LoadError::Pin {
        path: path.to_path_buf(),
        source,
    })
}

/// Attaches the encapsulation program at TC egress and the decapsulation program at `decap`
/// on `iface`, and pins the links under `pin_dir` so the datapath keeps forwarding when the
/// agent stops. A link an earlier agent pinned is taken over by atomically replacing its program
/// (no packet sees a detached hook); a pin of the decap hook not chosen is removed, detaching it.
/// `Auto` on a `virtual_dev` is TC; otherwise native (driver) XDP, and TC where the driver has
/// none. Returns the hook used and why.
pub fn attach(
    ebpf: &mut Ebpf,
    iface: &str,
    decap: DecapHook,
    virtual_dev: bool,
    tc_mode: TcAttach,
    pin_dir: &Path,
) -> Result<(DecapHook, &'static str), LoadError> {
    let tc_at = |ebpf: &mut Ebpf, name, kind| attach_tc(ebpf, iface, name, kind, tc_mode, pin_dir);
    tc_at(ebpf, prog_names::TC_ENCAP_EGRESS, TcAttachType::Egress)?;
    let (hook, why) = match decap {
        DecapHook::Auto if virtual_dev => (
            DecapHook::Tc,
            "virtual device (veth): XDP there would turn off GSO on its peer",
        ),
        DecapHook::Auto => match attach_xdp(ebpf, iface, XdpMode::Driver, pin_dir) {
            Ok(()) => {
                detach_other(pin_dir, DecapHook::Xdp);
                return Ok((DecapHook::Xdp, "the driver runs XDP natively"));
            }
            Err(_) => (DecapHook::Tc, "the driver has no native XDP"),
        },
        other => (other, "asked for"),
    };
    detach_other(pin_dir, hook);
    match hook {
        DecapHook::Tc => tc_at(ebpf, prog_names::TC_DECAP_INGRESS, TcAttachType::Ingress)?,
        _ => {
            let _ = tc::qdisc_detach_program(
                iface,
                TcAttachType::Ingress,
                prog_names::TC_DECAP_INGRESS,
            );
            attach_xdp(ebpf, iface, XdpMode::default(), pin_dir)?
        }
    }
    Ok((hook, why))
}

/// Removes the pinned link of the decap hook other than `hook`, detaching it.
fn detach_other(pin_dir: &Path, hook: DecapHook) {
    let other = match hook {
        DecapHook::Tc => DecapHook::Xdp.program(),
        _ => DecapHook::Tc.program(),
    };
    let _ = std::fs::remove_file(link_pin_path(pin_dir, other));
}

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
    pin_dir.join("progs").join(hook.program())
}

/// Where the link of a pod program on host-side interface `ifname` is pinned.
pub fn pod_link_pin_path(pin_dir: &Path, hook: PodHook, ifname: &str) -> PathBuf {
    pin_dir.join("links").join(hook.links_dir()).join(ifname)
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
        std::fs::read_dir(pin_dir.join("links").join(PodHook::Ingress.links_dir()))
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

/// Removes the agent's netlink TC filters from `iface` (they have no pins to remove): the
/// underlay's and a pod veth's.
pub fn detach_netlink_filters(iface: &str) {
    for (kind, name) in [
        (TcAttachType::Egress, prog_names::TC_ENCAP_EGRESS),
        (TcAttachType::Ingress, prog_names::TC_DECAP_INGRESS),
        (TcAttachType::Ingress, prog_names::TC_POD_INGRESS),
        (TcAttachType::Egress, prog_names::TC_POD_EGRESS),
    ] {
        let _ = tc::qdisc_detach_program(iface, kind, name);
    }
}

/// Attaches the drop program at TC ingress of the checksum path's kernel VXLAN device `dev`
/// (see `net::CSUM_DEV`) and pins the link. `fresh`: the device was just created, so a pinned
/// link belongs to a device that is gone and is dropped first.
pub fn attach_csum_dev(
    ebpf: &mut Ebpf,
    dev: &str,
    fresh: bool,
    tc_mode: TcAttach,
    pin_dir: &Path,
) -> Result<(), LoadError> {
    if fresh {
        detach_csum_dev(pin_dir);
    }
    attach_tc(
        ebpf,
        dev,
        prog_names::TC_CSUM_DEV_INGRESS,
        TcAttachType::Ingress,
        tc_mode,
        pin_dir,
    )
}

/// Removes the pinned link of the checksum device's drop program, if any.
pub fn detach_csum_dev(pin_dir: &Path) {
    let _ = std::fs::remove_file(link_pin_path(pin_dir, prog_names::TC_CSUM_DEV_INGRESS));
}

fn link_err(path: &Path) -> impl Fn(LinkError) -> LoadError + '_ {
    move |source| LoadError::Link {
        path: path.to_path_buf(),
        source,
    }
}

/// Pins a link taken from a program at `path` (see `repin`).
fn pin_link<L>(link: L, path: &Path) -> Result<(), LoadError>
where
    FdLink: TryFrom<L, Error = LinkError>,
{
    repin(FdLink::try_from(link).map_err(link_err(path))?, path)
}

/// Loads the TC program `name` and attaches it at `kind` on `iface` (see `attach_classifier`).
fn attach_tc(
    ebpf: &mut Ebpf,
    iface: &str,
    name: &'static str,
    kind: TcAttachType,
    tc_mode: TcAttach,
    pin_dir: &Path,
) -> Result<(), LoadError> {
    let path = link_pin_path(pin_dir, name);
    let prog: &mut SchedClassifier = program(ebpf, name)?;
    if prog.fd().is_err() {
        prog.load().map_err(|e| LoadError::Program(name, e))?;
    }
    attach_classifier(prog, name, iface, kind, tc_mode, &path)
}

/// Attaches a loaded TC program. tcx: in place of the program of the link pinned at `path`
/// (an earlier agent's), else newly, the link pinned. Netlink: in place of the filter at the
/// agent's fixed priority and handle, else newly (a clsact qdisc added first); the filter
/// outlives this process, as a pinned link would. Either way no packet sees an empty hook, and
/// what the other mode left is removed.
fn attach_classifier(
    prog: &mut SchedClassifier,
    name: &'static str,
    iface: &str,
    kind: TcAttachType,
    tc_mode: TcAttach,
    path: &Path,
) -> Result<(), LoadError> {
    let prog_err = |e| LoadError::Program(name, e);
    if tc_mode.resolve() == TcAttach::Netlink {
        let _ = std::fs::remove_file(path);
        let _ = tc::qdisc_add_clsact(iface);
        let existing = SchedClassifierLink::attached(iface, kind, NL_PRIORITY, NL_HANDLE, None)
            .ok()
            .and_then(|link| prog.attach_to_link(link).ok());
        let id = match existing {
            Some(id) => id,
            None => {
                let opts = NlOptions {
                    priority: NL_PRIORITY,
                    handle: NL_HANDLE,
                    ..NlOptions::default()
                };
                prog.attach_with_options(iface, kind, TcAttachOptions::Netlink(opts))
                    .map_err(prog_err)?
            }
        };
        // Dropping the link would remove the filter: it must outlive this process.
        std::mem::forget(prog.take_link(id).map_err(prog_err)?);
        return Ok(());
    }
    let _ = tc::qdisc_detach_program(iface, kind, name);
    let id = match pinned_link(path)? {
        Some(old) => {
            prog.attach_to_link(SchedClassifierLink::try_from(old).map_err(link_err(path))?)
        }
        None => {
            prog.attach_with_options(iface, kind, TcAttachOptions::TcxOrder(LinkOrder::default()))
        }
    }
    .map_err(prog_err)?;
    pin_link(prog.take_link(id).map_err(prog_err)?, path)
}

/// The same for the XDP decapsulation program, in `mode` when newly attached.
fn attach_xdp(
    ebpf: &mut Ebpf,
    iface: &str,
    mode: XdpMode,
    pin_dir: &Path,
) -> Result<(), LoadError> {
    let name = prog_names::XDP_DECAP_INGRESS;
    let path = link_pin_path(pin_dir, name);
    let prog_err = |e| LoadError::Program(name, e);
    let prog: &mut Xdp = program(ebpf, name)?;
    if prog.fd().is_err() {
        prog.load().map_err(prog_err)?;
    }
    let id = match pinned_link(&path)? {
        Some(old) => prog.attach_to_link(XdpLink::try_from(old).map_err(link_err(&path))?),
        None => prog.attach(iface, mode),
    }
    .map_err(prog_err)?;
    pin_link(prog.take_link(id).map_err(prog_err)?, &path)
}

/// Removes every pin under `pin_dir` (links first, so the hooks detach, then programs, then
/// maps) and the directories themselves. Returns what it removed.
pub fn remove_pins(pin_dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let mut removed = Vec::new();
    for sub in [
        "links/pods",
        "links/pods-egress",
        "links",
        "progs",
        "maps",
        "maps-pending",
        "maps-old",
    ] {
        let dir = pin_dir.join(sub);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(LoadError::Io {
                    what: "reading",
                    path: dir,
                    source,
                });
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                continue;
            }
            std::fs::remove_file(&path).map_err(|source| LoadError::Io {
                what: "removing",
                path: path.clone(),
                source,
            })?;
            removed.push(path);
        }
        let _ = std::fs::remove_dir(&dir);
    }
    let _ = std::fs::remove_dir(pin_dir);
    Ok(removed)
}

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

use super::{PathIo, pin_tree};

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
    #[error(transparent)]
    Io(#[from] PathIo),
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
    /// The `maps_common::decap_hook` code `DP_AGENT` records for a hook in use.
    pub fn code(self) -> u8 {
        match self {
            Self::Xdp | Self::Auto => maps_common::decap_hook::XDP,
            Self::Tc => maps_common::decap_hook::TC,
        }
    }

    /// The hook a `DP_AGENT` code records.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            maps_common::decap_hook::XDP => Some(Self::Xdp),
            maps_common::decap_hook::TC => Some(Self::Tc),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Xdp => "xdp",
            Self::Tc => "tc",
        }
    }

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
    /// The `maps_common::tc_attach` code `DP_AGENT` records for a resolved mode.
    pub fn code(self) -> u8 {
        match self.resolve() {
            Self::Netlink => maps_common::tc_attach::NETLINK,
            _ => maps_common::tc_attach::TCX,
        }
    }

    /// The mode a `DP_AGENT` code records.
    pub fn from_code(code: u8) -> Self {
        if code == maps_common::tc_attach::NETLINK {
            Self::Netlink
        } else {
            Self::Tcx
        }
    }

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
    pin_dir.join(pin_tree::MAPS).join(map)
}

pub fn link_pin_path(pin_dir: &Path, prog: &str) -> PathBuf {
    pin_dir.join(pin_tree::LINKS).join(prog)
}

/// Where bpffs is conventionally mounted; the default pin directory lies under it.
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
        map_names::HEALTH,
        map_names::POD_CIDRS6,
        map_names::NODES6,
        map_names::HEALTH6,
    ] {
        loader.map_max_entries(map, opts.max_nodes);
    }
    loader.override_global(aya_log::LEVEL, &opts.log_level, false);
    let paths: Vec<(&str, PathBuf)> = match &opts.pin_dir {
        Some(dir) => {
            let maps_dir = dir.join(opts.maps_dir);
            std::fs::create_dir_all(&maps_dir).map_err(|source| {
                LoadError::Io(PathIo {
                    what: "creating",
                    path: maps_dir.clone(),
                    source,
                })
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

pub(super) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(|e| LoadError::Program(name, e))
}

/// Opens the link pinned at `path`, `None` when there is none.
pub(super) fn pinned_link(path: &Path) -> Result<Option<FdLink>, LoadError> {
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
pub(super) fn create_parent(path: &Path) -> Result<(), LoadError> {
    match path.parent() {
        Some(parent) => std::fs::create_dir_all(parent).map_err(|source| {
            LoadError::Io(PathIo {
                what: "creating",
                path: parent.to_path_buf(),
                source,
            })
        }),
        None => Ok(()),
    }
}

/// Pins `link` at `path`, replacing an older pin of the same link.
pub(super) fn repin(link: FdLink, path: &Path) -> Result<(), LoadError> {
    create_parent(path)?;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(LoadError::Io(PathIo {
                what: "removing",
                path: path.to_path_buf(),
                source,
            }));
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

pub(super) fn link_err(path: &Path) -> impl Fn(LinkError) -> LoadError + '_ {
    move |source| LoadError::Link {
        path: path.to_path_buf(),
        source,
    }
}

/// Pins a link taken from a program at `path` (see `repin`).
pub(super) fn pin_link<L>(link: L, path: &Path) -> Result<(), LoadError>
where
    FdLink: TryFrom<L, Error = LinkError>,
{
    repin(FdLink::try_from(link).map_err(link_err(path))?, path)
}

/// Loads the TC program `name` and attaches it at `kind` on `iface` (see `attach_classifier`).
pub(super) fn attach_tc(
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
pub(super) fn attach_classifier(
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
        pin_tree::LINKS,
        pin_tree::PROGS,
        pin_tree::MAPS,
        pin_tree::MAPS_PENDING,
        pin_tree::MAPS_OLD,
    ] {
        let dir = pin_dir.join(sub);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(LoadError::Io(PathIo {
                    what: "reading",
                    path: dir,
                    source,
                }));
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                continue;
            }
            std::fs::remove_file(&path).map_err(|source| {
                LoadError::Io(PathIo {
                    what: "removing",
                    path: path.clone(),
                    source,
                })
            })?;
            removed.push(path);
        }
        let _ = std::fs::remove_dir(&dir);
    }
    let _ = std::fs::remove_dir(pin_dir);
    Ok(removed)
}

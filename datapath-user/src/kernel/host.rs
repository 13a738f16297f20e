//! The host as the agent needs it: bpffs mounted where pins outlive the agent (never a mount
//! private to a container's namespace), and the capabilities to load and attach programs.
use std::{
    io,
    path::{Path, PathBuf},
};

use super::PathIo;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Io(#[from] PathIo),
    #[error(
        "{0} holds no bpffs, and one mounted there by this process would be private to its mount namespace: the pins, and the one-agent-per-node lock with them, would vanish when it exits. Mount bpffs on the host first (`mount -t bpf bpf /sys/fs/bpf`; in a DaemonSet, the `datapath mount-bpffs` init container with mountPropagation: Bidirectional, as deploy/daemonset.yaml does), then give the agent that mount (mountPropagation: HostToContainer)"
    )]
    PrivateBpffs(PathBuf),
}

const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Makes sure `dir` is on a bpffs: mounts the conventional one first when `dir` lies under it
/// (nothing can be created there before), otherwise mounts one on `dir` itself if needed.
pub fn ensure_bpffs(dir: &Path) -> Result<(), HostError> {
    let root = Path::new(BPFFS_ROOT);
    if dir.starts_with(root) && !is_bpffs(root)? {
        mount_lasting_bpffs(root)?;
    }
    create_dir(dir)?;
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

fn create_dir(dir: &Path) -> Result<(), PathIo> {
    std::fs::create_dir_all(dir).map_err(|source| PathIo {
        what: "creating",
        path: dir.to_path_buf(),
        source,
    })
}

/// Mounts bpffs on `dir` unless one is there already (`datapath mount-bpffs`, the DaemonSet's
/// init container). Returns whether it mounted one.
pub fn mount_bpffs_once(dir: &Path) -> Result<bool, HostError> {
    create_dir(dir)?;
    if is_bpffs(dir)? {
        return Ok(false);
    }
    mount_lasting_bpffs(dir)?;
    Ok(true)
}

/// Mounts bpffs on `dir`, and takes it down again with `PrivateBpffs` when it would not
/// outlive this process: a mount that is neither in the host's mount namespace nor shared
/// with another (propagated) exists only as long as this process's namespace.
fn mount_lasting_bpffs(dir: &Path) -> Result<(), HostError> {
    mount_bpffs(dir)?;
    if in_hosts_mount_namespace() || mount_is_shared(dir) {
        return Ok(());
    }
    let c = c_path(dir)?;
    // SAFETY: umount2 on a NUL-terminated path this function just mounted.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    Err(HostError::PrivateBpffs(dir.to_path_buf()))
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

fn c_path(dir: &Path) -> Result<std::ffi::CString, HostError> {
    std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|e| {
        HostError::Io(PathIo {
            what: "path",
            path: dir.to_path_buf(),
            source: io::Error::other(e),
        })
    })
}

fn is_bpffs(dir: &Path) -> Result<bool, HostError> {
    let c = c_path(dir)?;
    // SAFETY: statfs on a NUL-terminated path into a zeroed struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(HostError::Io(PathIo {
            what: "statfs",
            path: dir.to_path_buf(),
            source: io::Error::last_os_error(),
        }));
    }
    Ok(st.f_type == libc::BPF_FS_MAGIC)
}

fn mount_bpffs(dir: &Path) -> Result<(), HostError> {
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
        return Err(HostError::Io(PathIo {
            what: "mounting bpffs on",
            path: dir.to_path_buf(),
            source: io::Error::last_os_error(),
        }));
    }
    Ok(())
}

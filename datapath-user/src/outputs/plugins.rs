//! Installing the reference CNI plugins the image carries (Debian's ptp, host-local, portmap)
//! onto a node that lacks them, as Flannel's install-cni-plugin does: each with the C library
//! and loader it was built against, so it runs whatever the host's glibc.
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use super::{cni::REFERENCE_PLUGINS, write_atomic};

/// Where the plugins' own loader and C library go, below the CNI bin directory.
pub const LIB_DIR: &str = "datapath-plugins";
/// The loader and the one library Debian's plugins link (`xtask image` checks that).
const LIBS: [&str; 2] = [
    "lib64/ld-linux-x86-64.so.2",
    "lib/x86_64-linux-gnu/libc.so.6",
];

/// What `install` did with one plugin.
#[derive(Debug, PartialEq, Eq)]
pub enum Installed {
    /// Written (a launcher in `to`, the binary and its libraries below it).
    Written(PathBuf),
    /// The node has one already: left as it is.
    Present(PathBuf),
}

/// Installs each reference plugin missing from `to`, from `from` (the image's plugin
/// directory), with the loader and C library found under `root` (the image's `/`).
pub fn install(root: &Path, from: &Path, to: &Path) -> anyhow::Result<Vec<Installed>> {
    let libs = to.join(LIB_DIR);
    fs::create_dir_all(&libs).with_context(|| format!("creating {}", libs.display()))?;
    for lib in LIBS {
        let src = root.join(lib);
        let name = src.file_name().context("a library name")?;
        copy(&src, &libs.join(name), 0o755)?;
    }
    let mut done = Vec::new();
    for name in REFERENCE_PLUGINS {
        let dest = to.join(name);
        if dest.exists() && !is_ours(&dest) {
            done.push(Installed::Present(dest));
            continue;
        }
        copy(&from.join(name), &libs.join(name), 0o755)?;
        write_atomic(&dest, launcher(&libs, name).as_bytes(), 0o755)
            .with_context(|| format!("writing {}", dest.display()))?;
        done.push(Installed::Written(dest));
    }
    Ok(done)
}

/// A launcher that runs the plugin through its own loader and C library.
fn launcher(libs: &Path, name: &str) -> String {
    let l = libs.display();
    format!(
        "#!/bin/sh\n# Installed by `datapath install-cni-plugins`: the reference CNI plugin {name}, run with the\n# C library it was built against ({LIB_DIR}/), whatever the host's.\nexec {l}/ld-linux-x86-64.so.2 --library-path {l} {l}/{name} \"$@\"\n"
    )
}

/// Whether `path` is a launcher this command wrote (it replaces those, never the node's own).
fn is_ours(path: &Path) -> bool {
    fs::read(path)
        .is_ok_and(|b| b.starts_with(b"#!/bin/sh\n# Installed by `datapath install-cni-plugins`"))
}

fn copy(src: &Path, dest: &Path, mode: u32) -> anyhow::Result<()> {
    let bytes = fs::read(src).with_context(|| format!("reading {}", src.display()))?;
    write_atomic(dest, &bytes, mode).with_context(|| format!("writing {}", dest.display()))?;
    Ok(())
}

//! Builds the kernel programs (nightly, bpfel-unknown-none) and leaves the object in OUT_DIR,
//! from where `src/loader.rs` embeds it in the `datapath` binary; records the commit built
//! for `datapath --version`.
use anyhow::Context as _;
use std::{fs, path::PathBuf};

use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    version_with_commit(&manifest_dir);
    let ebpf_dir = std::path::Path::new(&manifest_dir).join("../datapath-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    // The floor programs only for the benchmark: the object a node runs holds none.
    let features: &[&str] = if std::env::var_os("CARGO_FEATURE_BENCH").is_some() {
        &["floor"]
    } else {
        &[]
    };
    build_shared(ebpf_dir, features)
}

/// aya-build compiles the kernel crate, and `core` with it, in a target directory under
/// OUT_DIR, which is new for every profile, feature set and target datapath-user is built
/// with: five times in `cargo xtask test`, each half a minute. Here aya-build is pointed at
/// one directory per architecture and kernel feature set under the workspace's target
/// directory instead (the ancestor of OUT_DIR holding cargo's CACHEDIR.TAG), one build script
/// at a time (a file lock), and the object is copied into this build's OUT_DIR.
fn build_shared(ebpf_dir: &str, features: &[&str]) -> anyhow::Result<()> {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
    let tagged = |d: &&std::path::Path| d.join("CACHEDIR.TAG").exists();
    let nearest = out_dir.ancestors().find(tagged).unwrap_or(&out_dir);
    // A --target build's directory is tagged too, inside the target directory.
    let root = nearest.parent().filter(tagged).unwrap_or(nearest);
    // What the object depends on besides the sources: the target architecture aya-build
    // compiles for (`bpf_target_arch`) and the kernel features.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH")?;
    let set = [arch.as_str()].into_iter().chain(features.iter().copied());
    let shared = root.join("ebpf").join(set.collect::<Vec<_>>().join("-"));
    fs::create_dir_all(&shared).context("creating the shared kernel build directory")?;
    let lock = fs::File::create(shared.join(".lock")).context("creating the build lock")?;
    lock.lock().context("taking the build lock")?;
    // SAFETY: the build script has a single thread here; aya-build reads OUT_DIR to place its
    // target directory and the object, and it is set back right after.
    unsafe { std::env::set_var("OUT_DIR", &shared) };
    let built = aya_build::build_ebpf(
        [Package {
            name: "datapath-ebpf",
            root_dir: ebpf_dir,
            features,
            ..Default::default()
        }],
        Toolchain::default(),
    );
    // SAFETY: as above.
    unsafe { std::env::set_var("OUT_DIR", &out_dir) };
    built?;
    fs::copy(shared.join("datapath"), out_dir.join("datapath"))
        .context("copying the kernel object into OUT_DIR")?;
    Ok(())
}

/// `DATAPATH_VERSION`: the package version and the commit built (with `-dirty` for
/// uncommitted changes), or why there is none (a source archive holds no git history).
fn version_with_commit(manifest_dir: &str) {
    let repo = std::path::Path::new(manifest_dir).join("..");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(c)
            if git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty()) =>
        {
            format!("commit {c}-dirty")
        }
        Some(c) => format!("commit {c}"),
        None => "commit unknown: built outside a git checkout".to_string(),
    };
    println!(
        "cargo:rustc-env=DATAPATH_VERSION={} ({commit})",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        for f in ["HEAD", "index", "packed-refs"] {
            println!("cargo:rerun-if-changed={dir}/{f}");
        }
        if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={dir}/{head_ref}");
        }
    }
}

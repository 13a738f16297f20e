//! Builds the kernel programs (nightly, bpfel-unknown-none) and leaves the object in OUT_DIR,
//! from where `src/loader.rs` embeds it in the `datapath` binary; records the commit built
//! for `datapath --version`.
use anyhow::Context as _;
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
    aya_build::build_ebpf(
        [Package {
            name: "datapath-ebpf",
            root_dir: ebpf_dir,
            features,
            ..Default::default()
        }],
        Toolchain::default(),
    )
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

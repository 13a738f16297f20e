//! What a person runs: `setup` (install what a fresh machine lacks), `demo` (the two-node
//! cluster in namespaces), `test` (lint, unit, BPF_PROG_TEST_RUN and namespace tests).
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod bench;
mod demo;
mod lab;
mod test;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks (idempotent).
    Setup,
    /// Build and run the two-node demo: IPIP then VXLAN, counters, teardown.
    Demo,
    /// Measure native routing, the Linux VXLAN device and this datapath side by side.
    Bench {
        /// Rounds; configurations alternate within each round.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Seconds per figure.
        #[arg(long, default_value_t = 3)]
        secs: u32,
    },
    /// Run fmt, clippy, unit tests, program tests and namespace tests.
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// Build the agent's container image: a statically linked `datapath` on an empty base
    /// (deploy/Containerfile), with buildah.
    Image {
        /// The image's name and tag.
        #[arg(long, default_value = "localhost/datapath:0.1.0")]
        tag: String,
    },
}

const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "tcpdump",
    "tshark",
    "iperf3",
    "sockperf",
    "bpftool",
    "python3-scapy",
    "curl",
    "ethtool",
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    "containernetworking-plugins",
    "iptables",
    "python3-prometheus-client",
    "podman",
    "buildah",
    // The agents' BGP speaker (BIRD 2, as Calico's), and FRR: the BGP tests' fabric, another
    // implementation than the agents'.
    "bird2",
    "frr",
];

/// Where `bpf-linker` is built against the nightly toolchain's own LLVM.
const LLVM_SHIM: &str = "/root/.cache/datapath-llvm";

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Demo => {
            setup()?;
            build()?;
            demo::run(&workspace().join("target/debug/datapath"))
        }
        Cmd::Bench { rounds, secs } => {
            setup()?;
            bench::check_tools()?;
            run(cargo().args(["build", "--quiet", "--release", "-p", "datapath-user"]))?;
            // Apart: built together, datapath-user would get the bench feature too.
            run(cargo().args(["build", "--quiet", "--release", "-p", "datapath-bench"]))?;
            bench::run(&workspace().join("target/release/datapath"), rounds, secs)
        }
        Cmd::Image { tag } => {
            setup()?;
            image(&tag)
        }
        Cmd::Test { filter } => {
            setup()?;
            test::run(filter.as_deref())
        }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn quiet_ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn setup() -> Result<()> {
    let mut did = Vec::new();

    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !quiet_ok(Command::new("dpkg").args(["-s", p])))
        .collect();
    if !missing.is_empty() {
        println!("setup: installing Debian packages: {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        did.push("Debian packages");
    }

    let toolchains = String::from_utf8_lossy(
        &Command::new("rustup")
            .args(["toolchain", "list"])
            .output()?
            .stdout,
    )
    .into_owned();
    if !toolchains.contains("nightly") {
        println!("setup: installing the nightly toolchain");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
        did.push("nightly toolchain");
    }
    let components = String::from_utf8_lossy(
        &Command::new("rustup")
            .args(["component", "list", "--installed", "--toolchain", "nightly"])
            .output()?
            .stdout,
    )
    .into_owned();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: adding rust-src to the nightly toolchain (for -Z build-std=core)");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
        did.push("rust-src");
    }

    if !quiet_ok(Command::new("bpf-linker").arg("--version")) {
        let sysroot = String::from_utf8(
            Command::new("rustc")
                .args(["+nightly", "--print", "sysroot"])
                .output()?
                .stdout,
        )?;
        let lib = Path::new(sysroot.trim()).join("lib");
        let llvm = std::fs::read_dir(&lib)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("libLLVM.so."))
            .context("nightly toolchain has no libLLVM.so.*")?;
        let major = llvm
            .trim_start_matches("libLLVM.so.")
            .split('.')
            .next()
            .unwrap_or("22")
            .to_string();
        let shim = Path::new(LLVM_SHIM).join("lib");
        std::fs::create_dir_all(&shim)?;
        for name in ["libLLVM.so".to_string(), llvm.clone()] {
            let link = shim.join(&name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(lib.join(&llvm), &link)?;
        }
        println!(
            "setup: building bpf-linker against the nightly toolchain's LLVM {major} (about a minute)"
        );
        run(Command::new("cargo")
            .args([
                "+nightly",
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", LLVM_SHIM))?;
        did.push("bpf-linker");
    }

    // FRR's daemons run as root in the BGP tests, and refuse to unless root is in its vty group.
    let groups = Command::new("id").args(["-nG", "root"]).output()?.stdout;
    if !String::from_utf8_lossy(&groups)
        .split_whitespace()
        .any(|g| g == "frrvty")
    {
        println!("setup: adding root to FRR's frrvty group (the BGP tests run FRR as root)");
        run(Command::new("usermod").args(["-aG", "frrvty", "root"]))?;
        did.push("frrvty group");
    }

    if !quiet_ok(Command::new("kubernetes-validate").arg("--version")) {
        println!("setup: installing kubernetes-validate (PyPI) to check deploy/ offline");
        run(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "kubernetes-validate",
        ]))?;
        did.push("kubernetes-validate");
    }

    if did.is_empty() {
        println!("setup: nothing to do (packages, nightly rust-src, bpf-linker all present)");
    } else {
        println!("setup: done ({})", did.join(", "));
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(workspace());
    c
}

/// The statically linked agent (glibc, `crt-static`): what the image holds.
const STATIC_BIN: &str = "target/x86_64-unknown-linux-gnu/release/datapath";

/// Builds the static agent and the image `tag` from deploy/Containerfile.
fn image(tag: &str) -> Result<()> {
    run(cargo()
        .args([
            "build",
            "--quiet",
            "--release",
            "--target",
            "x86_64-unknown-linux-gnu",
            "-p",
            "datapath-user",
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static"))?;
    let context = std::env::temp_dir().join("datapath-image");
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context)?;
    std::fs::copy(workspace().join(STATIC_BIN), context.join("datapath"))?;
    stage_with_libraries(Path::new(BIRD), &context.join("rootfs"))?;
    for plugin in CNI_PLUGINS {
        let libs = stage_with_libraries(
            &Path::new(CNI_PLUGIN_DIR).join(plugin),
            &context.join("rootfs"),
        )?;
        // `datapath install-cni-plugins` installs each with the loader and libc alone.
        if let Some(other) = libs
            .iter()
            .find(|l| !l.ends_with("libc.so.6") && !l.ends_with("ld-linux-x86-64.so.2"))
        {
            bail!(
                "{plugin} links {} besides libc: install-cni-plugins would miss it",
                other.display()
            );
        }
    }
    let built = run(Command::new("buildah")
        .args(["build", "--quiet", "-f"])
        .arg(workspace().join("deploy/Containerfile"))
        .args(["-t", tag])
        .arg(&context)
        .stdout(Stdio::null()));
    let _ = std::fs::remove_dir_all(&context);
    built?;
    println!("image: built {tag} (deploy/Containerfile, static datapath)");
    Ok(())
}

/// The BGP speaker the image carries (Debian's bird2).
const BIRD: &str = "/usr/sbin/bird";

/// The reference CNI plugins the image carries for nodes without them (Debian's
/// containernetworking-plugins), and where Debian keeps them.
const CNI_PLUGINS: [&str; 3] = ["ptp", "host-local", "portmap"];
const CNI_PLUGIN_DIR: &str = "/usr/lib/cni";

/// Copies `bin` and the shared libraries `ldd` names for it (the loader included) under
/// `root`, at their own paths: a dynamically linked program that runs in a scratch image.
/// Returns the libraries.
fn stage_with_libraries(bin: &Path, root: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(bin).output()?;
    if !out.status.success() {
        bail!(
            "ldd {}: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let libs = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
        .collect::<Vec<_>>();
    for file in std::iter::once(bin.to_path_buf()).chain(libs.iter().cloned()) {
        let dest = root.join(file.strip_prefix("/")?);
        std::fs::create_dir_all(dest.parent().context("no parent")?)?;
        // The content, not a symlink: the image has no /usr/lib for it to point into.
        std::fs::copy(&file, &dest).with_context(|| format!("copying {}", file.display()))?;
    }
    Ok(libs)
}

/// Builds the agent, saying what and how long: a fresh checkout compiles for minutes.
fn build() -> Result<()> {
    println!(
        "build: the datapath agent and its kernel programs (cargo build -p datapath-user; a few minutes on a fresh checkout, seconds after)"
    );
    let started = Instant::now();
    run(cargo().args(["build", "--quiet", "-p", "datapath-user"]))?;
    println!("build: done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

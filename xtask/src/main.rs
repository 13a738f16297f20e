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
            test(filter.as_deref())
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

/// Runs `cmd`, echoing its output, and adds the counts of cargo's `test result:` lines.
fn run_counting(cmd: &mut Command, tests: &mut (u64, u64)) -> bool {
    use std::io::{BufRead as _, BufReader};
    let Ok(mut child) = cmd.stdout(Stdio::piped()).spawn() else {
        return false;
    };
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let count = |word: &str| {
                    rest.split("; ")
                        .find_map(|p| {
                            p.trim_start_matches("ok. ")
                                .trim_start_matches("FAILED. ")
                                .strip_suffix(word)
                        })
                        .and_then(|n| n.trim().parse::<u64>().ok())
                        .unwrap_or(0)
                };
                tests.0 += count(" passed");
                tests.1 += count(" failed");
            }
        }
    }
    child.wait().is_ok_and(|s| s.success())
}

/// The image the tests run the agent's binary from; removed afterwards.
const TEST_IMAGE: &str = "localhost/datapath:test";

fn test(filter: Option<&str>) -> Result<()> {
    let started = Instant::now();
    let mut summary: Vec<(String, bool, f64)> = Vec::new();
    let mut tests = (0u64, 0u64);
    let mut step = |name: &str, cmd: &mut Command, tests: &mut (u64, u64)| -> bool {
        println!("\n=== {name}");
        let t = Instant::now();
        let ok = run_counting(cmd, tests);
        summary.push((name.to_string(), ok, t.elapsed().as_secs_f64()));
        ok
    };
    let filter_args: Vec<&str> = filter.into_iter().collect();
    step(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--check"]),
        &mut tests,
    );
    step(
        "cargo clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--quiet",
            "--",
            "-D",
            "warnings",
        ]),
        &mut tests,
    );
    let built = step(
        "build datapath (with the upgrade tests' crash points)",
        cargo().args([
            "build",
            "--quiet",
            "-p",
            "datapath-user",
            "--features",
            "fault-injection",
        ]),
        &mut tests,
    );
    step(
        "unit tests (maps-common, datapath-user)",
        cargo()
            .args(["test", "-p", "maps-common", "-p", "datapath-user", "--"])
            .args(&filter_args),
        &mut tests,
    );
    // The image test's prerequisite: built whenever that test is among those that run.
    let image_test = "the_image_holds_a_self_contained_agent";
    let image_built = filter.is_none_or(|f| image_test.contains(f))
        && step(
            "container image (static datapath, deploy/Containerfile)",
            Command::new(std::env::current_exe()?).args(["image", "--tag", TEST_IMAGE]),
            &mut tests,
        );
    // The binary the image ships, searched as `strings` would: no test or benchmark code.
    let shipped_clean = image_built.then(|| {
        let shipped = std::fs::read(workspace().join(STATIC_BIN)).unwrap_or_default();
        let has = |needle: &[u8]| shipped.windows(needle.len()).any(|w| w == needle);
        !shipped.is_empty() && !has(b"DATAPATH_FAULT") && !has(b"tc_floor")
    });
    if built {
        // Namespace tests share the machine's two cores: one at a time.
        let mut cmd = cargo();
        // With the agent's features as built above: the library compiles once for both.
        cmd.args(["test", "-p", "integration-tests", "--features"])
            .args(["datapath-user/fault-injection", "--", "--test-threads=1"])
            .args(&filter_args);
        if image_built {
            cmd.env("DATAPATH_IMAGE", TEST_IMAGE);
        }
        step(
            "program tests (BPF_PROG_TEST_RUN) and namespace integration tests",
            &mut cmd,
            &mut tests,
        );
    }
    if image_built {
        let _ = Command::new("podman")
            .args(["rmi", "-f", TEST_IMAGE])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let leftovers =
        String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output()?.stdout)
            .lines()
            .filter(|l| l.starts_with("dpt"))
            .count();
    summary.push(("no namespaces left behind".into(), leftovers == 0, 0.0));
    if let Some(clean) = shipped_clean {
        summary.push((
            "the shipped binary holds neither DATAPATH_FAULT nor tc_floor".into(),
            clean,
            0.0,
        ));
    }
    // The tests pin only on bpffs mounts of their own under /run/datapath-tests.
    let mounts = std::fs::read_to_string("/proc/mounts")?
        .lines()
        .filter(|l| {
            l.split(' ')
                .nth(1)
                .is_some_and(|m| m.starts_with("/run/datapath-tests"))
        })
        .count();
    summary.push((
        "no bpffs mounts or pins left behind".into(),
        mounts == 0,
        0.0,
    ));

    println!("\n=== summary ({:.0} s)", started.elapsed().as_secs_f64());
    for (name, ok, secs) in &summary {
        println!(
            "  {:<4} {name} ({secs:.1} s)",
            if *ok { "ok" } else { "FAIL" }
        );
    }
    let failed_steps = summary.iter().filter(|s| !s.1).count() as u64;
    // One plain closing line: tests passed, and failed tests plus failed steps.
    println!("{} passed, {} failed", tests.0, tests.1.max(failed_steps));
    if failed_steps > 0 {
        bail!("{failed_steps} step(s) failed");
    }
    Ok(())
}

//! `cargo xtask test`: fmt, clippy, the agent's build, unit tests, the container image and the
//! namespace tests, each a step in one summary; the image compiles in the background while the
//! namespace tests run.
use std::{
    fs::File,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Instant,
};

use anyhow::{Result, bail};

use crate::{STATIC_BIN, cargo, workspace};

/// The image the tests run the agent's binary from; removed afterwards.
const TEST_IMAGE: &str = "localhost/datapath:test";
/// The one test that needs the image; it runs once the image is built.
const IMAGE_TEST: &str = "the_image_holds_a_self_contained_agent";

/// Each step's name, outcome and seconds, and the tests passed and failed so far.
#[derive(Default)]
struct Steps {
    summary: Vec<(String, bool, f64)>,
    tests: (u64, u64),
}

impl Steps {
    /// Runs `cmd` as the step `name`, echoing its output; returns whether it succeeded.
    fn run(&mut self, name: &str, cmd: &mut Command) -> bool {
        println!("\n=== {name}");
        let t = Instant::now();
        let ok = run_counting(cmd, &mut self.tests);
        self.record(name, ok, t.elapsed().as_secs_f64());
        ok
    }

    fn record(&mut self, name: &str, ok: bool, secs: f64) {
        self.summary.push((name.to_string(), ok, secs));
    }
}

pub fn run(filter: Option<&str>) -> Result<()> {
    let started = Instant::now();
    let mut steps = Steps::default();
    let filter_args: Vec<&str> = filter.into_iter().collect();
    steps.run(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--check"]),
    );
    steps.run(
        "cargo clippy",
        cargo()
            .args(["clippy", "--workspace", "--all-targets", "--quiet"])
            .args(["--", "-D", "warnings"]),
    );
    let built = steps.run(
        "build datapath (with the upgrade tests' crash points)",
        cargo()
            .args(["build", "--quiet", "-p", "datapath-user"])
            .args(["--features", "fault-injection"]),
    );
    steps.run(
        "unit tests (maps-common, datapath-user)",
        cargo()
            .args(["test", "-p", "maps-common", "-p", "datapath-user", "--"])
            .args(&filter_args),
    );
    let image = if filter.is_none_or(|f| IMAGE_TEST.contains(f)) {
        ImageBuild::start()
            .inspect_err(|e| {
                steps.record(&format!("container image: not started: {e:#}"), false, 0.0)
            })
            .ok()
    } else {
        None
    };
    if built {
        let mut cmd = integration_tests(&filter_args);
        if image.is_some() {
            cmd.args(["--skip", IMAGE_TEST]);
        }
        steps.run(
            "program tests (BPF_PROG_TEST_RUN) and namespace integration tests",
            &mut cmd,
        );
    }
    let image_built = image.is_some_and(|b| b.finish(&mut steps));
    if image_built && built {
        let mut cmd = integration_tests(&[IMAGE_TEST]);
        steps.run("the image test", cmd.env("DATAPATH_IMAGE", TEST_IMAGE));
    }
    if image_built {
        let _ = Command::new("podman")
            .args(["rmi", "-f", TEST_IMAGE])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    leftovers(&mut steps, image_built)?;
    report(&steps, started)
}

/// The namespace tests, with the agent's features as the build step built it (the library
/// compiles once for both), one at a time: they share the machine's two cores.
fn integration_tests(libtest_args: &[&str]) -> Command {
    let mut cmd = cargo();
    cmd.args(["test", "-p", "integration-tests", "--features"])
        .args(["datapath-user/fault-injection", "--", "--test-threads=1"])
        .args(libtest_args);
    cmd
}

/// `cargo xtask image` for the tests, run at the lowest priority beside the namespace tests,
/// which mostly wait on packets and timers: its minutes of compiling overlap theirs. Its
/// output goes to a log, shown once it ends.
struct ImageBuild {
    child: Child,
    log: PathBuf,
    started: Instant,
}

impl ImageBuild {
    fn start() -> Result<Self> {
        let log = workspace().join("target/xtask-image.log");
        let out = File::create(&log)?;
        let child = Command::new("nice")
            .args(["-n", "19"])
            .arg(std::env::current_exe()?)
            .args(["image", "--tag", TEST_IMAGE])
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        println!(
            "\n=== container image: building in the background (nice 19), log in {}",
            log.display()
        );
        Ok(Self {
            child,
            log,
            started: Instant::now(),
        })
    }

    /// Waits for the build, shows its log and records the step; returns whether it succeeded.
    fn finish(mut self, steps: &mut Steps) -> bool {
        let ok = self.child.wait().is_ok_and(|s| s.success());
        let secs = self.started.elapsed().as_secs_f64();
        println!("\n=== container image (static datapath, deploy/Containerfile)");
        print!("{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        steps.record(
            "container image (static datapath, deploy/Containerfile; in the background)",
            ok,
            secs,
        );
        ok
    }
}

/// What the tests must leave behind: no namespaces, no bpffs mounts, and a shipped binary with
/// neither test nor benchmark code.
fn leftovers(steps: &mut Steps, image_built: bool) -> Result<()> {
    let netns =
        String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output()?.stdout)
            .lines()
            .filter(|l| l.starts_with("dpt"))
            .count();
    steps.record("no namespaces left behind", netns == 0, 0.0);
    if image_built {
        // The binary the image ships, searched as `strings` would.
        let shipped = std::fs::read(workspace().join(STATIC_BIN)).unwrap_or_default();
        let has = |needle: &[u8]| shipped.windows(needle.len()).any(|w| w == needle);
        let clean = !shipped.is_empty() && !has(b"DATAPATH_FAULT") && !has(b"tc_floor");
        steps.record(
            "the shipped binary holds neither DATAPATH_FAULT nor tc_floor",
            clean,
            0.0,
        );
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
    steps.record("no bpffs mounts or pins left behind", mounts == 0, 0.0);
    Ok(())
}

fn report(steps: &Steps, started: Instant) -> Result<()> {
    println!("\n=== summary ({:.0} s)", started.elapsed().as_secs_f64());
    for (name, ok, secs) in &steps.summary {
        println!(
            "  {:<4} {name} ({secs:.1} s)",
            if *ok { "ok" } else { "FAIL" }
        );
    }
    let failed_steps = steps.summary.iter().filter(|s| !s.1).count() as u64;
    // One plain closing line: tests passed, and failed tests plus failed steps.
    println!(
        "{} passed, {} failed",
        steps.tests.0,
        steps.tests.1.max(failed_steps)
    );
    if failed_steps > 0 {
        bail!("{failed_steps} step(s) failed");
    }
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

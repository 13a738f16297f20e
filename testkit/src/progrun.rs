//! The BPF_PROG_TEST_RUN harness: a TC or XDP program of a loaded object run once on a frame
//! (output bytes, verdict, kernel-reported duration), a trimmed mean of many runs, and a
//! network namespace the calling thread lives in, where the programs' FIB and neighbour
//! lookups resolve.
//!
//! ```text
//!   test thread ── setns ──► netns: ul0 192.168.1.10/24 mac 02:00:00:00:00:0a (veth to ul1)
//!                                   neighbour 192.168.1.11 lladdr 02:00:00:00:00:0b PERMANENT
//! ```
use std::{fs::File, os::fd::AsRawFd as _};

use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};

use crate::net::{sh, sh_out, unique};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// One run: the verdict, the frame as the program left it, the kernel's duration in ns.
pub struct Run {
    pub verdict: u32,
    pub out: Vec<u8>,
    pub ns: u64,
}

/// Runs program `prog` of `ebpf` once on `input`; a TC program sees the frame arrive on
/// `ifindex`. Fails with the kernel's refusal: it will not build an skb for every frame (an
/// IPv4/IPv6 ethertype with less than the network header behind it, for one).
pub fn run(ebpf: &Ebpf, prog: &str, ifindex: u32, input: &[u8]) -> Result<Run, String> {
    let program = ebpf
        .program(prog)
        .ok_or_else(|| format!("no program {prog}"))?;
    let mut out = vec![0u8; input.len() + 128];
    let r = if let Ok(p) = <&Xdp>::try_from(program) {
        p.test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..Default::default()
        })
    } else {
        let p: &SchedClassifier = program.try_into().map_err(|e| format!("{e:?}"))?;
        // __sk_buff with only ifindex (offset 40) set.
        let mut ctx = [0u8; 192];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        p.test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        })
    }
    .map_err(|e| format!("{e:?}"))?;
    out.truncate(r.data_size_out as usize);
    Ok(Run {
        verdict: r.return_value,
        out,
        ns: r.duration.as_nanos() as u64,
    })
}

/// The mean of `iterations` single runs' kernel-reported durations with the slowest and
/// fastest tenth left out: robust against the interrupts and preemptions that inflate a
/// plain mean on a busy 2-CPU machine, and finer than a median of the kernel's durations,
/// which come in steps of 10 ns here.
pub fn trimmed_ns(
    ebpf: &Ebpf,
    prog: &str,
    ifindex: u32,
    input: &[u8],
    iterations: u32,
) -> Result<f64, String> {
    let mut runs = Vec::with_capacity(iterations as usize);
    for _ in 0..iterations {
        runs.push(run(ebpf, prog, ifindex, input)?.ns);
    }
    runs.sort_unstable();
    let cut = runs.len() / 10;
    let middle = &runs[cut..runs.len() - cut];
    Ok(middle.iter().sum::<u64>() as f64 / middle.len().max(1) as f64)
}

/// Loads every program of `ebpf` named in `tc` and `xdp` (the verifier's verdict).
pub fn load_programs(ebpf: &mut Ebpf, tc: &[&str], xdp: &[&str]) -> Result<(), String> {
    for name in tc {
        let loaded = program::<SchedClassifier>(ebpf, name)?.load();
        loaded.map_err(|e| refused(name, &e))?;
    }
    for name in xdp {
        let loaded = program::<Xdp>(ebpf, name)?.load();
        loaded.map_err(|e| refused(name, &e))?;
    }
    Ok(())
}

fn refused(name: &str, e: &aya::programs::ProgramError) -> String {
    format!("verifier refused {name}: {e:?}")
}

/// Program `name` of `ebpf` as its type.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| format!("no program {name}"))?
        .try_into()
        .map_err(|e| format!("{name}: {e:?}"))
}

/// A namespace the calling thread lives in until drop, then returns to its own.
pub struct ThreadNetns {
    name: String,
    home: File,
}

impl ThreadNetns {
    pub fn enter() -> Self {
        let name = unique("ptr");
        sh(&format!("ip netns add {name}"));
        let setup = format!(
            "ip -n {name} link add ul0 address 02:00:00:00:00:0a type veth peer name ul1 && \
             ip -n {name} link set ul0 up && ip -n {name} link set ul1 up && ip -n {name} link set lo up && \
             ip -n {name} addr add 192.168.1.10/24 dev ul0 && \
             ip -n {name} neigh add 192.168.1.11 lladdr 02:00:00:00:00:0b dev ul0 nud permanent && \
             ip -n {name} addr add fd00:1::10/64 dev ul0 nodad && \
             ip -n {name} neigh add fd00:1::11 lladdr 02:00:00:00:00:0b dev ul0 nud permanent && \
             ip netns exec {name} sysctl -qw net.ipv4.conf.all.forwarding=1 && \
             ip netns exec {name} sysctl -qw net.ipv6.conf.all.forwarding=1"
        );
        let home = File::open("/proc/thread-self/ns/net").expect("own netns");
        let me = Self { name, home };
        sh(&setup);
        let target = File::open(format!("/run/netns/{}", me.name)).expect("netns file");
        // SAFETY: setns on this thread only, with valid fds.
        assert_eq!(
            unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        me
    }
}

impl Drop for ThreadNetns {
    fn drop(&mut self) {
        // SAFETY: back to the namespace the thread came from.
        unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
        let _ = sh_out(&format!("ip netns del {}", self.name));
    }
}

impl ThreadNetns {
    /// The ifindex of `ul0` in this namespace.
    pub fn ifindex(&self) -> u32 {
        self.ifindex_of("ul0")
    }

    /// The ifindex of interface `name` in this namespace, as iproute2 run from this thread
    /// (in it) gives it: /sys may still show the namespace it was mounted in.
    pub fn ifindex_of(&self, name: &str) -> u32 {
        sh(&format!("ip -j link show {name}"))
            .split("\"ifindex\":")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("ifindex of {name}"))
    }
}

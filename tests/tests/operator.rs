//! What an operator sees and runs: the HTTP endpoint a DaemonSet probes (`/healthz`,
//! `/readyz`, `/metrics` parsed by prometheus_client), `datapath status` in each state, and the
//! two-node core (ping, TCP by hash, restart under ping) with netlink TC attachment, the path
//! for kernels before 6.6.
//!
//! ```text
//!   pod1 ── node1 (agent, :9464) ── u0 ─ br0 ─ u1 ── node2 (agent) ── pod2
//!   etcd on the underlay namespace (192.168.1.1:2379) for the readiness test
//! ```
use std::{thread, time::Duration};

use integration_tests::{Etcd, Topology, script, wait_for};

fn http(t: &Topology, i: usize, path: &str) -> (u16, String) {
    let out = t.nodes[i].ns.exec_out(&format!(
        "curl -s -o /dev/stdout -w '\\n%{{http_code}}' http://127.0.0.1:9464{path}"
    ));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn status(t: &Topology, i: usize) -> serde_json::Value {
    let out = t.datapath(
        i,
        &format!("status --json --pin-dir {}", t.pin_dir(i).display()),
    );
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn probes_metrics_and_status_in_each_state() {
    let mut t = Topology::two_nodes("ops");
    // Before any agent: nothing pinned, and the status says where it looked.
    let st = status(&t, 0);
    assert_eq!(st["attached"], false);
    let reason = st["reason"].as_str().unwrap();
    assert!(
        reason.contains("nothing is pinned at")
            && reason.contains(&t.pin_dir(0).display().to_string()),
        "{reason}"
    );
    let stats = t.datapath(0, &format!("stats --pin-dir {}", t.pin_dir(0).display()));
    assert!(
        String::from_utf8_lossy(&stats.stderr).contains("nothing is pinned at"),
        "{stats:?}"
    );

    // An agent waiting for its first state (etcd holds none yet): alive, not ready.
    let etcd = Etcd::start(&t);
    let log = t.spawn_agent(
        0,
        &format!("--etcd-endpoints {} --metrics 127.0.0.1:9464", Etcd::URL),
    );
    let up = wait_for(Duration::from_secs(10), || http(&t, 0, "/healthz").0 == 200);
    assert!(up, "no /healthz");
    let (code, body) = http(&t, 0, "/readyz");
    assert_eq!(code, 503, "ready before the first state: {body}");
    assert!(
        body.contains("waiting for the first cluster state"),
        "{body}"
    );

    etcd.put(
        "/coreos.com/network/config",
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
    );
    for (cidr, ip, name) in [
        ("10.244.0.0-24", "192.168.1.10", "node1"),
        ("10.244.1.0-24", "192.168.1.11", "node2"),
    ] {
        etcd.put(
            &format!("/coreos.com/network/subnets/{cidr}"),
            &format!(r#"{{"PublicIP":"{ip}","BackendType":"vxlan","NodeName":"{name}"}}"#),
        );
    }
    t.wait_agent(0, &log);
    let ready = wait_for(Duration::from_secs(5), || http(&t, 0, "/readyz").0 == 200);
    assert!(ready, "not ready after the first state");

    let (code, text) = http(&t, 0, "/metrics");
    assert_eq!(code, 200);
    let file = t.workdir.join("metrics.txt");
    std::fs::write(&file, &text).unwrap();
    let parsed = integration_tests::sh(&format!(
        "/usr/bin/python3 {} < {}",
        script("metrics_parse.py").display(),
        file.display()
    ));
    let samples: serde_json::Value = serde_json::from_str(&parsed).expect(&parsed);
    for name in [
        "datapath_packets_total{direction=encap,mode=vxlan}",
        "datapath_drops_total{reason=unknown_peer}",
        "datapath_peer_unreachable{peer=192.168.1.11}",
        "datapath_nodes_known",
        "datapath_last_reload_success",
        "datapath_pod_mtu",
        "datapath_etcd_connected",
        "datapath_reloads_total",
    ] {
        assert!(samples.get(name).is_some(), "{name} missing from {samples}");
    }
    assert_eq!(samples["datapath_pod_mtu"], 1450.0);
    assert_eq!(samples["datapath_etcd_connected"], 1.0);

    let st = status(&t, 0);
    assert_eq!(st["attached"], true, "{st}");
    assert_eq!(st["config"]["mode"], "vxlan");
    assert_eq!(st["config"]["vni"], 1);
    assert_eq!(st["config"]["vxlan_port"], 8472);
    assert_eq!(st["config"]["decap"], "tc");
    assert_eq!(st["config"]["host_routing"], "accepted-flows");
    assert_eq!(st["nodes_known"], 1);
    assert_eq!(st["pod_mtu"], 1450);
    assert_eq!(st["last_reload"]["ok"], true);
    assert_eq!(st["agent_running"], true);
    assert_eq!(st["map_abi"], st["cli_map_abi"]);
    assert!(
        st["hooks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["program"] == "tc_encap_egress"),
        "{st}"
    );

    // A state that cannot be used: the last reload failed, the last good state stays.
    etcd.put("/coreos.com/network/config", "{not json");
    let failed = wait_for(Duration::from_secs(5), || {
        status(&t, 0)["last_reload"]["ok"] == false
    });
    assert!(
        failed,
        "status does not show the failed reload: {}",
        status(&t, 0)
    );
    assert_eq!(status(&t, 0)["attached"], true);
    // With its reason, in the JSON and the text.
    let why = status(&t, 0)["last_reload"]["rejected"].clone();
    assert!(
        why.as_str().is_some_and(|w| w.contains("config")),
        "the rejection's reason is not shown: {why}"
    );
    let text = t.datapath(0, &format!("status --pin-dir {}", t.pin_dir(0).display()));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("FAILED (the last good state stays): "),
        "{text}"
    );
    assert_eq!(
        http(&t, 0, "/readyz").0,
        200,
        "the last good state still serves"
    );
    t.stop_agents(0);
    assert_eq!(status(&t, 0)["agent_running"], false);
}

fn flood(t: &Topology, secs: u32) -> std::process::Child {
    t.flood_ping(0, 1, secs)
}

#[test]
fn the_two_node_core_with_netlink_tc_attachment() {
    for encap in ["ipip", "vxlan"] {
        let (mut t, cluster) = Topology::two_nodes_running(
            &format!("nl{encap}"),
            encap,
            "",
            "--tc-attach netlink --decap tc",
        );
        let filters = t.nodes[0].ns.exec("tc filter show dev eth0 egress");
        assert!(
            filters.contains("tc_encap_egress"),
            "no netlink filter: {filters}"
        );
        assert!(
            !t.pin_dir(0).join("links/tc_encap_egress").exists(),
            "a tcx link was pinned"
        );
        assert_eq!(status(&t, 0)["config"]["tc_attach"], "netlink");
        assert_eq!(t.ping(0, 1, 3), 3, "{encap}: pod1 -> pod2");
        let (sent, got) = t.tcp_transfer(0, 1, 50);
        assert_eq!(sent, got, "{encap}: 50 MiB over TCP");
        // Restart under a 200 pps ping: the filter is replaced in place, nothing lost.
        let ping = flood(&t, 5);
        thread::sleep(Duration::from_millis(500));
        let stopped = std::time::SystemTime::now();
        t.stop_agents(0);
        thread::sleep(Duration::from_millis(800));
        t.start_agent(0, &cluster, "--tc-attach netlink --decap tc");
        let restarted = std::time::SystemTime::now();
        let (sent, received) = t.flood_ping_result(0, 1, ping);
        assert!(sent >= 200, "ping sent only {sent}");
        assert_eq!(sent, received, "{encap}: packets lost across the restart");
        assert!(
            t.ping_spanned(0, 1, stopped, restarted),
            "{encap}: the ping did not span the restart"
        );
        let filters = t.nodes[0].ns.exec("tc filter show dev eth0 egress");
        assert_eq!(
            filters
                .lines()
                .filter(|l| l.contains("tc_encap_egress"))
                .count(),
            1,
            "one filter, replaced in place: {filters}"
        );
        t.stop_agents(0);
        t.detach(0);
        let filters = t.nodes[0].ns.exec("tc filter show dev eth0 egress");
        assert!(
            !filters.contains("tc_encap_egress"),
            "filter left: {filters}"
        );
    }
}

/// Errors that name their cause and the fix: the agent without privileges, `status` without
/// the right to read the pins of a running agent, and `--node` naming no node where a named
/// node holds this host's address.
#[test]
fn errors_name_the_cause_and_the_fix() {
    let (t, cluster) = Topology::two_nodes_running("errs", "vxlan", "", "");
    let bin = integration_tests::datapath_bin();
    let nobody = "setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all";
    let out = t.nodes[0].ns.exec_out(&format!(
        "timeout 10 {nobody} {} run --cluster {} --node node1 --pin-dir {}/unprivileged",
        bin.display(),
        cluster.display(),
        t.workdir.display()
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an unprivileged agent ran");
    assert!(
        err.contains("the agent needs root") && err.contains("CAP_BPF"),
        "no word of privileges:\n{err}"
    );

    let out = t.nodes[0].ns.exec_out(&format!(
        "{nobody} {} status --pin-dir {}",
        bin.display(),
        t.pin_dir(0).display()
    ));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("permission denied") && !said.contains("nothing is pinned"),
        "status without privileges blames the pins:\n{said}"
    );

    // node1 runs at 192.168.1.10 under the name node1; --node says otherwise.
    let log = t.workdir.join("wrong-node.log");
    let out = t.nodes[0].ns.exec_out(&format!(
        "timeout 5 {bin} run --cluster {cluster} --node vm --pin-dir {w}/wrong-node --cni-conf-dir {w}/wn/net.d --cni-bin-dir {w}/wn/bin --cni-ipam-dir {w}/wn/ipam --subnet-file {w}/wn/subnet.env > {log} 2>&1",
        bin = bin.display(),
        w = t.workdir.display(),
        log = log.display(),
        cluster = cluster.display()
    ));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("node \"node1\" has this host's address 192.168.1.10: run with --node node1"),
        "the fallback does not say which node this host is ({:?}):\n{text}",
        out.status
    );
}

/// The reference CNI plugins the conflist names, missing from the agent's CNI bin directory:
/// named in the log, `/readyz` (503) and `datapath status` until they are installed, then
/// ready within the agent's 10 s re-check.
#[test]
fn missing_cni_plugins_are_named_until_they_are_installed() {
    let (mut t, cluster) = Topology::two_nodes_running("cniplug", "vxlan", "", "");
    t.stop_agents(0);
    let bin_dir = t.workdir.join("bare-cni-bin");
    let w = t.workdir.display().to_string();
    let log = t.workdir.join("agent-no-plugins.log");
    t.spawn_raw(
        0,
        &format!(
            "{} run --cluster {} --node node1 --pin-dir {} --metrics 127.0.0.1:9464 --cni-conf-dir {w}/np/net.d --cni-bin-dir {} --cni-ipam-dir {w}/np/ipam --subnet-file {w}/np/subnet.env",
            integration_tests::datapath_bin().display(),
            cluster.display(),
            t.pin_dir(0).display(),
            bin_dir.display()
        ),
        &log,
    );
    t.wait_agent(0, &log);
    let (code, body) = http(&t, 0, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("CNI plugins ptp, host-local, portmap missing from"),
        "{body}"
    );
    assert_eq!(
        status(&t, 0)["cni_plugins_missing"],
        serde_json::json!(["ptp", "host-local", "portmap"])
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("no pod can be created")
    );
    assert_eq!(
        t.ping(0, 1, 2),
        2,
        "forwarding does not wait for the plugins"
    );

    integration_tests::install_reference_plugins(&bin_dir);
    assert!(
        wait_for(Duration::from_secs(15), || http(&t, 0, "/readyz").0 == 200),
        "not ready once the plugins are there: {:?}",
        http(&t, 0, "/readyz")
    );
    assert_eq!(status(&t, 0)["cni_plugins_missing"], serde_json::json!([]));

    // SIGTERM: the agent records that it is stopping before it goes (status says "stopping"
    // while its pid lives on).
    t.stop_agents(0);
    let info = t.nodes[0].ns.exec(&format!(
        "bpftool -j map dump pinned {}/maps/DP_AGENT",
        t.pin_dir(0).display()
    ));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info[0]["formatted"]["value"]["stopping"], 1, "{info}");
    assert_eq!(status(&t, 0)["agent_running"], false);
}

//! What a cluster deploys: the manifests under `deploy/` checked against the Kubernetes
//! schemas (kubernetes-validate, offline, strict), and the container image built from
//! `deploy/Containerfile` shown self-contained by running its binary from the image's own root
//! filesystem (containers cannot be started on these machines: `podman image mount`, `chroot`).
use std::path::PathBuf;

use integration_tests::{sh, sh_out};

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

#[test]
fn manifests_are_valid_kubernetes_objects() {
    let dir = deploy_dir();
    let files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        files.len() >= 2,
        "manifests in {}: {files:?}",
        dir.display()
    );
    for version in ["1.27.0", "1.30.0"] {
        let out = sh_out(&format!(
            "kubernetes-validate --strict -k {version} {}",
            files.join(" ")
        ));
        let said = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "kubernetes {version}: {said}");
        assert!(
            said.contains("passed for resource daemonset/datapath"),
            "{said}"
        );
    }
    let ds = std::fs::read_to_string(dir.join("daemonset.yaml")).unwrap();
    for needle in [
        "hostNetwork: true",
        "path: /healthz",
        "path: /readyz",
        "path: /sys/fs/bpf",
        "path: /etc/cni/net.d",
        "path: /run/flannel",
        "name: install-cni-plugins",
        "command: [\"/datapath\", \"install-cni-plugins\", \"--to\", \"/host/opt/cni/bin\"]",
        // BGP mode: BIRD's files on the host, its port.
        "path: /run/datapath",
        "NET_BIND_SERVICE",
        "secretName: datapath-etcd-tls",
        "drop: [\"ALL\"]",
        // bpffs on the host from the init container, etcd by address from a ConfigMap.
        "command: [\"/datapath\", \"mount-bpffs\", \"--path\", \"/sys/fs/bpf\"]",
        "mountPropagation: Bidirectional",
        "mountPropagation: HostToContainer",
        "name: datapath-config",
    ] {
        assert!(ds.contains(needle), "daemonset.yaml lacks {needle}");
    }
}

#[test]
fn the_image_holds_a_self_contained_agent() {
    // A missing prerequisite fails with its name: a test that passes by skipping proves nothing.
    let image = std::env::var("DATAPATH_IMAGE").expect(
        "DATAPATH_IMAGE names the image under test: run through `cargo xtask test`, which builds it",
    );
    let root = sh(&format!("podman image mount {image}"))
        .trim()
        .to_string();
    let run = |args: &str| sh_out(&format!("chroot {root} /datapath {args}"));
    let listing = sh(&format!("ls -A {root}"));
    let version = run("--version");
    let status = run("status --json --pin-dir /nonexistent");
    // The BGP speaker runs from the image's own libraries.
    let bird = sh_out(&format!("chroot {root} /usr/sbin/bird --version"));
    let plugins = install_cni_plugins(&root);
    let _ = sh_out(&format!("podman image unmount {image}"));
    plugins.unwrap_or_else(|e| panic!("{e}"));
    let top: Vec<&str> = listing.split_whitespace().collect();
    assert_eq!(
        top,
        ["datapath", "lib", "lib64", "usr"],
        "the image holds the agent, BIRD and the reference CNI plugins with their libraries, nothing else"
    );
    assert!(
        String::from_utf8_lossy(&bird.stderr).starts_with("BIRD version 2"),
        "{bird:?}"
    );
    assert!(
        String::from_utf8_lossy(&version.stdout).starts_with("datapath "),
        "{version:?}"
    );
    let st: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert_eq!(st["attached"], false, "{st}");
}

/// The init container's `datapath install-cni-plugins`, run from the image's files into a
/// CNI bin directory of the test's that already holds a `portmap` of the node's own: ptp and
/// host-local installed and answering CNI's VERSION command through their own loader and C
/// library, the node's portmap left as it was.
fn install_cni_plugins(root: &str) -> Result<(), String> {
    let bin = std::env::temp_dir().join(format!("dp-cni-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&bin);
    std::fs::create_dir_all(&bin).map_err(|e| e.to_string())?;
    let node_portmap = "#!/bin/sh\necho the node's own\n";
    std::fs::write(bin.join("portmap"), node_portmap).map_err(|e| e.to_string())?;
    let result = (|| {
        let said = testkit::net::try_sh(&format!(
            "{root}/datapath install-cni-plugins --root {root} --from {root}/usr/lib/cni --to {}",
            bin.display()
        ))?;
        for p in ["ptp", "host-local"] {
            let out = testkit::net::try_sh(&format!(
                "echo '{{}}' | CNI_COMMAND=VERSION {}",
                bin.join(p).display()
            ))?;
            let v: serde_json::Value = serde_json::from_str(&out)
                .map_err(|e| format!("{p} VERSION answered {out:?}: {e}"))?;
            if v["supportedVersions"]
                .as_array()
                .is_none_or(|a| a.is_empty())
            {
                return Err(format!("{p} VERSION: {v}"));
            }
            let launcher = std::fs::read_to_string(bin.join(p)).unwrap_or_default();
            if !launcher.contains("datapath-plugins/ld-linux-x86-64.so.2 --library-path") {
                return Err(format!(
                    "{p} does not run through its own loader:\n{launcher}"
                ));
            }
        }
        let portmap = std::fs::read_to_string(bin.join("portmap")).unwrap_or_default();
        if portmap != node_portmap || !said.contains("portmap is there already") {
            return Err(format!("the node's portmap was not left alone: {said}"));
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&bin);
    result
}

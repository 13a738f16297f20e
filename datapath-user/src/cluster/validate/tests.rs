//! Validation of every class of bad state, each with its message and path.
use super::*;

fn parse(text: &str, defaults: &Defaults, limits: &Limits) -> Result<Cluster, Invalid> {
    validate(crate::source::document::read(text), defaults, limits)
}

fn limits(own: Option<&str>) -> Limits {
    Limits {
        max_nodes: 5000,
        own_node: own.map(String::from),
        own_addrs: Vec::new(),
    }
}

fn errors(text: &str) -> Vec<String> {
    parse(text, &Defaults::default(), &limits(Some("node1")))
        .unwrap_err()
        .0
        .iter()
        .map(ToString::to_string)
        .collect()
}

const GOOD: &str = "encapsulation: vxlan
crossSubnet: false
vxlan: { vni: 4096, port: 4789 }
nodes:
  - name: node1
    address: 192.168.1.10
    podCIDR: 10.244.0.0/24
    vtepMAC: \"66:00:00:00:00:01\"
  - name: node2
    address: 192.168.1.11
    podCIDR: 10.244.1.0/24
";

#[test]
fn parses_the_documented_example() {
    let c = parse(GOOD, &Defaults::default(), &limits(Some("node1"))).unwrap();
    assert_eq!(c.encap, Encap::Vxlan);
    assert_eq!((c.vni, c.port), (4096, 4789));
    assert_eq!(c.nodes[0].vtep_mac, [0x66, 0, 0, 0, 0, 1]);
    assert_eq!(c.nodes[1].vtep_mac, [0x0e, 0, 192, 168, 1, 11]);
    assert_eq!(c.nodes[1].pod_cidr.to_string(), "10.244.1.0/24");
}

#[test]
fn each_class_of_bad_file_is_rejected_with_its_message() {
    assert!(errors("nodes: [")[0].starts_with("(file): not parsable as YAML or JSON"));
    // (replace this in GOOD, by this, the one message expected)
    let cases = [
        (
            "encapsulation: vxlan",
            "encapsulation: gre",
            "encapsulation: unknown mode \"gre\" (expected ipip, vxlan or none)",
        ),
        (
            "10.244.1.0/24",
            "10.244.1.0/33",
            "nodes[1].podCIDR: \"10.244.1.0/33\" is not a CIDR (prefix length must be 0-32)",
        ),
        (
            "10.244.1.0/24",
            "10.244.1.1/24",
            "nodes[1].podCIDR: \"10.244.1.1/24\" has host bits set",
        ),
        (
            "10.244.1.0/24",
            "10.244.1.0",
            "nodes[1].podCIDR: \"10.244.1.0\" is not a CIDR (expected a.b.c.d/len)",
        ),
        (
            "66:00:00:00:00:01",
            "66:00:00:00:01",
            "nodes[0].vtepMAC: \"66:00:00:00:01\" is not a MAC address (expected six hex bytes aa:bb:cc:dd:ee:ff)",
        ),
        (
            "66:00:00:00:00:01",
            "67:00:00:00:00:01",
            "nodes[0].vtepMAC: \"67:00:00:00:00:01\" is a multicast MAC address",
        ),
        (
            "name: node2",
            "name: node1",
            "nodes[1].name: duplicate node \"node1\" (also nodes[0])",
        ),
        (
            "10.244.1.0/24",
            "10.244.0.0/16",
            "nodes[1].podCIDR: 10.244.0.0/16 overlaps 10.244.0.0/24 of node \"node1\"",
        ),
        (
            "name: node1",
            "name: node9",
            "nodes: this node \"node1\" is not in the cluster state",
        ),
        (
            "address: 192.168.1.11",
            "address: 192.168.1.300",
            "nodes[1].address: \"192.168.1.300\" is not an IPv4 address",
        ),
        (
            "address: 192.168.1.11",
            "address: 192.168.1.10",
            "nodes[1].address: duplicate address 192.168.1.10 (also node \"node1\")",
        ),
        (
            "address: 192.168.1.11",
            "address: 224.0.0.1",
            "nodes[1].address: 224.0.0.1 cannot be a node address",
        ),
        (
            "    address: 192.168.1.11\n",
            "",
            "nodes[1].address: missing",
        ),
        (
            "    podCIDR: 10.244.1.0/24\n",
            "",
            "nodes[1].podCIDR: missing",
        ),
        (
            "vni: 4096",
            "vni: 16777216",
            "vxlan.vni: 16777216 is outside 1-16777215",
        ),
        ("vni: 4096", "vni: 0", "vxlan.vni: 0 is outside 1-16777215"),
        (
            "port: 4789",
            "port: 0",
            "vxlan.port: port 0 is not a valid UDP port",
        ),
        (
            "crossSubnet: false",
            "bgp: { asNumber: 0 }",
            "bgp.asNumber: AS 0 is reserved (RFC 7607)",
        ),
        (
            "crossSubnet: false",
            "bgp: { peers: [ { address: 10.0.0.1 } ] }",
            "bgp.peers[0].asNumber: missing",
        ),
        (
            "crossSubnet: false",
            "bgp: { peers: [ { address: 10.0.0.300, asNumber: 65001 } ] }",
            "bgp.peers[0].address: \"10.0.0.300\" is not an IP address",
        ),
        (
            "crossSubnet: false",
            "bgp: { peers: [ { address: 192.168.1.11, asNumber: 64512 } ] }",
            "bgp.peers[0].address: 192.168.1.11 is node \"node2\", which the node-to-node mesh already peers with",
        ),
        (
            "crossSubnet: false",
            "bgp: { peers: [ { address: 10.0.0.1, asNumber: 65001 }, { address: 10.0.0.1, asNumber: 65002 } ] }",
            "bgp.peers[1].address: peer 10.0.0.1 is listed twice",
        ),
        (
            "    podCIDR: 10.244.1.0/24\n",
            "    podCIDR: 10.244.1.0/24\n    asNumber: 23456\n",
            "nodes[1].asNumber: AS 23456 is AS_TRANS (RFC 6793), not a real AS",
        ),
    ];
    for (from, to, want) in cases {
        assert_eq!(
            errors(&GOOD.replace(from, to)),
            [want],
            "{from:?} -> {to:?}"
        );
    }
    let no_nodes = GOOD.split("nodes:").next().unwrap().to_string() + "nodes: []\n";
    assert_eq!(
        parse(&no_nodes, &Defaults::default(), &limits(None))
            .unwrap_err()
            .0
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["nodes: no nodes"]
    );
}

#[test]
fn every_problem_is_reported_not_just_the_first() {
    let bad = GOOD
        .replace("10.244.1.0/24", "10.244.1.0/33")
        .replace("66:00:00:00:00:01", "zz");
    assert_eq!(errors(&bad).len(), 2);
}

#[test]
fn too_many_nodes_for_the_maps() {
    let l = Limits {
        max_nodes: 1,
        own_node: None,
        own_addrs: Vec::new(),
    };
    let e = parse(GOOD, &Defaults::default(), &l).unwrap_err();
    assert_eq!(
        e.0[0].to_string(),
        "nodes: 2 nodes do not fit in maps sized for 1 (raise --max-nodes)"
    );
}

#[test]
fn every_problem_of_a_file_at_once_with_its_path() {
    let bad = GOOD
        .replace("    podCIDR: 10.244.1.0/24", "    podCidr: 10.244.1.0/24")
        .replace("vni: 4096", "vnii: 4096")
        .replace("crossSubnet: false", "crossSubnet: maybe");
    let e = errors(&bad);
    for want in [
        "crossSubnet: expected true or false",
        "vxlan.vnii: unknown field, did you mean vni",
        "nodes[1].podCidr: unknown field, did you mean podCIDR",
        "nodes[1].podCIDR: missing",
    ] {
        assert!(e.contains(&want.to_string()), "{want:?} not in {e:#?}");
    }
}

#[test]
fn a_single_node_and_a_cidr_holding_node_addresses_are_explained() {
    let node = r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"node1"}}"#;
    assert!(errors(node)[0].contains("a single Node object"));
    let e = errors(&GOOD.replace("10.244.1.0/24", "192.168.0.0/16"));
    assert!(
        e.iter()
            .any(|p| p.starts_with("nodes[1].podCIDR: 192.168.0.0/16 holds the underlay address")),
        "{e:#?}"
    );
}

#[test]
fn flags_the_state_overrides_are_named() {
    let d = Defaults {
        vni: Some(7),
        ..Defaults::default()
    };
    let c = parse(GOOD, &d, &limits(Some("node1"))).unwrap();
    assert_eq!(c.vni, 4096);
    assert_eq!(
        c.warnings,
        ["--vni 7 is overridden by the cluster state's vxlan.vni 4096"]
    );
}

fn nodelist(nodes: &[(&str, &str, Option<&str>)], flannel: bool) -> String {
    let items: Vec<serde_json::Value> = nodes
            .iter()
            .map(|(name, addr, cidr)| {
                let mut n = serde_json::json!({
                    "metadata": {"name": name, "annotations": {}},
                    "spec": {},
                    "status": {"addresses": [{"type": "InternalIP", "address": addr}]},
                });
                if let Some(c) = cidr {
                    n["spec"]["podCIDR"] = serde_json::json!(c);
                }
                if flannel {
                    n["metadata"]["annotations"] = serde_json::json!({
                        "flannel.alpha.coreos.com/backend-type": "vxlan",
                        "flannel.alpha.coreos.com/backend-data": r#"{"VNI":1,"VtepMAC":"66:00:00:00:00:01"}"#,
                    });
                }
                n
            })
            .collect();
    serde_json::json!({"apiVersion": "v1", "kind": "NodeList", "items": items}).to_string()
}

#[test]
fn a_nodelist_skips_a_joining_node_but_not_this_one() {
    let text = nodelist(
        &[
            ("node1", "192.168.1.10", Some("10.244.0.0/24")),
            ("node2", "192.168.1.11", None),
        ],
        true,
    );
    let c = parse(&text, &Defaults::default(), &limits(Some("node1"))).unwrap();
    assert_eq!(c.nodes.len(), 1);
    assert_eq!(
        (c.vni, c.port),
        (1, 8472),
        "Flannel's defaults for Flannel's data"
    );
    assert_eq!(c.skipped[0].to_string(), "items[1].spec.podCIDR: missing");
    let e = parse(&text, &Defaults::default(), &limits(Some("node2"))).unwrap_err();
    assert_eq!(e.0[0].to_string(), "items[1].spec.podCIDR: missing");
    let plain = nodelist(&[("node1", "192.168.1.10", Some("10.244.0.0/24"))], false);
    let c = parse(&plain, &Defaults::default(), &limits(Some("node1"))).unwrap();
    assert_eq!((c.vni, c.port), (4096, 4789));
}

#[test]
fn an_unnamed_node_is_found_by_address() {
    let l = Limits {
        max_nodes: 10,
        own_node: Some("host-a".into()),
        own_addrs: vec!["192.168.1.11".parse().unwrap()],
    };
    let unnamed = GOOD.replace("name: node2", "name: 192.168.1.11");
    let c = parse(&unnamed, &Defaults::default(), &l).unwrap();
    assert_eq!(c.own.as_deref(), Some("192.168.1.11"));
    // A node with a name of its own is this node only by that name.
    assert!(parse(GOOD, &Defaults::default(), &l).is_err());
}

#[test]
fn bgp_block_is_read_with_calicos_defaults() {
    let text = GOOD.replace(
        "encapsulation: vxlan\ncrossSubnet: false",
        "encapsulation: none\nbgp:\n  peers:\n    - { address: 10.0.0.1, asNumber: 65001, node: node2 }",
    ).replace("    podCIDR: 10.244.1.0/24\n", "    podCIDR: 10.244.1.0/24\n    asNumber: 64600\n");
    let c = parse(&text, &Defaults::default(), &limits(Some("node1"))).unwrap();
    assert_eq!(c.encap, Encap::None);
    let b = c.bgp.as_ref().unwrap();
    assert_eq!((b.as_number, b.node_to_node_mesh), (64512, true));
    assert_eq!(b.peers_of("node1").count(), 0);
    assert_eq!(b.peers_of("node2").count(), 1);
    assert_eq!(b.as_of(&c.nodes[1]), 64600);
    // An unknown field of the block is named, with the fields there are.
    let bad = GOOD.replace("crossSubnet: false", "bgp: { asNumbr: 1 }");
    let e = errors(&bad);
    assert!(
        e[0].starts_with("bgp: unknown field `asNumbr`, expected one of `asNumber`"),
        "{e:?}"
    );
    // A peer for a node that is not there applies to none, with a word.
    let gone = GOOD.replace(
        "crossSubnet: false",
        "bgp: { peers: [ { address: 10.0.0.1, asNumber: 65001, node: node9 } ] }",
    );
    let c = parse(&gone, &Defaults::default(), &limits(Some("node1"))).unwrap();
    assert!(
        c.warnings
            .iter()
            .any(|w| w.starts_with("bgp.peers[0].node: no node \"node9\"")),
        "{:?}",
        c.warnings
    );
    // Native routing without BGP is allowed, with a word.
    let c = parse(
        &GOOD.replace("encapsulation: vxlan", "encapsulation: host-gw"),
        &Defaults::default(),
        &limits(Some("node1")),
    )
    .unwrap();
    assert_eq!(c.encap, Encap::None);
    assert!(
        c.warnings.iter().any(|w| w.contains("without a bgp block")),
        "{:?}",
        c.warnings
    );
}

#[test]
fn a_dual_stack_nodelist_gives_each_node_both_halves_or_says_why_not() {
    let list = r#"{"kind":"NodeList","items":[
      {"metadata":{"name":"node1","annotations":{"flannel.alpha.coreos.com/public-ipv6":"fd00::10",
         "flannel.alpha.coreos.com/backend-v6-data":"{\"VNI\":1,\"VtepMAC\":\"66:00:00:00:00:06\"}"}},
       "spec":{"podCIDR":"10.244.0.0/24","podCIDRs":["10.244.0.0/24","fd00:10:244::/64"]},
       "status":{"addresses":[{"type":"InternalIP","address":"192.168.1.10"}]}},
      {"metadata":{"name":"node2"},
       "spec":{"podCIDR":"fd00:10:244:1::/64","podCIDRs":["fd00:10:244:1::/64","10.244.1.0/24"]},
       "status":{"addresses":[{"type":"InternalIP","address":"192.168.1.11"}]}},
      {"metadata":{"name":"node3"},
       "spec":{"podCIDRs":["10.244.2.0/24","fd00:10:244:2::/64"]},
       "status":{"addresses":[{"type":"InternalIP","address":"192.168.1.12"},{"type":"InternalIP","address":"fd00::12"}]}}]}"#;
    let c = parse(list, &Defaults::default(), &limits(Some("node1"))).unwrap();
    let cidrs: Vec<String> = c.nodes.iter().map(|n| n.pod_cidr.to_string()).collect();
    assert_eq!(cidrs, ["10.244.0.0/24", "10.244.1.0/24", "10.244.2.0/24"]);
    let v6 = |i: usize| {
        c.nodes[i]
            .v6
            .map(|h| (h.address.to_string(), h.pod_cidr.to_string()))
    };
    assert_eq!(v6(0), Some(("fd00::10".into(), "fd00:10:244::/64".into())));
    assert_eq!(c.nodes[0].v6.unwrap().vtep_mac, [0x66, 0, 0, 0, 0, 6]);
    assert_eq!(
        v6(2),
        Some(("fd00::12".into(), "fd00:10:244:2::/64".into()))
    );
    assert_eq!(c.nodes[2].v6.unwrap().vtep_mac, [0x0e, 0x06, 0, 0, 0, 0x12]);
    // An IPv6 pod CIDR without an IPv6 address: the IPv6 half is skipped and said so; IPv4 stays.
    assert_eq!(v6(1), None);
    assert!(c.skipped.is_empty(), "{:?}", c.skipped);
    assert_eq!(c.skipped6.len(), 1, "{:?}", c.skipped6);
    assert!(
        c.skipped6[0].path.starts_with("items[1].status.addresses")
            && c.skipped6[0].reason.contains("no IPv6 address"),
        "{:?}",
        c.skipped6
    );
    // Overlapping IPv6 pod CIDRs reject the state whole.
    let e = parse(
        &list.replace("fd00:10:244:2::/64", "fd00:10:244::/56"),
        &Defaults::default(),
        &limits(Some("node1")),
    )
    .unwrap_err();
    assert!(
        e.0.iter().any(|p| p.path == "items[2].spec.podCIDRs"
            && p.reason
                .starts_with("fd00:10:244::/56 overlaps fd00:10:244::/64")),
        "{e}"
    );
    // An IPv6 pod CIDR where an IPv4 one belongs is named for what it is.
    let e = errors(&GOOD.replace("10.244.1.0/24", "fd00:10:244:1::/64"));
    assert_eq!(
        e,
        [
            "nodes[1].podCIDR: \"fd00:10:244:1::/64\" is an IPv6 CIDR where an IPv4 one belongs (a node's IPv6 pod CIDR is its podCIDRv6)"
        ]
    );
}

#[test]
fn a_cluster_files_ipv6_half_is_checked_like_the_rest() {
    let dual = GOOD
        .replace(
            "    podCIDR: 10.244.0.0/24\n",
            "    podCIDR: 10.244.0.0/24\n    addressV6: fd00::10\n    podCIDRv6: fd00:10:244::/64\n",
        )
        .replace(
            "    podCIDR: 10.244.1.0/24\n",
            "    podCIDR: 10.244.1.0/24\n    addressV6: fd00::11\n    podCIDRv6: fd00:10:244:1::/64\n    vtepMACv6: 66:00:00:00:00:06\n",
        );
    let c = parse(&dual, &Defaults::default(), &limits(Some("node1"))).unwrap();
    assert!(c.nodes.iter().all(|n| n.v6.is_some()));
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    // In a file an incomplete IPv6 half rejects the file, with the field and the reason.
    let e = errors(&dual.replace("    addressV6: fd00::11\n", ""));
    assert_eq!(
        e,
        ["nodes[1].addressV6: missing: the node has an IPv6 pod CIDR but no IPv6 address"]
    );
    let e = errors(&dual.replace("fd00:10:244:1::/64", "fd00:10:244::1/64"));
    assert_eq!(
        e,
        ["nodes[1].podCIDRv6: \"fd00:10:244::1/64\" has host bits set"]
    );
    let e = errors(&dual.replace("fd00::11", "fd00::10"));
    assert_eq!(
        e,
        ["nodes[1].addressV6: duplicate IPv6 address fd00::10 (also node \"node1\")"]
    );
    // IPv6 data where IPv6 pods cannot be carried is named, never dropped without a word.
    let warnings = |text: &str| {
        let c = parse(text, &Defaults::default(), &limits(Some("node1"))).unwrap();
        c.warnings
    };
    let w = warnings(&dual.replace("encapsulation: vxlan", "encapsulation: ipip"));
    assert!(w[0].contains("IPIP is IPv4 only"), "{w:?}");
    // Native routing (BGP) carries them: no word; an IPv6 BGP peer of a node without an
    // IPv6 half is named.
    let bgp = dual.replace(
        "encapsulation: vxlan",
        "encapsulation: none\nbgp: { peers: [ { address: \"fd00::1\", asNumber: 65001 } ] }",
    );
    assert!(warnings(&bgp).is_empty(), "{:?}", warnings(&bgp));
    let half2 = "    addressV6: fd00::11\n    podCIDRv6: fd00:10:244:1::/64\n    vtepMACv6: 66:00:00:00:00:06\n";
    let w = warnings(&bgp.replace(half2, ""));
    let named = "bgp.peers[0].address: an IPv6 peer, but node(s) [\"node2\"] have no IPv6 half";
    assert!(w.iter().any(|x| x.starts_with(named)), "{w:?}");
    let own_v4 = dual.replace(
        "    addressV6: fd00::10\n    podCIDRv6: fd00:10:244::/64\n",
        "",
    );
    let w = warnings(&own_v4);
    assert!(w[0].contains("no IPv6 underlay"), "{w:?}");
}

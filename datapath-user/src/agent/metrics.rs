//! The agent's Prometheus metrics: the datapath's counters from the maps, and the agent's
//! own (reloads, etcd, the pod MTU, ruleset changes, the BGP speaker and its sessions).
use std::sync::Mutex;

use crate::{
    bgp,
    observe::stats::{
        Extra::{self, Counter, Gauge},
        Snapshot,
    },
    reconcile::state::{SharedRef, lock},
    source::etcd::EtcdStatus,
};

/// The metrics page.
pub fn body(
    shared: &SharedRef,
    etcd: Option<&Mutex<EtcdStatus>>,
    speaker: &bgp::SpeakerRef,
) -> String {
    let s = lock(shared);
    let r = &s.reload;
    let mut extra = vec![
        Gauge(
            "datapath_last_reload_timestamp_seconds",
            "Unix time of the last reload",
            r.last_reload_unix,
        ),
        Gauge(
            "datapath_last_reload_success",
            "1 when the last reload applied, 0 when it was rejected",
            f64::from(u8::from(r.last_reload_ok)),
        ),
        Counter("datapath_reloads", "Cluster states received", r.reloads),
        Counter(
            "datapath_reload_failures",
            "Cluster states rejected (the last good state stayed)",
            r.failures,
        ),
        Gauge(
            "datapath_pod_mtu",
            "MTU pods on this node should use",
            f64::from(s.dp.pod_mtu()),
        ),
        Gauge(
            "datapath_nodes_skipped",
            "Nodes of the last state left out as incomplete or unreadable",
            r.skipped as f64,
        ),
        Gauge(
            "datapath_ipv6_nodes_known",
            "Peer nodes whose IPv6 half is in the maps (VXLAN over IPv6)",
            s.dp.ipv6_nodes_known() as f64,
        ),
        Counter(
            "datapath_ruleset_changes",
            "Changes of the host's netfilter ruleset seen; each one has accepted flows judged again",
            s.ruleset_changes,
        ),
    ];
    if let Some(etcd) = etcd {
        let e = etcd.lock().expect("lock").clone();
        extra.extend([
            Gauge(
                "datapath_etcd_connected",
                "1 while the etcd watch is connected",
                f64::from(u8::from(e.connected)),
            ),
            Counter(
                "datapath_etcd_resyncs",
                "Full reads of etcd after a lost connection",
                e.resyncs,
            ),
            Gauge(
                "datapath_etcd_revision",
                "etcd revision last seen",
                e.revision as f64,
            ),
            Gauge(
                "datapath_etcd_applied_revision",
                "etcd revision of the state applied",
                r.revision as f64,
            ),
        ]);
    }
    extra.extend(bgp_metrics(&bgp::snapshot(speaker)));
    match Snapshot::read(&s.dp.maps) {
        Ok(snap) => snap.render_openmetrics(&extra),
        Err(e) => format!("# error reading maps: {e}\n# EOF\n"),
    }
}

/// The BGP speaker and its sessions, when the state asks for BGP.
fn bgp_metrics(b: &bgp::SpeakerStatus) -> Vec<Extra> {
    if !b.wanted {
        return Vec::new();
    }
    let per = |f: &dyn Fn(&bgp::sessions::Session) -> f64| {
        b.sessions
            .iter()
            .map(|x| (x.peer.clone(), f(x)))
            .collect::<Vec<_>>()
    };
    vec![
        Gauge(
            "datapath_bgp_speaker_running",
            "1 while the node's BGP speaker (BIRD) answers on its control socket",
            f64::from(u8::from(b.running)),
        ),
        Counter(
            "datapath_bgp_speaker_starts",
            "Times the agent started the BGP speaker (the first start included)",
            b.starts,
        ),
        Extra::PeerGauges(
            "datapath_bgp_session_established",
            "1 while the BGP session with the peer is Established",
            per(&|x| f64::from(u8::from(x.established()))),
        ),
        Extra::PeerGauges(
            "datapath_bgp_prefixes_received",
            "Routes the peer advertised that BIRD imported",
            per(&|x| f64::from(x.received)),
        ),
        Extra::PeerGauges(
            "datapath_bgp_prefixes_advertised",
            "Routes advertised to the peer",
            per(&|x| f64::from(x.advertised)),
        ),
        Extra::PeerCounters(
            "datapath_bgp_session_flaps",
            "Times the session with the peer left Established",
            b.sessions
                .iter()
                .map(|x| (x.peer.clone(), b.flaps.get(&x.peer).copied().unwrap_or(0)))
                .collect(),
        ),
    ]
}

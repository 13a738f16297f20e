//! BGP native routing: the node's BIRD, configured from the cluster state's `bgp` block and
//! supervised by the agent, advertises this node's pod CIDR and learns the fabric's routes;
//! its sessions are logged, counted, and shown in `status` and the metrics.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{Notify, mpsc};
use tracing::{info, warn};

pub mod bird;
pub mod config;
pub mod sessions;

use bird::Bird;
use config::View;
use sessions::{Reading, Session};

use crate::reconcile::{
    dataplane::Fabric,
    state::{SharedRef, lock},
};

/// `datapath run`'s flags for the BGP speaker; the `bgp` block of the cluster state turns it on.
#[derive(clap::Args, Clone, Debug)]
pub struct BgpOptions {
    /// Directory of this node's BIRD: configuration, control socket, pid file and log
    /// [default: /run/datapath/bgp/<the pin directory, with - for />].
    #[arg(long)]
    pub bgp_dir: Option<PathBuf>,
    /// BGP router ID [default: this node's address].
    #[arg(long)]
    pub bgp_router_id: Option<Ipv4Addr>,
    /// Address the BGP sessions are made from [default: this node's address].
    #[arg(long)]
    pub bgp_source: Option<Ipv4Addr>,
    /// The BIRD 2 daemon to run.
    #[arg(long, default_value = "bird")]
    pub bird: PathBuf,
}

impl BgpOptions {
    pub fn bird(&self, pin_dir: &std::path::Path) -> Bird {
        Bird {
            bin: self.bird.clone(),
            dir: self
                .bgp_dir
                .clone()
                .unwrap_or_else(|| bird::default_dir(pin_dir)),
        }
    }
}

/// The speaker as the agent last saw it, for the metrics.
#[derive(Clone, Debug, Default)]
pub struct SpeakerStatus {
    /// The state asks for BGP.
    pub wanted: bool,
    pub running: bool,
    pub sessions: Vec<Session>,
    /// Times the agent had to start BIRD (the first start included).
    pub starts: u64,
    /// Times each session (by peer address) left Established.
    pub flaps: BTreeMap<String, u64>,
    /// Readings in a row each session (by name) has not been Established.
    pub waiting: BTreeMap<String, u32>,
    /// The last error configuring or reading BIRD, until one succeeds.
    pub error: Option<String>,
}

pub type SpeakerRef = Arc<Mutex<SpeakerStatus>>;

/// Supervises BIRD: configures it whenever the state changes (`changed`) and every two
/// seconds checks it runs, reads its sessions and sends the pod CIDRs the fabric can route to
/// the reconciler (`fabric`). A failure is logged and retried; forwarding never waits on it.
pub async fn supervise(
    shared: SharedRef,
    opts: BgpOptions,
    bird: Bird,
    changed: Arc<Notify>,
    fabric: mpsc::Sender<Fabric>,
    status: SpeakerRef,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut sent: Option<Fabric> = None;
    // What BIRD was last configured from: the configuration is rendered again only when the
    // state changed it (or after a failed round).
    let mut configured: Option<Option<View>> = None;
    loop {
        tokio::select! {
            () = changed.notified() => {}
            _ = tick.tick() => {}
        }
        let view = view(&shared, &opts);
        let fresh = configured.as_ref() != Some(&view);
        let (b, st, v) = (bird.clone(), status.clone(), view.clone());
        let reading = tokio::task::spawn_blocking(move || step(&b, v.as_ref(), fresh, &st))
            .await
            .ok()
            .flatten();
        let Some(reading) = reading else {
            configured = None;
            continue;
        };
        configured = Some(view);
        let routes = reading.fabric_routes();
        // A session coming back (BIRD restarted, a peer restarting) has not relearned what
        // graceful restart keeps in the fabric: no peer goes back into a tunnel for that.
        let settled = reading.sessions.iter().all(Session::established);
        let grows = sent.as_ref().is_none_or(|s| s.is_subset(&routes));
        if sent.as_ref() != Some(&routes)
            && (settled || grows)
            && fabric.send(routes.clone()).await.is_ok()
        {
            sent = Some(routes);
        }
    }
}

/// What the state asks of BIRD now: `None` when it asks for no BGP.
fn view(shared: &SharedRef, opts: &BgpOptions) -> Option<View> {
    let s = lock(shared);
    let bgp = s.dp.settings()?.bgp.clone()?;
    let mut me = s.dp.me()?.clone();
    // An IPv6 half this node does not carry (IPIP) is not advertised.
    if !s.dp.ipv6_active() {
        me.v6 = None;
    }
    Some(View {
        bgp,
        router_id: opts.bgp_router_id.unwrap_or(me.address),
        local: opts.bgp_source.unwrap_or(me.address),
        peers: s.dp.peer_nodes().cloned().collect(),
        networks: s.dp.cluster_networks(),
        networks6: s.dp.cluster_networks6(),
        iface: s.dp.local.iface.name.clone(),
        advertise: !s.reload.left_cluster,
        me,
    })
}

/// One round: BIRD configured and running as `view` asks (stopped when it asks for none),
/// then read. Errors are recorded in `status` and logged once.
fn step(bird: &Bird, view: Option<&View>, fresh: bool, status: &SpeakerRef) -> Option<Reading> {
    let alive = bird.alive();
    let Some(view) = view else {
        if alive {
            info!(dir = %bird.dir.display(), "the cluster state has no bgp block: stopping BIRD");
            if let Err(e) = bird.down() {
                warn!("stopping BIRD: {e:#}");
            }
        }
        *lock_status(status) = SpeakerStatus::default();
        return None;
    };
    let outcome =
        ensure(bird, view, alive, fresh, status).and_then(|()| sessions::read(&bird.socket()));
    let mut st = lock_status(status);
    st.wanted = true;
    match outcome {
        Ok(r) => {
            st.running = true;
            note_sessions(&mut st, &r.sessions);
            st.error = None;
            Some(r)
        }
        Err(e) => {
            let text = format!("{e:#}");
            if st.error.as_ref() != Some(&text) {
                warn!(dir = %bird.dir.display(), "BGP speaker: {text}");
            }
            st.running = bird.alive();
            st.error = Some(text);
            None
        }
    }
}

/// Writes the configuration (when `view` is `fresh` or BIRD is not running) and has BIRD run
/// it: started when it is not running, told to read it again when it changed.
fn ensure(
    bird: &Bird,
    view: &View,
    alive: bool,
    fresh: bool,
    status: &SpeakerRef,
) -> anyhow::Result<()> {
    let changed =
        (fresh || !alive) && bird.write_config(&config::render(view, &bird.log()), alive)?;
    if !alive {
        bird.start()?;
        let mut st = lock_status(status);
        st.starts += 1;
        info!(dir = %bird.dir.display(), starts = st.starts, "BGP speaker (BIRD) started");
    } else if changed {
        bird.configure()?;
        info!(dir = %bird.dir.display(), "BGP speaker reconfigured");
    }
    Ok(())
}

/// Readings (2 s apart) a session may spend coming up before it is logged as not coming up.
const PATIENCE: u32 = 3;

/// Logs every session that comes up or goes down, counts those that left Established, and
/// logs once a session that does not come up (a peer refusing, unreachable, of another AS).
fn note_sessions(st: &mut SpeakerStatus, now: &[Session]) {
    for s in now {
        let was_up = st
            .sessions
            .iter()
            .any(|o| o.name == s.name && o.established());
        if s.established() {
            st.waiting.remove(&s.name);
            if !was_up {
                info!(peer = %s.peer, kind = s.kind, peer_as = s.peer_as, "BGP session established");
            }
            continue;
        }
        if was_up {
            *st.flaps.entry(s.peer.clone()).or_default() += 1;
            warn!(peer = %s.peer, kind = s.kind, state = %s.state, info = %s.info, "BGP session down");
        }
        let readings = st.waiting.entry(s.name.clone()).or_default();
        *readings += 1;
        if *readings == PATIENCE {
            warn!(peer = %s.peer, kind = s.kind, peer_as = s.peer_as, state = %s.state, info = %s.info, "BGP session not established");
        }
    }
    st.waiting
        .retain(|name, _| now.iter().any(|s| &s.name == name));
    st.sessions = now.to_vec();
}

fn lock_status(s: &SpeakerRef) -> std::sync::MutexGuard<'_, SpeakerStatus> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The metrics' view of the speaker.
pub fn snapshot(s: &SpeakerRef) -> SpeakerStatus {
    lock_status(s).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(state: &str, info: &str) -> Session {
        Session {
            name: "peer_10_0_0_1".into(),
            kind: "peer",
            peer: "10.0.0.1".into(),
            peer_as: 65000,
            state: state.into(),
            since: String::new(),
            info: info.into(),
            received: 0,
            advertised: 0,
        }
    }

    #[test]
    fn a_session_leaving_established_is_a_flap_and_one_that_stays_down_is_noted() {
        let mut st = SpeakerStatus::default();
        for state in [
            "Connect",
            "Established",
            "Active",
            "Established",
            "Established",
            "Idle",
        ] {
            note_sessions(&mut st, &[session(state, state)]);
        }
        assert_eq!(st.flaps.get("10.0.0.1"), Some(&2));
        assert_eq!(st.waiting.get("peer_10_0_0_1"), Some(&1));
        for _ in 0..PATIENCE {
            note_sessions(&mut st, &[session("Active", "Active")]);
        }
        assert_eq!(st.waiting.get("peer_10_0_0_1"), Some(&(PATIENCE + 1)));
        note_sessions(&mut st, &[session("Established", "Established")]);
        assert_eq!(st.waiting.get("peer_10_0_0_1"), None);
    }
}

//! The agent's loop once the node is up: updates from the source to the reconciler, route
//! repair, output retries, netfilter ruleset changes, the CNI plugin check, and the signals
//! that end it.
use std::{sync::Arc, time::Duration};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{info, warn};

use crate::{
    observe::http,
    outputs::cni::{self, CniOptions},
    reconcile::{
        Reconciler,
        dataplane::Fabric,
        state::{SharedRef, lock},
    },
    source::Update,
    underlay::ruleset,
};

/// How often the CNI bin directory is looked at again for the reference plugins.
const CNI_PLUGIN_CHECK: Duration = Duration::from_secs(10);

/// A fresh interval whose first tick is one period away.
async fn every(period: Duration) -> tokio::time::Interval {
    let mut i = tokio::time::interval(period);
    i.tick().await;
    i
}

/// Applies what the source sends, repairs routes every 30 s, retries outputs (and puts back
/// the masquerade rules, as flanneld) every 5 s, until SIGTERM or SIGINT.
pub async fn serve(
    mut rec: Reconciler,
    mut rx: mpsc::Receiver<Update>,
    mut rulesets: Option<mpsc::Receiver<ruleset::Change>>,
    mut fabric: mpsc::Receiver<Fabric>,
    probe: Arc<http::Probe>,
) -> anyhow::Result<()> {
    let shared = rec.shared.clone();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut repair = every(Duration::from_secs(30)).await;
    let mut outputs = every(Duration::from_secs(5)).await;
    let mut plugins = every(CNI_PLUGIN_CHECK).await;
    loop {
        tokio::select! {
            u = rx.recv() => match u {
                Some(u) => rec.handle(u).await,
                None => break,
            },
            Some(routes) = fabric.recv() => rec.apply_fabric(routes).await,
            _ = repair.tick() => rec.repair_routes().await,
            Some(change) = async { rulesets.as_mut()?.recv().await }, if rulesets.is_some() => {
                ruleset_changed(&shared, change, rulesets.as_mut().expect("watched"));
            }
            _ = outputs.tick() => rec.outputs.retry(),
            _ = plugins.tick() => check_cni_plugins(&shared, &rec.outputs.cni, &probe),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    {
        let mut s = lock(&shared);
        s.stopping = true;
        s.record();
    }
    info!("stopping; programs stay attached and forwarding from their pins");
    Ok(())
}

/// A netfilter ruleset change: accepted flows are judged again from their next packet on.
/// Notifications of one transaction that are already queued count as this one change.
fn ruleset_changed(
    shared: &SharedRef,
    change: ruleset::Change,
    rx: &mut mpsc::Receiver<ruleset::Change>,
) {
    while rx.try_recv().is_ok() {}
    ruleset::keep_tcp_tracking_liberal();
    let mut s = lock(shared);
    s.ruleset_changes += 1;
    match s.dp.bump_ruleset_gen() {
        Ok(generation) => tracing::debug!(
            ?change,
            generation,
            "netfilter ruleset changed: accepted flows are judged again"
        ),
        Err(e) => warn!("netfilter ruleset changed, but the new generation was not written: {e}"),
    }
}

/// Looks for the reference CNI plugins the configuration list names; says so (log, `/readyz`,
/// `datapath status`) when some are missing, and again when they come.
pub fn check_cni_plugins(shared: &SharedRef, cni_opts: &CniOptions, probe: &http::Probe) {
    let mask = cni::missing_plugins(cni_opts);
    let mut s = lock(shared);
    if mask == s.cni_missing {
        return;
    }
    s.cni_missing = mask;
    s.record();
    if mask == 0 {
        info!(dir = %cni_opts.bin_dir.display(), "the reference CNI plugins are there now");
        probe.set_cni_problem(None);
        return;
    }
    let why = format!(
        "CNI plugins {} missing from {}: no pod can be created on this node; install the reference plugins (containernetworking-plugins) there",
        cni::plugin_names(mask).join(", "),
        cni_opts.bin_dir.display()
    );
    warn!("{why}");
    probe.set_cni_problem(Some(why));
}

//! The agent's HTTP endpoint, as a DaemonSet's probes and Prometheus expect it: `/healthz`
//! (the process answers), `/readyz` (a first state applied and the programs attached, by the
//! agent that holds the node; 503 with the reason otherwise) and `/metrics` (OpenMetrics text
//! from prometheus-client), served by axum.
use std::{
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::net::TcpListener;
use tracing::{error, info, warn};

/// What the endpoint answers with, set by the agent as it goes.
pub struct Probe {
    /// `None` when ready; otherwise why not.
    not_ready: Mutex<Option<String>>,
    /// Why pods cannot be created on this node (CNI plugins missing), if so: not ready either.
    cni: Mutex<Option<String>>,
    /// Renders the metrics; absent until the datapath is loaded.
    metrics: Mutex<Option<Box<dyn Fn() -> String + Send>>>,
}

impl Probe {
    pub fn new(not_ready: &str) -> Arc<Self> {
        Arc::new(Self {
            not_ready: Mutex::new(Some(not_ready.to_string())),
            cni: Mutex::new(None),
            metrics: Mutex::new(None),
        })
    }

    pub fn set_ready(&self) {
        *self.not_ready.lock().expect("probe lock") = None;
    }

    pub fn set_not_ready(&self, why: &str) {
        *self.not_ready.lock().expect("probe lock") = Some(why.to_string());
    }

    pub fn set_cni_problem(&self, why: Option<String>) {
        *self.cni.lock().expect("probe lock") = why;
    }

    pub fn set_metrics(&self, render: impl Fn() -> String + Send + 'static) {
        *self.metrics.lock().expect("probe lock") = Some(Box::new(render));
    }
}

/// The OpenMetrics text format's content type, as prometheus-client writes it.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How often a port another process holds is tried again.
const BIND_RETRY: Duration = Duration::from_millis(500);

/// Binds `addr` and serves the three paths in the background. A port in use (most likely by
/// the agent this one replaces, on a host network) is tried again every `BIND_RETRY` in the
/// background until it is free; any other failure to bind is an error.
pub async fn serve(addr: SocketAddr, probe: Arc<Probe>) -> anyhow::Result<()> {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => Some(l),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            warn!(
                %addr,
                "the HTTP endpoint's port is in use, most likely by the agent this one replaces; trying again every {} ms",
                BIND_RETRY.as_millis()
            );
            None
        }
        Err(e) => {
            return Err(e).with_context(|| format!("binding the HTTP endpoint on {addr}"));
        }
    };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(probe);
    tokio::spawn(async move {
        let listener = match listener {
            Some(l) => l,
            None => bind_when_free(addr).await,
        };
        info!(%addr, "serving /healthz, /readyz and /metrics");
        if let Err(e) = axum::serve(listener, app).await {
            error!("HTTP endpoint stopped: {e}");
        }
    });
    Ok(())
}

/// Binds `addr` once the process holding it has let it go.
async fn bind_when_free(addr: SocketAddr) -> TcpListener {
    loop {
        tokio::time::sleep(BIND_RETRY).await;
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
            Err(e) => warn!(%addr, "binding the HTTP endpoint: {e}; trying again"),
        }
    }
}

async fn readyz(State(p): State<Arc<Probe>>) -> impl IntoResponse {
    let not_ready = p.not_ready.lock().expect("probe lock").clone();
    match not_ready.or_else(|| p.cni.lock().expect("probe lock").clone()) {
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics(State(p): State<Arc<Probe>>) -> impl IntoResponse {
    let body = match p.metrics.lock().expect("probe lock").as_ref() {
        Some(render) => render(),
        None => "# EOF\n".to_string(),
    };
    ([(header::CONTENT_TYPE, OPENMETRICS)], body)
}

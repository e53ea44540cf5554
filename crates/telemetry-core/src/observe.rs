//! Logs, metrics and health, the same for every stage.
//!
//! Each process serves `/metrics` (Prometheus text), `/healthz` (the process is alive: every
//! stage with work pending makes progress) and
//! `/readyz` (every dependency it needs is reachable right now). Readiness is a set of named
//! checks that the stages flip as they lose and regain their servers, so an orchestrator stops
//! routing to, or scaling on, a replica that is waiting out an outage.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};

use crate::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("cannot listen for /metrics and health checks on {addr}: {source}; pick a free address with the `http.listen` setting")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install the Prometheus recorder: {0}")]
    Recorder(String),
}

/// Where the `/metrics`, `/healthz` and `/readyz` server listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address and port, e.g. `0.0.0.0:9101`; port 0 picks a free one.
    pub listen: SocketAddr,
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines, for terminals.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Starts structured logging; `RUST_LOG` overrides the default `info` filter. Safe to call twice
/// (the second call is ignored), which tests that start several stages in one process need.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Latency buckets in seconds: 1 ms to 30 s, dense where flushes and deliveries usually land.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Batch-size buckets in records, up to a few times the default batch of 1,000.
const RECORDS_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 750.0, 1000.0, 2000.0, 5000.0,
];

/// How often recorded histogram samples are folded into their buckets. The recorder keeps raw
/// samples until then, so without upkeep a histogram recorded per message grows without bound
/// between scrapes.
const METRICS_UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the process-wide Prometheus recorder once and returns its handle. The first call
/// also starts a small thread that runs the recorder's upkeep every few seconds.
///
/// Several stages may start at once in one process (the tests run a worker and a bridge side by
/// side), so checking and installing happen under one lock: otherwise the second caller could
/// find the recorder installed by the first but its handle not yet stored, and fail.
pub fn metrics_handle() -> Result<PrometheusHandle, ObserveError> {
    static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
    let mut installed = HANDLE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(handle) = installed.as_ref() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_records".into()), RECORDS_BUCKETS))
        .map_err(|e| ObserveError::Recorder(e.to_string()))?
        .install_recorder()
        .map_err(|e| ObserveError::Recorder(e.to_string()))?;
    start_upkeep(handle.clone());
    *installed = Some(handle.clone());
    Ok(handle)
}

fn start_upkeep(handle: PrometheusHandle) {
    let started = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(METRICS_UPKEEP_INTERVAL);
            handle.run_upkeep();
        });
    if let Err(error) = started {
        tracing::warn!(%error, "cannot start the metrics upkeep thread; histograms are folded only when scraped");
    }
}

/// Named readiness checks, and named liveness checks. The process is ready when every registered
/// readiness check passes; it is alive (`/healthz`) while no liveness check fails. A liveness
/// check fails only for a state a restart cures (a stage that stopped making progress), never
/// for an outage of a dependency, which readiness reports.
#[derive(Debug, Clone, Default)]
pub struct Health {
    checks: Arc<Mutex<BTreeMap<&'static str, bool>>>,
    live: Arc<Mutex<BTreeMap<&'static str, bool>>>,
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records whether `check` (e.g. `postgres`, `kafka`) passes right now.
    pub fn set(&self, check: &'static str, ok: bool) {
        let mut checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        if checks.insert(check, ok) != Some(ok) {
            tracing::info!(check, ok, "readiness changed");
        }
    }

    /// Records whether liveness check `check` (e.g. `progress`) passes right now.
    pub fn set_live(&self, check: &'static str, ok: bool) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.insert(check, ok) != Some(ok) {
            if ok {
                tracing::info!(check, "liveness restored");
            } else {
                tracing::error!(check, "liveness check failing: /healthz answers 503");
            }
        }
    }

    pub fn is_alive(&self) -> bool {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.values().all(|ok| *ok)
    }

    fn liveness_report(&self) -> String {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let failing: String = live
            .iter()
            .filter(|(_, ok)| !**ok)
            .map(|(name, _)| format!("{name}: failing\n"))
            .collect();
        if failing.is_empty() {
            "ok\n".into()
        } else {
            failing
        }
    }

    pub fn is_ready(&self) -> bool {
        let checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        !checks.is_empty() && checks.values().all(|ok| *ok)
    }

    fn report(&self) -> String {
        let checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        checks
            .iter()
            .map(|(name, ok)| format!("{name}: {}\n", if *ok { "ok" } else { "failing" }))
            .collect()
    }
}

#[derive(Clone)]
struct AppState {
    health: Health,
    metrics: PrometheusHandle,
}

/// Binds the health and metrics server now (so a bad address stops start-up) and serves it in
/// the background until shutdown. Returns the bound address, useful with port 0.
pub async fn serve_http(
    addr: SocketAddr,
    health: Health,
    shutdown: Shutdown,
) -> Result<SocketAddr, ObserveError> {
    let metrics = metrics_handle()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ObserveError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ObserveError::Bind { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(liveness))
        .route("/readyz", get(readiness))
        .with_state(AppState { health, metrics });
    tokio::spawn(async move {
        let served =
            axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.wait().await });
        if let Err(e) = served.await {
            tracing::error!(error = %e, "health and metrics server stopped");
        }
    });
    tracing::info!(%bound, "serving /metrics, /healthz and /readyz");
    Ok(bound)
}

async fn render_metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}

async fn liveness(State(state): State<AppState>) -> (StatusCode, String) {
    let status = if state.health.is_alive() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, state.health.liveness_report())
}

async fn readiness(State(state): State<AppState>) -> (StatusCode, String) {
    let status = if state.health.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, state.health.report())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_starting_at_once_in_one_process_share_the_recorder() {
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let callers: Vec<_> = (0..8)
            .map(|_| {
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    metrics_handle().map(|_| ())
                })
            })
            .collect();
        for caller in callers {
            caller
                .join()
                .unwrap()
                .expect("every caller gets the handle");
        }
        metrics::counter!("observe_concurrent_install_total").increment(1);
        assert!(metrics_handle()
            .unwrap()
            .render()
            .contains("observe_concurrent_install_total 1"));
    }

    #[test]
    fn readiness_needs_every_check_to_pass() {
        let health = Health::new();
        assert!(
            !health.is_ready(),
            "no checks registered yet means not ready"
        );
        health.set("postgres", true);
        health.set("kafka", false);
        assert!(!health.is_ready());
        health.set("kafka", true);
        assert!(health.is_ready());
    }

    #[tokio::test]
    async fn the_server_answers_health_readiness_and_metrics() {
        let health = Health::new();
        let shutdown = Shutdown::new();
        let addr = serve_http(
            "127.0.0.1:0".parse().unwrap(),
            health.clone(),
            shutdown.clone(),
        )
        .await
        .unwrap();
        metrics::counter!("observe_test_total").increment(3);
        let get = |path: &'static str| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            stream
                .write_all(
                    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            response
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        health.set("postgres", false);
        let not_ready = get("/readyz").await;
        assert!(
            not_ready.starts_with("HTTP/1.1 503") && not_ready.contains("postgres: failing"),
            "{not_ready}"
        );
        health.set("postgres", true);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/metrics").await.contains("observe_test_total 3"));
        // A stage that stopped making progress fails liveness, so an orchestrator restarts it;
        // an outage (readiness) never does.
        health.set("postgres", false);
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        health.set_live("progress", false);
        let dead = get("/healthz").await;
        assert!(
            dead.starts_with("HTTP/1.1 503") && dead.contains("progress: failing"),
            "{dead}"
        );
        health.set_live("progress", true);
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        shutdown.trigger();
    }
}

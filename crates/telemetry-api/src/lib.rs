//! The query API: an HTTP service next to the worker that lets the owners of devices read what
//! was stored (latest reading, history, devices, alerts) and lets devices that cannot speak MQTT
//! send readings over HTTP.
//!
//! - [`config`]: settings and their checks.
//! - [`schema`]: the API's own migrations (`api_tokens`) and the read-only role's grants.
//! - [`tokens`]: per-user API tokens, stored hashed.
//! - [`routes`]: the routes, their access rules and the OpenAPI document.
//! - [`params`] and [`cursor`]: query parameters and keyset-pagination cursors.
//! - [`store`]: every query, through PgBouncer.
//! - [`ingest`]: HTTP ingest to Kafka (its guarantee is described there).
//! - [`problem`]: error responses.
//! - [`metrics`]: every metric's name.
//!
//! The API only reads PostgreSQL. The tables it reads belong to the worker (`raw_telemetry`,
//! `device_latest`) and the alerting stage (`alerts`).

pub mod config;
pub mod cursor;
pub mod ingest;
pub mod metrics;
pub mod params;
pub mod problem;
pub mod routes;
pub mod schema;
pub mod store;
pub mod tokens;

use std::net::SocketAddr;
use std::time::Duration;

use deadpool_postgres::Pool;
use telemetry_core::backoff::Backoff;
use telemetry_core::observe::{self, Health};
use telemetry_core::Shutdown;
use tokio::task::JoinHandle;

pub use config::ApiConfig;

use crate::routes::App;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Observe(#[from] observe::ObserveError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot migrate the database: {0}")]
    Schema(#[from] schema::SchemaError),
    #[error("cannot create the Kafka producer: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("cannot listen for API requests on {addr}: {source}; pick a free address with the `listen` setting")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the API server failed: {0}")]
    Serve(#[source] std::io::Error),
    #[error("stopped before start-up finished")]
    Stopped,
}

/// How often readiness re-checks PostgreSQL and Kafka.
const READINESS_INTERVAL: Duration = Duration::from_secs(5);
/// How long in-flight HTTP ingest records may take to be confirmed at shutdown.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(10);

/// A started API: where it listens, and its end.
#[derive(Debug)]
pub struct Running {
    /// Where the API answers (useful with port 0).
    pub addr: SocketAddr,
    /// Where `/metrics`, `/healthz` and `/readyz` answer.
    pub metrics_addr: SocketAddr,
    store: Store,
    task: JoinHandle<Result<(), ApiError>>,
}

impl Running {
    /// The pool every request queries through; benchmarks compare the API against plain
    /// queries on this same pool.
    pub fn pool(&self) -> &Pool {
        self.store.pool()
    }

    /// Waits until the server has stopped after shutdown, requests in flight answered.
    pub async fn wait(self) -> Result<(), ApiError> {
        match self.task.await {
            Ok(result) => result,
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }
}

/// Runs the API until shutdown.
pub async fn run(config: ApiConfig, shutdown: Shutdown) -> Result<(), ApiError> {
    match start(config, shutdown).await {
        Ok(running) => running.wait().await,
        Err(ApiError::Stopped) => Ok(()),
        Err(error) => Err(error),
    }
}

/// Starts the API: health server, migrations (unless disabled; they wait for the database),
/// Kafka producer, then the listener. Returns once requests are being answered.
pub async fn start(config: ApiConfig, shutdown: Shutdown) -> Result<Running, ApiError> {
    let health = Health::new();
    health.set("postgres", false);
    health.set("kafka", false);
    let metrics_addr =
        observe::serve_http(config.http.listen, health.clone(), shutdown.clone()).await?;
    if config.migrate_on_start {
        let admin = store::create_pool(config.postgres.admin_url(), 1)?;
        if !migrate_when_reachable(&admin, &config.postgres.reader_role, &shutdown).await? {
            return Err(ApiError::Stopped);
        }
    }
    let pool = store::create_pool(&config.postgres.url, config.postgres.pool_size)?;
    let store = Store::new(pool, config.postgres.query_timeout());
    let auth = tokens::Authenticator::new(store.clone(), config.auth.token_cache_ttl());
    let ingest = ingest::HttpIngest::new(&config.kafka, &config.ingest)?;
    let app = App::new(store.clone(), auth, ingest, config.limits.clone());
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ApiError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ApiError::Bind {
        addr: config.listen,
        source,
    })?;
    tokio::spawn(keep_readiness(app.clone(), health, shutdown.clone()));
    let router = routes::router(app.clone());
    let task = tokio::spawn(async move {
        let stop = shutdown.clone();
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.wait().await })
            .await
            .map_err(ApiError::Serve);
        // A request whose client went away may have left a record in the producer's queue.
        let flushing = app.clone();
        let _ = tokio::task::spawn_blocking(move || flushing.ingest().flush(SHUTDOWN_FLUSH)).await;
        // Any way out of serving stops the rest of the process too.
        shutdown.trigger();
        tracing::info!("API stopped");
        served
    });
    tracing::info!(%addr, "API answering requests");
    Ok(Running {
        addr,
        metrics_addr,
        store,
        task,
    })
}

/// Applies the API's migrations, waiting for the database to come up first. Returns false on
/// shutdown.
async fn migrate_when_reachable(
    pool: &Pool,
    reader_role: &str,
    shutdown: &Shutdown,
) -> Result<bool, ApiError> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match pool.get().await {
            Ok(mut client) => {
                let migrated = schema::migrate(&mut client, reader_role).await?;
                if !reader_role.is_empty() {
                    tracing::info!(role = reader_role, tables = ?migrated.granted, "read-only role may read");
                }
                return Ok(true);
            }
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "database not reachable yet");
                tokio::select! {
                    _ = shutdown.wait() => return Ok(false),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Keeps `/readyz` true to whether PostgreSQL and Kafka answer right now.
async fn keep_readiness(app: App, health: Health, shutdown: Shutdown) {
    loop {
        health.set("postgres", app.store().ping().await.is_ok());
        let probing = app.clone();
        let kafka =
            tokio::task::spawn_blocking(move || probing.ingest().probe(Duration::from_secs(3)))
                .await
                .unwrap_or(false);
        health.set("kafka", kafka);
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tokio::time::sleep(READINESS_INTERVAL) => {}
        }
    }
}

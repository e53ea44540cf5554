//! The worker: consumes `iot-stream` in a Kafka consumer group and stores every record exactly
//! once in PostgreSQL with binary COPY, through PgBouncer.
//!
//! - [`config`]: settings and their checks.
//! - [`schema`]: embedded migrations (`telemetry-worker migrate`).
//! - [`record`]: a Kafka record decoded into a row or a dead letter.
//! - [`ingest`]: the consumer loop (batching, Kafka commits, backpressure).
//! - [`positions`]: where an assigned partition starts, never above what is stored.
//! - [`sink`]: the exactly-once writer (the guarantee is described there).
//! - [`copy`]: binary COPY encoding.
//! - [`dlq`]: the dead-letter producer.
//! - [`replay`]: `telemetry-worker replay`, reading history again without duplicates.
//! - [`metrics`]: every metric's name.

pub mod config;
pub mod copy;
pub mod dedup;
pub mod dlq;
pub mod ingest;
pub mod metrics;
pub mod partitions;
pub mod positions;
pub mod record;
pub mod redrive;
pub mod replay;
pub mod schema;
pub mod sink;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use rdkafka::consumer::Consumer;
use telemetry_core::backoff::Backoff;
use telemetry_core::observe::{self, Health};
use telemetry_core::Shutdown;

pub use config::WorkerConfig;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Observe(#[from] observe::ObserveError),
    #[error("cannot create the database pool for {url}: {reason}")]
    Pool { url: String, reason: String },
    #[error("cannot migrate the database: {0}")]
    Schema(#[from] schema::SchemaError),
    #[error("cannot create the Kafka client: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Ingest(#[from] ingest::IngestError),
    #[error(transparent)]
    Alerts(#[from] telemetry_alerts::AlertError),
}

/// Runs the worker until shutdown: migrations (unless disabled), health server, consumer loop.
pub async fn run(config: WorkerConfig, shutdown: Shutdown) -> Result<(), WorkerError> {
    let health = Health::new();
    health.set("postgres", false);
    observe::serve_http(config.http.listen, health.clone(), shutdown.clone()).await?;
    let pool = create_pool(&config.postgres)?;
    if config.migrate_on_start && !migrate_when_reachable(&pool, &shutdown).await? {
        return Ok(());
    }
    health.set("postgres", true);
    let consumer = std::sync::Arc::new(ingest::create_consumer(&config, &shutdown)?);
    consumer.subscribe(&[&config.kafka.topic])?;
    let dead_letters = dlq::DeadLetterProducer::new(
        &config.kafka,
        dlq::delivery_timeout(config.postgres.write_timeout()),
    )?;
    let mut sink = sink::Sink::new(
        pool.clone(),
        config.kafka.topic.clone(),
        dead_letters,
        health,
    )
    .write_timeout(config.postgres.write_timeout());
    let alerts = start_alerts(&config.alerts, &pool, &shutdown)?;
    if let Some(alerts) = &alerts {
        sink = sink.alerts(alerts.stage.clone());
    }
    tracing::info!(topic = %config.kafka.topic, group = %config.group_id, "worker consuming");
    let consumed = ingest::consume(consumer, &sink, &config, &shutdown).await;
    // The publisher sends what the last batches committed before it stops.
    shutdown.trigger();
    if let Some(alerts) = alerts {
        for task in alerts.tasks {
            let _ = task.await;
        }
    }
    consumed?;
    tracing::info!("worker stopped");
    Ok(())
}

/// Starts the rules watcher and the outbox publisher when a rules file is configured. A broken
/// rules file stops start-up with the file and field named.
fn start_alerts(
    config: &telemetry_alerts::AlertsConfig,
    pool: &Pool,
    shutdown: &Shutdown,
) -> Result<Option<RunningAlerts>, WorkerError> {
    let Some(path) = &config.rules.path else {
        tracing::info!("no alert rules configured (alerts.rules.path); alerts are off");
        return Ok(None);
    };
    let watcher = telemetry_alerts::RulesWatcher::start(path, config.rules.reload_interval())?;
    tracing::info!(path = %path.display(), rules = watcher.rules().len(), "alert rules loaded");
    let rules = watcher.subscribe();
    let outbox = telemetry_alerts::Outbox::new(config.outbox.clone())?;
    let stage = sink::AlertStage {
        rules,
        outbox: outbox.waker(),
    };
    let watching = tokio::spawn(watcher.run(shutdown.clone()));
    let (pool, stop) = (pool.clone(), shutdown.clone());
    let publishing = tokio::spawn(async move {
        if let Err(error) = outbox.run(pool, stop).await {
            tracing::error!(%error, "alert publisher stopped");
        }
    });
    Ok(Some(RunningAlerts {
        stage,
        tasks: vec![watching, publishing],
    }))
}

/// The alert tasks of a running worker: the sink's view of them, and the tasks to wait for.
struct RunningAlerts {
    stage: sink::AlertStage,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// A pool that issues no named statement that outlives a transaction, as PgBouncer's
/// transaction mode requires: the worker never uses the pool's statement cache.
pub fn create_pool(config: &config::PostgresConfig) -> Result<Pool, WorkerError> {
    let pool_error = |reason: String| WorkerError::Pool {
        url: telemetry_core::config::redact_url(&config.url),
        reason,
    };
    let pg: tokio_postgres::Config = config
        .url
        .parse()
        .map_err(|e: tokio_postgres::Error| pool_error(e.to_string()))?;
    let manager = Manager::from_config(
        pg,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(config.pool_size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .create_timeout(Some(Duration::from_secs(5)))
        .wait_timeout(Some(Duration::from_secs(10)))
        .build()
        .map_err(|e| pool_error(e.to_string()))
}

/// Applies migrations, waiting for the database to come up first. Returns false on shutdown.
async fn migrate_when_reachable(pool: &Pool, shutdown: &Shutdown) -> Result<bool, WorkerError> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match pool.get().await {
            Ok(mut client) => {
                schema::migrate(&mut client).await?;
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

//! The worker's settings. Every field has a default that works with the local stack
//! (`make demo`); see `telemetry-worker --help` for the matching flags and environment variables.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use telemetry_alerts::AlertsConfig;
use telemetry_core::config::{redact_url, ConfigError, Validate};
use telemetry_core::contract::DEFAULT_MAX_PAYLOAD_BYTES;
use telemetry_core::kafka::KafkaConfig;
use telemetry_core::observe::{HttpConfig, LogFormat};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    pub kafka: KafkaConfig,
    /// Kafka consumer group; every replica of one deployment uses the same one.
    pub group_id: String,
    pub postgres: PostgresConfig,
    pub batch: BatchConfig,
    /// Payloads larger than this go to the dead-letter topic.
    pub max_payload_bytes: usize,
    /// Apply pending database migrations at start-up.
    pub migrate_on_start: bool,
    pub http: HttpConfig,
    pub log_format: LogFormat,
    /// Threshold alerts: evaluated when `alerts.rules.path` names a rules file.
    pub alerts: AlertsConfig,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            kafka: KafkaConfig::default(),
            group_id: "telemetry-worker".into(),
            postgres: PostgresConfig::default(),
            batch: BatchConfig::default(),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            migrate_on_start: true,
            http: HttpConfig {
                listen: "0.0.0.0:9101".parse().expect("valid address"),
            },
            log_format: LogFormat::Text,
            alerts: AlertsConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Connection URL, normally PgBouncer's (transaction mode), e.g.
    /// `postgres://telemetry@127.0.0.1:6432/telemetry`. Printed without its password.
    #[serde(serialize_with = "telemetry_core::config::serialize_redacted_url")]
    pub url: String,
    /// Connections kept by this replica: one per writer (`batch.writers`) and two per alert
    /// outbox publisher (`alerts.outbox.publishers`: a round's partition locks, and its
    /// release marks committed meanwhile). With fewer, they wait for each other's.
    pub pool_size: usize,
    /// How long one batch's transaction may take before it is abandoned and retried on a new
    /// connection. PgBouncer holds queries while PostgreSQL is down instead of failing them,
    /// so without this bound an outage would look like a slow write, not an outage.
    pub write_timeout_ms: u64,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:6432/telemetry".into(),
            pool_size: 6,
            write_timeout_ms: 15_000,
        }
    }
}

const MIB: usize = 1024 * 1024;

/// What the batches of one replica may hold at most: `batch.writers` x 3 x `batch.max_bytes`.
/// The pods run with 256 MiB; librdkafka's prefetch (16 MiB), the COPY encoding of the batches
/// being written and the process itself (about 25 MiB measured) need the rest.
pub const MEMORY_BUDGET_BYTES: usize = 96 * MIB;

/// Batches a writer holds at once: one being filled, one queued, one being written.
const BATCHES_PER_WRITER: usize = 3;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// A batch is written when it holds this many records...
    pub max_records: usize,
    /// ...or when one more record would take its keys, payloads and headers past this many
    /// bytes (a record larger than this goes in a batch of its own). Each writer holds up to
    /// three batches (one being filled, one queued, one being written), so this is what keeps
    /// a backlog of large payloads inside the pod's memory limit; see [`MEMORY_BUDGET_BYTES`].
    pub max_bytes: usize,
    /// ...or when this many milliseconds have passed since its first record, whichever is first.
    pub max_wait_ms: u64,
    /// A batch whose writer is idle is written sooner: once every record ready in the consumer
    /// is in it and this many milliseconds have passed since its first record, or as many as
    /// the writer's last batch took, whichever is longer. While a writer stores one batch, the
    /// next gathers what arrives meanwhile, so batches grow with the load (group commit) and
    /// light load is stored at once. At most `max_wait_ms`; equal to it, every batch waits the
    /// full window.
    pub linger_ms: u64,
    /// Batches written at once, each on its own connection. Partitions are split between the
    /// writers, so each partition's batches stay in order; more than one lets PostgreSQL work
    /// on one batch while the next is sent.
    pub writers: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_records: 1000,
            max_bytes: 8 * MIB,
            max_wait_ms: 100,
            linger_ms: 5,
            writers: 2,
        }
    }
}

impl PostgresConfig {
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }
}

impl BatchConfig {
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }

    pub fn linger(&self) -> Duration {
        Duration::from_millis(self.linger_ms)
    }
}

impl Validate for WorkerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.kafka.validate()?;
        if self.group_id.trim().is_empty() {
            return Err(ConfigError::invalid(
                "group_id",
                "is empty; name the consumer group",
            ));
        }
        if self.postgres.url.parse::<tokio_postgres::Config>().is_err() {
            return Err(ConfigError::invalid(
                "postgres.url",
                format!(
                    "'{}' is not a PostgreSQL URL (postgres://user@host:port/db)",
                    redact_url(&self.postgres.url)
                ),
            ));
        }
        if self.postgres.pool_size == 0 {
            return Err(ConfigError::invalid(
                "postgres.pool_size",
                "must be at least 1",
            ));
        }
        if !(100..=600_000).contains(&self.postgres.write_timeout_ms) {
            return Err(ConfigError::invalid(
                "postgres.write_timeout_ms",
                "must be between 100 and 600000",
            ));
        }
        if !(1..=100_000).contains(&self.batch.max_records) {
            return Err(ConfigError::invalid(
                "batch.max_records",
                "must be between 1 and 100000",
            ));
        }
        if !(1..=60_000).contains(&self.batch.max_wait_ms) {
            return Err(ConfigError::invalid(
                "batch.max_wait_ms",
                "must be between 1 and 60000",
            ));
        }
        if self.batch.linger_ms > self.batch.max_wait_ms {
            return Err(ConfigError::invalid(
                "batch.linger_ms",
                format!(
                    "is {} but batch.max_wait_ms is {}: a batch never waits longer than max_wait_ms",
                    self.batch.linger_ms, self.batch.max_wait_ms
                ),
            ));
        }
        if !(1..=64).contains(&self.batch.writers) {
            return Err(ConfigError::invalid(
                "batch.writers",
                "must be between 1 and 64",
            ));
        }
        if self.batch.writers > self.postgres.pool_size {
            return Err(ConfigError::invalid(
                "batch.writers",
                format!(
                    "is {} but postgres.pool_size is {}: each writer needs a connection of its own",
                    self.batch.writers, self.postgres.pool_size
                ),
            ));
        }
        self.validate_batch_bytes()?;
        self.alerts.validate()?;
        self.validate_pool_size()?;
        if self.max_payload_bytes == 0 {
            return Err(ConfigError::invalid(
                "max_payload_bytes",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

impl WorkerConfig {
    fn validate_batch_bytes(&self) -> Result<(), ConfigError> {
        let max_bytes = self.batch.max_bytes;
        if !(1024..=64 * MIB).contains(&max_bytes) {
            return Err(ConfigError::invalid(
                "batch.max_bytes",
                format!(
                    "is {max_bytes} but must be between 1024 and {} (64 MiB)",
                    64 * MIB
                ),
            ));
        }
        let held = self.batch.writers * BATCHES_PER_WRITER * max_bytes;
        if held > MEMORY_BUDGET_BYTES {
            return Err(ConfigError::invalid(
                "batch.max_bytes",
                format!(
                    "is {max_bytes} with batch.writers = {}: the writers' batches could hold \
                     {} MiB, more than the {} MiB budgeted for them (each writer holds up to \
                     {BATCHES_PER_WRITER} batches); lower batch.max_bytes to at most {}",
                    self.batch.writers,
                    held / MIB,
                    MEMORY_BUDGET_BYTES / MIB,
                    MEMORY_BUDGET_BYTES / (BATCHES_PER_WRITER * self.batch.writers),
                ),
            ));
        }
        Ok(())
    }

    /// With alert rules, every writer holds a connection while it stores a batch, and every
    /// outbox publisher holds two during a round (its partition locks, and the release of the
    /// marks committed meanwhile); with fewer, they wait for each other's.
    fn validate_pool_size(&self) -> Result<(), ConfigError> {
        if self.alerts.rules.path.is_none() {
            return Ok(());
        }
        let (writers, publishers) = (self.batch.writers, self.alerts.outbox.publishers);
        let needed = writers + 2 * publishers;
        if self.postgres.pool_size < needed {
            return Err(ConfigError::invalid(
                "postgres.pool_size",
                format!(
                    "is {} but must be at least {needed} with alert rules: batch.writers \
                     ({writers}) + 2 x alerts.outbox.publishers ({publishers}), since each \
                     writer holds a connection and each outbox round two; raise \
                     postgres.pool_size or lower the other two",
                    self.postgres.pool_size
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        WorkerConfig::default().validate().unwrap();
    }

    #[test]
    fn a_linger_longer_than_the_window_is_named() {
        let mut config = WorkerConfig::default();
        config.batch.linger_ms = config.batch.max_wait_ms + 1;
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains("batch.linger_ms"), "{message}");
        config.batch.linger_ms = config.batch.max_wait_ms;
        config.validate().unwrap();
    }

    #[test]
    fn a_bad_batch_size_is_named() {
        let mut config = WorkerConfig::default();
        config.batch.max_records = 0;
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("batch.max_records"));
    }

    #[test]
    fn more_writers_than_connections_is_named() {
        let mut config = WorkerConfig::default();
        config.postgres.pool_size = 1;
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains("batch.writers"), "{message}");
    }

    #[test]
    fn with_alerts_the_pool_needs_a_connection_per_writer_and_two_per_publisher() {
        let mut config = WorkerConfig::default();
        config.batch.writers = 2;
        config.postgres.pool_size = 2;
        config.validate().unwrap();
        config.alerts.rules.path = Some("rules.toml".into());
        config.alerts.outbox.publishers = 2;
        let message = config.validate().unwrap_err().to_string();
        assert!(
            message.contains("postgres.pool_size")
                && message.contains("at least 6")
                && message.contains("batch.writers")
                && message.contains("alerts.outbox.publishers"),
            "{message}"
        );
        // publishers + 1, what was once checked, is not enough.
        config.postgres.pool_size = 5;
        assert!(config.validate().is_err());
        config.postgres.pool_size = 6;
        config.validate().unwrap();
        config.batch.writers = 3;
        config.alerts.outbox.publishers = 1;
        config.postgres.pool_size = 4;
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains("at least 5"), "{message}");
        config.postgres.pool_size = 5;
        config.validate().unwrap();
    }

    #[test]
    fn a_batch_byte_bound_out_of_range_or_over_the_memory_budget_is_named() {
        let mut config = WorkerConfig::default();
        config.batch.max_bytes = 100;
        let message = config.validate().unwrap_err().to_string();
        assert!(
            message.contains("batch.max_bytes") && message.contains("between 1024"),
            "{message}"
        );
        config.batch.max_bytes = 32 * MIB;
        let message = config.validate().unwrap_err().to_string();
        assert!(
            message.contains("batch.max_bytes") && message.contains("batch.writers = 2"),
            "{message}"
        );
        config.batch.writers = 1;
        config.validate().unwrap();
    }

    #[test]
    fn the_default_batches_stay_well_inside_the_pod_memory_limit() {
        let config = WorkerConfig::default();
        let held = config.batch.writers * BATCHES_PER_WRITER * config.batch.max_bytes;
        assert!(held <= 64 * MIB, "{held}");
    }

    #[test]
    fn a_bad_database_url_is_named_without_its_password() {
        let mut config = WorkerConfig::default();
        config.postgres.url = "mysql://me:secret@host/db?x=%%".into();
        let message = config.validate().unwrap_err().to_string();
        assert!(
            message.contains("postgres.url") && !message.contains("secret"),
            "{message}"
        );
    }
}

//! The API's settings. Every field has a default that works with the local stack (`make demo`);
//! `telemetry-api --help` lists the matching flags, and every field can also be set with a
//! `TELEMETRY_API_*` environment variable (nested fields with `__`).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use telemetry_core::config::{redact_url, ConfigError, Validate};
use telemetry_core::contract::DEFAULT_MAX_PAYLOAD_BYTES;
use telemetry_core::kafka::KafkaConfig;
use telemetry_core::observe::{HttpConfig, LogFormat};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Where the API answers requests, e.g. `0.0.0.0:8080`; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Where HTTP ingest produces records: the same topic the bridge feeds.
    pub kafka: KafkaConfig,
    pub postgres: PostgresConfig,
    pub limits: LimitsConfig,
    pub ingest: IngestConfig,
    pub auth: AuthConfig,
    /// Apply the API's own migrations (the `api_tokens` table and the read-only role's grants)
    /// at start-up, through `postgres.admin_url`.
    pub migrate_on_start: bool,
    /// The `/metrics`, `/healthz` and `/readyz` server, apart from the API so that scrapers and
    /// probes never compete with callers or need a token.
    pub http: HttpConfig,
    pub log_format: LogFormat,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".parse().expect("valid address"),
            kafka: KafkaConfig::default(),
            postgres: PostgresConfig::default(),
            limits: LimitsConfig::default(),
            ingest: IngestConfig::default(),
            auth: AuthConfig::default(),
            migrate_on_start: true,
            http: HttpConfig {
                listen: "0.0.0.0:9104".parse().expect("valid address"),
            },
            log_format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Connection URL for every query the service makes, normally PgBouncer's (transaction mode)
    /// as the read-only role, e.g. `postgres://telemetry_reader@pgbouncer:6432/telemetry`.
    /// Printed without its password, as is `admin_url`.
    #[serde(serialize_with = "telemetry_core::config::serialize_redacted_url")]
    pub url: String,
    /// Connection URL for what writes: migrations and the `token` subcommands. Empty means `url`,
    /// which is enough when `url` connects as a role that may write.
    #[serde(serialize_with = "telemetry_core::config::serialize_redacted_url")]
    pub admin_url: String,
    /// Connections kept by this replica; one request holds one for a single query.
    pub pool_size: usize,
    /// A query that takes longer than this many milliseconds fails the request with 503, so a
    /// slow database shows as errors instead of piling up requests.
    pub query_timeout_ms: u64,
    /// Read-only role that the migration creates (when the admin connection may create roles)
    /// and grants `SELECT` on the tables the API reads. Empty leaves roles and grants alone.
    pub reader_role: String,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:6432/telemetry".into(),
            admin_url: String::new(),
            pool_size: 16,
            query_timeout_ms: 5_000,
            reader_role: "telemetry_reader".into(),
        }
    }
}

impl PostgresConfig {
    /// The URL that migrations and token commands use.
    pub fn admin_url(&self) -> &str {
        if self.admin_url.is_empty() {
            &self.url
        } else {
            &self.admin_url
        }
    }

    pub fn query_timeout(&self) -> Duration {
        Duration::from_millis(self.query_timeout_ms)
    }
}

/// Bounds on what one request may ask for, so that no caller can make the database scan a
/// device's whole history in one go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Rows per page when the request gives no `limit`.
    pub default_page_size: u32,
    /// Largest `limit` a request may give.
    pub max_page_size: u32,
    /// History covers this many hours before `to` when the request gives no `from`.
    pub default_range_hours: u32,
    /// Widest `from`..`to` a history request may give, in hours (31 days by default).
    pub max_range_hours: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            default_page_size: 100,
            max_page_size: 1_000,
            default_range_hours: 24,
            max_range_hours: 31 * 24,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Larger bodies are refused with 413, as the bridge sends larger MQTT payloads to the
    /// dead-letter topic; keep it equal to the worker's `max_payload_bytes`.
    pub max_payload_bytes: usize,
    /// How long a POST waits for Kafka to confirm its record before answering 503. The producer
    /// stops retrying the record at the same moment (`message.timeout.ms`), so a 503 after this
    /// wait almost always means the record was not stored; see the README on retries.
    pub delivery_timeout_ms: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            delivery_timeout_ms: 10_000,
        }
    }
}

impl IngestConfig {
    pub fn delivery_timeout(&self) -> Duration {
        Duration::from_millis(self.delivery_timeout_ms)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// A verified token is remembered for this many seconds, so most requests cost one query
    /// instead of two. A revoked token keeps working on a replica for up to this long; 0 checks
    /// every request against the database.
    pub token_cache_seconds: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            token_cache_seconds: 30,
        }
    }
}

impl AuthConfig {
    pub fn token_cache_ttl(&self) -> Duration {
        Duration::from_secs(self.token_cache_seconds)
    }
}

impl Validate for ApiConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.kafka.validate()?;
        check_url("postgres.url", &self.postgres.url)?;
        if !self.postgres.admin_url.is_empty() {
            check_url("postgres.admin_url", &self.postgres.admin_url)?;
        }
        if self.postgres.pool_size == 0 {
            return Err(ConfigError::invalid(
                "postgres.pool_size",
                "must be at least 1",
            ));
        }
        if !(1..=600_000).contains(&self.postgres.query_timeout_ms) {
            return Err(ConfigError::invalid(
                "postgres.query_timeout_ms",
                "must be between 1 and 600000",
            ));
        }
        let role = &self.postgres.reader_role;
        let plain_identifier = role.len() <= 63
            && role.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && role
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !role.is_empty() && !plain_identifier {
            return Err(ConfigError::invalid(
                "postgres.reader_role",
                format!("'{role}' is not a plain role name (a-z, 0-9 and _, at most 63 bytes); leave it empty to skip roles and grants"),
            ));
        }
        let limits = &self.limits;
        if limits.max_page_size == 0 || limits.max_page_size > 10_000 {
            return Err(ConfigError::invalid(
                "limits.max_page_size",
                "must be between 1 and 10000",
            ));
        }
        if limits.default_page_size == 0 || limits.default_page_size > limits.max_page_size {
            return Err(ConfigError::invalid(
                "limits.default_page_size",
                format!(
                    "must be between 1 and limits.max_page_size ({})",
                    limits.max_page_size
                ),
            ));
        }
        if limits.max_range_hours == 0 {
            return Err(ConfigError::invalid(
                "limits.max_range_hours",
                "must be at least 1",
            ));
        }
        if limits.default_range_hours == 0 || limits.default_range_hours > limits.max_range_hours {
            return Err(ConfigError::invalid(
                "limits.default_range_hours",
                format!(
                    "must be between 1 and limits.max_range_hours ({})",
                    limits.max_range_hours
                ),
            ));
        }
        if self.ingest.max_payload_bytes == 0 {
            return Err(ConfigError::invalid(
                "ingest.max_payload_bytes",
                "must be at least 1",
            ));
        }
        if !(1..=300_000).contains(&self.ingest.delivery_timeout_ms) {
            return Err(ConfigError::invalid(
                "ingest.delivery_timeout_ms",
                "must be between 1 and 300000",
            ));
        }
        if self.listen == self.http.listen && self.listen.port() != 0 {
            return Err(ConfigError::invalid(
                "http.listen",
                format!(
                    "is the same address as `listen` ({}); give the metrics and health server its own port",
                    self.listen
                ),
            ));
        }
        Ok(())
    }
}

fn check_url(field: &'static str, url: &str) -> Result<(), ConfigError> {
    url.parse::<tokio_postgres::Config>()
        .map(|_| ())
        .map_err(|_| {
            ConfigError::invalid(
                field,
                format!(
                    "'{}' is not a PostgreSQL URL (postgres://user@host:port/db)",
                    redact_url(url)
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        ApiConfig::default().validate().unwrap();
    }

    #[test]
    fn a_default_page_larger_than_the_limit_is_named() {
        let mut config = ApiConfig::default();
        config.limits.default_page_size = 5_000;
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains("limits.default_page_size"), "{message}");
    }

    #[test]
    fn a_reader_role_that_would_need_quoting_is_refused() {
        let mut config = ApiConfig::default();
        config.postgres.reader_role = "reader\"; DROP TABLE x; --".into();
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains("postgres.reader_role"), "{message}");
    }

    #[test]
    fn the_admin_url_falls_back_to_the_query_url() {
        let mut config = PostgresConfig::default();
        assert_eq!(config.admin_url(), config.url);
        config.admin_url = "postgres://owner@db/telemetry".into();
        assert_eq!(config.admin_url(), "postgres://owner@db/telemetry");
    }

    #[test]
    fn a_bad_admin_url_is_named_without_its_password() {
        let mut config = ApiConfig::default();
        config.postgres.admin_url = "mysql://me:secret@host/db?x=%%".into();
        let message = config.validate().unwrap_err().to_string();
        assert!(
            message.contains("postgres.admin_url") && !message.contains("secret"),
            "{message}"
        );
    }
}

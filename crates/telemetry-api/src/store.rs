//! Every query the API makes, through a pool that PgBouncer's transaction mode can serve.
//!
//! Each request runs one statement with `query_typed`: the statement is unnamed and its
//! parameter types are given, so it needs no prepare round trip and leaves nothing on the server
//! connection that a later transaction could trip over. Nothing here writes; production connects
//! as the read-only role (`postgres.reader_role`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde::Serialize;
use serde_json::value::RawValue;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{Json, ToSql, Type};
use tokio_postgres::Row;

use crate::cursor::Cursor;
use crate::params::{OpenRange, Range};
use crate::problem::Problem;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the database pool for {url}: {reason}")]
    Pool { url: String, reason: String },
    #[error("no database connection: {0}")]
    Connection(#[from] deadpool_postgres::PoolError),
    #[error("query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("the database did not answer within {0:?}")]
    Timeout(Duration),
}

impl From<StoreError> for Problem {
    /// Outages and slowness are 503 (retry later); a missing table is 503 too, because it only
    /// means the worker has not migrated yet; anything else is a bug or a schema mismatch.
    fn from(error: StoreError) -> Problem {
        let missing_table = matches!(&error, StoreError::Query(e)
            if e.code() == Some(&SqlState::UNDEFINED_TABLE));
        let outage = match &error {
            StoreError::Connection(_) | StoreError::Timeout(_) | StoreError::Pool { .. } => true,
            StoreError::Query(e) => e.is_closed() || e.as_db_error().is_none(),
        };
        if missing_table {
            tracing::warn!(%error, "a telemetry table is missing; has the worker migrated?");
            Problem::unavailable("the telemetry tables do not exist yet; retry once the worker has migrated the database")
        } else if outage {
            tracing::warn!(%error, "database unavailable");
            Problem::unavailable("the database is unavailable; retry shortly")
        } else {
            tracing::error!(%error, "query failed");
            Problem::internal("a query failed; the error is in the service's log")
        }
    }
}

/// A pool without a statement cache, as PgBouncer's transaction mode requires.
pub fn create_pool(url: &str, size: usize) -> Result<Pool, StoreError> {
    let pool_error = |reason: String| StoreError::Pool {
        url: telemetry_core::config::redact_url(url),
        reason,
    };
    let pg: tokio_postgres::Config = url
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
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .create_timeout(Some(Duration::from_secs(5)))
        .wait_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| pool_error(e.to_string()))
}

/// The API's read side: a pool and how long one query may take.
#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
    timeout: Duration,
}

/// One stored reading.
#[derive(Debug, Serialize)]
pub struct Reading {
    /// When the bridge (or the API, for HTTP ingest) received it.
    pub received_at: DateTime<Utc>,
    /// The payload's `ts`, when the device sent one.
    pub device_time: Option<DateTime<Utc>>,
    /// The payload's `seq`, when the device sent one.
    pub seq: Option<i64>,
    /// The payload as the device sent it, passed through without being parsed into a tree.
    pub payload: Box<RawValue>,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
}

/// A device's newest reading, from `device_latest`.
#[derive(Debug, Serialize)]
pub struct Latest {
    pub user: String,
    pub device: String,
    pub received_at: DateTime<Utc>,
    pub device_time: Option<DateTime<Utc>>,
    pub seq: Option<i64>,
    pub payload: Box<RawValue>,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    /// When the worker last wrote this row.
    pub updated_at: DateTime<Utc>,
}

/// A device in a user's list.
#[derive(Debug, Serialize)]
pub struct Device {
    pub device: String,
    /// `received_at` of its newest reading.
    pub last_seen: DateTime<Utc>,
    pub device_time: Option<DateTime<Utc>>,
    pub seq: Option<i64>,
}

/// One alert event from `alerts`.
#[derive(Debug, Serialize)]
pub struct Alert {
    /// The row's id: the tie-breaker of the page order, not shown to callers.
    #[serde(skip)]
    pub id: i64,
    pub alert_id: String,
    /// `raised` or `cleared`.
    pub event: String,
    pub rule: String,
    pub severity: String,
    pub occurred_at: DateTime<Utc>,
    pub body: Box<RawValue>,
    /// When it went out over MQTT; null while it waits in the outbox.
    pub published_at: Option<DateTime<Utc>>,
}

/// A page of rows and where the next one starts (`None` on the last page).
#[derive(Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<Cursor>,
}

const LATEST: &str =
    "SELECT received_at, device_time, seq, payload, kafka_partition, kafka_offset, updated_at \
     FROM device_latest WHERE user_id = $1 AND device_id = $2";

const HISTORY_FIRST: &str =
    "SELECT received_at, device_time, seq, payload, kafka_partition, kafka_offset \
     FROM raw_telemetry \
     WHERE user_id = $1 AND device_id = $2 AND received_at >= $3 AND received_at < $4 \
     ORDER BY received_at DESC, kafka_partition DESC, kafka_offset DESC LIMIT $5";

const HISTORY_AFTER: &str =
    "SELECT received_at, device_time, seq, payload, kafka_partition, kafka_offset \
     FROM raw_telemetry \
     WHERE user_id = $1 AND device_id = $2 AND received_at >= $3 AND received_at < $4 \
       AND (received_at, kafka_partition, kafka_offset) < ($6, $7, $8) \
     ORDER BY received_at DESC, kafka_partition DESC, kafka_offset DESC LIMIT $5";

const DEVICES: &str = "SELECT device_id, received_at, device_time, seq FROM device_latest \
     WHERE user_id = $1 AND device_id > $2 ORDER BY device_id LIMIT $3";

const ALERTS: &str = "SELECT id, alert_id, event, rule, severity, occurred_at, body, published_at \
     FROM alerts \
     WHERE user_id = $1 AND device_id = $2 \
       AND occurred_at >= coalesce($3, '-infinity') AND occurred_at < coalesce($4, 'infinity') \
       AND (occurred_at, id) < (coalesce($5, 'infinity'), coalesce($6, 0)) \
     ORDER BY occurred_at DESC, id DESC LIMIT $7";

const DEVICE_KNOWN: &str =
    "SELECT EXISTS (SELECT 1 FROM device_latest WHERE user_id = $1 AND device_id = $2) \
     OR EXISTS (SELECT 1 FROM raw_telemetry WHERE user_id = $1 AND device_id = $2)";

const TOKEN_USER: &str = "SELECT user_id FROM api_tokens WHERE token_hash = $1";

impl Store {
    pub fn new(pool: Pool, timeout: Duration) -> Store {
        Store { pool, timeout }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Runs one statement on a pooled connection, within the query timeout.
    async fn query(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, StoreError> {
        let run = async {
            let client = self.pool.get().await?;
            Ok::<_, StoreError>(client.query_typed(sql, params).await?)
        };
        tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| StoreError::Timeout(self.timeout))?
    }

    /// Whether the pool can reach PostgreSQL right now.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.query("SELECT 1", &[]).await.map(|_| ())
    }

    pub async fn latest(&self, user: &str, device: &str) -> Result<Option<Latest>, StoreError> {
        let rows = self
            .query(LATEST, &[(&user, Type::TEXT), (&device, Type::TEXT)])
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        Ok(Some(Latest {
            user: user.to_owned(),
            device: device.to_owned(),
            received_at: row.try_get(0)?,
            device_time: row.try_get(1)?,
            seq: row.try_get(2)?,
            payload: row.try_get::<_, Json<Box<RawValue>>>(3)?.0,
            kafka_partition: row.try_get(4)?,
            kafka_offset: row.try_get(5)?,
            updated_at: row.try_get(6)?,
        }))
    }

    /// Newest first within `range`, after `cursor`.
    pub async fn history(
        &self,
        user: &str,
        device: &str,
        range: Range,
        limit: u32,
        cursor: Option<&Cursor>,
    ) -> Result<Page<Reading>, StoreError> {
        // One row more than asked tells whether another page follows, without a COUNT.
        let fetch = i64::from(limit) + 1;
        let rows = match cursor {
            Some(Cursor::Telemetry {
                received_at,
                partition,
                offset,
            }) => {
                self.query(
                    HISTORY_AFTER,
                    &[
                        (&user, Type::TEXT),
                        (&device, Type::TEXT),
                        (&range.from, Type::TIMESTAMPTZ),
                        (&range.to, Type::TIMESTAMPTZ),
                        (&fetch, Type::INT8),
                        (received_at, Type::TIMESTAMPTZ),
                        (partition, Type::INT4),
                        (offset, Type::INT8),
                    ],
                )
                .await?
            }
            _ => {
                self.query(
                    HISTORY_FIRST,
                    &[
                        (&user, Type::TEXT),
                        (&device, Type::TEXT),
                        (&range.from, Type::TIMESTAMPTZ),
                        (&range.to, Type::TIMESTAMPTZ),
                        (&fetch, Type::INT8),
                    ],
                )
                .await?
            }
        };
        let mut items = rows
            .iter()
            .map(|row| {
                Ok(Reading {
                    received_at: row.try_get(0)?,
                    device_time: row.try_get(1)?,
                    seq: row.try_get(2)?,
                    payload: row.try_get::<_, Json<Box<RawValue>>>(3)?.0,
                    kafka_partition: row.try_get(4)?,
                    kafka_offset: row.try_get(5)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let next = page_end(&mut items, limit, |last| Cursor::Telemetry {
            received_at: last.received_at,
            partition: last.kafka_partition,
            offset: last.kafka_offset,
        });
        Ok(Page { items, next })
    }

    /// A user's devices in name order, after `cursor`.
    pub async fn devices(
        &self,
        user: &str,
        limit: u32,
        cursor: Option<&Cursor>,
    ) -> Result<Page<Device>, StoreError> {
        let after = match cursor {
            Some(Cursor::Device { device }) => device.as_str(),
            _ => "",
        };
        let fetch = i64::from(limit) + 1;
        let rows = self
            .query(
                DEVICES,
                &[
                    (&user, Type::TEXT),
                    (&after, Type::TEXT),
                    (&fetch, Type::INT8),
                ],
            )
            .await?;
        let mut items = rows
            .iter()
            .map(|row| {
                Ok(Device {
                    device: row.try_get(0)?,
                    last_seen: row.try_get(1)?,
                    device_time: row.try_get(2)?,
                    seq: row.try_get(3)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let next = page_end(&mut items, limit, |last| Cursor::Device {
            device: last.device.clone(),
        });
        Ok(Page { items, next })
    }

    /// A device's alert events, newest first, optionally within `[from, to)`, after `cursor`.
    pub async fn alerts(
        &self,
        user: &str,
        device: &str,
        (from, to): OpenRange,
        limit: u32,
        cursor: Option<&Cursor>,
    ) -> Result<Page<Alert>, StoreError> {
        let (after_time, after_id) = match cursor {
            Some(Cursor::Alert { occurred_at, id }) => (Some(*occurred_at), Some(*id)),
            _ => (None, None),
        };
        let fetch = i64::from(limit) + 1;
        let rows = self
            .query(
                ALERTS,
                &[
                    (&user, Type::TEXT),
                    (&device, Type::TEXT),
                    (&from, Type::TIMESTAMPTZ),
                    (&to, Type::TIMESTAMPTZ),
                    (&after_time, Type::TIMESTAMPTZ),
                    (&after_id, Type::INT8),
                    (&fetch, Type::INT8),
                ],
            )
            .await?;
        let mut items = rows
            .iter()
            .map(|row| {
                Ok(Alert {
                    id: row.try_get(0)?,
                    alert_id: row.try_get(1)?,
                    event: row.try_get(2)?,
                    rule: row.try_get(3)?,
                    severity: row.try_get(4)?,
                    occurred_at: row.try_get(5)?,
                    body: row.try_get::<_, Json<Box<RawValue>>>(6)?.0,
                    published_at: row.try_get(7)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let next = page_end(&mut items, limit, |last| Cursor::Alert {
            occurred_at: last.occurred_at,
            id: last.id,
        });
        Ok(Page { items, next })
    }

    /// Whether the device has ever stored a reading; asked only when a listing comes back
    /// empty, to tell an unknown device (404) from a quiet one (an empty page).
    pub async fn device_known(&self, user: &str, device: &str) -> Result<bool, StoreError> {
        let rows = self
            .query(DEVICE_KNOWN, &[(&user, Type::TEXT), (&device, Type::TEXT)])
            .await?;
        Ok(rows
            .first()
            .map(|r| r.try_get(0))
            .transpose()?
            .unwrap_or(false))
    }

    /// The user a token hash belongs to, if any.
    pub async fn token_user(&self, hash: &[u8; 32]) -> Result<Option<String>, StoreError> {
        let hash: &[u8] = hash;
        let rows = self.query(TOKEN_USER, &[(&hash, Type::BYTEA)]).await?;
        Ok(rows.first().map(|r| r.try_get(0)).transpose()?)
    }
}

/// Trims the extra row fetched past `limit` and returns the cursor after the last kept row
/// when there was one.
fn page_end<T>(items: &mut Vec<T>, limit: u32, cursor: impl Fn(&T) -> Cursor) -> Option<Cursor> {
    if items.len() <= limit as usize {
        return None;
    }
    items.truncate(limit as usize);
    items.last().map(cursor)
}

//! Database schema, as migrations embedded in the binary.
//!
//! `telemetry-worker migrate` applies them, and so does every start-up unless disabled. All
//! pending migrations run in one transaction under an advisory lock, so replicas starting
//! together apply each migration once, and a failure leaves the schema as it was. Only simple
//! queries are used, which PgBouncer's transaction mode handles.

use tokio_postgres::{Client, SimpleQueryMessage};

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("cannot read applied migrations: {0}")]
    ReadApplied(#[source] tokio_postgres::Error),
    #[error("migration {version} ({name}) failed: {source}; fix the database and run `telemetry-worker migrate` again")]
    Apply {
        version: i32,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "the database has migration {0}, newer than this worker knows ({1}); upgrade the worker"
    )]
    TooNew(i32, i32),
}

#[derive(Debug)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "raw_telemetry",
        sql: include_str!("../migrations/0001_raw_telemetry.sql"),
    },
    Migration {
        version: 2,
        name: "replay_window",
        sql: include_str!("../migrations/0002_replay_window.sql"),
    },
    Migration {
        version: 3,
        name: "device_latest",
        sql: include_str!("../migrations/0003_device_latest.sql"),
    },
    Migration {
        version: 4,
        name: "alerts",
        sql: telemetry_alerts::SCHEMA_SQL,
    },
];

/// Advisory lock key shared by every replica; the value is arbitrary but fixed.
const MIGRATION_LOCK: i64 = 0x7465_6c65_6d65;

/// Applies every pending migration; returns the versions applied now.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, SchemaError> {
    let tx = client
        .transaction()
        .await
        .map_err(SchemaError::ReadApplied)?;
    tx.batch_execute(&format!(
        "SELECT pg_advisory_xact_lock({MIGRATION_LOCK});
         CREATE TABLE IF NOT EXISTS schema_migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now());"
    ))
    .await
    .map_err(SchemaError::ReadApplied)?;
    let applied = applied_versions(&tx).await?;
    let newest_known = MIGRATIONS.last().map_or(0, |m| m.version);
    if let Some(&newest) = applied.iter().max() {
        if newest > newest_known {
            return Err(SchemaError::TooNew(newest, newest_known));
        }
    }
    let mut applied_now = Vec::new();
    for migration in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        let record = format!(
            "INSERT INTO schema_migrations (version, name) VALUES ({}, '{}')",
            migration.version, migration.name
        );
        let apply = |source| SchemaError::Apply {
            version: migration.version,
            name: migration.name,
            source,
        };
        tx.batch_execute(migration.sql).await.map_err(apply)?;
        tx.batch_execute(&record).await.map_err(apply)?;
        applied_now.push(migration.version);
    }
    tx.commit().await.map_err(SchemaError::ReadApplied)?;
    if !applied_now.is_empty() {
        tracing::info!(versions = ?applied_now, "applied database migrations");
    }
    Ok(applied_now)
}

async fn applied_versions(tx: &tokio_postgres::Transaction<'_>) -> Result<Vec<i32>, SchemaError> {
    let messages = tx
        .simple_query("SELECT version FROM schema_migrations")
        .await
        .map_err(SchemaError::ReadApplied)?;
    Ok(messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .collect())
}

//! Database schema, as migrations embedded in the binary.
//!
//! `telemetry-worker migrate` applies them, and so does every start-up unless disabled. All
//! pending migrations run in one transaction under an advisory lock (see
//! `telemetry_core::migrations`), so replicas starting together apply each migration once, and a
//! failure leaves the schema as it was.

use telemetry_core::migrations::{Migration, MigrationError, Migrations};
use tokio_postgres::Client;

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("cannot open the migration transaction: {0}")]
    Transaction(#[source] tokio_postgres::Error),
    #[error(transparent)]
    Migration(#[from] MigrationError),
}

pub const MIGRATIONS: Migrations = Migrations {
    binary: "telemetry-worker",
    table: "schema_migrations",
    // Arbitrary but fixed, shared by every replica.
    lock_key: 0x7465_6c65_6d65,
    list: &[
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
        Migration {
            version: 5,
            name: "device_latest_hot_updates",
            sql: include_str!("../migrations/0005_device_latest_hot_updates.sql"),
        },
        Migration {
            version: 6,
            name: "alerts_released",
            sql: telemetry_alerts::RELEASE_SQL,
        },
        Migration {
            version: 7,
            name: "device_sequences",
            sql: include_str!("../migrations/0007_device_sequences.sql"),
        },
        Migration {
            version: 9,
            name: "redriven_letters",
            sql: include_str!("../migrations/0009_redriven_letters.sql"),
        },
    ],
};

/// Applies every pending migration in one transaction; returns the versions applied now.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, SchemaError> {
    let tx = client
        .transaction()
        .await
        .map_err(SchemaError::Transaction)?;
    let applied = MIGRATIONS.apply_pending(&tx).await?;
    tx.commit().await.map_err(SchemaError::Transaction)?;
    if !applied.is_empty() {
        tracing::info!(versions = ?applied, "applied database migrations");
    }
    Ok(applied)
}

//! Embedded SQL migrations, applied inside a caller's transaction under an advisory lock.
//!
//! Every stage that owns tables (the worker, the API) keeps its own list, bookkeeping table and
//! lock key. Pending migrations run in the caller's transaction, so replicas starting together
//! apply each migration once, and a failure leaves the schema as it was. Only simple queries are
//! used, which PgBouncer's transaction mode handles.

use tokio_postgres::{SimpleQueryMessage, Transaction};

/// One migration: its SQL runs once, in version order.
#[derive(Debug)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// A stage's migrations and where it records them.
#[derive(Debug)]
pub struct Migrations {
    /// The binary that owns them, named in errors (`{binary} migrate`).
    pub binary: &'static str,
    /// The bookkeeping table, created when missing.
    pub table: &'static str,
    /// Advisory lock key; differs between stages so they never wait on each other.
    pub lock_key: i64,
    pub list: &'static [Migration],
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("cannot read the applied migrations in {table}: {source}")]
    ReadApplied {
        table: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("migration {version} ({name}) failed: {source}; fix the database and run `{binary} migrate` again")]
    Apply {
        binary: &'static str,
        version: i32,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("the database has migration {newest} in {table}, newer than this {binary} knows ({known}); upgrade {binary}")]
    TooNew {
        binary: &'static str,
        table: &'static str,
        newest: i32,
        known: i32,
    },
}

impl Migrations {
    /// Applies every pending migration in `tx`; returns the versions applied now. The caller
    /// commits.
    pub async fn apply_pending(&self, tx: &Transaction<'_>) -> Result<Vec<i32>, MigrationError> {
        let read_error = |source| MigrationError::ReadApplied {
            table: self.table,
            source,
        };
        tx.batch_execute(&format!(
            "SELECT pg_advisory_xact_lock({lock});
             CREATE TABLE IF NOT EXISTS {table} (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now());",
            lock = self.lock_key,
            table = self.table,
        ))
        .await
        .map_err(read_error)?;
        let applied = self.applied_versions(tx).await?;
        let known = self.list.last().map_or(0, |m| m.version);
        if let Some(&newest) = applied.iter().max() {
            if newest > known {
                return Err(MigrationError::TooNew {
                    binary: self.binary,
                    table: self.table,
                    newest,
                    known,
                });
            }
        }
        let mut applied_now = Vec::new();
        for migration in self.list.iter().filter(|m| !applied.contains(&m.version)) {
            let record = format!(
                "INSERT INTO {} (version, name) VALUES ({}, '{}')",
                self.table, migration.version, migration.name
            );
            let apply = |source| MigrationError::Apply {
                binary: self.binary,
                version: migration.version,
                name: migration.name,
                source,
            };
            tx.batch_execute(migration.sql).await.map_err(apply)?;
            tx.batch_execute(&record).await.map_err(apply)?;
            applied_now.push(migration.version);
        }
        Ok(applied_now)
    }

    async fn applied_versions(&self, tx: &Transaction<'_>) -> Result<Vec<i32>, MigrationError> {
        let messages = tx
            .simple_query(&format!("SELECT version FROM {}", self.table))
            .await
            .map_err(|source| MigrationError::ReadApplied {
                table: self.table,
                source,
            })?;
        Ok(messages
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => row.get(0).and_then(|v| v.parse().ok()),
                _ => None,
            })
            .collect())
    }
}

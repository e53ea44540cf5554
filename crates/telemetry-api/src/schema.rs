//! The API's own schema: the `api_tokens` table and the read-only role's grants.
//!
//! `telemetry-api migrate` applies it, and so does every start-up unless disabled. Like the
//! worker's migrations, everything runs in one transaction under an advisory lock, so replicas
//! starting together apply each migration once and a failure leaves the schema as it was. The
//! API keeps its own bookkeeping table (`api_schema_migrations`) and lock key, so its versions
//! never collide with the worker's `schema_migrations`.
//!
//! The telemetry tables themselves (`raw_telemetry`, `device_latest`, `alerts`) belong to the
//! worker and the alerting stage; the API only reads them. Grants are therefore re-applied on
//! every run, not once: a table that the worker created after the API's first migration gets its
//! `SELECT` grant at the API's next start or `migrate`.

use telemetry_core::migrations::{Migration, MigrationError, Migrations};
use tokio_postgres::{Client, SimpleQueryMessage};

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("cannot open the API migration transaction: {0}")]
    Transaction(#[source] tokio_postgres::Error),
    #[error(transparent)]
    Migration(#[from] MigrationError),
    #[error("cannot grant the read-only role '{role}' its privileges: {source}; connect `postgres.admin_url` as the tables' owner, or set `postgres.reader_role` to '' and grant by hand")]
    Grant {
        role: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// The API keeps its own bookkeeping table and lock key ("api_mi"), so its versions never
/// collide with the worker's `schema_migrations` and the two never wait on each other.
pub const MIGRATIONS: Migrations = Migrations {
    binary: "telemetry-api",
    table: "api_schema_migrations",
    lock_key: 0x6170_695f_6d69,
    list: &[Migration {
        version: 1,
        name: "api_tokens",
        sql: include_str!("../migrations/0001_api_tokens.sql"),
    }],
};

/// The tables the API reads; the read-only role gets `SELECT` on each one that exists.
pub const READ_TABLES: &[&str] = &["device_latest", "raw_telemetry", "alerts", "api_tokens"];

/// What one run of [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// Migration versions applied by this run.
    pub applied: Vec<i32>,
    /// Tables the read-only role may now read (empty when no role is configured or it does not
    /// exist and could not be created).
    pub granted: Vec<String>,
}

/// Applies every pending migration, then (when `reader_role` is not empty) creates the role if
/// the connected user may and it is missing, and grants it `SELECT` on [`READ_TABLES`].
///
/// `reader_role` must be a plain identifier; `ApiConfig::validate` checks that.
pub async fn migrate(client: &mut Client, reader_role: &str) -> Result<Migrated, SchemaError> {
    let tx = client
        .transaction()
        .await
        .map_err(SchemaError::Transaction)?;
    let applied_now = MIGRATIONS.apply_pending(&tx).await?;
    let granted = if reader_role.is_empty() {
        Vec::new()
    } else {
        grant_reader(&tx, reader_role).await?
    };
    tx.commit().await.map_err(SchemaError::Transaction)?;
    if !applied_now.is_empty() {
        tracing::info!(versions = ?applied_now, "applied API migrations");
    }
    Ok(Migrated {
        applied: applied_now,
        granted,
    })
}

/// Creates the role when missing (roles are cluster-wide, so two databases' migrations may race
/// to create it; the loser's error is swallowed) and grants it read access. The role logs in
/// without a password here; production sets one (`ALTER ROLE ... PASSWORD`) or relies on
/// PgBouncer's and PostgreSQL's authentication. `default_transaction_read_only` makes even a
/// mistaken grant unable to write through this role.
async fn grant_reader(
    tx: &tokio_postgres::Transaction<'_>,
    role: &str,
) -> Result<Vec<String>, SchemaError> {
    let tables = READ_TABLES
        .iter()
        .map(|t| format!("'{t}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        r#"DO $grant$
DECLARE
    t text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}')
       AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = current_user AND (rolsuper OR rolcreaterole)) THEN
        BEGIN
            CREATE ROLE "{role}" LOGIN;
            ALTER ROLE "{role}" SET default_transaction_read_only = on;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN
        GRANT USAGE ON SCHEMA public TO "{role}";
        FOREACH t IN ARRAY ARRAY[{tables}] LOOP
            IF to_regclass(quote_ident(t)) IS NOT NULL THEN
                EXECUTE format('GRANT SELECT ON %I TO "{role}"', t);
            END IF;
        END LOOP;
    ELSE
        RAISE WARNING 'role {role} does not exist and % may not create it; create it, then run telemetry-api migrate', current_user;
    END IF;
END
$grant$;
SELECT t FROM unnest(ARRAY[{tables}]) AS t
 WHERE to_regclass(quote_ident(t)) IS NOT NULL
   AND CASE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}')
            THEN has_table_privilege('{role}', quote_ident(t), 'SELECT')
            ELSE false END
 ORDER BY 1;"#
    );
    let messages = tx
        .simple_query(&sql)
        .await
        .map_err(|source| SchemaError::Grant {
            role: role.to_owned(),
            source,
        })?;
    Ok(messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .collect())
}

//! Stores batches in `raw_telemetry` exactly once.
//!
//! Guarantee: a record's row is stored once and only once, whatever happens to the worker, the
//! database or the broker. One transaction (through PgBouncer, so nothing outlives it) does:
//!
//! 1. lock the batch's partitions in `ingest_offsets` (`FOR UPDATE`, in partition order), which
//!    also makes a replica that lost a partition in a rebalance, but still holds a batch for it,
//!    wait for the new owner and then see what the new owner stored;
//! 2. drop records below each partition's `next_offset`: they are already stored;
//! 3. COPY the rest; if PostgreSQL rejects the data, bisect under savepoints to find the rows it
//!    rejects, and dead-letter those alone;
//! 4. send dead letters and wait for the broker to confirm them;
//! 5. move `next_offset` past the batch, and commit.
//!
//! A crash anywhere before the commit leaves nothing behind, and the records are delivered
//! again; a crash after it makes the records skipped at step 2 when they come again. Outages are
//! retried with back-off and never turn a record into a dead letter.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use futures::SinkExt;
use telemetry_core::backoff::Backoff;
use telemetry_core::contract::DeadLetterReason;
use telemetry_core::observe::Health;
use telemetry_core::Shutdown;
use tokio_postgres::types::Type;
use tokio_postgres::Transaction;

use crate::copy;
use crate::dlq::DeadLetterProducer;
use crate::metrics;
use crate::record::{Batch, DeadLetter, Row};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot get a database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database error while {step}: {source}")]
    Postgres {
        step: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("cannot deliver dead letters to Kafka: {0}")]
    DeadLetters(#[from] rdkafka::error::KafkaError),
    #[error("shutdown requested while the database was unavailable; the batch was not stored and will be consumed again")]
    Shutdown,
}

fn step(step: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SinkError {
    move |source| SinkError::Postgres { step, source }
}

/// What storing one batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub written: u64,
    pub skipped: u64,
    pub dead_lettered: u64,
}

#[derive(Debug)]
pub struct Sink {
    pool: Pool,
    topic: String,
    dead_letters: DeadLetterProducer,
    health: Health,
}

impl Sink {
    pub fn new(
        pool: Pool,
        topic: String,
        dead_letters: DeadLetterProducer,
        health: Health,
    ) -> Self {
        Self {
            pool,
            topic,
            dead_letters,
            health,
        }
    }

    /// Stores the batch, waiting out outages until it is durable or shutdown is asked for.
    pub async fn store(&self, batch: &Batch, shutdown: &Shutdown) -> Result<Stored, SinkError> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let started = Instant::now();
            match self.store_once(batch).await {
                Ok(stored) => {
                    self.health.set("postgres", true);
                    metrics::flushed(
                        batch.len(),
                        stored.written,
                        stored.skipped,
                        started.elapsed(),
                    );
                    return Ok(stored);
                }
                Err(error) => {
                    self.health.set("postgres", false);
                    let cause = match error {
                        SinkError::DeadLetters(_) => "kafka_dead_letters",
                        _ => "postgres",
                    };
                    metrics::retry(cause);
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %error, attempt = backoff.attempts(), retry_in_ms = delay.as_millis() as u64,
                        "batch not stored; retrying");
                    tokio::select! {
                        biased;
                        _ = shutdown.wait() => return Err(SinkError::Shutdown),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn store_once(&self, batch: &Batch) -> Result<Stored, SinkError> {
        let mut client = self.pool.get().await?;
        let mut tx = client
            .transaction()
            .await
            .map_err(step("beginning a transaction"))?;
        let stored_up_to = lock_offsets(&tx, &self.topic, &batch.next_offsets).await?;
        let is_new = |partition: i32, offset: i64| {
            offset >= stored_up_to.get(&partition).copied().unwrap_or(0)
        };
        let fresh: Vec<&Row> = batch
            .rows
            .iter()
            .filter(|r| is_new(r.partition, r.offset))
            .collect();
        let rejected = copy_rows(&mut tx, &fresh).await?;
        let mut dead: Vec<&DeadLetter> = batch
            .dead
            .iter()
            .filter(|d| is_new(d.partition, d.offset))
            .collect();
        let rejected: Vec<DeadLetter> = rejected
            .into_iter()
            .map(|(i, detail)| rejected_letter(fresh[i], detail))
            .collect();
        dead.extend(rejected.iter());
        self.dead_letters.send_all(dead.iter().copied()).await?;
        advance_offsets(&tx, &self.topic, &batch.next_offsets).await?;
        tx.commit().await.map_err(step("committing the batch"))?;
        Ok(Stored {
            written: (fresh.len() - rejected.len()) as u64,
            skipped: (batch.rows.len() - fresh.len()) as u64,
            dead_lettered: dead.len() as u64,
        })
    }
}

/// Creates missing offset rows, locks the batch's partitions and returns their `next_offset`.
async fn lock_offsets(
    tx: &Transaction<'_>,
    topic: &str,
    next_offsets: &BTreeMap<i32, i64>,
) -> Result<BTreeMap<i32, i64>, SinkError> {
    // Sorted (BTreeMap) so that two replicas lock overlapping partitions in the same order.
    let partitions: Vec<i32> = next_offsets.keys().copied().collect();
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 2] =
        [(&topic, Type::TEXT), (&partitions, Type::INT4_ARRAY)];
    tx.query_typed(
        "INSERT INTO ingest_offsets (topic, kafka_partition, next_offset)
         SELECT $1, p, 0 FROM unnest($2::int4[]) AS p ORDER BY p
         ON CONFLICT DO NOTHING",
        &params,
    )
    .await
    .map_err(step("creating offset rows"))?;
    let rows = tx
        .query_typed(
            "SELECT kafka_partition, next_offset FROM ingest_offsets
             WHERE topic = $1 AND kafka_partition = ANY($2) ORDER BY kafka_partition FOR UPDATE",
            &params,
        )
        .await
        .map_err(step("locking partition offsets"))?;
    Ok(rows
        .iter()
        .map(|row| (row.get::<_, i32>(0), row.get::<_, i64>(1)))
        .collect())
}

async fn advance_offsets(
    tx: &Transaction<'_>,
    topic: &str,
    next_offsets: &BTreeMap<i32, i64>,
) -> Result<(), SinkError> {
    let partitions: Vec<i32> = next_offsets.keys().copied().collect();
    let offsets: Vec<i64> = next_offsets.values().copied().collect();
    tx.query_typed(
        "UPDATE ingest_offsets AS o
         SET next_offset = GREATEST(o.next_offset, v.next), updated_at = now()
         FROM unnest($2::int4[], $3::int8[]) AS v(p, next)
         WHERE o.topic = $1 AND o.kafka_partition = v.p",
        &[
            (&topic, Type::TEXT),
            (&partitions, Type::INT4_ARRAY),
            (&offsets, Type::INT8_ARRAY),
        ],
    )
    .await
    .map_err(step("advancing partition offsets"))?;
    Ok(())
}

/// COPYs the rows; when PostgreSQL rejects the data, bisects under savepoints until each
/// rejected row stands alone. Returns the indexes of rejected rows with PostgreSQL's reason.
async fn copy_rows(
    tx: &mut Transaction<'_>,
    rows: &[&Row],
) -> Result<Vec<(usize, String)>, SinkError> {
    let mut rejected = Vec::new();
    // A stack of ranges still to store; the left half is pushed last so rows go in order.
    let mut pending: Vec<Range<usize>> = Vec::new();
    pending.push(0..rows.len());
    while let Some(range) = pending.pop() {
        if range.is_empty() {
            continue;
        }
        let savepoint = tx
            .savepoint("copy_rows")
            .await
            .map_err(step("creating a savepoint"))?;
        match copy_in(&savepoint, &rows[range.clone()]).await {
            Ok(()) => savepoint
                .commit()
                .await
                .map_err(step("releasing a savepoint"))?,
            Err(error) if is_rejected_data(&error) => {
                savepoint
                    .rollback()
                    .await
                    .map_err(step("rolling back a savepoint"))?;
                if range.len() == 1 {
                    rejected.push((range.start, database_reason(&error)));
                } else {
                    let middle = range.start + range.len() / 2;
                    pending.push(middle..range.end);
                    pending.push(range.start..middle);
                }
            }
            Err(error) => {
                return Err(SinkError::Postgres {
                    step: "copying rows",
                    source: error,
                })
            }
        }
    }
    Ok(rejected)
}

async fn copy_in(tx: &Transaction<'_>, rows: &[&Row]) -> Result<(), tokio_postgres::Error> {
    let sink = tx
        .copy_in::<_, bytes::Bytes>(copy::COPY_RAW_TELEMETRY)
        .await?;
    futures::pin_mut!(sink);
    sink.send(copy::encode(rows.iter().copied())).await?;
    sink.finish().await?;
    Ok(())
}

/// The one place that decides whether PostgreSQL refused the data itself (so retrying cannot
/// help and the rows must be found and dead-lettered) or anything else went wrong (connection
/// lost, server shutting down, out of resources, schema missing), which is retried.
fn is_rejected_data(error: &tokio_postgres::Error) -> bool {
    let Some(code) = error.code() else {
        return false;
    };
    let class = &code.code()[..2];
    // 22: data exception (value out of range, bad encoding); 23: integrity constraint violation;
    // 54: program limit exceeded (e.g. an index row too large for one value).
    matches!(class, "22" | "23" | "54")
}

fn database_reason(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!(
            "PostgreSQL rejected the row: {} ({})",
            db.message(),
            db.code().code()
        ),
        None => format!("PostgreSQL rejected the row: {error}"),
    }
}

fn rejected_letter(row: &Row, detail: String) -> DeadLetter {
    DeadLetter {
        reason: DeadLetterReason::RejectedByDatabase,
        detail,
        key: Some(row.device.kafka_key().into_bytes()),
        payload: Some(row.payload.clone()),
        headers: vec![(
            telemetry_core::contract::header::RECEIVED_AT_MS.to_owned(),
            Some(row.received_at.timestamp_millis().to_string().into_bytes()),
        )],
        partition: row.partition,
        offset: row.offset,
    }
}

//! Stores batches in `raw_telemetry` exactly once.
//!
//! Guarantee: a record's row is stored once and only once, whatever happens to the worker, the
//! database or the broker. One transaction (through PgBouncer, so nothing outlives it) does:
//!
//! 1. lock the batch's partitions in `ingest_offsets` (`FOR UPDATE`, in partition order), which
//!    also makes a replica that lost a partition in a rebalance, but still holds a batch for it,
//!    wait for the new owner and then see what the new owner stored;
//! 2. refuse the batch if it starts a partition above its `next_offset` (the records between
//!    were never read); drop records below each partition's `next_offset`: they are already
//!    stored (inside a replay window, see migration 0002, a record is stored again only if its
//!    row is missing);
//! 3. drop the copies of readings stored already, by device and `seq` (see [`crate::dedup`]);
//!    COPY the rest; if PostgreSQL rejects the data, roll back and store the batch again,
//!    bisecting under savepoints to find the rows it rejects, and dead-letter those alone;
//! 4. upsert `device_latest` once per device; send dead letters and wait for the broker to
//!    confirm them;
//! 5. move `next_offset` past the batch, and commit.
//!
//! Statements that do not depend on each other's results are pipelined (sent together, answers
//! awaited together): creating and locking the offset rows, and everything after the COPY.
//! Only unnamed statements are pipelined: a cancelled one leaves nothing behind on the server
//! connection, which PgBouncer hands to other clients. A batch's transaction then costs seven
//! round trips to the database instead of eleven, which matters through PgBouncer and on a
//! network.
//!
//! A crash anywhere before the commit leaves nothing behind, and the records are delivered
//! again; a crash after it makes the records skipped at step 2 when they come again. Outages are
//! retried with back-off and never turn a record into a dead letter.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use futures::SinkExt;
use telemetry_alerts::outbox::{self, OutboxWaker};
use telemetry_alerts::{AlertEvent, Reading, RuleSet};
use telemetry_core::backoff::Backoff;
use telemetry_core::contract::{DeadLetterReason, DeviceId};
use telemetry_core::observe::Health;
use telemetry_core::Shutdown;
use tokio_postgres::types::Type;
use tokio_postgres::Transaction;

use crate::copy;
use crate::dedup;
use crate::dlq::{DeadLetterError, DeadLetterProducer};
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
    #[error("the batch's transaction took longer than {0:?} (postgres.write_timeout_ms); abandoned it and its connection")]
    Timeout(Duration),
    #[error(transparent)]
    Alerts(#[from] telemetry_alerts::AlertError),
    #[error(transparent)]
    DeadLetters(#[from] DeadLetterError),
    #[error("shutdown requested while the database was unavailable; the batch was not stored and will be consumed again")]
    Shutdown,
    /// PostgreSQL refused some of the batch's rows when they were copied at once; the batch is
    /// stored again with the refused rows found one by one. Never returned from [`Sink::store`].
    #[error("PostgreSQL rejected rows of the batch; storing it again to find them")]
    RowsRejected,
    #[error("partition {partition}: the batch starts at offset {first_offset} but ingest_offsets has stored only up to {resume_offset}, so the records in between would never be stored (the consumer started ahead of the database, e.g. at Kafka's committed offset after a database restore, or the broker moved it). Refused the batch and stopping; start the worker again: each partition then starts where ingest_offsets says, and offsets Kafka no longer keeps are recorded as skipped")]
    StartsAboveStored {
        partition: i32,
        first_offset: i64,
        resume_offset: i64,
    },
}

pub(crate) fn step(step: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SinkError {
    move |source| SinkError::Postgres { step, source }
}

/// Readiness checks the sink reports: the database, and the dead-letter topic.
const POSTGRES: &str = "postgres";
const DEAD_LETTER_TOPIC: &str = "kafka_dlq";

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
    /// Keep `device_latest` current in each batch's transaction (on by default; off only to
    /// measure what it costs).
    keep_device_latest: bool,
    write_timeout: Duration,
    /// Alert evaluation, when rules are configured.
    alerts: Option<AlertStage>,
}

/// What the sink needs to evaluate alerts: the current rules and a way to tell the outbox
/// publisher that new alerts are committed.
#[derive(Debug, Clone)]
pub struct AlertStage {
    pub rules: tokio::sync::watch::Receiver<Arc<RuleSet>>,
    pub outbox: OutboxWaker,
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
            keep_device_latest: true,
            write_timeout: Duration::from_secs(15),
            alerts: None,
        }
    }

    /// Evaluates alert rules on every newly stored row, in the batch's transaction.
    pub fn alerts(mut self, stage: AlertStage) -> Self {
        self.alerts = Some(stage);
        self
    }

    /// How long one batch's transaction may take before it is abandoned and retried.
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// Whether each batch also updates `device_latest`.
    pub fn keep_device_latest(mut self, keep: bool) -> Self {
        self.keep_device_latest = keep;
        self
    }

    /// Stores the batch, waiting out outages until it is durable or shutdown is asked for.
    pub async fn store(&self, batch: &Batch, shutdown: &Shutdown) -> Result<Stored, SinkError> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let started = Instant::now();
            match self.store_once(batch).await {
                // Storing it again cannot fill the gap.
                Err(error @ SinkError::StartsAboveStored { .. }) => return Err(error),
                Ok(stored) => {
                    self.health.set(POSTGRES, true);
                    self.health.set(DEAD_LETTER_TOPIC, true);
                    metrics::flushed(
                        batch.len(),
                        stored.written,
                        stored.skipped,
                        started.elapsed(),
                    );
                    return Ok(stored);
                }
                Err(error) => {
                    // Readiness names what failed: a dead-letter topic that refuses letters is
                    // not a database outage.
                    let (check, cause) = match error {
                        SinkError::DeadLetters(_) => (DEAD_LETTER_TOPIC, "kafka_dead_letters"),
                        _ => (POSTGRES, "postgres"),
                    };
                    self.health.set(check, false);
                    // Sending the same letter again cannot help: stop, saying what to fix.
                    if let SinkError::DeadLetters(DeadLetterError::Refused { .. }) = error {
                        tracing::error!(%error, "batch not stored: a dead letter is refused for good");
                        return Err(error);
                    }
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

    /// One attempt, bounded by the write timeout. A connection whose transaction timed out is
    /// taken out of the pool and closed, so no half-finished exchange is reused.
    async fn store_once(&self, batch: &Batch) -> Result<Stored, SinkError> {
        let mut client = self.pool.get().await?;
        let attempt = tokio::time::timeout(
            self.write_timeout,
            self.write_finding_rejected_rows(&mut client, batch),
        )
        .await;
        match attempt {
            Ok(result) => result,
            Err(_elapsed) => {
                drop(deadpool_postgres::Object::take(client));
                Err(SinkError::Timeout(self.write_timeout))
            }
        }
    }

    /// Copies the batch at once; only if PostgreSQL refuses some of its rows is the batch
    /// written again with savepoints, which cost two round trips per COPY.
    async fn write_finding_rejected_rows(
        &self,
        client: &mut deadpool_postgres::Object,
        batch: &Batch,
    ) -> Result<Stored, SinkError> {
        match self.write(client, batch, CopyMode::Whole).await {
            Err(SinkError::RowsRejected) => self.write(client, batch, CopyMode::Bisect).await,
            outcome => outcome,
        }
    }

    async fn write(
        &self,
        client: &mut deadpool_postgres::Object,
        batch: &Batch,
        mode: CopyMode,
    ) -> Result<Stored, SinkError> {
        let mut tx = client
            .transaction()
            .await
            .map_err(step("beginning a transaction"))?;
        let positions = lock_offsets(&tx, &self.topic, &batch.next_offsets).await?;
        if let Some(gap) = gap_before(batch, &positions) {
            return Err(gap);
        }
        let classify = |partition: i32, offset: i64| {
            positions
                .get(&partition)
                .map_or(Disposition::Fresh, |p| p.classify(offset))
        };
        let mut fresh: Vec<&Row> = Vec::with_capacity(batch.rows.len());
        let mut replayed: Vec<&Row> = Vec::new();
        for row in &batch.rows {
            match classify(row.partition, row.offset) {
                Disposition::Fresh => fresh.push(row),
                Disposition::Replay => replayed.push(row),
                Disposition::Stored => {}
            }
        }
        let replayed = missing_rows(&tx, replayed).await?;
        // Replayed rows come first: they are older than every fresh row of their partition.
        let candidates: Vec<&Row> = replayed.iter().chain(fresh.iter()).copied().collect();
        let (to_copy, copies) = dedup::drop_copies(&tx, candidates).await?;
        // Replayed rows still come first: the index of the first fresh one.
        let first_fresh = to_copy
            .iter()
            .take_while(|row| classify(row.partition, row.offset) == Disposition::Replay)
            .count();
        let skipped = batch.rows.len() - to_copy.len();
        let rejected = copy_rows(&mut tx, &to_copy, mode).await?;
        // Dead letters of a replay window were sent when the records were first read.
        let mut dead: Vec<&DeadLetter> = batch
            .dead
            .iter()
            .filter(|d| classify(d.partition, d.offset) == Disposition::Fresh)
            .collect();
        let rejected: Vec<(usize, DeadLetter)> = rejected
            .into_iter()
            .map(|(i, detail)| (i, rejected_letter(to_copy[i], detail)))
            .collect();
        dead.extend(
            rejected
                .iter()
                .filter(|(i, _)| *i >= first_fresh)
                .map(|(_, letter)| letter),
        );
        // The rows that are now in the table, replayed ones first.
        let rejected_rows: HashSet<usize> = rejected.iter().map(|(i, _)| *i).collect();
        let stored: Vec<&Row> = to_copy
            .iter()
            .enumerate()
            .filter(|(i, _)| !rejected_rows.contains(i))
            .map(|(_, row)| *row)
            .collect();
        let replayed_stored = (0..first_fresh)
            .filter(|i| !rejected_rows.contains(i))
            .count();
        let latest = async {
            if self.keep_device_latest {
                upsert_device_latest(&tx, stored.iter().copied()).await?;
            }
            Ok(())
        };
        // Only rows stored for the first time, in offset order: a replayed or re-delivered
        // reading must not move a device's alert state twice, nor raise an old alert again.
        let newly_stored = stored[replayed_stored..].iter().copied();
        let alerts = async {
            match &self.alerts {
                Some(stage) => evaluate_alerts(&tx, stage, newly_stored).await,
                None => Ok(Vec::new()),
            }
        };
        // The broker must confirm the dead letters before the commit, or a crash between the
        // two would lose them; so they are awaited with the statements, not after.
        let letters = async {
            self.dead_letters.send_all(dead.iter().copied()).await?;
            Ok(())
        };
        let ((), alerts, (), (), ()) = futures::try_join!(
            latest,
            alerts,
            letters,
            dedup::advance_sequences(&tx, stored.iter().copied()),
            advance_offsets(&tx, &self.topic, &batch.next_offsets)
        )?;
        tx.commit().await.map_err(step("committing the batch"))?;
        if copies > 0 {
            metrics::copies_dropped(copies);
        }
        metrics::record_age(to_copy.iter().map(|row| row.received_at));
        if let (Some(stage), false) = (&self.alerts, alerts.is_empty()) {
            telemetry_alerts::metrics::events_committed(&alerts);
            stage
                .outbox
                .wake_partitions(alerts.iter().map(|event| event.partition));
        }
        Ok(Stored {
            written: (to_copy.len() - rejected.len()) as u64,
            skipped: skipped as u64,
            dead_lettered: dead.len() as u64,
        })
    }
}

/// Evaluates the rules on the rows, with each device's state locked, loaded from and saved to
/// `alert_state` in the batch's transaction, and stores the resulting alerts in the outbox
/// table (see `telemetry_alerts::outbox::evaluate_batch`). The state therefore moves with the
/// device: whichever writer stores the next batch of a device, on this replica or another,
/// waits for the previous one and reads the state it left.
async fn evaluate_alerts<'a>(
    tx: &Transaction<'_>,
    stage: &AlertStage,
    rows: impl Iterator<Item = &'a Row>,
) -> Result<Vec<AlertEvent>, SinkError> {
    let readings: Vec<Reading> = rows
        .map(|row| Reading {
            device: &row.device,
            payload: &row.payload,
            time: row.device_time.unwrap_or(row.received_at),
            partition: row.partition,
            offset: row.offset,
        })
        .collect();
    let rules = stage.rules.borrow().clone();
    Ok(outbox::evaluate_batch(tx, &rules, &readings).await?)
}

/// What the database already says about one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredPosition {
    /// Every record below this offset has been stored (or dead-lettered).
    pub next_offset: i64,
    /// A replay window `[from, to)`, see migration 0002.
    pub replay: Option<(i64, i64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disposition {
    /// Never seen: store it, dead-letter it, evaluate it.
    Fresh,
    /// Inside a replay window: store it again only if its row is missing.
    Replay,
    /// Already stored.
    Stored,
}

impl StoredPosition {
    fn classify(&self, offset: i64) -> Disposition {
        if offset >= self.next_offset {
            Disposition::Fresh
        } else if self
            .replay
            .is_some_and(|(from, to)| (from..to).contains(&offset))
        {
            Disposition::Replay
        } else {
            Disposition::Stored
        }
    }

    /// Where a consumer must start reading this partition so that nothing unstored is skipped.
    pub fn resume_offset(&self) -> i64 {
        match self.replay {
            Some((from, _)) => from.min(self.next_offset),
            None => self.next_offset,
        }
    }
}

/// The refusal of a batch that starts a partition above where its stored data ends (or its replay
/// window begins): the records in between were never read, and storing the batch would move
/// `next_offset` past them for good. Offsets in a partition have no holes here: the topic takes
/// no transactional producers (whose commit markers take offsets) and is not compacted.
fn gap_before(batch: &Batch, positions: &BTreeMap<i32, StoredPosition>) -> Option<SinkError> {
    let mut first_offsets: BTreeMap<i32, i64> = BTreeMap::new();
    let offsets = batch.rows.iter().map(|r| (r.partition, r.offset));
    for (partition, offset) in offsets.chain(batch.dead.iter().map(|d| (d.partition, d.offset))) {
        let first = first_offsets.entry(partition).or_insert(offset);
        *first = (*first).min(offset);
    }
    first_offsets
        .into_iter()
        .map(|(partition, first_offset)| SinkError::StartsAboveStored {
            partition,
            first_offset,
            resume_offset: positions.get(&partition).map_or(0, |p| p.resume_offset()),
        })
        .find(|gap| {
            matches!(gap, SinkError::StartsAboveStored { first_offset, resume_offset, .. }
                if first_offset > resume_offset)
        })
}

/// Creates missing offset rows, locks the batch's partitions and returns what they say.
async fn lock_offsets(
    tx: &Transaction<'_>,
    topic: &str,
    next_offsets: &BTreeMap<i32, i64>,
) -> Result<BTreeMap<i32, StoredPosition>, SinkError> {
    // Sorted (BTreeMap) so that two replicas lock overlapping partitions in the same order.
    let partitions: Vec<i32> = next_offsets.keys().copied().collect();
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 2] =
        [(&topic, Type::TEXT), (&partitions, Type::INT4_ARRAY)];
    // Sent together: the lock sees the rows the insert creates, as statements run in order.
    let create = async {
        tx.query_typed(
            "INSERT INTO ingest_offsets (topic, kafka_partition, next_offset)
             SELECT $1, p, 0 FROM unnest($2::int4[]) AS p ORDER BY p
             ON CONFLICT DO NOTHING",
            &params,
        )
        .await
        .map_err(step("creating offset rows"))
    };
    let lock = async {
        tx.query_typed(
            "SELECT kafka_partition, next_offset, replay_from, replay_to FROM ingest_offsets
             WHERE topic = $1 AND kafka_partition = ANY($2) ORDER BY kafka_partition FOR UPDATE",
            &params,
        )
        .await
        .map_err(step("locking partition offsets"))
    };
    let (_, rows) = futures::try_join!(create, lock)?;
    Ok(rows.iter().map(stored_position).collect())
}

/// Reads one `ingest_offsets` row selected as (partition, next_offset, replay_from, replay_to).
pub fn stored_position(row: &tokio_postgres::Row) -> (i32, StoredPosition) {
    let replay = match (row.get::<_, Option<i64>>(2), row.get::<_, Option<i64>>(3)) {
        (Some(from), Some(to)) => Some((from, to)),
        _ => None,
    };
    (
        row.get(0),
        StoredPosition {
            next_offset: row.get(1),
            replay,
        },
    )
}

/// Of the replayed rows, those whose row is not in `raw_telemetry` any more.
async fn missing_rows<'a>(
    tx: &Transaction<'_>,
    replayed: Vec<&'a Row>,
) -> Result<Vec<&'a Row>, SinkError> {
    if replayed.is_empty() {
        return Ok(replayed);
    }
    let partitions: Vec<i32> = replayed.iter().map(|r| r.partition).collect();
    let offsets: Vec<i64> = replayed.iter().map(|r| r.offset).collect();
    let present = tx
        .query_typed(
            "SELECT t.kafka_partition, t.kafka_offset
             FROM unnest($1::int4[], $2::int8[]) AS v(p, o)
             JOIN raw_telemetry AS t ON t.kafka_partition = v.p AND t.kafka_offset = v.o",
            &[
                (&partitions, Type::INT4_ARRAY),
                (&offsets, Type::INT8_ARRAY),
            ],
        )
        .await
        .map_err(step("looking up replayed rows"))?;
    let present: HashSet<(i32, i64)> = present.iter().map(|r| (r.get(0), r.get(1))).collect();
    Ok(replayed
        .into_iter()
        .filter(|r| !present.contains(&(r.partition, r.offset)))
        .collect())
}

/// One upsert per device for the whole batch: each device's newest row wins, and a row older
/// than what the table holds (a replay, a late batch from a revoked partition) changes nothing.
async fn upsert_device_latest<'a>(
    tx: &Transaction<'_>,
    rows: impl Iterator<Item = &'a Row>,
) -> Result<(), SinkError> {
    let mut newest: HashMap<&DeviceId, &Row> = HashMap::new();
    for row in rows {
        let entry = newest.entry(&row.device).or_insert(row);
        if (row.received_at, row.offset) >= (entry.received_at, entry.offset) {
            *entry = row;
        }
    }
    if newest.is_empty() {
        return Ok(());
    }
    let mut rows: Vec<&Row> = newest.into_values().collect();
    // A fixed order, so two replicas updating the same devices cannot deadlock.
    rows.sort_by(|a, b| a.device.cmp(&b.device));
    let users: Vec<&str> = rows.iter().map(|r| r.device.user.as_str()).collect();
    let devices: Vec<&str> = rows.iter().map(|r| r.device.device.as_str()).collect();
    let received: Vec<DateTime<Utc>> = rows.iter().map(|r| r.received_at).collect();
    let device_times: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.device_time).collect();
    let seqs: Vec<Option<i64>> = rows.iter().map(|r| r.seq).collect();
    let payloads: Vec<&str> = rows.iter().map(|r| payload_text(&r.payload)).collect();
    let partitions: Vec<i32> = rows.iter().map(|r| r.partition).collect();
    let offsets: Vec<i64> = rows.iter().map(|r| r.offset).collect();
    tx.query_typed(
        "INSERT INTO device_latest AS l (user_id, device_id, received_at, device_time, seq,
                                         payload, kafka_partition, kafka_offset)
         SELECT u, d, r, t, s, p::jsonb, kp, ko
         FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::int8[],
                     $6::text[], $7::int4[], $8::int8[]) AS v(u, d, r, t, s, p, kp, ko)
         ON CONFLICT (user_id, device_id) DO UPDATE
         SET received_at = EXCLUDED.received_at, device_time = EXCLUDED.device_time,
             seq = EXCLUDED.seq, payload = EXCLUDED.payload,
             kafka_partition = EXCLUDED.kafka_partition, kafka_offset = EXCLUDED.kafka_offset,
             updated_at = now()
         WHERE (l.received_at, l.kafka_offset) <= (EXCLUDED.received_at, EXCLUDED.kafka_offset)",
        &[
            (&users, Type::TEXT_ARRAY),
            (&devices, Type::TEXT_ARRAY),
            (&received, Type::TIMESTAMPTZ_ARRAY),
            (&device_times, Type::TIMESTAMPTZ_ARRAY),
            (&seqs, Type::INT8_ARRAY),
            (&payloads, Type::TEXT_ARRAY),
            (&partitions, Type::INT4_ARRAY),
            (&offsets, Type::INT8_ARRAY),
        ],
    )
    .await
    .map_err(step("updating device_latest"))?;
    Ok(())
}

/// Payloads passed the contract's JSON decoding, so they are UTF-8.
pub(crate) fn payload_text(payload: &[u8]) -> &str {
    std::str::from_utf8(payload).unwrap_or("{}")
}

async fn advance_offsets(
    tx: &Transaction<'_>,
    topic: &str,
    next_offsets: &BTreeMap<i32, i64>,
) -> Result<(), SinkError> {
    let partitions: Vec<i32> = next_offsets.keys().copied().collect();
    let offsets: Vec<i64> = next_offsets.values().copied().collect();
    // GREATEST: a batch that was wholly skipped (another replica got there first) must not move
    // an offset back. The replay window shrinks from the front and is dropped once read.
    tx.query_typed(
        "UPDATE ingest_offsets AS o
         SET next_offset = GREATEST(o.next_offset, v.next),
             replay_from = CASE WHEN GREATEST(o.replay_from, v.next) < o.replay_to
                                THEN GREATEST(o.replay_from, v.next) END,
             replay_to   = CASE WHEN GREATEST(o.replay_from, v.next) < o.replay_to
                                THEN o.replay_to END,
             updated_at = now()
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

/// How a batch's rows are copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyMode {
    /// One COPY; [`SinkError::RowsRejected`] if PostgreSQL refuses any row (the transaction is
    /// then aborted and must be rolled back).
    Whole,
    /// Under savepoints, bisecting until each refused row stands alone.
    Bisect,
}

/// COPYs the rows. In [`CopyMode::Bisect`], when PostgreSQL rejects the data, bisects under
/// savepoints until each rejected row stands alone. Returns the indexes of rejected rows with
/// PostgreSQL's reason.
async fn copy_rows(
    tx: &mut Transaction<'_>,
    rows: &[&Row],
    mode: CopyMode,
) -> Result<Vec<(usize, String)>, SinkError> {
    let copy_error = |source| SinkError::Postgres {
        step: "copying rows",
        source,
    };
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    if mode == CopyMode::Whole {
        return match copy_in(tx, rows).await {
            Ok(()) => Ok(Vec::new()),
            Err(error) if is_rejected_data(&error) => Err(SinkError::RowsRejected),
            Err(error) => Err(copy_error(error)),
        };
    }
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
            Err(error) => return Err(copy_error(error)),
        }
    }
    Ok(rejected)
}

/// The COPY statement is prepared here and closed when the sink is dropped, before anything
/// else is sent: a named statement must never outlive its transaction, nor be left behind by a
/// cancelled request, on a PgBouncer connection in transaction mode (another client would
/// collide with its name).
async fn copy_in(tx: &Transaction<'_>, rows: &[&Row]) -> Result<(), tokio_postgres::Error> {
    let sink = tx
        .copy_in::<_, bytes::Bytes>(copy::COPY_RAW_TELEMETRY)
        .await?;
    futures::pin_mut!(sink);
    for chunk in copy::chunks(copy::encode(rows.iter().copied())) {
        sink.feed(chunk).await?;
    }
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

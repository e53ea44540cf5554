//! Where an assigned partition starts reading.
//!
//! Guarantee: a partition never starts above what `ingest_offsets` says is stored, and never
//! starts at all on a log that does not reach what is stored. Kafka's committed offset only
//! moves a start back (an offset reset with Kafka's tools); it never moves it forward, because
//! after a database restore it is ahead of the database and the records between would never be
//! read. So:
//!
//! - a partition without a row starts at the oldest record Kafka keeps, not at Kafka's
//!   committed offset: nothing of it is stored;
//! - when the database cannot be read at assignment, the lookup is retried for
//!   [`LOOKUP_PATIENCE`], then the worker stops with [`PositionError::Unknown`] instead of
//!   guessing (a restart waits for the database before it consumes);
//! - records below the oldest offset Kafka keeps cannot be read any more (retention): the
//!   partition starts at the oldest kept, and `ingest_offsets` records that it skipped them, with
//!   a warning and [`crate::metrics::RECORDS_LOST`], so the sink's gap check (see
//!   [`crate::sink`]) accepts the start.
//!
//! A stored position is only meaningful on the log it was read from. Kafka has topic ids, but
//! rdkafka's metadata API does not expose them (librdkafka has them only behind DescribeTopics,
//! which rdkafka does not wrap), and offsets alone say nothing of which log they belong to. The
//! identity checked is the one every Kafka-compatible broker can answer: the log must reach the
//! stored `next_offset`. A topic deleted and created again, a new cluster, or a broker that lost
//! acknowledged records (Redpanda in dev mode skips fsync) has a log that ends below it; reading
//! it would store nothing below `next_offset`, silently, and alerts keyed by offset would collide
//! with old ones. Such a partition stops the worker with [`PositionError::LogEndsBelowStored`],
//! which names `telemetry-worker replay --new-log` as the fix. A log that was re-created and has
//! already grown past the stored offset cannot be told apart this way; this is the same limit a
//! Kafka Connect sink that keeps its offsets in the target database has.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::{Duration, Instant};

use telemetry_core::backoff::Backoff;
use tokio_postgres::types::Type;

use crate::sink::{stored_position, StoredPosition};

/// How long an assignment keeps trying to read the stored positions before the worker stops.
/// The rebalance callback holds the consumer's poll meanwhile (librdkafka keeps heartbeating on
/// its own thread), so this stays well below `max.poll.interval.ms` (300 s by default).
pub const LOOKUP_PATIENCE: Duration = Duration::from_secs(30);

/// How long one database or Kafka request of a lookup may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, thiserror::Error)]
pub enum PositionError {
    #[error("cannot tell where partitions {partitions:?} of '{topic}' start: {reason} (gave up after {waited:?}). The worker stops rather than start at Kafka's committed offset, which can be ahead of the database (after a restore) and would skip records for good; check the database (postgres.url) and Kafka, then start the worker again")]
    Unknown {
        topic: String,
        partitions: Vec<i32>,
        reason: String,
        waited: Duration,
    },
    #[error("partition {partition} of '{topic}': ingest_offsets says offset {next_offset} is the next to store, but the partition's log ends at {log_end}. The topic was deleted and created again, the Kafka cluster was replaced, or the broker lost records it had acknowledged; consuming would silently skip every new record below {next_offset}. Stop every worker of the group, make sure the topic is the one you want, then run `telemetry-worker replay --new-log --partition {partition}` to read this log from its start")]
    LogEndsBelowStored {
        topic: String,
        partition: i32,
        next_offset: i64,
        log_end: i64,
    },
}

impl PositionError {
    /// A low-cardinality name for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PositionError::Unknown { .. } => "positions_unreadable",
            PositionError::LogEndsBelowStored { .. } => "log_ends_below_stored",
        }
    }
}

/// A partition's log as Kafka reports it: the oldest offset it keeps and where it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionLog {
    pub oldest: i64,
    pub end: i64,
}

/// Where one partition starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    pub offset: i64,
    /// Offsets that were never stored and that Kafka no longer keeps; `ingest_offsets` is moved
    /// past them before consuming starts.
    pub lost: Option<Range<i64>>,
}

/// Why a partition's log cannot be consumed from what is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogEndsBelowStored {
    pub next_offset: i64,
    pub log_end: i64,
}

/// Decides where a partition starts from what the database stored (none: nothing), Kafka's
/// committed offset for the group, and the partition's log.
pub fn start(
    stored: Option<&StoredPosition>,
    committed: Option<i64>,
    log: PartitionLog,
) -> Result<Start, LogEndsBelowStored> {
    let (next_offset, resume) = stored.map_or((0, 0), |s| (s.next_offset, s.resume_offset()));
    // The group's own commit at or past `next_offset` is the broker's word that this log did
    // reach it: a deleted topic's or another cluster's group offsets are gone. It also keeps the
    // check quiet on a broker whose ListOffsets under-reports the end (Tansu answers with the
    // first offset of the last record batch plus one).
    let log_reached_stored = committed.is_some_and(|c| c >= next_offset);
    if next_offset > log.end && !log_reached_stored {
        return Err(LogEndsBelowStored {
            next_offset,
            log_end: log.end,
        });
    }
    let wanted = committed.map_or(resume, |c| c.min(resume));
    Ok(Start {
        offset: wanted.max(log.oldest),
        lost: (resume < log.oldest).then_some(resume..log.oldest),
    })
}

/// Retries `attempt` with capped back-off until it succeeds or [`LOOKUP_PATIENCE`] has passed;
/// the error then says what failed last.
pub fn with_patience<T>(
    mut attempt: impl FnMut() -> Result<T, String>,
) -> Result<T, (String, Duration)> {
    let started = Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let reason = match attempt() {
            Ok(value) => return Ok(value),
            Err(reason) => reason,
        };
        let delay = backoff.next_delay();
        if started.elapsed() + delay > LOOKUP_PATIENCE {
            return Err((reason, started.elapsed()));
        }
        tracing::warn!(%reason, attempt = backoff.attempts(), retry_in_ms = delay.as_millis() as u64,
            "cannot tell where assigned partitions start; retrying");
        std::thread::sleep(delay);
    }
}

/// Runs database work on a short-lived thread with a runtime of its own. librdkafka calls the
/// rebalance callback from inside the consumer's poll, on a runtime thread that must not wait
/// on the runtime's own tasks. Rebalances are rare; the cost of a connection is nothing next to
/// them.
fn on_own_runtime<T: Send>(
    work: impl std::future::Future<Output = Result<T, String>> + Send,
) -> Result<T, String> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("cannot start a runtime: {e}"))?;
                runtime.block_on(async {
                    tokio::time::timeout(REQUEST_TIMEOUT, work)
                        .await
                        .map_err(|_| {
                            format!("the database did not answer within {REQUEST_TIMEOUT:?}")
                        })?
                })
            })
            .join()
            .map_err(|_| "the lookup thread panicked".to_owned())?
    })
}

/// Reads the partitions' rows of `ingest_offsets`; a partition without a row is missing.
pub fn read_stored(
    database_url: &str,
    topic: &str,
    partitions: &[i32],
) -> Result<BTreeMap<i32, StoredPosition>, String> {
    on_own_runtime(async {
        let client = connect(database_url).await?;
        let rows = client
            .query_typed(
                "SELECT kafka_partition, next_offset, replay_from, replay_to FROM ingest_offsets
                 WHERE topic = $1 AND kafka_partition = ANY($2)",
                &[(&topic, Type::TEXT), (&partitions, Type::INT4_ARRAY)],
            )
            .await;
        match rows {
            Ok(rows) => Ok(rows.iter().map(stored_position).collect()),
            // Not migrated yet: nothing is stored.
            Err(error)
                if error.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) =>
            {
                Ok(BTreeMap::new())
            }
            Err(error) => Err(format!("cannot read ingest_offsets: {error}")),
        }
    })
}

/// Moves each partition's `next_offset` (and replay window) up to the given oldest kept
/// offset, creating the row if there is none; never moves one back.
pub fn skip_to_oldest_kept(
    database_url: &str,
    topic: &str,
    oldest: &BTreeMap<i32, i64>,
) -> Result<(), String> {
    let partitions: Vec<i32> = oldest.keys().copied().collect();
    let offsets: Vec<i64> = oldest.values().copied().collect();
    on_own_runtime(async {
        let client = connect(database_url).await?;
        client
            .query_typed(
                "INSERT INTO ingest_offsets AS o (topic, kafka_partition, next_offset)
                 SELECT $1, p, n FROM unnest($2::int4[], $3::int8[]) AS v(p, n) ORDER BY p
                 ON CONFLICT (topic, kafka_partition) DO UPDATE
                 SET next_offset = GREATEST(o.next_offset, EXCLUDED.next_offset),
                     replay_from = CASE WHEN GREATEST(o.replay_from, EXCLUDED.next_offset) < o.replay_to
                                        THEN GREATEST(o.replay_from, EXCLUDED.next_offset) END,
                     replay_to   = CASE WHEN GREATEST(o.replay_from, EXCLUDED.next_offset) < o.replay_to
                                        THEN o.replay_to END,
                     updated_at = now()",
                &[
                    (&topic, Type::TEXT),
                    (&partitions, Type::INT4_ARRAY),
                    (&offsets, Type::INT8_ARRAY),
                ],
            )
            .await
            .map_err(|e| format!("cannot record the offsets Kafka no longer keeps: {e}"))?;
        Ok(())
    })
}

async fn connect(database_url: &str) -> Result<tokio_postgres::Client, String> {
    let (client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("cannot connect to the database: {e}"))?;
    // The connection ends when the client is dropped at the end of the lookup.
    tokio::spawn(connection);
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(next_offset: i64) -> StoredPosition {
        StoredPosition {
            next_offset,
            replay: None,
        }
    }

    const LOG: PartitionLog = PartitionLog {
        oldest: 0,
        end: 100,
    };

    #[test]
    fn a_partition_never_stored_starts_at_the_oldest_record_whatever_kafka_committed() {
        let start = super::start(None, Some(80), LOG).unwrap();
        assert_eq!(
            start,
            Start {
                offset: 0,
                lost: None
            }
        );
    }

    #[test]
    fn a_committed_offset_ahead_of_the_database_does_not_move_the_start_forward() {
        assert_eq!(
            super::start(Some(&stored(40)), Some(90), LOG)
                .unwrap()
                .offset,
            40
        );
        assert_eq!(
            super::start(Some(&stored(40)), Some(10), LOG)
                .unwrap()
                .offset,
            10
        );
        assert_eq!(
            super::start(Some(&stored(40)), None, LOG).unwrap().offset,
            40
        );
    }

    #[test]
    fn a_stored_offset_past_the_end_of_the_log_is_refused_unless_the_group_committed_that_far() {
        assert_eq!(
            super::start(Some(&stored(500)), None, LOG),
            Err(LogEndsBelowStored {
                next_offset: 500,
                log_end: 100
            })
        );
        assert!(super::start(Some(&stored(500)), Some(20), LOG).is_err());
        assert_eq!(
            super::start(Some(&stored(500)), Some(500), LOG)
                .unwrap()
                .offset,
            500
        );
        assert_eq!(
            super::start(Some(&stored(100)), None, LOG).unwrap().offset,
            100
        );
    }

    #[test]
    fn offsets_kafka_no_longer_keeps_are_skipped_and_named() {
        let log = PartitionLog {
            oldest: 60,
            end: 100,
        };
        assert_eq!(
            super::start(Some(&stored(40)), None, log).unwrap(),
            Start {
                offset: 60,
                lost: Some(40..60)
            }
        );
        assert_eq!(
            super::start(None, None, log).unwrap(),
            Start {
                offset: 60,
                lost: Some(0..60)
            }
        );
        // A reset below retention by hand loses nothing that was not stored.
        assert_eq!(
            super::start(Some(&stored(80)), Some(0), log).unwrap(),
            Start {
                offset: 60,
                lost: None
            }
        );
    }

    #[test]
    fn a_replay_window_starts_the_partition_at_its_beginning() {
        let position = StoredPosition {
            next_offset: 90,
            replay: Some((20, 90)),
        };
        assert_eq!(
            super::start(Some(&position), Some(20), LOG).unwrap().offset,
            20
        );
    }
}

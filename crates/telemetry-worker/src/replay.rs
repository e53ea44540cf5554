//! `telemetry-worker replay`: read history again without duplicating it.
//!
//! A replay opens a window `[from, to)` per partition in `ingest_offsets` (`to` is where the
//! partition's stored data ends now) and moves the consumer group's Kafka offsets back to
//! `from`. When the workers start again they read from there (see `ingest::WorkerContext`);
//! inside the window the sink stores a record only if its row is missing from `raw_telemetry`,
//! and sends no dead letter and no alert for it (those went out the first time). So a replay
//! restores rows that were deleted or lost, and never duplicates one.
//!
//! A rebuild deletes the rows of a time range (by receive time) and replays the offsets they
//! came from, so the range is ingested again from Kafka. It refuses to delete rows that Kafka no
//! longer has (retention), since they could not come back.
//!
//! Both need the consumer group to be empty (every worker stopped), as Kafka's own offset reset
//! does: a running worker would not see the window until its partitions are reassigned.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use tokio_postgres::types::Type;

use crate::config::WorkerConfig;
use crate::partitions::{chosen_partitions, PartitionsError};

const KAFKA_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot talk to Kafka while {step}: {source}")]
    Kafka {
        step: &'static str,
        #[source]
        source: KafkaError,
    },
    #[error("consumer group '{group}' has {members} active member(s); stop every worker of the group (e.g. scale it to 0) and run the command again")]
    GroupActive { group: String, members: usize },
    #[error(transparent)]
    Partitions(#[from] PartitionsError),
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] tokio_postgres::Error),
    #[error("database error while {step}: {source}")]
    Postgres {
        step: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("partition {partition}: the range starts at offset {first} but Kafka keeps offsets from {kept} only; rebuilding would delete rows that cannot be ingested again. Narrow the range (--from) or restore those rows another way")]
    BeyondRetention {
        partition: i32,
        first: i64,
        kept: i64,
    },
    #[error("--from ({from}) must be before --to ({to})")]
    EmptyRange {
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    },
}

fn kafka(step: &'static str) -> impl FnOnce(KafkaError) -> ReplayError {
    move |source| ReplayError::Kafka { step, source }
}

fn postgres(step: &'static str) -> impl FnOnce(tokio_postgres::Error) -> ReplayError {
    move |source| ReplayError::Postgres { step, source }
}

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayStart {
    /// The oldest record Kafka keeps.
    Earliest,
    /// This offset in every chosen partition (or the oldest kept, if that is later).
    Offset(i64),
    /// The first record at or after this time (Kafka's record timestamp).
    Timestamp(DateTime<Utc>),
}

/// What a replay or rebuild did to one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionReplay {
    pub partition: i32,
    /// The window read again, `[from, to)`; empty when nothing was stored there.
    pub from: i64,
    pub to: i64,
    /// Rows deleted (rebuild only).
    pub deleted: u64,
}

/// Opens a replay window from `start` on the chosen partitions (all when `partitions` is
/// empty) and moves the group's Kafka offsets there.
pub async fn replay(
    config: &WorkerConfig,
    start: ReplayStart,
    partitions: &[i32],
) -> Result<Vec<PartitionReplay>, ReplayError> {
    let (group, partitions) = GroupAdmin::idle(config, partitions)?;
    let starts = group.start_offsets(start, &partitions)?;
    let mut client = connect(config).await?;
    let tx = client
        .transaction()
        .await
        .map_err(postgres("beginning a transaction"))?;
    let next = lock_positions(&tx, &config.kafka.topic, &partitions).await?;
    let mut replays = Vec::new();
    for (&partition, &from) in &starts {
        let to = next.get(&partition).copied().unwrap_or(0);
        // i64::MAX: no record at or after the timestamp, so nothing to read again.
        let from = if from == i64::MAX { to } else { from };
        if from < to {
            open_window(&tx, &config.kafka.topic, partition, from, to).await?;
        }
        replays.push(PartitionReplay {
            partition,
            from,
            to: to.max(from),
            deleted: 0,
        });
    }
    tx.commit()
        .await
        .map_err(postgres("committing the replay window"))?;
    group.commit_offsets(&starts)?;
    Ok(replays)
}

/// Deletes the rows received in `[from, to)` and replays the offsets they came from.
pub async fn rebuild(
    config: &WorkerConfig,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    partitions: &[i32],
) -> Result<Vec<PartitionReplay>, ReplayError> {
    if from >= to {
        return Err(ReplayError::EmptyRange { from, to });
    }
    let (group, partitions) = GroupAdmin::idle(config, partitions)?;
    let mut client = connect(config).await?;
    let tx = client
        .transaction()
        .await
        .map_err(postgres("beginning a transaction"))?;
    let next = lock_positions(&tx, &config.kafka.topic, &partitions).await?;
    let spans = tx
        .query_typed(
            "SELECT kafka_partition, min(kafka_offset), max(kafka_offset) FROM raw_telemetry
             WHERE received_at >= $1 AND received_at < $2 AND kafka_partition = ANY($3)
             GROUP BY kafka_partition ORDER BY kafka_partition",
            &[
                (&from, Type::TIMESTAMPTZ),
                (&to, Type::TIMESTAMPTZ),
                (&partitions, Type::INT4_ARRAY),
            ],
        )
        .await
        .map_err(postgres("finding the offsets of the range"))?;
    let mut replays = Vec::new();
    let mut starts = BTreeMap::new();
    for span in &spans {
        let (partition, first, last): (i32, i64, i64) = (span.get(0), span.get(1), span.get(2));
        let kept = group.oldest_kept(partition)?;
        if first < kept {
            return Err(ReplayError::BeyondRetention {
                partition,
                first,
                kept,
            });
        }
        // Every row between the range's first and last offsets goes, including rows of other
        // times that sit among them: they are all read again, so none is lost.
        let deleted = tx
            .query_typed(
                "WITH gone AS (DELETE FROM raw_telemetry
                               WHERE kafka_partition = $1 AND kafka_offset BETWEEN $2 AND $3
                               RETURNING 1)
                 SELECT count(*) FROM gone",
                &[
                    (&partition, Type::INT4),
                    (&first, Type::INT8),
                    (&last, Type::INT8),
                ],
            )
            .await
            .map_err(postgres("deleting the range"))?;
        let deleted: i64 = deleted[0].get(0);
        let window_end = (last + 1).min(next.get(&partition).copied().unwrap_or(last + 1));
        open_window(&tx, &config.kafka.topic, partition, first, window_end).await?;
        starts.insert(partition, first);
        replays.push(PartitionReplay {
            partition,
            from: first,
            to: window_end,
            deleted: deleted as u64,
        });
    }
    tx.commit()
        .await
        .map_err(postgres("committing the rebuild"))?;
    group.commit_offsets(&starts)?;
    Ok(replays)
}

/// For partitions whose log now ends below the stored `next_offset` (the topic was deleted and
/// created again, the cluster replaced, or the broker lost acknowledged records; the worker
/// refuses to start them, see `crate::positions`): forgets that position and reads the log from
/// the oldest record it keeps. Partitions whose log reaches the stored position are left alone.
///
/// Rows stored from the old log stay, with the partition and offset they came from; the new
/// log's records reuse those offsets, so do not replay or rebuild ranges from before this.
pub async fn start_new_log(
    config: &WorkerConfig,
    partitions: &[i32],
) -> Result<Vec<PartitionReplay>, ReplayError> {
    let (group, partitions) = GroupAdmin::idle(config, partitions)?;
    let mut client = connect(config).await?;
    let tx = client
        .transaction()
        .await
        .map_err(postgres("beginning a transaction"))?;
    let next = lock_positions(&tx, &config.kafka.topic, &partitions).await?;
    let mut replays = Vec::new();
    let mut starts = BTreeMap::new();
    for (&partition, &next_offset) in &next {
        let (oldest, end) = group.watermarks(partition)?;
        if next_offset <= end {
            continue;
        }
        tx.query_typed(
            "UPDATE ingest_offsets
             SET next_offset = $3, replay_from = NULL, replay_to = NULL, updated_at = now()
             WHERE topic = $1 AND kafka_partition = $2",
            &[
                (&config.kafka.topic, Type::TEXT),
                (&partition, Type::INT4),
                (&oldest, Type::INT8),
            ],
        )
        .await
        .map_err(postgres("resetting the partition's position"))?;
        starts.insert(partition, oldest);
        replays.push(PartitionReplay {
            partition,
            from: oldest,
            to: end,
            deleted: 0,
        });
    }
    tx.commit()
        .await
        .map_err(postgres("committing the new positions"))?;
    group.commit_offsets(&starts)?;
    Ok(replays)
}

/// Locks the partitions' offset rows and returns their `next_offset`.
async fn lock_positions(
    tx: &tokio_postgres::Transaction<'_>,
    topic: &str,
    partitions: &[i32],
) -> Result<BTreeMap<i32, i64>, ReplayError> {
    let rows = tx
        .query_typed(
            "SELECT kafka_partition, next_offset FROM ingest_offsets
             WHERE topic = $1 AND kafka_partition = ANY($2)
             ORDER BY kafka_partition FOR UPDATE",
            &[(&topic, Type::TEXT), (&partitions, Type::INT4_ARRAY)],
        )
        .await
        .map_err(postgres("locking partition offsets"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Widens the partition's window to cover `[from, to)`.
async fn open_window(
    tx: &tokio_postgres::Transaction<'_>,
    topic: &str,
    partition: i32,
    from: i64,
    to: i64,
) -> Result<(), ReplayError> {
    tx.query_typed(
        "UPDATE ingest_offsets
         SET replay_from = LEAST(COALESCE(replay_from, $3), $3),
             replay_to = GREATEST(COALESCE(replay_to, $4), $4),
             updated_at = now()
         WHERE topic = $1 AND kafka_partition = $2",
        &[
            (&topic, Type::TEXT),
            (&partition, Type::INT4),
            (&from, Type::INT8),
            (&to, Type::INT8),
        ],
    )
    .await
    .map_err(postgres("opening the replay window"))?;
    Ok(())
}

async fn connect(config: &WorkerConfig) -> Result<tokio_postgres::Client, ReplayError> {
    let (client, connection) = tokio_postgres::connect(&config.postgres.url, tokio_postgres::NoTls)
        .await
        .map_err(ReplayError::Connect)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "database connection closed");
        }
    });
    Ok(client)
}

/// The consumer group seen from outside: its members, its topic's partitions, its offsets.
struct GroupAdmin {
    consumer: BaseConsumer,
    group: String,
    topic: String,
}

impl GroupAdmin {
    /// The group's admin once no member is consuming, and the partitions to act on: every
    /// operator command that moves positions starts here.
    fn idle(config: &WorkerConfig, chosen: &[i32]) -> Result<(GroupAdmin, Vec<i32>), ReplayError> {
        let group = GroupAdmin::new(config)?;
        group.ensure_inactive()?;
        let partitions = group.partitions(chosen)?;
        Ok((group, partitions))
    }

    fn new(config: &WorkerConfig) -> Result<Self, ReplayError> {
        let consumer = config
            .kafka
            .client_config(&[
                ("group.id", config.group_id.as_str()),
                ("enable.auto.commit", "false"),
                ("isolation.level", "read_uncommitted"),
            ])
            .create()
            .map_err(kafka("creating a client"))?;
        Ok(Self {
            consumer,
            group: config.group_id.clone(),
            topic: config.kafka.topic.clone(),
        })
    }

    fn ensure_inactive(&self) -> Result<(), ReplayError> {
        let groups = self
            .consumer
            .fetch_group_list(Some(&self.group), KAFKA_TIMEOUT)
            .map_err(kafka("describing the consumer group"))?;
        let members = groups
            .groups()
            .iter()
            .filter(|g| g.name() == self.group)
            .map(|g| g.members().len())
            .sum();
        if members > 0 {
            return Err(ReplayError::GroupActive {
                group: self.group.clone(),
                members,
            });
        }
        Ok(())
    }

    /// The chosen partitions, checked against the topic; all of them when none is chosen.
    fn partitions(&self, chosen: &[i32]) -> Result<Vec<i32>, ReplayError> {
        Ok(chosen_partitions(
            &self.consumer,
            &self.topic,
            chosen,
            KAFKA_TIMEOUT,
        )?)
    }

    fn oldest_kept(&self, partition: i32) -> Result<i64, ReplayError> {
        Ok(self.watermarks(partition)?.0)
    }

    /// The oldest offset the partition keeps and where its log ends.
    fn watermarks(&self, partition: i32) -> Result<(i64, i64), ReplayError> {
        self.consumer
            .fetch_watermarks(&self.topic, partition, KAFKA_TIMEOUT)
            .map_err(kafka("reading the partition's oldest and end offsets"))
    }

    fn start_offsets(
        &self,
        start: ReplayStart,
        partitions: &[i32],
    ) -> Result<BTreeMap<i32, i64>, ReplayError> {
        let mut starts = BTreeMap::new();
        match start {
            ReplayStart::Earliest | ReplayStart::Offset(_) => {
                for &partition in partitions {
                    let kept = self.oldest_kept(partition)?;
                    let wanted = match start {
                        ReplayStart::Offset(offset) => offset,
                        _ => kept,
                    };
                    starts.insert(partition, wanted.max(kept));
                }
            }
            ReplayStart::Timestamp(time) => {
                let mut query = TopicPartitionList::new();
                for &partition in partitions {
                    query
                        .add_partition_offset(
                            &self.topic,
                            partition,
                            Offset::Offset(time.timestamp_millis()),
                        )
                        .map_err(kafka("building the timestamp query"))?;
                }
                let found = self
                    .consumer
                    .offsets_for_times(query, KAFKA_TIMEOUT)
                    .map_err(kafka("finding the offsets for the timestamp"))?;
                for element in found.elements_for_topic(&self.topic) {
                    let offset = match element.offset() {
                        Offset::Offset(offset) => offset,
                        // No record at or after the time: nothing to replay.
                        _ => i64::MAX,
                    };
                    starts.insert(element.partition(), offset);
                }
            }
        }
        Ok(starts)
    }

    /// Commits the start offsets for the group, so lag tools show the replay and workers
    /// start there.
    fn commit_offsets(&self, starts: &BTreeMap<i32, i64>) -> Result<(), ReplayError> {
        let mut offsets = TopicPartitionList::new();
        for (&partition, &offset) in starts.iter().filter(|(_, &o)| o != i64::MAX) {
            offsets
                .add_partition_offset(&self.topic, partition, Offset::Offset(offset))
                .map_err(kafka("building the offset commit"))?;
        }
        if offsets.count() == 0 {
            return Ok(());
        }
        self.consumer
            .commit(&offsets, CommitMode::Sync)
            .map_err(kafka("committing the group's offsets"))
    }
}

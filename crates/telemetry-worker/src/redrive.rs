//! `telemetry-worker redrive`: copy dead letters back into the telemetry topic after a fix.
//!
//! A dead letter keeps the original value and headers, plus the `dlq_*` headers that say why
//! and where it was rejected. Once the cause is fixed (a device firmware, a limit, a contract
//! change), a redrive reads the dead-letter topic from a given offset up to where each
//! partition ended when the redrive started (or up to a given offset), picks the letters of the
//! chosen reasons (and stage), and produces each to the telemetry topic with its
//! original headers, the `dlq_*` ones removed, and the key the bridge would have given it:
//!
//! - a letter the worker rejected keeps its key (the record's own);
//! - a letter the bridge rejected is keyed by its MQTT topic, so it gets the contract key
//!   `{user}/{device}` from that topic, or is skipped when the topic names no device.
//!
//! Letters from another source topic (`dlq_source_topic`) are skipped: the worker reads only its
//! own. The workers store the copies as new records; what is still bad is dead-lettered again,
//! beyond where this redrive stops, so nothing loops.
//!
//! Each source record is copied back once, however many letters it has and however often a
//! redrive runs over it. A record can have two letters: the worker sends a batch's dead letters
//! before its COMMIT, so a COMMIT that fails or a write timeout sends them again. A letter
//! stands for its source record (`dlq_source_topic`, `dlq_source_partition`,
//! `dlq_source_offset`; for the bridge's letters, which have none, the letter's own position),
//! and a redrive skips a letter whose record it copied already in this run, whose record an
//! earlier redrive copied (the `redriven_letters` table), or whose record is stored in
//! `raw_telemetry` at its source position (a replay stored it after the fix).
//!
//! Why a table written by the redrive, rather than a check in the worker's transaction: the
//! copy is a new record at a new offset, and only the redrive knows which letter it came from;
//! the table keeps that knowledge in the command that has it, and the worker's hot path stays
//! as it is. The positions of a chunk of copies are claimed in one transaction that stays open
//! until Kafka confirmed the copies; the ones Kafka did not confirm are released in it before
//! the COMMIT. So two redrives at once cannot both copy a letter (the second waits on the
//! first's claims), and a failed copy can be redriven again. The one gap left: a crash between
//! Kafka's confirmation and the COMMIT leaves copies that the table does not know, which a
//! later redrive copies again (at-least-once, as the dead-letter topic itself).
//!
//! It prints, per partition, the offset up to which every selected letter's copy was
//! confirmed, which is where the next redrive starts; when it fails or is stopped, it waits for
//! the copies already sent and reports that offset and the letters whose copy was not
//! confirmed, to be redriven alone.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use telemetry_core::contract::{header, parse_telemetry_topic};
use telemetry_core::Shutdown;
use tokio_postgres::types::Type;

use crate::config::WorkerConfig;
use crate::partitions::{chosen_partitions, PartitionsError};

/// How long a read of the dead-letter topic may wait for the broker before the redrive stops.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the broker may take to confirm a copy; the worker's own producers wait forever,
/// but a command run by hand should say that the broker is away.
const DELIVERY_TIMEOUT_MS: &str = "60000";
/// Records produced before waiting for the broker to confirm them...
const CONFIRM_EVERY: usize = 1_000;
/// ...or bytes of them: the letters of a chunk are held until their copies are confirmed.
const CONFIRM_EVERY_BYTES: usize = 16 * 1024 * 1024;
/// Headers that dead-lettering adds; a redriven record goes back without them.
const DLQ_HEADER_PREFIX: &str = "dlq_";
/// `dlq_stage` of the letters the bridge wrote.
const BRIDGE_STAGE: &str = "bridge";

#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    #[error("cannot talk to Kafka while {step}: {source}")]
    Kafka {
        step: &'static str,
        #[source]
        source: KafkaError,
    },
    #[error("the dead-letter topic: {0}")]
    Partitions(#[from] PartitionsError),
    #[error(
        "--from-offset and --to-offset must be 0 or more, and --to-offset after --from-offset"
    )]
    BadRange,
    #[error("nothing was copied: {0}")]
    NothingCopied(String),
    #[error("cannot use the database while {step}: {source}; a redrive records there what it copied, so that no letter is copied twice. Check postgres.url, and run `telemetry-worker migrate` if migrate_on_start is off")]
    Database {
        step: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{what}. Read so far, per partition (\"-\": nothing yet): {}; every selected letter before those offsets was copied and confirmed{}. Go on with --partition P --from-offset N from there", read_to(.progress), failed_letters(.progress))]
    Interrupted {
        what: String,
        /// Each partition as far as it was read, with the copies that failed.
        progress: Vec<PartitionRedrive>,
    },
}

fn kafka(step: &'static str) -> impl FnOnce(KafkaError) -> RedriveError {
    move |source| RedriveError::Kafka { step, source }
}

/// librdkafka reports the end of each partition as an error too, and the default context logs
/// it as one; for a redrive it is how the read ends, so only real errors are logged.
struct RedriveContext;

impl ClientContext for RedriveContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let end_of_partition = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        );
        if !end_of_partition {
            tracing::error!(%error, reason, "Kafka client error");
        }
    }
}

impl ConsumerContext for RedriveContext {}

/// Which dead letters to copy back.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// `dlq_reason` codes to redrive; empty means every reason.
    pub reasons: Vec<String>,
    /// Only letters of this `dlq_stage` (`bridge` or `worker`).
    pub stage: Option<String>,
    /// First offset read in each partition; the oldest kept when absent.
    pub from_offset: Option<i64>,
    /// Offset each partition is read up to, exclusive; its end when the redrive starts, when
    /// absent.
    pub to_offset: Option<i64>,
    /// Partitions of the dead-letter topic; all when empty.
    pub partitions: Vec<i32>,
}

impl Selection {
    fn check(&self) -> Result<(), RedriveError> {
        let from = self.from_offset.unwrap_or(0);
        let to = self.to_offset.unwrap_or(i64::MAX);
        if from < 0 || to <= from {
            return Err(RedriveError::BadRange);
        }
        Ok(())
    }

    fn wants(&self, letter: &BorrowedMessage<'_>) -> bool {
        let reason_ok = self.reasons.is_empty()
            || header_text(letter, header::DLQ_REASON).is_some_and(|r| self.reasons.contains(&r));
        let stage_ok = self.stage.as_ref().is_none_or(|stage| {
            header_text(letter, header::DLQ_STAGE).as_deref() == Some(stage.as_str())
        });
        reason_ok && stage_ok
    }
}

/// What a redrive did in one partition of the dead-letter topic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionRedrive {
    pub partition: i32,
    /// Dead letters read, how many were copied back, and how many of the selected ones could
    /// not be (a bridge letter whose topic names no device, another source topic, a letter
    /// that lost its payload to the dead-letter topic's size limit).
    pub read: u64,
    pub redriven: u64,
    pub skipped: u64,
    /// Selected letters not copied because their source record was copied already (by this
    /// redrive or an earlier one) or is stored.
    pub duplicates: u64,
    /// Where the next redrive starts: every selected letter before it was copied and
    /// confirmed, except those in `failed`. None when nothing was read.
    pub next_offset: Option<i64>,
    /// Offsets of letters whose copy the broker did not confirm (a timeout, an error). A copy
    /// that timed out may have been stored all the same.
    pub failed: Vec<i64>,
}

/// A copy on its way, and the letter it came from.
struct Pending {
    partition: i32,
    offset: i64,
    origin: Origin,
    delivery: DeliveryFuture,
}

/// The record a letter stands for: see the module's documentation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Origin {
    topic: String,
    partition: i32,
    offset: i64,
}

/// A selected letter, held until its copy is confirmed: where it is, the record it stands for,
/// and what its copy carries.
struct Letter {
    partition: i32,
    offset: i64,
    origin: Origin,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Letter {
    /// What a dead letter's copy carries; None when it cannot go to the telemetry topic
    /// (another source topic, a bridge letter whose topic names no device, a letter whose
    /// payload the dead-letter topic refused).
    fn copy_of(
        letter: &BorrowedMessage<'_>,
        telemetry_topic: &str,
        dlq_topic: &str,
    ) -> Option<Self> {
        let source = header_text(letter, header::DLQ_SOURCE_TOPIC);
        if source
            .as_ref()
            .is_some_and(|source| source != telemetry_topic)
        {
            return None;
        }
        if header_text(letter, header::DLQ_TRUNCATED).is_some() {
            return None;
        }
        let key = original_key(letter)?;
        let headers = letter
            .headers()
            .into_iter()
            .flat_map(|headers| headers.iter())
            .filter(|h| !h.key.starts_with(DLQ_HEADER_PREFIX))
            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
            .collect();
        Some(Letter {
            partition: letter.partition(),
            offset: letter.offset(),
            origin: origin(letter, source, dlq_topic),
            key,
            payload: letter.payload().map(<[u8]>::to_vec),
            headers,
        })
    }

    fn bytes(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
            .sum();
        self.key.as_ref().map_or(0, Vec::len) + self.payload.as_ref().map_or(0, Vec::len) + headers
    }

    /// Produces the copy to the telemetry topic.
    fn send(
        &self,
        producer: &FutureProducer,
        telemetry_topic: &str,
    ) -> Result<DeliveryFuture, KafkaError> {
        let headers = self
            .headers
            .iter()
            .fold(OwnedHeaders::new(), |headers, (key, value)| {
                headers.insert(Header {
                    key,
                    value: value.as_deref(),
                })
            });
        let mut record = FutureRecord::<[u8], [u8]>::to(telemetry_topic).headers(headers);
        if let Some(key) = &self.key {
            record = record.key(key);
        }
        if let Some(payload) = &self.payload {
            record = record.payload(payload);
        }
        producer.send_result(record).map_err(|(error, _)| error)
    }
}

/// The worker's letters stand for their source record; the bridge's, which never reached
/// Kafka before, for themselves.
fn origin(letter: &BorrowedMessage<'_>, source_topic: Option<String>, dlq_topic: &str) -> Origin {
    let position = |name| header_text(letter, name).and_then(|v| v.parse::<i64>().ok());
    match (
        source_topic,
        position(header::DLQ_SOURCE_PARTITION),
        position(header::DLQ_SOURCE_OFFSET),
    ) {
        (Some(topic), Some(partition), Some(offset)) => Origin {
            topic,
            partition: partition as i32,
            offset,
        },
        _ => Origin {
            topic: dlq_topic.to_owned(),
            partition: letter.partition(),
            offset: letter.offset(),
        },
    }
}

/// The letters selected and not yet copied, and the records they stand for.
#[derive(Default)]
struct Chunk {
    letters: Vec<Letter>,
    bytes: usize,
    /// Every record a letter of this run stands for.
    seen: HashSet<Origin>,
}

impl Chunk {
    /// Adds the letter; false when this run has a letter of the same record already.
    fn add(&mut self, letter: Letter) -> bool {
        if !self.seen.insert(letter.origin.clone()) {
            return false;
        }
        self.bytes += letter.bytes();
        self.letters.push(letter);
        true
    }

    fn is_full(&self) -> bool {
        self.letters.len() >= CONFIRM_EVERY || self.bytes >= CONFIRM_EVERY_BYTES
    }

    fn take(&mut self) -> Vec<Letter> {
        self.bytes = 0;
        std::mem::take(&mut self.letters)
    }
}

/// Copies the selected dead letters of `config.kafka.dlq_topic` back to the telemetry topic and
/// waits until the broker has confirmed every copy. On shutdown it stops reading, waits for the
/// copies already sent, and returns what it did.
pub async fn redrive(
    config: &WorkerConfig,
    selection: &Selection,
    shutdown: &Shutdown,
) -> Result<Vec<PartitionRedrive>, RedriveError> {
    selection.check()?;
    let dlq_topic = config.kafka.dlq_topic.as_str();
    let mut database = connect_database(config).await?;
    let consumer = create_consumer(config)?;
    let mut producer_config = config.kafka.durable_producer_config();
    producer_config.set("message.timeout.ms", DELIVERY_TIMEOUT_MS);
    let producer: FutureProducer = producer_config
        .create()
        .map_err(kafka("creating a producer"))?;
    let partitions = chosen_partitions(&consumer, dlq_topic, &selection.partitions, KAFKA_TIMEOUT)?;
    let mut progress: BTreeMap<i32, PartitionRedrive> = partitions
        .iter()
        .map(|&partition| {
            let start = PartitionRedrive {
                partition,
                next_offset: selection.from_offset,
                ..PartitionRedrive::default()
            };
            (partition, start)
        })
        .collect();
    // Where to stop: found by a first read, so that letters dead-lettered again while the
    // copies are stored land beyond it (a still-bad letter must not go round and round), and
    // so on any broker (Tansu's memory storage answers ListOffsets "latest" wrongly).
    let ends = read_ends(&consumer, dlq_topic, selection, &partitions, shutdown)
        .await
        .map_err(RedriveError::NothingCopied)?;
    drop(consumer);
    let consumer = create_consumer(config)?;
    assign(&consumer, dlq_topic, selection, ends.keys().copied())?;
    let copier = Copier {
        producer: &producer,
        telemetry_topic: &config.kafka.topic,
        dlq_topic,
    };
    let mut open: BTreeSet<i32> = ends.keys().copied().collect();
    let mut chunk = Chunk::default();
    let mut interrupted_by = None;
    while !open.is_empty() {
        let letter = match next_letter(&consumer, dlq_topic, shutdown).await {
            Next::Letter(letter) => letter,
            Next::End(partition) => {
                close(&consumer, dlq_topic, &mut open, partition);
                continue;
            }
            Next::Interrupted(what) => {
                interrupted_by = Some(what);
                break;
            }
        };
        let partition = letter.partition();
        if !open.contains(&partition) {
            continue;
        }
        if letter.offset() >= ends[&partition] {
            close(&consumer, dlq_topic, &mut open, partition);
            continue;
        }
        let state = progress.get_mut(&partition).expect("an assigned partition");
        state.read += 1;
        if selection.wants(&letter) {
            match Letter::copy_of(&letter, &config.kafka.topic, dlq_topic) {
                Some(copy) => {
                    if !chunk.add(copy) {
                        state.duplicates += 1;
                    }
                }
                None => state.skipped += 1,
            }
        }
        // Not copied yet: the chunk is copied before anything is reported, and `copy_chunk`
        // notes the copies that fail.
        state.next_offset = Some(letter.offset() + 1);
        if letter.offset() + 1 >= ends[&partition] {
            close(&consumer, dlq_topic, &mut open, partition);
        }
        if chunk.is_full() {
            if let Err(failure) = copier
                .copy_chunk(&mut database, chunk.take(), &mut progress)
                .await
            {
                interrupted_by = Some(failure);
                break;
            }
        }
    }
    // Whatever was selected is copied and confirmed (or found failed) before anything is
    // reported.
    let rest = chunk.take();
    if !rest.is_empty() {
        if let Err(failure) = copier.copy_chunk(&mut database, rest, &mut progress).await {
            interrupted_by.get_or_insert(failure);
        }
    }
    match interrupted_by {
        Some(what) => Err(interrupted(what, &progress)),
        None => Ok(progress.into_values().collect()),
    }
}

/// The database the worker stores in, with the `redriven_letters` table (migrated first unless
/// `migrate_on_start` is off, as the worker does).
async fn connect_database(config: &WorkerConfig) -> Result<tokio_postgres::Client, RedriveError> {
    let (mut client, connection) =
        tokio_postgres::connect(&config.postgres.url, tokio_postgres::NoTls)
            .await
            .map_err(database("connecting"))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "redrive's database connection closed");
        }
    });
    if config.migrate_on_start {
        crate::schema::migrate(&mut client).await.map_err(|error| {
            RedriveError::NothingCopied(format!("cannot migrate the database: {error}"))
        })?;
    }
    Ok(client)
}

fn chunk_error(step: &'static str) -> impl FnOnce(tokio_postgres::Error) -> String {
    move |error| {
        format!("database error while {step}: {error}; the letters of this chunk were not copied")
    }
}

fn database(step: &'static str) -> impl FnOnce(tokio_postgres::Error) -> RedriveError {
    move |source| RedriveError::Database { step, source }
}

/// Copies chunks of letters back, each source record once.
struct Copier<'a> {
    producer: &'a FutureProducer,
    telemetry_topic: &'a str,
    dlq_topic: &'a str,
}

impl Copier<'_> {
    /// Claims the letters' records in `redriven_letters`, copies those it could claim, waits for
    /// Kafka to confirm them, releases the claims of the copies that failed, and commits.
    async fn copy_chunk(
        &self,
        database: &mut tokio_postgres::Client,
        letters: Vec<Letter>,
        progress: &mut BTreeMap<i32, PartitionRedrive>,
    ) -> Result<(), String> {
        let tx = database
            .transaction()
            .await
            .map_err(chunk_error("opening a transaction"))?;
        let claimed = self
            .claim(&tx, &letters)
            .await
            .map_err(chunk_error("claiming letters in redriven_letters"))?;
        let mut pending = Vec::with_capacity(claimed.len());
        let mut unsent = Vec::new();
        let mut failure = None;
        for letter in letters {
            let state = progress
                .get_mut(&letter.partition)
                .expect("an assigned partition");
            if !claimed.contains(&letter.origin) {
                state.duplicates += 1;
                continue;
            }
            if failure.is_some() {
                state.failed.push(letter.offset);
                unsent.push(letter.origin);
                continue;
            }
            match letter.send(self.producer, self.telemetry_topic) {
                Ok(delivery) => {
                    state.redriven += 1;
                    pending.push(Pending {
                        partition: letter.partition,
                        offset: letter.offset,
                        origin: letter.origin,
                        delivery,
                    });
                }
                Err(error) => {
                    failure = Some(format!("cannot send a copy: {error}"));
                    state.failed.push(letter.offset);
                    unsent.push(letter.origin);
                }
            }
        }
        let (failed, confirm_failure) = confirm(pending, progress).await;
        unsent.extend(failed);
        release(&tx, &unsent)
            .await
            .map_err(chunk_error("releasing the claims of failed copies"))?;
        // A COMMIT that fails leaves copies the table does not know: said, so they are checked.
        tx.commit().await.map_err(|e| {
            format!("the copies were sent, but recording them in redriven_letters failed ({e}); a redrive over the same letters copies them again")
        })?;
        match failure.or(confirm_failure) {
            Some(failure) => Err(failure),
            None => Ok(()),
        }
    }

    /// The records of `letters` that no redrive copied before and that are not stored,
    /// claimed in `tx`.
    async fn claim(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        letters: &[Letter],
    ) -> Result<HashSet<Origin>, tokio_postgres::Error> {
        let topics: Vec<&str> = letters.iter().map(|l| l.origin.topic.as_str()).collect();
        let partitions: Vec<i32> = letters.iter().map(|l| l.origin.partition).collect();
        let offsets: Vec<i64> = letters.iter().map(|l| l.origin.offset).collect();
        let dlq_partitions: Vec<i32> = letters.iter().map(|l| l.partition).collect();
        let dlq_offsets: Vec<i64> = letters.iter().map(|l| l.offset).collect();
        // raw_telemetry holds the rows of the worker's topic, by the position they came from.
        let rows = tx
            .query_typed(
                "INSERT INTO redriven_letters (source_topic, source_partition, source_offset,
                                               dlq_topic, dlq_partition, dlq_offset)
                 SELECT v.st, v.sp, v.so, $1, v.lp, v.lo
                 FROM unnest($2::text[], $3::int4[], $4::int8[], $5::int4[], $6::int8[])
                      AS v(st, sp, so, lp, lo)
                 WHERE NOT (v.st = $7 AND EXISTS (
                     SELECT 1 FROM raw_telemetry AS r
                     WHERE r.kafka_partition = v.sp AND r.kafka_offset = v.so))
                 ORDER BY v.st, v.sp, v.so
                 ON CONFLICT DO NOTHING
                 RETURNING source_topic, source_partition, source_offset",
                &[
                    (&self.dlq_topic, Type::TEXT),
                    (&topics, Type::TEXT_ARRAY),
                    (&partitions, Type::INT4_ARRAY),
                    (&offsets, Type::INT8_ARRAY),
                    (&dlq_partitions, Type::INT4_ARRAY),
                    (&dlq_offsets, Type::INT8_ARRAY),
                    (&self.telemetry_topic, Type::TEXT),
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| Origin {
                topic: row.get(0),
                partition: row.get(1),
                offset: row.get(2),
            })
            .collect())
    }
}

/// Gives back the claims of copies that were not confirmed, so that they can be redriven.
async fn release(
    tx: &tokio_postgres::Transaction<'_>,
    origins: &[Origin],
) -> Result<(), tokio_postgres::Error> {
    if origins.is_empty() {
        return Ok(());
    }
    let topics: Vec<&str> = origins.iter().map(|o| o.topic.as_str()).collect();
    let partitions: Vec<i32> = origins.iter().map(|o| o.partition).collect();
    let offsets: Vec<i64> = origins.iter().map(|o| o.offset).collect();
    tx.query_typed(
        "DELETE FROM redriven_letters AS r
         USING unnest($1::text[], $2::int4[], $3::int8[]) AS v(st, sp, so)
         WHERE (r.source_topic, r.source_partition, r.source_offset) = (v.st, v.sp, v.so)",
        &[
            (&topics, Type::TEXT_ARRAY),
            (&partitions, Type::INT4_ARRAY),
            (&offsets, Type::INT8_ARRAY),
        ],
    )
    .await?;
    Ok(())
}

fn interrupted(what: String, progress: &BTreeMap<i32, PartitionRedrive>) -> RedriveError {
    RedriveError::Interrupted {
        what,
        progress: progress.values().cloned().collect(),
    }
}

fn read_to(progress: &[PartitionRedrive]) -> String {
    let each = progress.iter().map(|p| {
        let next = p.next_offset.map_or("-".to_owned(), |n| n.to_string());
        format!("{}: {next}", p.partition)
    });
    each.collect::<Vec<_>>().join(", ")
}

fn failed_letters(progress: &[PartitionRedrive]) -> String {
    let failed: Vec<String> = progress
        .iter()
        .flat_map(|p| p.failed.iter().map(move |o| format!("{}@{o}", p.partition)))
        .collect();
    if failed.is_empty() {
        return String::new();
    }
    format!(
        ", except the letters at partition@offset {}: redrive each alone (--partition P \
         --from-offset N --to-offset N+1), after checking that the worker did not store it",
        failed.join(", ")
    )
}

/// What the next read from the dead-letter topic brought.
enum Next<'a> {
    Letter(BorrowedMessage<'a>),
    /// The partition has no more letters now.
    End(i32),
    /// Shutdown, a silent broker or a read error: why.
    Interrupted(String),
}

async fn next_letter<'a>(
    consumer: &'a StreamConsumer<RedriveContext>,
    topic: &str,
    shutdown: &Shutdown,
) -> Next<'a> {
    let received = tokio::select! {
        biased;
        _ = shutdown.wait() => return Next::Interrupted("stopped".to_owned()),
        received = tokio::time::timeout(KAFKA_TIMEOUT, consumer.recv()) => received,
    };
    match received {
        Err(_) => Next::Interrupted(format!(
            "Kafka sent nothing from '{topic}' for {} s; is the broker up, and --from-offset \
             within the partition?",
            KAFKA_TIMEOUT.as_secs()
        )),
        Ok(Err(KafkaError::PartitionEOF(partition))) => Next::End(partition),
        Ok(Err(error)) => Next::Interrupted(format!("cannot read '{topic}': {error}")),
        Ok(Ok(letter)) => Next::Letter(letter),
    }
}

/// Assigns `partitions` of the dead-letter topic from the selection's first offset.
fn assign(
    consumer: &StreamConsumer<RedriveContext>,
    topic: &str,
    selection: &Selection,
    partitions: impl IntoIterator<Item = i32>,
) -> Result<(), RedriveError> {
    let start = selection
        .from_offset
        .map_or(Offset::Beginning, Offset::Offset);
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        assignment
            .add_partition_offset(topic, partition, start)
            .map_err(kafka("choosing where to start"))?;
    }
    consumer
        .assign(&assignment)
        .map_err(kafka("assigning the dead-letter partitions"))
}

/// Reads each partition from the selection's first offset to its end (or `to_offset`), and
/// returns where each one ends: the offset after its last letter. Partitions with nothing to
/// read are left out.
async fn read_ends(
    consumer: &StreamConsumer<RedriveContext>,
    topic: &str,
    selection: &Selection,
    partitions: &[i32],
    shutdown: &Shutdown,
) -> Result<BTreeMap<i32, i64>, String> {
    assign(consumer, topic, selection, partitions.iter().copied()).map_err(|e| e.to_string())?;
    let mut open: BTreeSet<i32> = partitions.iter().copied().collect();
    let mut ends = BTreeMap::new();
    while !open.is_empty() {
        match next_letter(consumer, topic, shutdown).await {
            Next::Letter(letter) => {
                let partition = letter.partition();
                if !open.contains(&partition) {
                    continue;
                }
                let end = letter.offset() + 1;
                match selection.to_offset {
                    Some(to) if letter.offset() >= to => {
                        close(consumer, topic, &mut open, partition);
                    }
                    Some(to) if end >= to => {
                        ends.insert(partition, end);
                        close(consumer, topic, &mut open, partition);
                    }
                    _ => {
                        ends.insert(partition, end);
                    }
                }
            }
            Next::End(partition) => close(consumer, topic, &mut open, partition),
            Next::Interrupted(what) => return Err(what),
        }
    }
    Ok(ends)
}

/// A consumer of assigned partitions: the group is never joined and nothing is committed. The
/// settings the read depends on are set after the operator's `kafka.properties`, which would
/// otherwise win.
fn create_consumer(config: &WorkerConfig) -> Result<StreamConsumer<RedriveContext>, RedriveError> {
    let mut client = config.kafka.client_config(&[]);
    for (key, value) in [
        ("group.id", "telemetry-worker-redrive"),
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
        // How the read knows it is done.
        ("enable.partition.eof", "true"),
        // A --from-offset beyond the end is an error, not a silent restart from the oldest.
        ("auto.offset.reset", "error"),
        ("isolation.level", "read_uncommitted"),
    ] {
        client.set(key, value);
    }
    client
        .create_with_context(RedriveContext)
        .map_err(kafka("creating a consumer"))
}

/// Stops reading a partition: it is done, and its later letters must not keep the read alive.
fn close(
    consumer: &StreamConsumer<RedriveContext>,
    topic: &str,
    open: &mut BTreeSet<i32>,
    partition: i32,
) {
    if open.remove(&partition) {
        let mut done = TopicPartitionList::new();
        done.add_partition(topic, partition);
        if let Err(error) = consumer.pause(&done) {
            tracing::warn!(partition, %error, "cannot pause a finished partition");
        }
    }
}

/// The key a letter goes back with: the bridge keyed its letters by MQTT topic, which becomes
/// the contract key; the worker's letters keep the record's key, or its lack of one. None when
/// the bridge letter's topic names no device.
fn original_key(letter: &BorrowedMessage<'_>) -> Option<Option<Vec<u8>>> {
    if header_text(letter, header::DLQ_STAGE).as_deref() != Some(BRIDGE_STAGE) {
        return Some(letter.key().map(<[u8]>::to_vec));
    }
    let topic = header_text(letter, header::MQTT_TOPIC);
    let topic = topic
        .as_deref()
        .map_or(letter.key().unwrap_or_default(), str::as_bytes);
    parse_telemetry_topic(topic)
        .ok()
        .map(|device| Some(device.kafka_key().into_bytes()))
}

/// Waits for the copies. A copy that failed is noted with its partition: the letters after it
/// were sent too, and were most likely confirmed, so going back to it would copy them twice.
/// Returns the records whose copy failed, and the first failure.
async fn confirm(
    pending: Vec<Pending>,
    progress: &mut BTreeMap<i32, PartitionRedrive>,
) -> (Vec<Origin>, Option<String>) {
    let (letters, deliveries): (Vec<_>, Vec<_>) = pending
        .into_iter()
        .map(|p| ((p.partition, p.offset, p.origin), p.delivery))
        .unzip();
    let mut failure = None;
    let mut failed = Vec::new();
    for ((partition, offset, origin), delivery) in letters
        .into_iter()
        .zip(futures::future::join_all(deliveries).await)
    {
        let error = match delivery {
            Ok(Ok(_)) => continue,
            Ok(Err((error, _))) => error.to_string(),
            Err(_) => "the producer dropped the copy".to_owned(),
        };
        let state = progress.get_mut(&partition).expect("an assigned partition");
        state.failed.push(offset);
        failed.push(origin);
        failure.get_or_insert(format!(
            "the telemetry topic did not confirm the copy of partition {partition} offset {offset}: {error}"
        ));
    }
    (failed, failure)
}

fn header_text(message: &BorrowedMessage<'_>, name: &str) -> Option<String> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partition(partition: i32, next_offset: Option<i64>, failed: Vec<i64>) -> PartitionRedrive {
        PartitionRedrive {
            partition,
            next_offset,
            failed,
            ..PartitionRedrive::default()
        }
    }

    #[test]
    fn an_interrupted_redrive_says_how_far_it_read_and_which_copies_failed() {
        let stopped = RedriveError::Interrupted {
            what: "stopped".into(),
            progress: vec![
                partition(0, Some(40), vec![12, 17]),
                partition(1, None, vec![]),
            ],
        }
        .to_string();
        assert!(stopped.starts_with("stopped. "), "{stopped}");
        assert!(stopped.contains("0: 40, 1: -"), "{stopped}");
        assert!(stopped.contains("0@12, 0@17"), "{stopped}");
        assert!(stopped.contains("--to-offset N+1"), "{stopped}");

        let clean = RedriveError::Interrupted {
            what: "stopped".into(),
            progress: vec![partition(0, Some(40), vec![])],
        }
        .to_string();
        assert!(!clean.contains("except"), "{clean}");
    }

    #[test]
    fn offsets_must_be_a_non_empty_range_of_kafka_offsets() {
        let range = |from, to| Selection {
            from_offset: from,
            to_offset: to,
            ..Selection::default()
        };
        assert!(range(None, None).check().is_ok());
        assert!(range(Some(3), Some(4)).check().is_ok());
        for (from, to) in [(Some(-1), None), (Some(3), Some(3)), (None, Some(0))] {
            assert!(
                matches!(range(from, to).check(), Err(RedriveError::BadRange)),
                "{from:?}..{to:?}"
            );
        }
    }
}

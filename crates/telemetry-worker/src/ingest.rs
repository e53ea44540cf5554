//! The consumer loop: read batches from Kafka, store them, then commit their offsets to Kafka.
//!
//! Kafka's committed offsets are only a hint here (they let lag tools work and keep restarts
//! short); what is stored is decided by `ingest_offsets` in the same transaction as the rows
//! (see [`crate::sink`]), and an assigned partition starts where that table says (see
//! [`crate::positions`]), never above it. Auto-commit and the offset store are off, so Kafka
//! never records an offset whose rows are not durable.
//!
//! Backpressure: per writer at most one batch waits while another is written, and librdkafka's
//! prefetch queue is capped, so a slow or absent database slows consumption down instead of filling
//! memory. `StreamConsumer::recv` hands out messages straight from librdkafka's queue (no
//! channel per message), and each is decoded and released at once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use telemetry_core::kafka::{self, KafkaConfig};
use telemetry_core::Shutdown;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::{BatchConfig, WorkerConfig};
use crate::metrics;
use crate::positions::{self, PartitionLog, PositionError, Start};
use crate::record::Batch;
use crate::sink::{Sink, SinkError};

/// librdkafka's prefetch buffer per replica. Its default (64 MiB) is far more than two batches
/// need; this bounds memory while the database is down.
const PREFETCH_KBYTES: &str = "16384";

/// Messages librdkafka tries to keep queued per partition: five batches' worth.
const QUEUED_MIN_MESSAGES: &str = "5000";
/// Bytes one fetch request may return (all partitions) and per partition.
const FETCH_MAX_BYTES: &str = "1048576";
const MAX_PARTITION_FETCH_BYTES: &str = "262144";

/// How often librdkafka reports statistics, which carry each partition's consumer lag.
const STATISTICS_INTERVAL_MS: &str = "5000";

pub type WorkerConsumer = StreamConsumer<WorkerContext>;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Boxed: a sink error is large, and is returned at most once per run.
    #[error(transparent)]
    Sink(Box<SinkError>),
    #[error(transparent)]
    Position(#[from] PositionError),
}

impl From<SinkError> for IngestError {
    fn from(error: SinkError) -> Self {
        IngestError::Sink(Box::new(error))
    }
}

/// A consumer whose assignments start where the database says; `shutdown` is triggered when an
/// assigned partition cannot be started safely (see [`crate::positions`]).
pub fn create_consumer(
    config: &WorkerConfig,
    shutdown: &Shutdown,
) -> Result<WorkerConsumer, KafkaError> {
    let context = WorkerContext {
        topic: config.kafka.topic.clone(),
        database_url: config.postgres.url.clone(),
        shutdown: shutdown.clone(),
        refused: Mutex::new(None),
    };
    consumer_config(&config.kafka, &config.group_id).create_with_context(context)
}

fn consumer_config(kafka: &KafkaConfig, group_id: &str) -> rdkafka::ClientConfig {
    kafka.client_config(&[
        ("group.id", group_id),
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
        // A new group starts from the oldest record: telemetry is never skipped by default.
        ("auto.offset.reset", "earliest"),
        // Cooperative rebalancing moves only the partitions that must move, so adding a replica
        // does not stop every other replica's work.
        ("partition.assignment.strategy", "cooperative-sticky"),
        ("queued.max.messages.kbytes", PREFETCH_KBYTES),
        // librdkafka's defaults (100,000 queued messages per partition, 50 MiB fetches, 1 MiB
        // per partition) let each partition's queue and each fetch grow far beyond what two
        // batches need; measured peak RSS 75 MB against 23 MB with these, and no slower drain.
        ("queued.min.messages", QUEUED_MIN_MESSAGES),
        ("fetch.max.bytes", FETCH_MAX_BYTES),
        ("max.partition.fetch.bytes", MAX_PARTITION_FETCH_BYTES),
        // A partition whose queue is full is fetched again after this long (default 1 s): a
        // drained queue refills before the reader runs dry.
        ("fetch.queue.backoff.ms", "10"),
        // How long a broker may hold a fetch that found too little data. Kafka and Redpanda
        // answer as soon as data arrives, so this only paces fetches of an idle topic; Tansu
        // holds every fetch this long, data or not, so on the local stack it is a floor under
        // end-to-end latency: at 8,905 msg/s 50 ms gave a reading e2e p50 of 84 ms, 10 ms one
        // of 40 ms (docs/performance.md). `kafka.properties` overrides it.
        ("fetch.wait.max.ms", "10"),
        // The worker reads non-transactional records only; read_committed also fails on some
        // Kafka-compatible brokers.
        ("isolation.level", "read_uncommitted"),
        ("statistics.interval.ms", STATISTICS_INTERVAL_MS),
    ])
}

/// The consumer's callbacks: where an assigned partition starts, and lag from statistics.
///
/// On assignment each partition starts where [`positions::start`] says: at the lowest of its
/// Kafka committed offset and what `ingest_offsets` says (its next offset, or the start of a
/// replay window), and at the oldest record when it has no row. The database is the record of
/// what is stored, so this never skips a record that is not stored, even when Kafka's commit is
/// ahead of it (a database restored from a backup); an offset reset with standard Kafka tools
/// to an earlier point is honoured and the records it re-reads are skipped by the sink.
#[derive(Debug)]
pub struct WorkerContext {
    topic: String,
    database_url: String,
    /// Stops the worker when an assigned partition cannot be started safely.
    shutdown: Shutdown,
    /// Why, for [`consume`] to return once the batches in flight are stored.
    refused: Mutex<Option<PositionError>>,
}

impl ClientContext for WorkerContext {
    fn stats(&self, statistics: Statistics) {
        for topic in statistics.topics.values().filter(|t| t.topic == self.topic) {
            for partition in topic.partitions.values() {
                if partition.partition < 0 || partition.fetch_state != "active" {
                    continue;
                }
                let lag = if partition.consumer_lag >= 0 {
                    partition.consumer_lag
                } else if partition.hi_offset >= 0 && partition.app_offset >= 0 {
                    (partition.hi_offset - partition.app_offset).max(0)
                } else {
                    continue;
                };
                metrics::consumer_lag(partition.partition, lag);
            }
        }
    }
}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(assigned) => {
                metrics::rebalance("assign");
                self.start_at_stored_positions(consumer, assigned);
            }
            Rebalance::Revoke(revoked) => {
                metrics::rebalance("revoke");
                let partitions: Vec<i32> =
                    revoked.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(?partitions, "partitions revoked");
                // Another replica reports them now; a stale value here would be counted twice.
                for partition in partitions {
                    metrics::consumer_lag(partition, 0);
                }
            }
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance error"),
        }
    }
}

impl WorkerContext {
    fn start_at_stored_positions(
        &self,
        consumer: &BaseConsumer<Self>,
        assigned: &TopicPartitionList,
    ) {
        let partitions: Vec<i32> = assigned
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        if partitions.is_empty() {
            return;
        }
        let starts = match self.plan_starts(consumer, assigned, &partitions) {
            Ok(starts) => starts,
            Err(refusal) => return self.refuse(assigned, refusal),
        };
        for mut element in assigned.elements_for_topic(&self.topic) {
            let partition = element.partition();
            let Some(&start) = starts.get(&partition) else {
                continue;
            };
            tracing::info!(partition, start, "partition assigned");
            if let Err(error) = element.set_offset(Offset::Offset(start)) {
                tracing::warn!(%error, partition, "cannot set the start offset");
            }
        }
    }

    /// Each partition's start offset, once the database and Kafka have both answered (retried
    /// for [`positions::LOOKUP_PATIENCE`]); records Kafka no longer keeps are recorded as
    /// skipped before any is consumed.
    fn plan_starts(
        &self,
        consumer: &BaseConsumer<Self>,
        assigned: &TopicPartitionList,
        partitions: &[i32],
    ) -> Result<BTreeMap<i32, i64>, PositionError> {
        let planned = positions::with_patience(|| {
            let stored = positions::read_stored(&self.database_url, &self.topic, partitions)?;
            let committed = self.committed_offsets(consumer, assigned);
            let mut starts = BTreeMap::new();
            for &partition in partitions {
                let log = self.partition_log(consumer, partition)?;
                let stored = stored.get(&partition);
                let committed = committed.get(&partition).copied();
                match positions::start(stored, committed, log) {
                    Ok(start) => {
                        tracing::debug!(
                            partition,
                            ?stored,
                            ?committed,
                            ?log,
                            ?start,
                            "start planned"
                        );
                        starts.insert(partition, start);
                    }
                    // Not retried: waiting does not make the log reach what is stored.
                    Err(beyond) => {
                        return Ok(Err(PositionError::LogEndsBelowStored {
                            topic: self.topic.clone(),
                            partition,
                            next_offset: beyond.next_offset,
                            log_end: beyond.log_end,
                        }))
                    }
                }
            }
            self.skip_what_kafka_no_longer_keeps(&starts)?;
            Ok(Ok(starts.into_iter().map(|(p, s)| (p, s.offset)).collect()))
        });
        match planned {
            Ok(plan) => plan,
            Err((reason, waited)) => Err(PositionError::Unknown {
                topic: self.topic.clone(),
                partitions: partitions.to_vec(),
                reason,
                waited,
            }),
        }
    }

    /// Kafka's committed offsets of the group; none where it has none or cannot say (they only
    /// ever move a start back).
    fn committed_offsets(
        &self,
        consumer: &BaseConsumer<Self>,
        assigned: &TopicPartitionList,
    ) -> BTreeMap<i32, i64> {
        let committed = match consumer
            .committed_offsets(assigned.clone(), positions::REQUEST_TIMEOUT)
        {
            Ok(committed) => committed,
            Err(error) => {
                tracing::warn!(%error, "cannot read Kafka's committed offsets; using the database's alone");
                return BTreeMap::new();
            }
        };
        committed
            .elements_for_topic(&self.topic)
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(offset) => Some((e.partition(), offset)),
                _ => None,
            })
            .collect()
    }

    fn partition_log(
        &self,
        consumer: &BaseConsumer<Self>,
        partition: i32,
    ) -> Result<PartitionLog, String> {
        let (oldest, end) = consumer
            .fetch_watermarks(&self.topic, partition, positions::REQUEST_TIMEOUT)
            .map_err(|e| {
                format!("cannot read the offsets of partition {partition} from Kafka: {e}")
            })?;
        Ok(PartitionLog { oldest, end })
    }

    fn skip_what_kafka_no_longer_keeps(&self, starts: &BTreeMap<i32, Start>) -> Result<(), String> {
        let lost: BTreeMap<i32, i64> = starts
            .iter()
            .filter_map(|(&partition, start)| Some((partition, start.lost.clone()?.end)))
            .collect();
        if lost.is_empty() {
            return Ok(());
        }
        positions::skip_to_oldest_kept(&self.database_url, &self.topic, &lost)?;
        for (&partition, start) in starts {
            if let Some(lost) = &start.lost {
                tracing::warn!(partition, from = lost.start, to = lost.end,
                    "records were never stored and Kafka no longer keeps them (retention); starting at the oldest kept");
                metrics::records_lost(partition, lost.end - lost.start);
            }
        }
        Ok(())
    }

    /// Stops the worker: the partitions start at the oldest record (never ahead of the
    /// database) until shutdown takes effect, and [`consume`] returns why.
    fn refuse(&self, assigned: &TopicPartitionList, refusal: PositionError) {
        tracing::error!(error = %refusal, "stopping the worker");
        metrics::partition_refused(refusal.kind());
        for mut element in assigned.elements_for_topic(&self.topic) {
            let _ = element.set_offset(Offset::Beginning);
        }
        self.refused
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get_or_insert(refusal);
        self.shutdown.trigger();
    }

    fn take_refusal(&self) -> Option<PositionError> {
        self.refused
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }
}

/// Consumes until shutdown; returns after the batches in flight are stored and committed.
///
/// A reader takes records from Kafka and decodes them into one batch per writer while
/// `batch.writers` writers store earlier batches, each on its own connection. Partitions are
/// split between the writers ([`kafka::share_of`]), so the database works on several batches at
/// once while each partition's batches still go in order. A channel of one batch per writer
/// keeps every writer busy and memory bounded (per writer one batch being written and one
/// ready, plus librdkafka's capped prefetch).
///
/// An assigned partition that cannot be started safely stops it too, with the reason.
pub async fn consume(
    consumer: Arc<WorkerConsumer>,
    sink: &Sink,
    config: &WorkerConfig,
    shutdown: &Shutdown,
) -> Result<(), IngestError> {
    let (lanes, queues): (Vec<_>, Vec<_>) = (0..config.batch.writers.max(1))
        .map(|_| mpsc::channel::<Batch>(1))
        .unzip();
    let (done, finished) = mpsc::unbounded_channel();
    let reader = tokio::spawn(read_batches(
        consumer.clone(),
        config.batch.clone(),
        config.max_payload_bytes,
        shutdown.clone(),
        Lanes::new(lanes, finished),
    ));
    let writers = queues.into_iter().enumerate().map(|(writer, queue)| {
        write_batches(
            &consumer,
            sink,
            &config.kafka.topic,
            queue,
            (writer, &done),
            shutdown,
        )
    });
    let outcome = futures::future::join_all(writers)
        .await
        .into_iter()
        .collect::<Result<Vec<()>, SinkError>>()
        .map(|_| ());
    let _ = reader.await;
    if let Some(refusal) = consumer.context().take_refusal() {
        return Err(refusal.into());
    }
    Ok(outcome?)
}

/// One writer: stores its batches in order, commits each one's offsets to Kafka, and tells
/// the reader after each batch.
async fn write_batches(
    consumer: &WorkerConsumer,
    sink: &Sink,
    topic: &str,
    mut batches: mpsc::Receiver<Batch>,
    (writer, done): (usize, &mpsc::UnboundedSender<WriteReport>),
    shutdown: &Shutdown,
) -> Result<(), SinkError> {
    while let Some(batch) = batches.recv().await {
        let started = Instant::now();
        match sink.store(&batch, shutdown).await {
            Ok(stored) => tracing::debug!(records = batch.len(), ?stored, "batch stored"),
            // Nothing was stored or committed; the records come again after restart.
            Err(SinkError::Shutdown) => return Ok(()),
            Err(error) => {
                // The reader stops when it sees shutdown or this writer's queue closed; the
                // other writers finish what they hold.
                shutdown.trigger();
                return Err(error);
            }
        }
        commit_to_kafka(consumer, topic, &batch);
        // The reader is gone only at shutdown, when nothing more comes.
        let _ = done.send((writer, started.elapsed()));
    }
    Ok(())
}

/// What the reader knows of a writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writer {
    /// Storing a batch, or holding one in its queue.
    Busy,
    /// Waiting for a batch; its last one took this long to store.
    Idle { last_write: Duration },
}

/// A writer's report after storing a batch: which writer, and how long the batch took.
type WriteReport = (usize, Duration);

/// The reader's side of the writers: a queue of one batch each, and which of them are idle.
struct Lanes {
    queues: Vec<mpsc::Sender<Batch>>,
    /// Batches handed to each writer and not yet stored.
    outstanding: Vec<usize>,
    /// How long each writer's last batch took to store.
    last_write: Vec<Duration>,
    finished: mpsc::UnboundedReceiver<WriteReport>,
}

impl Lanes {
    fn new(
        queues: Vec<mpsc::Sender<Batch>>,
        finished: mpsc::UnboundedReceiver<WriteReport>,
    ) -> Self {
        Self {
            outstanding: vec![0; queues.len()],
            last_write: vec![Duration::ZERO; queues.len()],
            queues,
            finished,
        }
    }

    fn len(&self) -> usize {
        self.queues.len()
    }

    fn writer(&self, writer: usize) -> Writer {
        match self.outstanding[writer] {
            0 => Writer::Idle {
                last_write: self.last_write[writer],
            },
            _ => Writer::Busy,
        }
    }

    fn finished(&mut self, (writer, took): WriteReport) {
        self.outstanding[writer] = self.outstanding[writer].saturating_sub(1);
        self.last_write[writer] = took;
    }

    /// Takes in every "stored" report that is already there.
    fn collect_finished(&mut self) {
        while let Ok(stored) = self.finished.try_recv() {
            self.finished(stored);
        }
    }

    /// Gives a batch to its writer, waiting while the writer's queue is full (backpressure).
    /// False when the writer has stopped.
    async fn hand_over(&mut self, writer: usize, batch: Batch) -> bool {
        if batch.is_empty() {
            return true;
        }
        metrics::consumed(batch.len());
        let sent = self.queues[writer].send(batch).await.is_ok();
        self.outstanding[writer] += 1;
        sent
    }
}

/// The batches being filled, one per writer, each with the time its first record arrived.
struct OpenBatches {
    batches: Vec<Batch>,
    opened: Vec<Option<Instant>>,
    limits: BatchConfig,
}

impl OpenBatches {
    fn new(writers: usize, limits: BatchConfig) -> Self {
        Self {
            batches: (0..writers).map(|_| Batch::default()).collect(),
            opened: vec![None; writers],
            limits,
        }
    }

    /// Decodes the message into its writer's batch; returns that writer if the batch is full.
    ///
    /// A record at or below one the batch already holds of its partition is dropped: a
    /// partition revoked and assigned back within one batch window is read again from where
    /// the database says, and the sink, which checks each record against the stored position
    /// alone, would store both copies. It also keeps the batch's `next_offsets` from moving back.
    fn push(&mut self, message: &BorrowedMessage<'_>, max_payload_bytes: usize) -> Option<usize> {
        let writer = kafka::share_of(message.partition(), self.batches.len());
        if holds(&self.batches[writer], message.partition(), message.offset()) {
            return None;
        }
        self.batches[writer].push(message, max_payload_bytes);
        self.opened[writer].get_or_insert_with(Instant::now);
        (self.batches[writer].len() >= self.limits.max_records).then_some(writer)
    }

    /// When a writer's open batch is due. While the writer is idle: `linger_ms` after its
    /// first record, or as long after it as the writer's last batch took, whichever is later
    /// (group commit: light load is stored at once, and a slower database, or a busier
    /// machine, gets fewer and larger batches, so a writer spends at most about half its time
    /// writing before the batches grow). While the writer is busy: `max_wait_ms` after it.
    fn deadline(&self, writer: usize, state: Writer) -> Option<Instant> {
        let wait = match state {
            Writer::Idle { last_write } => self
                .limits
                .linger()
                .max(last_write)
                .min(self.limits.max_wait()),
            Writer::Busy => self.limits.max_wait(),
        };
        self.opened[writer].map(|opened| opened + wait)
    }

    /// When the first open batch is due, if any is open; `writer` gives each writer's state.
    fn next_deadline(&self, writer: impl Fn(usize) -> Writer) -> Option<Instant> {
        (0..self.batches.len())
            .filter_map(|w| self.deadline(w, writer(w)))
            .min()
    }

    /// The writers whose open batches are due.
    fn due(&self, now: Instant, writer: impl Fn(usize) -> Writer) -> Vec<usize> {
        (0..self.batches.len())
            .filter(|&w| self.deadline(w, writer(w)).is_some_and(|due| now >= due))
            .collect()
    }

    fn take(&mut self, writer: usize) -> Batch {
        self.opened[writer] = None;
        std::mem::take(&mut self.batches[writer])
    }

    fn open_writers(&self) -> Vec<usize> {
        (0..self.batches.len())
            .filter(|&w| self.opened[w].is_some())
            .collect()
    }
}

/// Whether the batch already holds `offset` of `partition`, or a later one.
fn holds(batch: &Batch, partition: i32, offset: i64) -> bool {
    batch
        .next_offsets
        .get(&partition)
        .is_some_and(|&next| offset < next)
}

/// What woke the reader.
enum Event<'a> {
    Message(Option<Result<BorrowedMessage<'a>, KafkaError>>),
    Stored(Option<WriteReport>),
}

/// Fills one batch per writer. A batch goes to its writer at `batch.max_records` records, or
/// before a record that would take it past `batch.max_bytes` (see [`BatchBytes`]); else,
/// once the reader has taken every record librdkafka holds ready, when it is due (see
/// [`OpenBatches::deadline`]). On shutdown the open batches are handed over too, so what was
/// read is stored and committed.
async fn read_batches(
    consumer: Arc<WorkerConsumer>,
    limits: BatchConfig,
    max_payload_bytes: usize,
    shutdown: Shutdown,
    mut lanes: Lanes,
) {
    let mut bytes = BatchBytes::new(lanes.len(), limits.max_bytes);
    let mut open = OpenBatches::new(lanes.len(), limits);
    loop {
        lanes.collect_finished();
        let deadline = open.next_deadline(|w| lanes.writer(w));
        // A message that is ready comes before a deadline that has passed (see
        // `next_message`), so a due batch still takes what librdkafka already holds.
        let event = tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            message = next_message(&consumer, deadline) => Event::Message(message),
            stored = lanes.finished.recv() => Event::Stored(stored),
        };
        let full = match event {
            Event::Message(Some(Ok(message))) => {
                let writer = kafka::share_of(message.partition(), lanes.len());
                let size = message_bytes(&message);
                if bytes.would_overflow(writer, size)
                    && !lanes.hand_over(writer, bytes.take(&mut open, writer)).await
                {
                    return;
                }
                bytes.add(writer, size);
                open.push(&message, max_payload_bytes)
            }
            Event::Message(Some(Err(error))) => {
                log_consumer_error(&error);
                None
            }
            Event::Message(None) => None,
            Event::Stored(Some(stored)) => {
                lanes.finished(stored);
                None
            }
            Event::Stored(None) => None,
        };
        let ready = full
            .into_iter()
            .chain(open.due(Instant::now(), |w| lanes.writer(w)))
            .collect::<Vec<_>>();
        for writer in ready {
            if !lanes.hand_over(writer, bytes.take(&mut open, writer)).await {
                return;
            }
        }
    }
    for writer in open.open_writers() {
        if !lanes.hand_over(writer, bytes.take(&mut open, writer)).await {
            return;
        }
    }
}

/// The bytes in each writer's open batch. Records are counted as they came from Kafka (key,
/// payload, headers), which is what the batch keeps of them: without this bound a backlog of
/// large payloads makes batches of `max_records` of them, and a replica whose writers hold
/// three such batches each outgrows its memory limit and is restarted in a loop.
struct BatchBytes {
    open: Vec<usize>,
    max_bytes: usize,
}

impl BatchBytes {
    fn new(writers: usize, max_bytes: usize) -> Self {
        Self {
            open: vec![0; writers],
            max_bytes,
        }
    }

    /// Whether a record of `size` bytes would take the writer's non-empty batch past the bound;
    /// a record larger than the bound on its own goes in a batch of its own.
    fn would_overflow(&self, writer: usize, size: usize) -> bool {
        self.open[writer] > 0 && self.open[writer] + size > self.max_bytes
    }

    fn add(&mut self, writer: usize, size: usize) {
        self.open[writer] += size;
    }

    /// Takes the writer's open batch, whose bytes then start again from zero.
    fn take(&mut self, open: &mut OpenBatches, writer: usize) -> Batch {
        self.open[writer] = 0;
        open.take(writer)
    }
}

/// What a record weighs in a batch: its key, payload and headers.
fn message_bytes(message: &BorrowedMessage<'_>) -> usize {
    let headers = message.headers().map_or(0, |headers| {
        headers
            .iter()
            .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len))
            .sum()
    });
    message.key_len() + message.payload_len() + headers
}

/// The next message, or `None` when the deadline passes first. A message that is ready wins
/// over a deadline that has passed: the timeout polls `recv` first.
async fn next_message<'a>(
    consumer: &'a WorkerConsumer,
    deadline: Option<Instant>,
) -> Option<Result<BorrowedMessage<'a>, KafkaError>> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .ok(),
        None => Some(consumer.recv().await),
    }
}

/// librdkafka reports broker trouble through the consumer and keeps reconnecting by itself;
/// none of it is a reason to stop.
fn log_consumer_error(error: &KafkaError) {
    tracing::warn!(%error, "kafka consumer error; librdkafka keeps retrying");
}

/// Tells Kafka what is stored, so lag tools and restarts see it. Best effort: if it fails (e.g.
/// the partition moved to another replica), the next owner skips the records already stored.
fn commit_to_kafka(consumer: &WorkerConsumer, topic: &str, batch: &Batch) {
    let mut offsets = TopicPartitionList::new();
    for (&partition, &next) in &batch.next_offsets {
        if let Err(error) = offsets.add_partition_offset(topic, partition, Offset::Offset(next)) {
            tracing::warn!(%error, partition, "cannot build offset commit");
        }
    }
    if let Err(error) = consumer.commit(&offsets, CommitMode::Async) {
        tracing::debug!(%error, "kafka offset commit not sent");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> BatchConfig {
        BatchConfig {
            max_records: 1000,
            max_wait_ms: 100,
            linger_ms: 5,
            writers: 2,
            ..BatchConfig::default()
        }
    }

    const MS: Duration = Duration::from_millis(1);

    fn idle_after(last_write_ms: u32) -> Writer {
        Writer::Idle {
            last_write: MS * last_write_ms,
        }
    }

    #[test]
    fn an_idle_writers_batch_is_due_after_the_linger_a_busy_ones_after_the_window() {
        let mut open = OpenBatches::new(2, limits());
        let start = Instant::now();
        open.opened = vec![Some(start), Some(start)];
        let (idle, busy) = (idle_after(1), Writer::Busy);
        assert_eq!(open.deadline(0, idle), Some(start + MS * 5));
        assert_eq!(open.deadline(0, busy), Some(start + MS * 100));
        let writers = [idle, busy];
        assert_eq!(open.next_deadline(|w| writers[w]), Some(start + MS * 5));
        assert!(open.due(start, |w| writers[w]).is_empty());
        assert_eq!(open.due(start + MS * 5, |w| writers[w]), vec![0]);
        assert_eq!(open.due(start + MS * 100, |w| writers[w]), vec![0, 1]);
    }

    #[test]
    fn a_writer_that_wrote_slowly_gets_a_batch_that_waited_as_long_within_the_window() {
        let mut open = OpenBatches::new(1, limits());
        let start = Instant::now();
        open.opened = vec![Some(start)];
        assert_eq!(open.deadline(0, idle_after(30)), Some(start + MS * 30));
        assert_eq!(open.deadline(0, idle_after(400)), Some(start + MS * 100));
    }

    #[test]
    fn a_writer_without_an_open_batch_has_no_deadline() {
        let mut open = OpenBatches::new(2, limits());
        let writers = [idle_after(0), idle_after(0)];
        assert_eq!(open.next_deadline(|w| writers[w]), None);
        open.opened[1] = Some(Instant::now());
        assert_eq!(open.deadline(0, writers[0]), None);
        assert!(open.next_deadline(|w| writers[w]).is_some());
        open.take(1);
        assert_eq!(open.next_deadline(|w| writers[w]), None);
    }

    #[tokio::test]
    async fn a_writer_is_idle_once_it_has_stored_every_batch_it_was_handed() {
        let (queue, mut batches) = mpsc::channel(1);
        let (done, finished) = mpsc::unbounded_channel();
        let mut lanes = Lanes::new(vec![queue], finished);
        assert_eq!(lanes.writer(0), idle_after(0));
        let mut batch = Batch::default();
        batch.rows.push(crate::record::Row {
            device_time: None,
            received_at: chrono::Utc::now(),
            device: telemetry_core::contract::DeviceId {
                user: "u".into(),
                device: "d".into(),
            },
            seq: None,
            payload: b"{}".to_vec(),
            partition: 0,
            offset: 0,
        });
        // An empty batch is not handed over at all.
        assert!(lanes.hand_over(0, Batch::default()).await);
        assert_eq!(lanes.writer(0), idle_after(0));
        assert!(lanes.hand_over(0, batch).await);
        assert_eq!(lanes.writer(0), Writer::Busy);
        batches.recv().await.unwrap();
        done.send((0, MS * 12)).unwrap();
        lanes.collect_finished();
        assert_eq!(lanes.writer(0), idle_after(12));
    }
}

//! `telemetry-worker redrive`: copy dead letters back into the telemetry topic after a fix.
//!
//! A dead letter keeps the original key, value and headers, plus the `dlq_*` headers that say
//! why and where it was rejected. Once the cause is fixed (a device firmware, a limit, a
//! contract change), a redrive reads the dead-letter topic from a given offset up to where it
//! ends when the command starts (or up to a given offset), picks the letters of the chosen
//! reasons (and stage), and produces each to the topic it came from (`dlq_source_topic`, or the
//! telemetry topic for letters the bridge rejected before Kafka) with its key, value and
//! original headers, the `dlq_*` ones removed. The workers then store them as new records;
//! what is still bad is dead-lettered again, so nothing loops.
//!
//! A redrive copies whatever it selects each time it runs: the summary it prints says up to
//! which offset each partition was read, which is where the next redrive should start.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use telemetry_core::contract::header;

use crate::config::WorkerConfig;

/// How long a read of the dead-letter topic may wait for the broker before the redrive stops.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);
/// Records produced before waiting for the broker to confirm them.
const CONFIRM_EVERY: usize = 1_000;
/// Headers that dead-lettering adds; a redriven record goes back without them.
const DLQ_HEADER_PREFIX: &str = "dlq_";

#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    #[error("cannot talk to Kafka while {step}: {source}")]
    Kafka {
        step: &'static str,
        #[source]
        source: KafkaError,
    },
    #[error("the dead-letter topic '{0}' does not exist or has no partitions")]
    NoTopic(String),
    #[error("the dead-letter topic '{topic}' has no partition {partition} (it has {count})")]
    NoSuchPartition {
        topic: String,
        partition: i32,
        count: usize,
    },
    #[error("Kafka sent nothing from '{topic}' for {}s; is the broker up? Nothing read after offset {read_to:?} was redriven", KAFKA_TIMEOUT.as_secs())]
    Stalled {
        topic: String,
        read_to: BTreeMap<i32, i64>,
    },
    #[error("the telemetry topic did not take a redriven record: {0}; run the redrive again from the offsets printed for the last good run")]
    NotDelivered(#[source] KafkaError),
}

/// librdkafka reports the end of each partition as an error too, and the default context logs
/// it as one; for a redrive it is how the read ends, so only real errors are logged.
struct RedriveContext;

impl ClientContext for RedriveContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(error, KafkaError::PartitionEOF(_)) {
            tracing::error!(%error, reason, "Kafka client error");
        }
    }
}

impl ConsumerContext for RedriveContext {}

fn kafka(step: &'static str) -> impl FnOnce(KafkaError) -> RedriveError {
    move |source| RedriveError::Kafka { step, source }
}

/// Which dead letters to copy back.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// `dlq_reason` codes to redrive; empty means every reason.
    pub reasons: Vec<String>,
    /// Only letters of this `dlq_stage` (`bridge` or `worker`).
    pub stage: Option<String>,
    /// First offset read in each partition; the oldest kept when absent.
    pub from_offset: Option<i64>,
    /// Offset each partition is read up to, exclusive; its end when the redrive starts when
    /// absent.
    pub to_offset: Option<i64>,
    /// Partitions of the dead-letter topic; all when empty.
    pub partitions: Vec<i32>,
}

impl Selection {
    fn wants(&self, message: &BorrowedMessage<'_>) -> bool {
        let value = |name: &str| header_text(message, name);
        let reason_ok = self.reasons.is_empty()
            || value(header::DLQ_REASON).is_some_and(|r| self.reasons.contains(&r));
        let stage_ok = self
            .stage
            .as_ref()
            .is_none_or(|stage| value(header::DLQ_STAGE).as_deref() == Some(stage.as_str()));
        reason_ok && stage_ok
    }
}

/// What a redrive did in one partition of the dead-letter topic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionRedrive {
    pub partition: i32,
    /// Dead letters read, and how many of them were copied back.
    pub read: u64,
    pub redriven: u64,
    /// The offset after the last letter read: where the next redrive starts.
    pub next_offset: Option<i64>,
}

/// Copies the selected dead letters of `config.kafka.dlq_topic` back to their topics and waits
/// until the broker has confirmed every copy.
pub async fn redrive(
    config: &WorkerConfig,
    selection: &Selection,
) -> Result<Vec<PartitionRedrive>, RedriveError> {
    let dlq_topic = config.kafka.dlq_topic.as_str();
    let consumer: StreamConsumer<RedriveContext> = config
        .kafka
        .client_config(&[
            // Assigned partitions only: the group is never joined and nothing is committed.
            ("group.id", "telemetry-worker-redrive"),
            ("enable.auto.commit", "false"),
            ("enable.partition.eof", "true"),
            ("auto.offset.reset", "earliest"),
            ("isolation.level", "read_uncommitted"),
        ])
        .create_with_context(RedriveContext)
        .map_err(kafka("creating a consumer"))?;
    let producer: FutureProducer = config
        .kafka
        .durable_producer_config()
        .create()
        .map_err(kafka("creating a producer"))?;
    let partitions = partitions(&consumer, dlq_topic, &selection.partitions)?;
    let mut assignment = TopicPartitionList::new();
    for &partition in &partitions {
        let start = selection
            .from_offset
            .map_or(Offset::Beginning, Offset::Offset);
        assignment
            .add_partition_offset(dlq_topic, partition, start)
            .map_err(kafka("choosing where to start"))?;
    }
    consumer
        .assign(&assignment)
        .map_err(kafka("assigning the dead-letter partitions"))?;

    let mut summary: BTreeMap<i32, PartitionRedrive> = partitions
        .iter()
        .map(|&partition| {
            let start = PartitionRedrive {
                partition,
                ..PartitionRedrive::default()
            };
            (partition, start)
        })
        .collect();
    let mut open: BTreeSet<i32> = partitions.into_iter().collect();
    let mut unconfirmed = Vec::new();
    while !open.is_empty() {
        let message = match tokio::time::timeout(KAFKA_TIMEOUT, consumer.recv()).await {
            Err(_) => {
                return Err(RedriveError::Stalled {
                    topic: dlq_topic.to_owned(),
                    read_to: read_to(&summary),
                })
            }
            Ok(Err(KafkaError::PartitionEOF(partition))) => {
                open.remove(&partition);
                continue;
            }
            Ok(Err(error)) => return Err(kafka("reading the dead-letter topic")(error)),
            Ok(Ok(message)) => message,
        };
        let partition = message.partition();
        if !open.contains(&partition) {
            continue;
        }
        if selection.to_offset.is_some_and(|to| message.offset() >= to) {
            open.remove(&partition);
            continue;
        }
        let progress = summary.get_mut(&partition).expect("an assigned partition");
        progress.read += 1;
        progress.next_offset = Some(message.offset() + 1);
        if selection.wants(&message) {
            unconfirmed.push(copy_back(&producer, &message, &config.kafka.topic)?);
            progress.redriven += 1;
        }
        if unconfirmed.len() >= CONFIRM_EVERY {
            confirm(std::mem::take(&mut unconfirmed)).await?;
        }
    }
    confirm(unconfirmed).await?;
    Ok(summary.into_values().collect())
}

/// The chosen partitions of `topic`, checked against it; all of them when none is chosen.
fn partitions(
    consumer: &StreamConsumer<RedriveContext>,
    topic: &str,
    chosen: &[i32],
) -> Result<Vec<i32>, RedriveError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
        .map_err(kafka("reading the dead-letter topic's partitions"))?;
    let mut existing: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    existing.sort_unstable();
    if existing.is_empty() {
        return Err(RedriveError::NoTopic(topic.to_owned()));
    }
    if chosen.is_empty() {
        return Ok(existing);
    }
    if let Some(&missing) = chosen.iter().find(|p| !existing.contains(p)) {
        return Err(RedriveError::NoSuchPartition {
            topic: topic.to_owned(),
            partition: missing,
            count: existing.len(),
        });
    }
    let mut chosen = chosen.to_vec();
    chosen.sort_unstable();
    chosen.dedup();
    Ok(chosen)
}

/// Produces a dead letter's key, value and original headers to the topic it came from.
fn copy_back(
    producer: &FutureProducer,
    letter: &BorrowedMessage<'_>,
    telemetry_topic: &str,
) -> Result<DeliveryFuture, RedriveError> {
    let source = header_text(letter, header::DLQ_SOURCE_TOPIC);
    let topic = source.as_deref().unwrap_or(telemetry_topic);
    let mut headers = OwnedHeaders::new();
    if let Some(original) = letter.headers() {
        for h in original.iter() {
            if !h.key.starts_with(DLQ_HEADER_PREFIX) {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
    }
    let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
    if let Some(key) = letter.key() {
        record = record.key(key);
    }
    if let Some(payload) = letter.payload() {
        record = record.payload(payload);
    }
    producer
        .send_result(record)
        .map_err(|(error, _)| RedriveError::NotDelivered(error))
}

async fn confirm(unconfirmed: Vec<DeliveryFuture>) -> Result<(), RedriveError> {
    for delivery in futures::future::join_all(unconfirmed).await {
        match delivery {
            Ok(Ok(_)) => {}
            Ok(Err((error, _))) => return Err(RedriveError::NotDelivered(error)),
            Err(_cancelled) => {
                return Err(RedriveError::NotDelivered(KafkaError::Canceled));
            }
        }
    }
    Ok(())
}

fn header_text(message: &BorrowedMessage<'_>, name: &str) -> Option<String> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

fn read_to(summary: &BTreeMap<i32, PartitionRedrive>) -> BTreeMap<i32, i64> {
    summary
        .values()
        .filter_map(|p| p.next_offset.map(|next| (p.partition, next)))
        .collect()
}

//! Dead-letter producer: records that break the contract or that PostgreSQL rejects go to
//! `iot-stream-dlq` whole (key, payload, headers), with the reason and their source position.
//!
//! Dead letters are sent inside the batch's database transaction, before it commits, so a
//! record's offset never moves past it unless its dead letter was confirmed. A crash between the
//! two, a COMMIT that fails, or a write timeout after the letters went out sends them again: the
//! dead-letter topic is at-least-once, the table exactly-once, and `redrive` copies each source
//! record back once however many letters it has (see [`crate::redrive`]).
//!
//! A letter the topic refuses for good (see [`is_permanent_produce_error`]) is sent once more
//! without its payload, marked `dlq_truncated`; if that is refused too, the batch stops with an
//! error that names the topic and the setting to change, instead of being retried forever.

use std::time::Duration;

use futures::future::try_join_all;
use rdkafka::error::KafkaError;
use rdkafka::message::Header;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use telemetry_core::contract::header;
use telemetry_core::kafka::{is_permanent_produce_error, permanent_error_fix, KafkaConfig};

use crate::metrics;
use crate::record::DeadLetter;

/// The longest a dead letter may take to be confirmed. Bounded because the batch's transaction,
/// and its offset locks, stay open meanwhile.
const MAX_DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// Kafka did not take the letters now (a broker down, a timeout): the batch is retried.
    #[error("cannot deliver dead letters to '{topic}': {source}")]
    Unavailable {
        topic: String,
        #[source]
        source: KafkaError,
    },
    /// Kafka refused a letter for good, even without its payload: retrying cannot help.
    #[error("the dead-letter topic '{topic}' refused a letter (source partition {partition} offset {offset}) for good, even without its payload: {source}; {fix}, then restart the worker. The batch was not stored and is consumed again then")]
    Refused {
        topic: String,
        partition: i32,
        offset: i64,
        fix: String,
        #[source]
        source: KafkaError,
    },
}

pub struct DeadLetterProducer {
    producer: FutureProducer,
    topic: String,
    source_topic: String,
}

impl std::fmt::Debug for DeadLetterProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetterProducer")
            .field("topic", &self.topic)
            .finish()
    }
}

/// How long a dead letter may wait for the broker when a batch's transaction may last
/// `write_timeout`: half of it (at most 30 s), so that librdkafka gives a letter up, and the
/// batch is retried, before the write deadline abandons the transaction. A letter still queued
/// when its transaction is gone would otherwise be delivered later, beside the retry's copy.
pub fn delivery_timeout(write_timeout: Duration) -> Duration {
    (write_timeout / 2).min(MAX_DELIVERY_TIMEOUT)
}

impl DeadLetterProducer {
    /// `delivery_timeout`: see [`delivery_timeout`].
    pub fn new(kafka: &KafkaConfig, delivery_timeout: Duration) -> Result<Self, KafkaError> {
        let mut config = kafka.durable_producer_config();
        config.set(
            "message.timeout.ms",
            delivery_timeout.as_millis().max(1).to_string(),
        );
        Ok(Self {
            producer: config.create()?,
            topic: kafka.dlq_topic.clone(),
            source_topic: kafka.topic.clone(),
        })
    }

    /// Sends every dead letter and waits until the broker confirmed all of them.
    pub async fn send_all<'a>(
        &self,
        letters: impl IntoIterator<Item = &'a DeadLetter>,
    ) -> Result<usize, DeadLetterError> {
        let deliveries = letters.into_iter().map(|letter| async move {
            self.send(letter).await?;
            metrics::dead_letter(letter.reason);
            Ok::<_, DeadLetterError>(())
        });
        Ok(try_join_all(deliveries).await?.len())
    }

    /// Sends one letter; if the topic refuses it for good, sends it once more without its
    /// payload.
    async fn send(&self, letter: &DeadLetter) -> Result<(), DeadLetterError> {
        let whole = self.produce(letter, letter.payload.as_deref(), None);
        let error = match whole.await {
            Ok(()) => return Ok(()),
            Err(error) if is_permanent_produce_error(&error) => error,
            Err(source) => return Err(self.unavailable(source)),
        };
        let dropped = letter.payload.as_ref().map_or(0, Vec::len);
        tracing::warn!(%error, topic = %self.topic, partition = letter.partition, offset = letter.offset,
            payload_bytes = dropped, "the dead-letter topic refused a letter; sending it without its payload");
        let note = format!(
            "payload of {dropped} bytes dropped: '{}' refused the whole letter ({error}); {}",
            self.topic,
            permanent_error_fix(&error, &self.topic)
        );
        match self.produce(letter, None, Some(&note)).await {
            Ok(()) => {
                metrics::dead_letter_truncated();
                Ok(())
            }
            Err(source) if is_permanent_produce_error(&source) => Err(DeadLetterError::Refused {
                topic: self.topic.clone(),
                partition: letter.partition,
                offset: letter.offset,
                fix: permanent_error_fix(&source, &self.topic),
                source,
            }),
            Err(source) => Err(self.unavailable(source)),
        }
    }

    async fn produce(
        &self,
        letter: &DeadLetter,
        payload: Option<&[u8]>,
        truncated: Option<&str>,
    ) -> Result<(), KafkaError> {
        let mut headers = letter.headers(&self.source_topic);
        if let Some(note) = truncated {
            headers = headers.insert(Header {
                key: header::DLQ_TRUNCATED,
                value: Some(note),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic).headers(headers);
        if let Some(key) = &letter.key {
            record = record.key(key.as_slice());
        }
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        self.producer
            .send(record, Timeout::Never)
            .await
            .map(|_| ())
            .map_err(|(error, _)| error)
    }

    fn unavailable(&self, source: KafkaError) -> DeadLetterError {
        DeadLetterError::Unavailable {
            topic: self.topic.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_gives_up_before_its_batch_is_abandoned() {
        let write = Duration::from_secs(15);
        assert!(delivery_timeout(write) < write);
        assert_eq!(
            delivery_timeout(Duration::from_secs(600)),
            MAX_DELIVERY_TIMEOUT
        );
        let shortest = Duration::from_millis(100);
        assert!(delivery_timeout(shortest) < shortest);
    }
}

//! Dead-letter producer: records that break the contract or that PostgreSQL rejects go to
//! `iot-stream-dlq` whole (key, payload, headers), with the reason and their source position.
//!
//! Dead letters are sent inside the batch's database transaction, before it commits, so a
//! record's offset never moves past it unless its dead letter was confirmed. A crash between the
//! two sends it again: the dead-letter topic is at-least-once, the table exactly-once.

use std::time::Duration;

use futures::future::try_join_all;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use telemetry_core::kafka::KafkaConfig;

use crate::metrics;
use crate::record::DeadLetter;

/// How long a dead letter may take to be confirmed before the batch is retried. Bounded because
/// the batch's transaction, and its offset locks, stay open meanwhile.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

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

impl DeadLetterProducer {
    pub fn new(kafka: &KafkaConfig) -> Result<Self, KafkaError> {
        let mut config = kafka.durable_producer_config();
        config.set(
            "message.timeout.ms",
            DELIVERY_TIMEOUT.as_millis().to_string(),
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
    ) -> Result<usize, KafkaError> {
        let deliveries = letters.into_iter().map(|letter| {
            let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic)
                .headers(letter.headers(&self.source_topic));
            if let Some(key) = &letter.key {
                record = record.key(key.as_slice());
            }
            if let Some(payload) = &letter.payload {
                record = record.payload(payload.as_slice());
            }
            let reason = letter.reason;
            async move {
                self.producer
                    .send(record, Timeout::Never)
                    .await
                    .map_err(|(e, _)| e)?;
                metrics::dead_letter(reason);
                Ok::<_, KafkaError>(())
            }
        });
        Ok(try_join_all(deliveries).await?.len())
    }
}

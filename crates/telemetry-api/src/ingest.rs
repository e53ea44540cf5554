//! HTTP ingest: `POST /v1/devices/{user}/{device}/telemetry` for devices that cannot speak MQTT.
//!
//! Guarantee: 202 means Kafka has the record (all in-sync replicas confirmed, `acks=all`, with
//! an idempotent producer), and from there the worker stores it exactly once, as it does for the
//! bridge's records. The record follows the same contract as the bridge's: topic `kafka.topic`,
//! key `{user}/{device}`, the body unchanged as the value, header `received_at_ms`, plus
//! `ingest_via: http` in place of the MQTT headers. A body that breaks the payload rules is
//! refused with 422 and the contract's reason code instead of being dead-lettered: the caller is
//! still on the line and can fix it.
//!
//! Limit: like MQTT QoS 1, delivery is at least once. A 503 (Kafka did not confirm within
//! `ingest.delivery_timeout_ms`) or a lost response may hide a record that was stored after all;
//! a caller that retries can then store it twice. Devices that send `seq` let readers spot such
//! duplicates.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use serde::Serialize;
use telemetry_core::contract::{self, header, DeviceId};
use telemetry_core::kafka::KafkaConfig;

use crate::config::IngestConfig;
use crate::metrics;
use crate::problem::Problem;

/// Header that tells records of HTTP ingest from the bridge's, whose records carry
/// `mqtt_topic` and the other MQTT headers instead.
pub const VIA_HEADER: &str = "ingest_via";
pub const VIA_HTTP: &str = "http";

/// Where Kafka put an accepted record.
#[derive(Debug, Clone, Serialize)]
pub struct Accepted {
    pub received_at: DateTime<Utc>,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
}

pub struct HttpIngest {
    producer: FutureProducer,
    topic: String,
    max_payload_bytes: usize,
    delivery_timeout: Duration,
}

impl std::fmt::Debug for HttpIngest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpIngest")
            .field("topic", &self.topic)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("delivery_timeout", &self.delivery_timeout)
            .finish_non_exhaustive()
    }
}

impl HttpIngest {
    /// The durable producer every stage uses, except that it gives up on a record after
    /// `delivery_timeout` instead of never: an HTTP caller is waiting, and a record that Kafka
    /// still took after the caller heard 503 is what makes a retry a duplicate.
    pub fn new(kafka: &KafkaConfig, ingest: &IngestConfig) -> Result<HttpIngest, KafkaError> {
        let mut config = kafka.durable_producer_config();
        if !kafka.properties.contains_key("message.timeout.ms") {
            config.set("message.timeout.ms", ingest.delivery_timeout_ms.to_string());
        }
        Ok(HttpIngest {
            producer: config.create()?,
            topic: kafka.topic.clone(),
            max_payload_bytes: ingest.max_payload_bytes,
            delivery_timeout: ingest.delivery_timeout(),
        })
    }

    pub fn max_payload_bytes(&self) -> usize {
        self.max_payload_bytes
    }

    /// Checks the payload against the contract, produces it, and waits for Kafka's confirmation.
    pub async fn accept(&self, device: &DeviceId, payload: &[u8]) -> Result<Accepted, Problem> {
        if let Err(error) = contract::decode_payload(payload, self.max_payload_bytes) {
            metrics::ingested("invalid");
            return Err(match error {
                contract::PayloadError::TooLarge { max, .. } => Problem::payload_too_large(max),
                error => Problem::invalid_payload(&error),
            });
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let received_at_ms = now.as_millis().to_string();
        let key = device.kafka_key();
        let record = FutureRecord::to(&self.topic)
            .key(&key)
            .payload(payload)
            .headers(
                OwnedHeaders::new_with_capacity(2)
                    .insert(Header {
                        key: header::RECEIVED_AT_MS,
                        value: Some(&received_at_ms),
                    })
                    .insert(Header {
                        key: VIA_HEADER,
                        value: Some(VIA_HTTP),
                    }),
            );
        // librdkafka fails the record itself after `message.timeout.ms`; the outer timeout only
        // guards against a confirmation that never comes back at all.
        let delivery = tokio::time::timeout(
            self.delivery_timeout + Duration::from_secs(5),
            self.producer
                .send(record, Timeout::After(self.delivery_timeout)),
        )
        .await;
        match delivery {
            Ok(Ok(delivered)) => {
                metrics::ingested("accepted");
                Ok(Accepted {
                    received_at: DateTime::from_timestamp_millis(now.as_millis() as i64)
                        .unwrap_or_else(Utc::now),
                    kafka_partition: delivered.partition,
                    kafka_offset: delivered.offset,
                })
            }
            Ok(Err((error, _))) => {
                metrics::ingested("failed");
                tracing::warn!(%error, device = %device, "Kafka did not take an HTTP reading");
                Err(Problem::unavailable(format!(
                    "Kafka did not confirm the reading ({error}); retry"
                )))
            }
            Err(_) => {
                metrics::ingested("failed");
                tracing::warn!(device = %device, "no confirmation from Kafka for an HTTP reading");
                Err(Problem::unavailable(
                    "Kafka did not confirm the reading in time; retry",
                ))
            }
        }
    }

    /// Whether the brokers answer a metadata request for the topic; blocks, so call it from
    /// `spawn_blocking`.
    pub fn probe(&self, timeout: Duration) -> bool {
        self.producer
            .client()
            .fetch_metadata(Some(&self.topic), timeout)
            .is_ok_and(|m| m.topics().iter().any(|t| t.error().is_none()))
    }

    /// Waits for records still in the producer's queue; called on shutdown.
    pub fn flush(&self, timeout: Duration) {
        if let Err(error) = self.producer.flush(timeout) {
            tracing::warn!(%error, "records still unconfirmed at shutdown");
        }
    }
}

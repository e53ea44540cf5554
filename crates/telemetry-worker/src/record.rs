//! What a Kafka record becomes: a row to store, or a dead letter with its reason.
//!
//! Decoding happens as each record is taken from the consumer, so the batch holds only owned,
//! checked rows and the borrowed librdkafka message is released at once.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::Message;
use telemetry_core::contract::{self, header, DeadLetterReason, DeviceId};

/// A record that passed the contract.
#[derive(Debug, Clone)]
pub struct Row {
    pub device_time: Option<DateTime<Utc>>,
    pub received_at: DateTime<Utc>,
    pub device: DeviceId,
    pub seq: Option<i64>,
    /// The payload bytes as produced; valid JSON, stored as `jsonb`.
    pub payload: Vec<u8>,
    pub partition: i32,
    pub offset: i64,
}

/// A record that breaks the contract, kept whole for the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub reason: DeadLetterReason,
    pub detail: String,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub partition: i32,
    pub offset: i64,
}

/// The records taken from Kafka in one go, decoded.
#[derive(Debug, Default)]
pub struct Batch {
    pub rows: Vec<Row>,
    pub dead: Vec<DeadLetter>,
    /// Per partition, the offset after the last record in the batch.
    pub next_offsets: BTreeMap<i32, i64>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.rows.len() + self.dead.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decodes one message into the batch.
    pub fn push(&mut self, message: &BorrowedMessage<'_>, max_payload_bytes: usize) {
        let (partition, offset) = (message.partition(), message.offset());
        self.next_offsets.insert(partition, offset + 1);
        match decode(message, max_payload_bytes) {
            Ok(row) => self.rows.push(row),
            Err((reason, detail)) => self.dead.push(DeadLetter {
                reason,
                detail,
                key: message.key().map(<[u8]>::to_vec),
                payload: message.payload().map(<[u8]>::to_vec),
                headers: message
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default(),
                partition,
                offset,
            }),
        }
    }
}

fn decode(
    message: &BorrowedMessage<'_>,
    max_payload_bytes: usize,
) -> Result<Row, (DeadLetterReason, String)> {
    let device = match message.key() {
        Some(key) => contract::parse_kafka_key(key)
            .map_err(|e| (DeadLetterReason::InvalidKey, format!("record key: {e}")))?,
        None => return Err((DeadLetterReason::InvalidKey, "record has no key".into())),
    };
    let payload = message.payload().unwrap_or_default();
    let telemetry = contract::decode_payload(payload, max_payload_bytes)
        .map_err(|e| (e.reason(), e.to_string()))?;
    let received_at = received_at(message);
    if let Some(device_time) = telemetry.device_time {
        check_not_ahead(device_time, received_at)?;
    }
    Ok(Row {
        device_time: telemetry.device_time,
        received_at,
        device,
        seq: telemetry.seq,
        payload: payload.to_vec(),
        partition: message.partition(),
        offset: message.offset(),
    })
}

/// How far a device's clock may run ahead of the bridge's. Time zones misapplied by a device
/// make at most 14 hours; a reading from further ahead has a clock that was never set right, and
/// storing it would put it beyond every "latest readings" query for years.
pub const MAX_DEVICE_CLOCK_AHEAD: chrono::TimeDelta = chrono::TimeDelta::days(1);

/// Refuses a device time more than [`MAX_DEVICE_CLOCK_AHEAD`] after the bridge received the
/// reading. Measured against the receive time, not the worker's clock, so that a record replayed
/// or redriven later is judged as it was when it arrived.
pub fn check_not_ahead(
    device_time: DateTime<Utc>,
    received_at: DateTime<Utc>,
) -> Result<(), (DeadLetterReason, String)> {
    if device_time - received_at <= MAX_DEVICE_CLOCK_AHEAD {
        return Ok(());
    }
    Err((
        DeadLetterReason::InvalidTimestamp,
        format!(
            "'ts' {} is more than a day after the reading was received ({}); check the device's clock",
            device_time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            received_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        ),
    ))
}

/// The bridge's receive time from the header; else the Kafka timestamp (records produced by
/// other tools); else now. Never fails: a missing header is not the device's fault.
fn received_at(message: &BorrowedMessage<'_>) -> DateTime<Utc> {
    let from_header = message.headers().and_then(|headers| {
        headers
            .iter()
            .find(|h| h.key == header::RECEIVED_AT_MS)
            .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse::<i64>().ok())
    });
    from_header
        .or_else(|| message.timestamp().to_millis())
        .and_then(DateTime::from_timestamp_millis)
        .unwrap_or_else(Utc::now)
}

impl DeadLetter {
    /// The original headers plus the `dlq_*` ones that say why and from where.
    pub fn headers(&self, source_topic: &str) -> OwnedHeaders {
        let mut headers = OwnedHeaders::new_with_capacity(self.headers.len() + 6);
        for (key, value) in &self.headers {
            headers = headers.insert(Header {
                key,
                value: value.as_deref(),
            });
        }
        let partition = self.partition.to_string();
        let offset = self.offset.to_string();
        for (key, value) in [
            (header::DLQ_REASON, self.reason.code()),
            (header::DLQ_DETAIL, self.detail.as_str()),
            (header::DLQ_STAGE, "worker"),
            (header::DLQ_SOURCE_TOPIC, source_topic),
            (header::DLQ_SOURCE_PARTITION, partition.as_str()),
            (header::DLQ_SOURCE_OFFSET, offset.as_str()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        headers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_clock_up_to_a_day_ahead_is_accepted_and_further_is_not() {
        let received = DateTime::from_timestamp_millis(1_764_000_000_000).unwrap();
        assert!(check_not_ahead(received, received).is_ok());
        assert!(check_not_ahead(received - chrono::TimeDelta::days(3650), received).is_ok());
        assert!(check_not_ahead(received + MAX_DEVICE_CLOCK_AHEAD, received).is_ok());
        let (reason, detail) = check_not_ahead(
            received + MAX_DEVICE_CLOCK_AHEAD + chrono::TimeDelta::milliseconds(1),
            received,
        )
        .unwrap_err();
        assert_eq!(reason, DeadLetterReason::InvalidTimestamp);
        assert!(detail.contains("2025-11-25T16:00:00.001Z"), "{detail}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        #[test]
        fn a_device_time_is_refused_exactly_when_it_is_more_than_a_day_ahead(
            received_ms in 0i64..253_402_300_799_999,
            ahead_ms in -1_000_000_000_000i64..1_000_000_000_000,
        ) {
            let received = DateTime::from_timestamp_millis(received_ms).unwrap();
            let device = received + chrono::TimeDelta::milliseconds(ahead_ms);
            let refused = check_not_ahead(device, received).is_err();
            proptest::prop_assert_eq!(refused, ahead_ms > MAX_DEVICE_CLOCK_AHEAD.num_milliseconds());
        }
    }
}

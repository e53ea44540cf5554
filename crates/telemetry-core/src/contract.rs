//! The wire contract: what devices publish, what the bridge produces to Kafka and what the
//! worker accepts. `docs/contract.md` says the same in prose; change both together.
//!
//! The contract is strict on purpose: whatever passes [`parse_telemetry_topic`] and
//! [`decode_payload`] can be stored by the worker without PostgreSQL rejecting it (no NUL bytes
//! in text, no `\u0000` in `jsonb`, timestamps in PostgreSQL's range), so a bad message is caught
//! once, at the edge, with a reason, instead of failing a whole batch later.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};

/// Kafka topic that carries telemetry from the bridge to the workers.
pub const DEFAULT_TOPIC: &str = "iot-stream";
/// Kafka topic that takes messages that break the contract, with the reason in a header.
pub const DEFAULT_DLQ_TOPIC: &str = "iot-stream-dlq";
/// MQTT filter matching every device's telemetry topic.
pub const TELEMETRY_FILTER: &str = "users/+/devices/+/telemetry";
/// Largest payload accepted by default. MQTT allows 256 MiB; a reading is a few hundred bytes, so
/// anything near this is a device bug, not telemetry.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// Longest user or device id, in bytes; keeps keys, topics and index entries small.
pub const MAX_ID_BYTES: usize = 128;
/// Deepest nesting of reading groups (`{"gps":{"lat":1,"lon":2}}` is depth 2).
pub const MAX_READING_DEPTH: usize = 4;

/// Kafka record header names. Values are UTF-8 text.
pub mod header {
    /// The MQTT topic the device published to.
    pub const MQTT_TOPIC: &str = "mqtt_topic";
    /// When the bridge received the message: milliseconds since the Unix epoch, decimal.
    pub const RECEIVED_AT_MS: &str = "received_at_ms";
    /// MQTT QoS of the publish as received: `0`, `1` or `2`.
    pub const MQTT_QOS: &str = "mqtt_qos";
    /// `true` when the broker delivered a retained message.
    pub const MQTT_RETAIN: &str = "mqtt_retain";
    /// `true` when the broker flagged the publish as a possible redelivery.
    pub const MQTT_DUP: &str = "mqtt_dup";

    /// Dead-letter records: a [`super::DeadLetterReason`] code.
    pub const DLQ_REASON: &str = "dlq_reason";
    /// Dead-letter records: the reason in words, with the offending value.
    pub const DLQ_DETAIL: &str = "dlq_detail";
    /// Dead-letter records: which stage rejected it (`bridge` or `worker`).
    pub const DLQ_STAGE: &str = "dlq_stage";
    /// Dead-letter records from the worker: where the original record was.
    pub const DLQ_SOURCE_TOPIC: &str = "dlq_source_topic";
    pub const DLQ_SOURCE_PARTITION: &str = "dlq_source_partition";
    pub const DLQ_SOURCE_OFFSET: &str = "dlq_source_offset";
    /// Dead-letter records with reason `schema_violation`: the JSON Pointer of the value that
    /// broke the schema, and the schema keyword that failed.
    pub const DLQ_SCHEMA_INSTANCE_PATH: &str = "dlq_schema_instance_path";
    pub const DLQ_SCHEMA_KEYWORD: &str = "dlq_schema_keyword";
    /// Dead-letter records the dead-letter topic refused whole: what was dropped (the payload
    /// and its size) and why. Such a letter cannot be redriven; its headers say what to look for.
    pub const DLQ_TRUNCATED: &str = "dlq_truncated";
}

/// One device, as named by its MQTT topic and its Kafka key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId {
    pub user: String,
    pub device: String,
}

impl DeviceId {
    /// Builds an id, checking both parts against the same rules as a topic.
    pub fn new(user: &str, device: &str) -> Result<Self, TopicError> {
        check_segment(user, Segment::User)?;
        check_segment(device, Segment::Device)?;
        Ok(Self {
            user: user.to_owned(),
            device: device.to_owned(),
        })
    }

    /// The Kafka record key: `{user}/{device}`. Keying by device sends all of one device's
    /// readings to one partition, which keeps them in order.
    pub fn kafka_key(&self) -> String {
        format!("{}/{}", self.user, self.device)
    }

    /// Where the device publishes telemetry.
    pub fn telemetry_topic(&self) -> String {
        format!("users/{}/devices/{}/telemetry", self.user, self.device)
    }

    /// Where the device's owner receives alerts.
    pub fn alerts_topic(&self) -> String {
        format!("users/{}/devices/{}/alerts", self.user, self.device)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.user, self.device)
    }
}

/// Which id a topic or key segment holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    User,
    Device,
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Segment::User => "user",
            Segment::Device => "device",
        })
    }
}

/// Why a topic or key is not a device's telemetry topic or key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is not valid UTF-8")]
    NotUtf8,
    #[error("topic '{0}' does not have the form users/{{user}}/devices/{{device}}/telemetry")]
    WrongShape(String),
    #[error("the {0} id is empty")]
    EmptySegment(Segment),
    #[error(
        "the {0} id '{1}' contains an MQTT wildcard ('+' or '#'), which a publish topic may not"
    )]
    Wildcard(Segment, String),
    #[error("the {0} id '{1}' contains a control character")]
    ControlCharacter(Segment, String),
    #[error("the {0} id is {1} bytes long; the limit is {max}", max = MAX_ID_BYTES)]
    TooLong(Segment, usize),
    #[error("key '{0}' does not have the form {{user}}/{{device}}")]
    WrongKey(String),
}

/// Parses `users/{user}/devices/{device}/telemetry`, as bytes because MQTT topics arrive as
/// bytes and a device may send anything.
pub fn parse_telemetry_topic(topic: &[u8]) -> Result<DeviceId, TopicError> {
    let topic = std::str::from_utf8(topic).map_err(|_| TopicError::NotUtf8)?;
    let wrong_shape = || TopicError::WrongShape(topic.to_owned());
    let mut levels = topic.split('/');
    let (Some("users"), Some(user), Some("devices"), Some(device), Some("telemetry"), None) = (
        levels.next(),
        levels.next(),
        levels.next(),
        levels.next(),
        levels.next(),
        levels.next(),
    ) else {
        return Err(wrong_shape());
    };
    DeviceId::new(user, device)
}

/// Parses a Kafka key `{user}/{device}` back into a device id.
pub fn parse_kafka_key(key: &[u8]) -> Result<DeviceId, TopicError> {
    let key = std::str::from_utf8(key).map_err(|_| TopicError::NotUtf8)?;
    match key.split_once('/') {
        Some((user, device)) if !device.contains('/') => DeviceId::new(user, device),
        _ => Err(TopicError::WrongKey(key.to_owned())),
    }
}

fn check_segment(value: &str, segment: Segment) -> Result<(), TopicError> {
    if value.is_empty() {
        return Err(TopicError::EmptySegment(segment));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(TopicError::TooLong(segment, value.len()));
    }
    if value.contains(['+', '#']) {
        return Err(TopicError::Wildcard(segment, value.to_owned()));
    }
    // NUL cannot be stored in PostgreSQL text; other control characters only cause grief in
    // logs and topic names.
    if value.chars().any(char::is_control) {
        return Err(TopicError::ControlCharacter(
            segment,
            value.escape_debug().to_string(),
        ));
    }
    Ok(())
}

/// What the worker needs from a valid payload; the payload itself is stored as it came.
#[derive(Debug, Clone, PartialEq)]
pub struct Telemetry {
    /// Device time (`ts`), when the device sent one.
    pub device_time: Option<DateTime<Utc>>,
    /// Per-device sequence number (`seq`), when the device sent one.
    pub seq: Option<i64>,
    /// How many numeric readings the payload holds (leaves, nested groups included).
    pub readings: usize,
}

/// Why a payload breaks the contract. Each kind has a stable [`DeadLetterReason`] code.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload is {size} bytes; the limit is {max}")]
    TooLarge { size: usize, max: usize },
    #[error("payload is not valid JSON: {0}")]
    NotJson(String),
    #[error("payload is JSON but not an object")]
    NotObject,
    #[error("'ts' {0}")]
    BadTimestamp(String),
    #[error("'seq' {0}")]
    BadSequence(String),
    #[error("reading '{name}' {why}")]
    BadReading { name: String, why: String },
    #[error("payload has no readings: add at least one numeric member besides 'ts' and 'seq'")]
    NoReadings,
}

impl PayloadError {
    pub fn reason(&self) -> DeadLetterReason {
        match self {
            PayloadError::TooLarge { .. } => DeadLetterReason::PayloadTooLarge,
            PayloadError::NotJson(_) => DeadLetterReason::InvalidJson,
            PayloadError::NotObject => DeadLetterReason::NotAnObject,
            PayloadError::BadTimestamp(_) => DeadLetterReason::InvalidTimestamp,
            PayloadError::BadSequence(_) => DeadLetterReason::InvalidSequence,
            PayloadError::BadReading { .. } => DeadLetterReason::InvalidReading,
            PayloadError::NoReadings => DeadLetterReason::NoReadings,
        }
    }
}

/// Stable, machine-readable reasons carried in the `dlq_reason` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterReason {
    InvalidTopic,
    InvalidKey,
    PayloadTooLarge,
    InvalidJson,
    NotAnObject,
    InvalidTimestamp,
    InvalidSequence,
    InvalidReading,
    NoReadings,
    RejectedByDatabase,
    /// The topic has the contract's shape but none of the bridge's routes covers it: a gap in
    /// the configuration rather than a device fault.
    NoMatchingRoute,
    /// The payload is JSON but breaks its bridge route's JSON Schema.
    SchemaViolation,
    /// Kafka refused the record for good (too large for its topic, no right to write to the
    /// topic): the bridge sends it here instead of retrying it forever.
    RejectedByKafka,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 13] = [
        DeadLetterReason::InvalidTopic,
        DeadLetterReason::InvalidKey,
        DeadLetterReason::PayloadTooLarge,
        DeadLetterReason::InvalidJson,
        DeadLetterReason::NotAnObject,
        DeadLetterReason::InvalidTimestamp,
        DeadLetterReason::InvalidSequence,
        DeadLetterReason::InvalidReading,
        DeadLetterReason::NoReadings,
        DeadLetterReason::RejectedByDatabase,
        DeadLetterReason::NoMatchingRoute,
        DeadLetterReason::SchemaViolation,
        DeadLetterReason::RejectedByKafka,
    ];

    pub fn code(self) -> &'static str {
        match self {
            DeadLetterReason::InvalidTopic => "invalid_topic",
            DeadLetterReason::InvalidKey => "invalid_key",
            DeadLetterReason::PayloadTooLarge => "payload_too_large",
            DeadLetterReason::InvalidJson => "invalid_json",
            DeadLetterReason::NotAnObject => "not_an_object",
            DeadLetterReason::InvalidTimestamp => "invalid_timestamp",
            DeadLetterReason::InvalidSequence => "invalid_sequence",
            DeadLetterReason::InvalidReading => "invalid_reading",
            DeadLetterReason::NoReadings => "no_readings",
            DeadLetterReason::RejectedByDatabase => "rejected_by_database",
            DeadLetterReason::NoMatchingRoute => "no_matching_route",
            DeadLetterReason::SchemaViolation => "schema_violation",
            DeadLetterReason::RejectedByKafka => "rejected_by_kafka",
        }
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Checks a payload against the contract without building a JSON tree: one pass over the bytes.
pub fn decode_payload(payload: &[u8], max_bytes: usize) -> Result<Telemetry, PayloadError> {
    if payload.len() > max_bytes {
        return Err(PayloadError::TooLarge {
            size: payload.len(),
            max: max_bytes,
        });
    }
    let mut deserializer = serde_json::Deserializer::from_slice(payload);
    let telemetry = de::Deserializer::deserialize_any(&mut deserializer, PayloadVisitor)
        .map_err(|e| PayloadError::NotJson(e.to_string()))?;
    deserializer
        .end()
        .map_err(|e| PayloadError::NotJson(e.to_string()))?;
    telemetry
}

struct PayloadVisitor;

impl<'de> Visitor<'de> for PayloadVisitor {
    /// The outer `Result` is JSON syntax, the inner one is the contract. Keeping them apart lets
    /// syntax errors keep serde's line and column while contract errors keep their own type.
    type Value = Result<Telemetry, PayloadError>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut verdict: Result<(), PayloadError> = Ok(());
        let mut telemetry = Telemetry {
            device_time: None,
            seq: None,
            readings: 0,
        };
        let mut seen_ts = false;
        let mut seen_seq = false;
        let mut names = Names::default();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if verdict.is_err() {
                // Keep parsing so that broken JSON later on is still reported as broken JSON.
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            verdict = match key.as_ref() {
                "ts" if seen_ts => {
                    map.next_value::<IgnoredAny>()?;
                    Err(PayloadError::BadTimestamp("appears twice".into()))
                }
                "ts" => {
                    seen_ts = true;
                    map.next_value::<Scalar>()?
                        .into_timestamp()
                        .map(|t| telemetry.device_time = Some(t))
                }
                "seq" if seen_seq => {
                    map.next_value::<IgnoredAny>()?;
                    Err(PayloadError::BadSequence("appears twice".into()))
                }
                "seq" => {
                    seen_seq = true;
                    map.next_value::<Scalar>()?
                        .into_sequence()
                        .map(|s| telemetry.seq = Some(s))
                }
                name => {
                    let counted = map.next_value_seed(ReadingSeed { depth: 1 })?;
                    check_member_name(name)
                        .and(names.first_time(&key))
                        .and(counted)
                        .map(|n| telemetry.readings += n)
                        .map_err(|why| PayloadError::BadReading {
                            name: name.escape_debug().to_string(),
                            why,
                        })
                }
            };
        }
        if verdict.is_ok() && telemetry.readings == 0 {
            verdict = Err(PayloadError::NoReadings);
        }
        Ok(verdict.map(|()| telemetry))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Err(PayloadError::NotObject))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Err(PayloadError::NotObject))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Err(PayloadError::NotObject))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Err(PayloadError::NotObject))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Err(PayloadError::NotObject))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Err(PayloadError::NotObject))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Err(PayloadError::NotObject))
    }
}

/// The member names of one object seen so far. `jsonb` (and every JSON library the readers use)
/// keeps only the last of two members with one name, so a payload that names a reading twice
/// would lose one value without a word: it is refused instead.
#[derive(Default)]
struct Names<'de>(std::collections::HashSet<std::borrow::Cow<'de, str>>);

impl<'de> Names<'de> {
    #[allow(clippy::ptr_arg)] // the Cow is cloned into the set, cheaply when it borrows
    fn first_time(&mut self, name: &std::borrow::Cow<'de, str>) -> Result<(), String> {
        if self.0.insert(name.clone()) {
            Ok(())
        } else {
            Err("appears twice; each name holds one reading".into())
        }
    }
}

/// `jsonb` rejects `\u0000` anywhere, so a key holding it would fail the whole COPY.
fn check_member_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("has an empty name".into());
    }
    if name.contains('\0') {
        return Err("has a NUL character in its name".into());
    }
    Ok(())
}

/// A JSON scalar, for `ts` and `seq`.
enum Scalar {
    Int(i128),
    Float(f64),
    Text(String),
    Other(&'static str),
}

impl Scalar {
    fn into_timestamp(self) -> Result<DateTime<Utc>, PayloadError> {
        let bad = |why: String| Err(PayloadError::BadTimestamp(why));
        match self {
            Scalar::Int(ms) => match i64::try_from(ms)
                .ok()
                .and_then(DateTime::from_timestamp_millis)
            {
                Some(t) if t.timestamp() >= 0 && t.year_in_range() => Ok(t),
                _ => bad(format!(
                    "{ms} is not milliseconds since 1970-01-01 before year 10000"
                )),
            },
            Scalar::Text(text) => match DateTime::parse_from_rfc3339(&text) {
                Ok(t) if t.to_utc().year_in_range() => Ok(t.to_utc()),
                Ok(_) => bad(format!("'{text}' is outside years 1970 to 9999")),
                Err(e) => bad(format!(
                    "'{}' is not an RFC 3339 time: {e}",
                    text.escape_debug()
                )),
            },
            Scalar::Float(f) => bad(format!("{f} is not a whole number of milliseconds")),
            Scalar::Other(kind) => bad(format!(
                "is {kind}; expected milliseconds since the epoch or an RFC 3339 string"
            )),
        }
    }

    fn into_sequence(self) -> Result<i64, PayloadError> {
        let bad = |why: String| Err(PayloadError::BadSequence(why));
        match self {
            Scalar::Int(n) => match i64::try_from(n) {
                Ok(n) if n >= 0 => Ok(n),
                _ => bad(format!("{n} is outside 0 to {}", i64::MAX)),
            },
            Scalar::Float(f) => bad(format!("{f} is not a whole number")),
            Scalar::Text(_) => bad("is a string; expected a whole number".into()),
            Scalar::Other(kind) => bad(format!("is {kind}; expected a whole number")),
        }
    }
}

trait YearInRange {
    fn year_in_range(&self) -> bool;
}

impl YearInRange for DateTime<Utc> {
    fn year_in_range(&self) -> bool {
        use chrono::Datelike;
        (1970..=9999).contains(&self.year())
    }
}

impl<'de> de::Deserialize<'de> for Scalar {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl<'de> Visitor<'de> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v.into()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar::Float(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Text(v.to_owned()))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Scalar, E> {
                Ok(Scalar::Other("a boolean"))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar::Other("null"))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other("an array"))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other("an object"))
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

/// Checks one reading (a number, or an object of readings) and counts its numeric leaves.
struct ReadingSeed {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for ReadingSeed {
    /// Inner `Err` is the contract breach in words; see [`PayloadVisitor::Value`].
    type Value = Result<usize, String>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ReadingSeed {
    type Value = Result<usize, String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number or an object of numbers")
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Ok(1))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Ok(1))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Ok(1))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Err("is a boolean; readings are numbers".into()))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Err("is a string; readings are numbers".into()))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Err("is null; leave a missing reading out instead".into()))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Err(
            "is an array; readings are numbers or objects of numbers".into(),
        ))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut verdict = if self.depth >= MAX_READING_DEPTH {
            Err(format!("nests deeper than {MAX_READING_DEPTH} levels"))
        } else {
            Ok(0)
        };
        let mut names = Names::default();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let inner = map.next_value_seed(ReadingSeed {
                depth: self.depth + 1,
            })?;
            if let Ok(total) = verdict {
                verdict = check_member_name(&key)
                    .and(names.first_time(&key))
                    .and(inner)
                    .map(|n| total + n)
                    .map_err(|why| format!("member '{}' {why}", key.escape_debug()));
            }
        }
        Ok(verdict.and_then(|n| match n {
            0 => Err("is an empty object".into()),
            n => Ok(n),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(payload: &str) -> Result<Telemetry, PayloadError> {
        decode_payload(payload.as_bytes(), DEFAULT_MAX_PAYLOAD_BYTES)
    }

    #[test]
    fn a_telemetry_topic_names_its_user_and_device() {
        let id = parse_telemetry_topic(b"users/alice/devices/thermo-1/telemetry").unwrap();
        assert_eq!(
            id,
            DeviceId {
                user: "alice".into(),
                device: "thermo-1".into()
            }
        );
        assert_eq!(id.kafka_key(), "alice/thermo-1");
        assert_eq!(
            id.telemetry_topic(),
            "users/alice/devices/thermo-1/telemetry"
        );
        assert_eq!(id.alerts_topic(), "users/alice/devices/thermo-1/alerts");
    }

    #[test]
    fn topics_with_the_wrong_shape_are_rejected() {
        for topic in [
            "users/alice/devices/thermo-1",
            "users/alice/devices/thermo-1/telemetry/extra",
            "users/alice/devices/thermo-1/alerts",
            "user/alice/devices/thermo-1/telemetry",
            "/users/alice/devices/thermo-1/telemetry",
            "users/alice/devices/thermo-1/telemetry/",
            "users/alice/sensors/thermo-1/telemetry",
            "",
        ] {
            assert_eq!(
                parse_telemetry_topic(topic.as_bytes()),
                Err(TopicError::WrongShape(topic.into())),
                "{topic}"
            );
        }
    }

    #[test]
    fn empty_segments_are_rejected_and_named() {
        assert_eq!(
            parse_telemetry_topic(b"users//devices/d/telemetry"),
            Err(TopicError::EmptySegment(Segment::User))
        );
        assert_eq!(
            parse_telemetry_topic(b"users/u/devices//telemetry"),
            Err(TopicError::EmptySegment(Segment::Device))
        );
    }

    #[test]
    fn wildcards_in_a_publish_topic_are_rejected() {
        assert!(matches!(
            parse_telemetry_topic(b"users/+/devices/d/telemetry"),
            Err(TopicError::Wildcard(Segment::User, _))
        ));
        assert!(matches!(
            parse_telemetry_topic(b"users/u/devices/d#/telemetry"),
            Err(TopicError::Wildcard(Segment::Device, _))
        ));
    }

    #[test]
    fn non_utf8_and_control_characters_are_rejected() {
        assert_eq!(
            parse_telemetry_topic(b"users/\xff/devices/d/telemetry"),
            Err(TopicError::NotUtf8)
        );
        assert!(matches!(
            parse_telemetry_topic(b"users/u\0x/devices/d/telemetry"),
            Err(TopicError::ControlCharacter(Segment::User, _))
        ));
    }

    #[test]
    fn overlong_ids_are_rejected() {
        let long = "d".repeat(MAX_ID_BYTES + 1);
        let topic = format!("users/u/devices/{long}/telemetry");
        assert_eq!(
            parse_telemetry_topic(topic.as_bytes()),
            Err(TopicError::TooLong(Segment::Device, MAX_ID_BYTES + 1))
        );
    }

    #[test]
    fn unicode_ids_are_accepted() {
        let id = parse_telemetry_topic("users/zoë/devices/温度計/telemetry".as_bytes()).unwrap();
        assert_eq!(id.kafka_key(), "zoë/温度計");
    }

    #[test]
    fn kafka_keys_round_trip_and_bad_keys_are_rejected() {
        let id = DeviceId::new("u1", "d1").unwrap();
        assert_eq!(parse_kafka_key(id.kafka_key().as_bytes()), Ok(id));
        assert!(matches!(
            parse_kafka_key(b"u1"),
            Err(TopicError::WrongKey(_))
        ));
        assert!(matches!(
            parse_kafka_key(b"u1/d1/x"),
            Err(TopicError::WrongKey(_))
        ));
        assert_eq!(
            parse_kafka_key(b"/d1"),
            Err(TopicError::EmptySegment(Segment::User))
        );
    }

    #[test]
    fn a_full_payload_decodes() {
        let t =
            decode(r#"{"ts":1764000000123,"seq":42,"temperature":21.5,"gps":{"lat":1,"lon":2}}"#)
                .unwrap();
        assert_eq!(t.seq, Some(42));
        assert_eq!(t.device_time.unwrap().timestamp_millis(), 1_764_000_000_123);
        assert_eq!(t.readings, 3);
    }

    #[test]
    fn ts_and_seq_are_optional_and_ts_may_be_rfc3339() {
        let t = decode(r#"{"v":1}"#).unwrap();
        assert_eq!((t.device_time, t.seq, t.readings), (None, None, 1));
        let t = decode(r#"{"ts":"2026-11-23T10:00:00.5+01:00","v":1}"#).unwrap();
        assert_eq!(
            t.device_time.unwrap().to_rfc3339(),
            "2026-11-23T09:00:00.500+00:00"
        );
    }

    #[test]
    fn each_kind_of_invalid_payload_has_its_own_reason() {
        let cases = [
            ("not json", DeadLetterReason::InvalidJson),
            (r#"{"v":1"#, DeadLetterReason::InvalidJson),
            (r#"{"v":1} trailing"#, DeadLetterReason::InvalidJson),
            (r#"{"v":1e999}"#, DeadLetterReason::InvalidJson),
            (r#"[1,2]"#, DeadLetterReason::NotAnObject),
            (r#"42"#, DeadLetterReason::NotAnObject),
            (
                r#"{"ts":"yesterday","v":1}"#,
                DeadLetterReason::InvalidTimestamp,
            ),
            (r#"{"ts":-5,"v":1}"#, DeadLetterReason::InvalidTimestamp),
            (r#"{"ts":1.5,"v":1}"#, DeadLetterReason::InvalidTimestamp),
            (
                r#"{"ts":1,"ts":2,"v":1}"#,
                DeadLetterReason::InvalidTimestamp,
            ),
            (
                r#"{"ts":99999999999999999,"v":1}"#,
                DeadLetterReason::InvalidTimestamp,
            ),
            (r#"{"seq":-1,"v":1}"#, DeadLetterReason::InvalidSequence),
            (r#"{"seq":"7","v":1}"#, DeadLetterReason::InvalidSequence),
            (
                r#"{"seq":18446744073709551615,"v":1}"#,
                DeadLetterReason::InvalidSequence,
            ),
            (r#"{"v":"hot"}"#, DeadLetterReason::InvalidReading),
            (r#"{"v":null}"#, DeadLetterReason::InvalidReading),
            (r#"{"v":[1,2]}"#, DeadLetterReason::InvalidReading),
            (r#"{"v":{}}"#, DeadLetterReason::InvalidReading),
            (
                r#"{"a":{"b":{"c":{"d":{"e":1}}}}}"#,
                DeadLetterReason::InvalidReading,
            ),
            (r#"{"bad\u0000name":1}"#, DeadLetterReason::InvalidReading),
            (r#"{"":1}"#, DeadLetterReason::InvalidReading),
            (r#"{"v":1,"v":2}"#, DeadLetterReason::InvalidReading),
            (
                r#"{"gps":{"lat":1,"lat":2}}"#,
                DeadLetterReason::InvalidReading,
            ),
            (r#"{"ts":1,"seq":1}"#, DeadLetterReason::NoReadings),
            (r#"{}"#, DeadLetterReason::NoReadings),
        ];
        for (payload, reason) in cases {
            let error = decode(payload).expect_err(payload);
            assert_eq!(error.reason(), reason, "{payload}: {error}");
            assert!(!error.to_string().is_empty());
        }
    }

    #[test]
    fn errors_name_the_offending_member_and_value() {
        let e = decode(r#"{"gps":{"lat":"north"}}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "reading 'gps' member 'lat' is a string; readings are numbers"
        );
        let e = decode(r#"{"seq":-3,"v":1}"#).unwrap_err();
        assert!(e.to_string().contains("-3"), "{e}");
        let e = decode(r#"{"v":1"#).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    #[test]
    fn oversize_payloads_are_rejected_before_parsing() {
        let e = decode_payload(b"{\"v\":1}", 3).unwrap_err();
        assert_eq!(e, PayloadError::TooLarge { size: 7, max: 3 });
        assert_eq!(e.reason(), DeadLetterReason::PayloadTooLarge);
    }

    #[test]
    fn dead_letter_codes_are_unique() {
        let codes: std::collections::HashSet<_> =
            DeadLetterReason::ALL.iter().map(|r| r.code()).collect();
        assert_eq!(codes.len(), DeadLetterReason::ALL.len());
    }

    /// Properties over generated input, a bounded number of cases so `cargo test` stays quick;
    /// `make fuzz` explores the same functions for longer (fuzz/).
    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// An id the contract accepts: printable characters but `/`, `+` and `#`.
        fn id() -> impl Strategy<Value = String> {
            "[^/+#\\p{Cc}]{1,32}".prop_filter("at most MAX_ID_BYTES", |s| s.len() <= MAX_ID_BYTES)
        }

        fn reading() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                any::<i64>().prop_map(serde_json::Value::from),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(3, 16, 4, |inner| {
                prop::collection::btree_map("[a-z]{1,6}", inner, 1..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect()))
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(200))]

            #[test]
            fn any_bytes_as_a_topic_never_panic_and_accepted_topics_round_trip(
                topic in prop::collection::vec(any::<u8>(), 0..80)
            ) {
                if let Ok(id) = parse_telemetry_topic(&topic) {
                    prop_assert_eq!(id.telemetry_topic().into_bytes(), topic);
                    prop_assert_eq!(parse_kafka_key(id.kafka_key().as_bytes()), Ok(id));
                }
            }

            #[test]
            fn every_valid_user_and_device_make_a_topic_and_key_that_parse_back(
                user in id(), device in id()
            ) {
                let id = DeviceId::new(&user, &device).unwrap();
                prop_assert_eq!(parse_telemetry_topic(id.telemetry_topic().as_bytes()), Ok(id.clone()));
                prop_assert_eq!(parse_kafka_key(id.kafka_key().as_bytes()), Ok(id));
            }

            #[test]
            fn any_bytes_as_a_payload_never_panic_and_accepted_payloads_are_json_objects(
                payload in prop::collection::vec(any::<u8>(), 0..200)
            ) {
                if decode_payload(&payload, DEFAULT_MAX_PAYLOAD_BYTES).is_ok() {
                    let value: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                    prop_assert!(value.is_object());
                }
            }

            #[test]
            fn well_formed_payloads_decode_with_their_ts_seq_and_reading_count(
                ts in 0i64..253_402_300_799_999,
                seq in 0i64..=i64::MAX,
                readings in prop::collection::btree_map(
                    "[a-z]{1,8}".prop_filter("ts and seq are not readings", |name| name != "ts" && name != "seq"),
                    reading(),
                    1..6,
                ),
            ) {
                let mut object = serde_json::Map::new();
                object.insert("ts".into(), ts.into());
                object.insert("seq".into(), seq.into());
                fn leaves(value: &serde_json::Value) -> usize {
                    match value {
                        serde_json::Value::Object(m) => m.values().map(leaves).sum(),
                        _ => 1,
                    }
                }
                let expected: usize = readings.values().map(leaves).sum();
                object.extend(readings);
                let payload = serde_json::to_vec(&object).unwrap();
                let t = decode_payload(&payload, usize::MAX).unwrap();
                prop_assert_eq!(t.device_time.map(|t| t.timestamp_millis()), Some(ts));
                prop_assert_eq!(t.seq, Some(seq));
                prop_assert_eq!(t.readings, expected);
            }
        }
    }
}

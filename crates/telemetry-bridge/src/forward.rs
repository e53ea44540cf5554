//! What an MQTT message becomes in Kafka: a telemetry record keyed by device, or a dead letter
//! with the reason. The payload is never rewritten.

use std::time::{SystemTime, UNIX_EPOCH};

use rdkafka::message::{Header, OwnedHeaders};
use rumqttc::{Publish, QoS};
use telemetry_core::contract::{self, header, DeadLetterReason};

/// Where a message goes and with which key and headers.
#[derive(Debug)]
pub struct Outgoing {
    pub topic: Destination,
    pub key: String,
    pub headers: OwnedHeaders,
    pub reason: Option<DeadLetterReason>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Telemetry,
    DeadLetters,
}

/// Maps one MQTT message. Never fails: whatever is wrong with it is said in a dead letter.
pub fn route(publish: &Publish, max_payload_bytes: usize) -> Outgoing {
    let headers = mqtt_headers(publish);
    let checked = contract::parse_telemetry_topic(publish.topic.as_bytes())
        .map_err(|e| (DeadLetterReason::InvalidTopic, e.to_string()))
        .and_then(|device| match publish.payload.len() {
            size if size > max_payload_bytes => Err((
                DeadLetterReason::PayloadTooLarge,
                format!("payload is {size} bytes; the limit is {max_payload_bytes}"),
            )),
            _ => Ok(device),
        });
    match checked {
        Ok(device) => Outgoing {
            topic: Destination::Telemetry,
            key: device.kafka_key(),
            headers,
            reason: None,
        },
        Err((reason, detail)) => Outgoing {
            topic: Destination::DeadLetters,
            key: publish.topic.clone(),
            headers: headers
                .insert(Header {
                    key: header::DLQ_REASON,
                    value: Some(reason.code()),
                })
                .insert(Header {
                    key: header::DLQ_DETAIL,
                    value: Some(&detail),
                })
                .insert(Header {
                    key: header::DLQ_STAGE,
                    value: Some("bridge"),
                }),
            reason: Some(reason),
        },
    }
}

fn mqtt_headers(publish: &Publish) -> OwnedHeaders {
    let received_at_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
        .to_string();
    let qos = match publish.qos {
        QoS::AtMostOnce => "0",
        QoS::AtLeastOnce => "1",
        QoS::ExactlyOnce => "2",
    };
    OwnedHeaders::new_with_capacity(8)
        .insert(Header {
            key: header::MQTT_TOPIC,
            value: Some(&publish.topic),
        })
        .insert(Header {
            key: header::RECEIVED_AT_MS,
            value: Some(&received_at_ms),
        })
        .insert(Header {
            key: header::MQTT_QOS,
            value: Some(qos),
        })
        .insert(Header {
            key: header::MQTT_RETAIN,
            value: Some(bool_text(publish.retain)),
        })
        .insert(Header {
            key: header::MQTT_DUP,
            value: Some(bool_text(publish.dup)),
        })
}

fn bool_text(value: bool) -> &'static str {
    if value {
        "true"
    } else {
        "false"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    fn header_value<'a>(headers: &'a OwnedHeaders, key: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|h| h.key == key)
            .and_then(|h| std::str::from_utf8(h.value?).ok())
    }

    #[test]
    fn a_device_message_is_keyed_by_user_and_device_with_mqtt_headers() {
        let publish = Publish::new(
            "users/u1/devices/d1/telemetry",
            QoS::AtLeastOnce,
            b"{\"v\":1}".to_vec(),
        );
        let out = route(&publish, 1024);
        assert_eq!(out.topic, Destination::Telemetry);
        assert_eq!(out.key, "u1/d1");
        assert_eq!(
            header_value(&out.headers, header::MQTT_TOPIC),
            Some("users/u1/devices/d1/telemetry")
        );
        assert_eq!(header_value(&out.headers, header::MQTT_QOS), Some("1"));
        assert_eq!(
            header_value(&out.headers, header::MQTT_RETAIN),
            Some("false")
        );
        let received: u128 = header_value(&out.headers, header::RECEIVED_AT_MS)
            .unwrap()
            .parse()
            .unwrap();
        assert!(received > 1_700_000_000_000);
    }

    #[test]
    fn a_bad_topic_and_an_oversize_payload_become_dead_letters_with_reasons() {
        let bad_topic = Publish::new("users/u1/telemetry", QoS::AtLeastOnce, b"{}".to_vec());
        let out = route(&bad_topic, 1024);
        assert_eq!(out.topic, Destination::DeadLetters);
        assert_eq!(
            header_value(&out.headers, header::DLQ_REASON),
            Some("invalid_topic")
        );
        assert_eq!(
            header_value(&out.headers, header::DLQ_STAGE),
            Some("bridge")
        );
        let big = Publish::new(
            "users/u1/devices/d1/telemetry",
            QoS::AtLeastOnce,
            vec![b' '; 2048],
        );
        let out = route(&big, 1024);
        assert_eq!(
            header_value(&out.headers, header::DLQ_REASON),
            Some("payload_too_large")
        );
        assert!(header_value(&out.headers, header::DLQ_DETAIL)
            .unwrap()
            .contains("2048"));
    }
}

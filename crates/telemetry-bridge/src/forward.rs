//! What an MQTT message becomes in Kafka: a record on its route's topic, keyed as the route
//! says, or a dead letter with the reason. The payload is never rewritten, and nothing a
//! device sends can make this fail: whatever is wrong with a message is said in a dead letter.
//!
//! Checks, in order: the topic has a route (else `invalid_topic` when it breaks the contract's
//! topic shape, `no_matching_route` when it does not); a record for the telemetry topic has the
//! contract's key `{user}/{device}` (`invalid_topic`); the payload fits `max_payload_bytes`
//! (`payload_too_large`); the payload satisfies the route's JSON Schema (`invalid_json`,
//! `schema_violation`).

use std::time::{SystemTime, UNIX_EPOCH};

use rdkafka::message::{Header, OwnedHeaders};
use rumqttc::v5::mqttbytes::v5::Publish;
use rumqttc::v5::mqttbytes::QoS;
use telemetry_core::contract::{self, header, DeadLetterReason};

use crate::route::Router;
use crate::schema::Rejection;

/// Value of the `dlq_stage` header on the bridge's dead letters.
pub const STAGE: &str = "bridge";

/// Every reason the bridge can give a dead letter.
pub const REASONS: [DeadLetterReason; 6] = [
    DeadLetterReason::InvalidTopic,
    DeadLetterReason::PayloadTooLarge,
    DeadLetterReason::InvalidJson,
    DeadLetterReason::NoMatchingRoute,
    DeadLetterReason::SchemaViolation,
    DeadLetterReason::RejectedByKafka,
];

/// Where a message goes, with which key and headers.
#[derive(Debug)]
pub struct Outgoing<'r> {
    /// The Kafka topic: the route's, or the dead-letter topic.
    pub topic: &'r str,
    pub key: String,
    pub headers: OwnedHeaders,
    /// Set for dead letters.
    pub reason: Option<DeadLetterReason>,
}

/// A dead letter in the making.
struct Refusal {
    reason: DeadLetterReason,
    detail: String,
    schema: Option<(String, String)>,
}

impl Refusal {
    fn new(reason: DeadLetterReason, detail: String) -> Self {
        Refusal {
            reason,
            detail,
            schema: None,
        }
    }
}

/// Maps one MQTT message.
pub fn route<'r>(
    publish: &Publish,
    router: &'r Router,
    max_payload_bytes: usize,
    dlq_topic: &'r str,
) -> Outgoing<'r> {
    let topic = String::from_utf8_lossy(&publish.topic);
    let headers = mqtt_headers(publish, &topic);
    match check(publish, &topic, router, max_payload_bytes) {
        Ok((kafka_topic, key)) => Outgoing {
            topic: kafka_topic,
            key,
            headers,
            reason: None,
        },
        Err(refusal) => {
            let mut headers = headers
                .insert(Header {
                    key: header::DLQ_REASON,
                    value: Some(refusal.reason.code()),
                })
                .insert(Header {
                    key: header::DLQ_DETAIL,
                    value: Some(&refusal.detail),
                })
                .insert(Header {
                    key: header::DLQ_STAGE,
                    value: Some(STAGE),
                });
            if let Some((instance_path, keyword)) = &refusal.schema {
                headers = headers
                    .insert(Header {
                        key: header::DLQ_SCHEMA_INSTANCE_PATH,
                        value: Some(instance_path),
                    })
                    .insert(Header {
                        key: header::DLQ_SCHEMA_KEYWORD,
                        value: Some(keyword),
                    });
            }
            Outgoing {
                topic: dlq_topic,
                // The topic names the device even when no key could be made from it.
                key: topic.into_owned(),
                headers,
                reason: Some(refusal.reason),
            }
        }
    }
}

/// The headers of the dead letter for a message Kafka refused for good on `refused_topic`;
/// `truncated` when the dead-letter topic refused the whole letter too and it goes without its
/// payload.
pub fn refused_by_kafka_headers(
    publish: &Publish,
    refused_topic: &str,
    error: &str,
    truncated: Option<&str>,
) -> OwnedHeaders {
    let topic = String::from_utf8_lossy(&publish.topic);
    let detail = format!("Kafka refused the record for topic '{refused_topic}' for good: {error}");
    let mut headers = mqtt_headers(publish, &topic)
        .insert(Header {
            key: header::DLQ_REASON,
            value: Some(DeadLetterReason::RejectedByKafka.code()),
        })
        .insert(Header {
            key: header::DLQ_DETAIL,
            value: Some(&detail),
        })
        .insert(Header {
            key: header::DLQ_STAGE,
            value: Some(STAGE),
        });
    if let Some(note) = truncated {
        headers = headers.insert(Header {
            key: header::DLQ_TRUNCATED,
            value: Some(note),
        });
    }
    headers
}

fn check<'r>(
    publish: &Publish,
    topic: &str,
    router: &'r Router,
    max_payload_bytes: usize,
) -> Result<(&'r str, String), Refusal> {
    let invalid_topic = |detail: String| Refusal::new(DeadLetterReason::InvalidTopic, detail);
    if std::str::from_utf8(&publish.topic).is_err() {
        return Err(invalid_topic("topic is not valid UTF-8".into()));
    }
    let mut captures = Vec::with_capacity(4);
    let Some(route) = router.find(topic, &mut captures) else {
        return Err(match contract::parse_telemetry_topic(topic.as_bytes()) {
            Err(error) => invalid_topic(format!("{error}, and no route matches it")),
            Ok(_) => Refusal::new(
                DeadLetterReason::NoMatchingRoute,
                format!("no route matches topic '{topic}'; add one to `routes`"),
            ),
        });
    };
    let key = route.key.render(&captures);
    if route.contract {
        contract::parse_kafka_key(key.as_bytes())
            .map_err(|error| invalid_topic(format!("topic '{topic}': {error}")))?;
    }
    let size = publish.payload.len();
    if size > max_payload_bytes {
        return Err(Refusal::new(
            DeadLetterReason::PayloadTooLarge,
            format!("payload is {size} bytes; the limit is {max_payload_bytes}"),
        ));
    }
    if let Some(schema) = &route.schema {
        match schema.check(&publish.payload) {
            Ok(()) => {}
            Err(Rejection::NotJson(error)) => {
                return Err(Refusal::new(
                    DeadLetterReason::InvalidJson,
                    format!(
                        "payload is not valid JSON ({error}); schema {} needs JSON",
                        schema.name()
                    ),
                ))
            }
            Err(Rejection::Violation {
                instance_path,
                keyword,
                message,
            }) => {
                let location = if instance_path.is_empty() {
                    "the payload".to_owned()
                } else {
                    format!("'{instance_path}'")
                };
                let mut refusal = Refusal::new(
                    DeadLetterReason::SchemaViolation,
                    format!(
                        "schema {} refused {location} (keyword '{keyword}'): {message}",
                        schema.name()
                    ),
                );
                refusal.schema = Some((instance_path, keyword));
                return Err(refusal);
            }
        }
    }
    Ok((route.topic.as_str(), key))
}

fn mqtt_headers(publish: &Publish, topic: &str) -> OwnedHeaders {
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
    OwnedHeaders::new_with_capacity(10)
        .insert(Header {
            key: header::MQTT_TOPIC,
            value: Some(topic),
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
    use crate::config::RouteConfig;
    use rdkafka::message::Headers;
    use telemetry_core::kafka::KafkaConfig;

    const DLQ: &str = "dlq";

    fn header_value<'a>(headers: &'a OwnedHeaders, key: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|h| h.key == key)
            .and_then(|h| std::str::from_utf8(h.value?).ok())
    }

    fn publish(topic: &str, payload: &[u8]) -> Publish {
        Publish::new(topic, QoS::AtLeastOnce, payload.to_vec(), None)
    }

    fn router(routes: &[RouteConfig]) -> Router {
        Router::new(routes, &KafkaConfig::default()).unwrap()
    }

    #[test]
    fn a_device_message_is_keyed_by_user_and_device_with_mqtt_headers() {
        let router = router(&[RouteConfig::telemetry()]);
        let out = route(
            &publish("users/u1/devices/d1/telemetry", b"{\"v\":1}"),
            &router,
            1024,
            DLQ,
        );
        assert_eq!(out.topic, KafkaConfig::default().topic);
        assert_eq!(out.key, "u1/d1");
        assert_eq!(out.reason, None);
        assert_eq!(
            header_value(&out.headers, header::MQTT_TOPIC),
            Some("users/u1/devices/d1/telemetry")
        );
        assert_eq!(header_value(&out.headers, header::MQTT_QOS), Some("1"));
        assert_eq!(
            header_value(&out.headers, header::MQTT_RETAIN),
            Some("false")
        );
        assert_eq!(header_value(&out.headers, header::MQTT_DUP), Some("false"));
        let received: u128 = header_value(&out.headers, header::RECEIVED_AT_MS)
            .unwrap()
            .parse()
            .unwrap();
        assert!(received > 1_700_000_000_000);
    }

    #[test]
    fn each_kind_of_bad_input_becomes_a_dead_letter_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let schema = dir.path().join("reading.json");
        std::fs::write(
            &schema,
            r#"{"type":"object","required":["v"],"properties":{"v":{"maximum":10}}}"#,
        )
        .unwrap();
        let strict = RouteConfig {
            filter: "users/strict/devices/+/telemetry".into(),
            topic: None,
            key: "strict/{1}".into(),
            schema: Some(schema),
        };
        let narrow = RouteConfig {
            filter: "users/+/devices/only-this/telemetry".into(),
            topic: None,
            key: "{1}/only-this".into(),
            schema: None,
        };
        let router = router(&[strict, narrow, RouteConfig::telemetry()]);
        let cases: [(&str, &[u8], &str, &str); 6] = [
            (
                "users/u1/telemetry",
                b"{}",
                "invalid_topic",
                "users/u1/telemetry",
            ),
            (
                "users//devices/d1/telemetry",
                b"{}",
                "invalid_topic",
                "user id is empty",
            ),
            (
                "users/u1/devices/d1/telemetry",
                &[b' '; 2048],
                "payload_too_large",
                "2048",
            ),
            (
                "users/strict/devices/d1/telemetry",
                b"nope",
                "invalid_json",
                "reading.json",
            ),
            (
                "users/strict/devices/d1/telemetry",
                br#"{"v":11}"#,
                "schema_violation",
                "'/v'",
            ),
            (
                "users/strict/devices/d1/telemetry",
                br#"{"w":1}"#,
                "schema_violation",
                "required",
            ),
        ];
        for (topic, payload, reason, detail) in cases {
            let out = route(&publish(topic, payload), &router, 1024, DLQ);
            assert_eq!(out.topic, DLQ, "{topic}");
            assert_eq!(out.key, topic);
            assert_eq!(header_value(&out.headers, header::DLQ_REASON), Some(reason));
            assert_eq!(
                header_value(&out.headers, header::DLQ_STAGE),
                Some("bridge")
            );
            assert_eq!(header_value(&out.headers, header::MQTT_TOPIC), Some(topic));
            let got = header_value(&out.headers, header::DLQ_DETAIL).unwrap();
            assert!(got.contains(detail), "{reason}: {got}");
        }
        let out = route(
            &publish("users/strict/devices/d1/telemetry", br#"{"v":11}"#),
            &router,
            1024,
            DLQ,
        );
        assert_eq!(
            header_value(&out.headers, header::DLQ_SCHEMA_INSTANCE_PATH),
            Some("/v")
        );
        assert_eq!(
            header_value(&out.headers, header::DLQ_SCHEMA_KEYWORD),
            Some("maximum")
        );

        let only_narrow = super::tests::router(&[RouteConfig {
            filter: "users/+/devices/only-this/telemetry".into(),
            topic: None,
            key: "{1}/only-this".into(),
            schema: None,
        }]);
        let out = route(
            &publish("users/u1/devices/other/telemetry", b"{}"),
            &only_narrow,
            1024,
            DLQ,
        );
        assert_eq!(
            header_value(&out.headers, header::DLQ_REASON),
            Some("no_matching_route")
        );
        let out = route(&publish("factory/line-1", b"{}"), &only_narrow, 1024, DLQ);
        assert_eq!(
            header_value(&out.headers, header::DLQ_REASON),
            Some("invalid_topic"),
            "a topic outside the contract with no route is the device's fault"
        );
    }

    #[test]
    fn a_route_to_another_topic_may_use_any_key() {
        let legacy = RouteConfig {
            filter: "legacy/#".into(),
            topic: Some("legacy-stream".into()),
            key: "{1}".into(),
            schema: None,
        };
        let router = router(&[legacy]);
        let out = route(&publish("legacy/a/b/c", b"x"), &router, 1024, DLQ);
        assert_eq!((out.topic, out.key.as_str()), ("legacy-stream", "a/b/c"));
    }

    #[test]
    fn the_bridge_gives_only_contract_reasons() {
        for reason in REASONS {
            assert!(DeadLetterReason::ALL.contains(&reason), "{reason}");
        }
    }
}

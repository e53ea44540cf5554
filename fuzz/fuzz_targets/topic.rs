//! Any MQTT topic and payload through the bridge's routing (`forward::route`): it never panics,
//! a message it forwards to the telemetry topic has a topic and key that follow the contract,
//! and the contract's topic parser agrees with the bridge's filter.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rdkafka::message::Headers;
use rumqttc::v5::mqttbytes::v5::Publish;
use rumqttc::v5::mqttbytes::QoS;
use telemetry_bridge::config::RouteConfig;
use telemetry_bridge::forward;
use telemetry_bridge::route::{Filter, Router};
use telemetry_core::contract::{self, header, TELEMETRY_FILTER};
use telemetry_core::kafka::KafkaConfig;

const DLQ: &str = "dlq";
const MAX_PAYLOAD: usize = 1024;

fn router() -> &'static (Router, KafkaConfig) {
    static ROUTER: OnceLock<(Router, KafkaConfig)> = OnceLock::new();
    ROUTER.get_or_init(|| {
        let kafka = KafkaConfig::default();
        let legacy = RouteConfig {
            filter: "legacy/#".into(),
            topic: Some("legacy".into()),
            key: "{1}".into(),
            schema: None,
        };
        let router = Router::new(&[RouteConfig::telemetry(), legacy], &kafka).unwrap();
        (router, kafka)
    })
}

fuzz_target!(|input: (&[u8], &[u8])| {
    let (topic, payload) = input;
    let (router, kafka) = router();
    let mut publish = Publish::new("", QoS::AtLeastOnce, payload.to_vec(), None);
    publish.topic = bytes::Bytes::copy_from_slice(topic);
    let out = forward::route(&publish, router, MAX_PAYLOAD, DLQ);

    let parsed = contract::parse_telemetry_topic(topic);
    if out.topic == kafka.topic {
        assert!(out.reason.is_none());
        let id = parsed
            .clone()
            .expect("forwarded a topic the contract refuses");
        assert_eq!(id.telemetry_topic().as_bytes(), topic);
        assert_eq!(contract::parse_kafka_key(out.key.as_bytes()), Ok(id));
        assert!(payload.len() <= MAX_PAYLOAD);
    } else if out.topic == DLQ {
        let reason = out.reason.expect("a dead letter has a reason");
        let code = out
            .headers
            .iter()
            .find(|h| h.key == header::DLQ_REASON)
            .and_then(|h| h.value)
            .expect("dlq_reason header");
        assert_eq!(code, reason.code().as_bytes());
        assert!(forward::REASONS.contains(&reason));
    }
    if let Ok(id) = &parsed {
        let text = std::str::from_utf8(topic).unwrap();
        let mut captures = Vec::new();
        assert!(Filter::parse(TELEMETRY_FILTER)
            .unwrap()
            .matches(text, &mut captures));
        assert_eq!(captures, [id.user.as_str(), id.device.as_str()]);
        assert_eq!(out.topic, kafka.topic, "a contract topic must be forwarded");
    }
    // Filters too: parsing any text never panics, and a filter matches its own topic when it
    // has no wildcards.
    if let Ok(text) = std::str::from_utf8(topic) {
        if let Ok(filter) = Filter::parse(text) {
            if filter.wildcards() == 0 && !text.starts_with('$') {
                assert!(filter.matches(text, &mut Vec::new()), "{text:?}");
            }
        }
    }
});

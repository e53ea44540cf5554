//! Routes and dead letters end to end on the shared Mosquitto and Kafka: where each message
//! lands, with which key and headers, and why a bad one was refused.

mod common;

use std::time::Duration;

use common::{bridge_config, read_topic, topics, InProcess, Record};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use telemetry_bridge::config::RouteConfig;
use telemetry_core::contract::header;
use test_servers::{shared, unique_name};

/// Publishes each message with QoS 1 (retained where asked) and waits for every PUBACK.
async fn publish(messages: &[(String, Vec<u8>, bool)]) {
    let servers = shared();
    let mut options = MqttOptions::new(
        unique_name("device"),
        servers.mosquitto.host(),
        servers.mosquitto.port(),
    );
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    for (topic, payload, retain) in messages {
        client
            .publish(topic, QoS::AtLeastOnce, *retain, payload.clone())
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < messages.len() {
        let event = tokio::time::timeout(Duration::from_secs(30), eventloop.poll())
            .await
            .expect("PUBACKs within 30 s")
            .expect("MQTT connection");
        if let Event::Incoming(Packet::PubAck(_)) = event {
            acked += 1;
        }
    }
    client.disconnect().await.unwrap();
}

fn by_reason(letters: &[Record], reason: &str) -> Vec<Record> {
    letters
        .iter()
        .filter(|l| l.headers.get(header::DLQ_REASON).map(String::as_str) == Some(reason))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_bad_input_reaches_the_dead_letter_topic_with_its_reason_and_the_bridge_carries_on(
) {
    let servers = shared();
    let kafka = topics(&servers.kafka, 1);
    let user = unique_name("u");
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("thermometer.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "required": ["temperature"],
            "properties": {"temperature": {"type": "number", "maximum": 100}}}"#,
    )
    .unwrap();
    // Another user's telemetry reaches the bridge, but no route takes it.
    let other = unique_name("u");
    let mut config = bridge_config(
        &kafka,
        servers.mosquitto.port(),
        vec![
            format!("users/{user}/#"),
            format!("users/{other}/devices/+/telemetry"),
        ],
    );
    config.max_payload_bytes = 1024;
    config.routes = vec![RouteConfig {
        filter: format!("users/{user}/devices/+/telemetry"),
        topic: None,
        key: format!("{user}/{{1}}"),
        schema: Some(schema),
    }];
    let bridge = InProcess::start(config);
    bridge.wait_ready().await;

    let telemetry = |device: &str| format!("users/{user}/devices/{device}/telemetry");
    publish(&[
        (telemetry("d1"), br#"{"temperature": 21.5}"#.to_vec(), false),
        (
            format!("users/{other}/devices/d9/telemetry"),
            b"{\"v\":1}".to_vec(),
            false,
        ),
        (
            format!("users/{user}/oops/telemetry"),
            b"{}".to_vec(),
            false,
        ),
        (telemetry("d1"), vec![b' '; 2000], false),
        (telemetry("d1"), b"not json".to_vec(), false),
        (telemetry("d1"), br#"{"temperature": 150}"#.to_vec(), false),
        (telemetry("d2"), br#"{"temperature": 22.5}"#.to_vec(), true),
    ])
    .await;

    let records = read_topic(&kafka, &kafka.topic, Duration::from_secs(60), |r| {
        r.len() >= 2
    });
    let letters = read_topic(&kafka, &kafka.dlq_topic, Duration::from_secs(60), |r| {
        r.len() >= 5
    });
    bridge.stop().await;

    let keys: Vec<&str> = records.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, [format!("{user}/d1"), format!("{user}/d2")]);
    // MQTT 5 clears the retain flag of a live message unless the subscription asks to keep it.
    assert_eq!(records[1].headers[header::MQTT_RETAIN], "false");
    assert_eq!(letters.len(), 5, "{letters:#?}");
    for letter in &letters {
        assert_eq!(letter.headers[header::DLQ_STAGE], "bridge");
        assert_eq!(
            letter.key,
            letter.headers[header::MQTT_TOPIC],
            "the key names the topic"
        );
    }

    let [no_route] = &by_reason(&letters, "no_matching_route")[..] else {
        panic!("one no_matching_route letter: {letters:#?}")
    };
    assert_eq!(no_route.key, format!("users/{other}/devices/d9/telemetry"));
    assert!(no_route.headers[header::DLQ_DETAIL].contains("no route"));

    let [invalid_topic] = &by_reason(&letters, "invalid_topic")[..] else {
        panic!("one invalid_topic letter: {letters:#?}")
    };
    assert!(invalid_topic.headers[header::DLQ_DETAIL].contains("oops"));

    let [too_large] = &by_reason(&letters, "payload_too_large")[..] else {
        panic!("one payload_too_large letter: {letters:#?}")
    };
    assert_eq!(too_large.payload.len(), 2000, "the payload is kept");
    assert!(too_large.headers[header::DLQ_DETAIL].contains("1024"));

    let [not_json] = &by_reason(&letters, "invalid_json")[..] else {
        panic!("one invalid_json letter: {letters:#?}")
    };
    assert_eq!(not_json.payload, "not json");

    let [violation] = &by_reason(&letters, "schema_violation")[..] else {
        panic!("one schema_violation letter: {letters:#?}")
    };
    assert_eq!(
        violation.headers[header::DLQ_SCHEMA_INSTANCE_PATH],
        "/temperature"
    );
    assert_eq!(violation.headers[header::DLQ_SCHEMA_KEYWORD], "maximum");
    assert!(
        violation.headers[header::DLQ_DETAIL].contains("thermometer.json"),
        "{:?}",
        violation.headers
    );
}

/// A record Kafka refuses for good (here larger than the producer's `message.max.bytes`, which
/// librdkafka enforces with the broker's error; Tansu does not enforce a topic's limit) must
/// neither stop the bridge nor hold up the messages behind it: it goes to the dead-letter
/// topic, without its payload when that topic refuses it whole too, and is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_kafka_refuses_for_good_is_dead_lettered_acknowledged_and_the_rest_flows() {
    let servers = shared();
    let kafka = topics(&servers.kafka, 1);
    let user = unique_name("u");
    let mut config = bridge_config(
        &kafka,
        servers.mosquitto.port(),
        vec![format!("users/{user}/#")],
    );
    config
        .kafka
        .properties
        .insert("message.max.bytes".into(), "1000".into());
    let bridge = InProcess::start(config);
    bridge.wait_ready().await;

    let telemetry = |device: &str| format!("users/{user}/devices/{device}/telemetry");
    let huge = format!(r#"{{"v":1.{}1}}"#, "0".repeat(2000));
    // Every PUBACK comes: the refused message is acknowledged, the one behind it too.
    publish(&[
        (telemetry("d1"), br#"{"v":1}"#.to_vec(), false),
        (telemetry("d1"), huge.clone().into_bytes(), false),
        (telemetry("d2"), br#"{"v":2}"#.to_vec(), false),
    ])
    .await;
    let records = read_topic(&kafka, &kafka.topic, Duration::from_secs(60), |r| {
        r.len() >= 2
    });
    let letters = read_topic(&kafka, &kafka.dlq_topic, Duration::from_secs(60), |r| {
        !r.is_empty()
    });
    bridge.stop().await;

    let keys: Vec<&str> = records.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, [format!("{user}/d1"), format!("{user}/d2")]);
    let [letter] = &letters[..] else {
        panic!("one dead letter: {letters:#?}")
    };
    assert_eq!(letter.headers[header::DLQ_REASON], "rejected_by_kafka");
    assert_eq!(letter.headers[header::MQTT_TOPIC], telemetry("d1"));
    assert!(
        letter.headers[header::DLQ_DETAIL].contains(&kafka.topic),
        "{:?}",
        letter.headers
    );
    assert_eq!(
        letter.payload, "",
        "the dead-letter topic refused it whole too"
    );
    let note = &letter.headers[header::DLQ_TRUNCATED];
    assert!(
        note.contains(&format!("{} bytes", huge.len())) && note.contains("max.message.bytes"),
        "{note}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_send_each_topic_to_its_kafka_topic_and_key_exact_filters_first() {
    let servers = shared();
    let kafka = topics(&servers.kafka, 2);
    let vip_topic = unique_name("vip");
    servers.kafka.create_topic(&vip_topic, 1).unwrap();
    let plant_topic = unique_name("plant");
    servers.kafka.create_topic(&plant_topic, 1).unwrap();
    let user = unique_name("u");
    let plant = unique_name("plant");
    let mut config = bridge_config(
        &kafka,
        servers.mosquitto.port(),
        vec![
            format!("users/{user}/devices/+/telemetry"),
            format!("{plant}/#"),
        ],
    );
    config.routes = vec![
        RouteConfig::telemetry(),
        RouteConfig {
            filter: format!("{plant}/#"),
            topic: Some(plant_topic.clone()),
            key: "line-{1}".into(),
            schema: None,
        },
        // Listed last, still wins for its one topic: exact filters are tried first.
        RouteConfig {
            filter: format!("users/{user}/devices/vip/telemetry"),
            topic: Some(vip_topic.clone()),
            key: "vip".into(),
            schema: None,
        },
    ];
    let bridge = InProcess::start(config);
    bridge.wait_ready().await;

    publish(&[
        (
            format!("users/{user}/devices/d1/telemetry"),
            b"{\"v\":1}".to_vec(),
            false,
        ),
        (
            format!("users/{user}/devices/vip/telemetry"),
            b"{\"v\":2}".to_vec(),
            false,
        ),
        (format!("{plant}/a/b"), b"raw bytes".to_vec(), false),
    ])
    .await;

    let telemetry = read_topic(&kafka, &kafka.topic, Duration::from_secs(60), |r| {
        !r.is_empty()
    });
    let vip = read_topic(&kafka, &vip_topic, Duration::from_secs(60), |r| {
        !r.is_empty()
    });
    let plants = read_topic(&kafka, &plant_topic, Duration::from_secs(60), |r| {
        !r.is_empty()
    });
    bridge.stop().await;

    assert_eq!(telemetry.len(), 1);
    assert_eq!(telemetry[0].key, format!("{user}/d1"));
    assert_eq!(
        telemetry[0].payload, "{\"v\":1}",
        "the payload is not rewritten"
    );
    let headers = &telemetry[0].headers;
    assert_eq!(
        headers[header::MQTT_TOPIC],
        format!("users/{user}/devices/d1/telemetry")
    );
    assert_eq!(headers[header::MQTT_QOS], "1");
    assert_eq!(headers[header::MQTT_RETAIN], "false");
    assert_eq!(headers[header::MQTT_DUP], "false");
    assert!(headers[header::RECEIVED_AT_MS].parse::<u64>().unwrap() > 1_700_000_000_000);

    assert_eq!((vip.len(), vip[0].key.as_str()), (1, "vip"));
    assert_eq!((plants.len(), plants[0].key.as_str()), (1, "line-a/b"));
    assert_eq!(plants[0].payload, "raw bytes");
}

//! The worker on real servers: records produced to Kafka as the bridge would, stored through
//! PgBouncer, bad ones dead-lettered with their reason.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::message::OwnedHeaders;
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use support::{Fixture, Record};
use telemetry_core::contract::header;
use test_servers::unique_name;

const A_MINUTE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_consumed_again_by_another_group_are_not_stored_twice() {
    let fixture = Fixture::new(2);
    let records = fixture.records(200, 4);
    fixture.produce(&records).await;
    let first = fixture.start_worker(&unique_name("group"));
    assert_eq!(fixture.wait_for_rows(200, A_MINUTE).await, 200);
    first.stop().await;

    // A new group has no committed offsets, exactly like an offset reset to the beginning.
    let second = fixture.start_worker(&unique_name("group"));
    let one_more = Record {
        key: fixture.key(9),
        payload: r#"{"seq":0,"v":1}"#.into(),
        received_at_ms: None,
    };
    fixture.produce(std::slice::from_ref(&one_more)).await;
    assert_eq!(fixture.wait_for_rows(201, A_MINUTE).await, 201);
    second.stop().await;
    let mut all = records;
    all.push(one_more);
    fixture.assert_stored_exactly_once(&all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_postgres_rejects_is_dead_lettered_alone_and_the_rest_of_its_batch_is_stored() {
    let fixture = Fixture::new(1);
    fixture.migrate().await;
    fixture
        .database()
        .await
        .batch_execute(
            "ALTER TABLE raw_telemetry ADD CONSTRAINT seq_below_a_million CHECK (seq < 1000000)",
        )
        .await
        .unwrap();
    let mut records = fixture.records(99, 1);
    let bad = Record {
        key: fixture.key(0),
        payload: r#"{"seq":5000000,"v":1}"#.into(),
        received_at_ms: None,
    };
    records.insert(37, bad);
    fixture.produce(&records).await;

    let worker = fixture.start_worker(&unique_name("group"));
    assert_eq!(fixture.wait_for_rows(99, A_MINUTE).await, 99);
    let letters = fixture.read_dead_letters(1);
    assert_eq!(letters[0][header::DLQ_REASON], "rejected_by_database");
    assert!(
        letters[0][header::DLQ_DETAIL].contains("seq_below_a_million"),
        "{:?}",
        letters[0]
    );
    assert_eq!(letters[0][header::DLQ_SOURCE_OFFSET], "37");
    assert_eq!(letters[0]["payload"], r#"{"seq":5000000,"v":1}"#);
    worker.stop().await;
    records.remove(37);
    fixture.assert_stored_exactly_once(&records).await;
}

/// A poison record: what is produced, and the reason it must be dead-lettered with.
struct Poison {
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    reason: &'static str,
}

fn poison(key: Option<&str>, payload: impl Into<Vec<u8>>, reason: &'static str) -> Poison {
    Poison {
        key: key.map(|k| k.as_bytes().to_vec()),
        payload: payload.into(),
        reason,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_of_every_kind_are_dead_lettered_and_the_good_ones_around_them_stored() {
    let fixture = Fixture::new(1);
    let key = fixture.key(0);
    let key = Some(key.as_str());
    let poisons = [
        poison(None, r#"{"v":1}"#, "invalid_key"),
        poison(Some("no-slash"), r#"{"v":1}"#, "invalid_key"),
        poison(Some("user/+"), r#"{"v":1}"#, "invalid_key"),
        poison(key, "not json", "invalid_json"),
        poison(key, "", "invalid_json"),
        poison(
            key,
            b"{\"v\":1,\"s\":\"\xff\xfe\"}".to_vec(),
            "invalid_json",
        ),
        poison(key, "[1,2,3]", "not_an_object"),
        poison(key, r#"{"ts":"yesterday","v":1}"#, "invalid_timestamp"),
        poison(key, r#"{"seq":-1,"v":1}"#, "invalid_sequence"),
        poison(key, r#"{"v":"hot"}"#, "invalid_reading"),
        poison(
            key,
            r#"{"v":{"a":{"b":{"c":{"d":{"e":1}}}}}}"#,
            "invalid_reading",
        ),
        poison(key, r#"{"ts":1764000000000}"#, "no_readings"),
        poison(
            key,
            format!(r#"{{"v":1,"pad":"{}"}}"#, "x".repeat(70_000)),
            "payload_too_large",
        ),
        // jsonb cannot hold U+0000, so the contract refuses it before PostgreSQL would.
        poison(key, r#"{"v":1,"n\u0000":2}"#, "invalid_reading"),
    ];
    let mut good = Vec::new();
    let mut expected_reasons = BTreeMap::new();
    let producer = fixture.producer();
    let mut offset = 0;
    let mut seq = 0;
    for poison in &poisons {
        for _ in 0..3 {
            let record = Record {
                key: fixture.key(0),
                payload: format!(r#"{{"seq":{seq},"v":{seq}}}"#),
                received_at_ms: None,
            };
            support::produce(
                &producer,
                &fixture.kafka.topic,
                std::slice::from_ref(&record),
            )
            .await;
            good.push(record);
            seq += 1;
            offset += 1;
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(&fixture.kafka.topic)
            .payload(&poison.payload)
            .headers(OwnedHeaders::new());
        if let Some(key) = &poison.key {
            record = record.key(key.as_slice());
        }
        producer
            .send(record, Timeout::After(A_MINUTE))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        expected_reasons.insert(offset.to_string(), poison.reason);
        offset += 1;
    }

    let worker = fixture.start_worker(&unique_name("group"));
    let letters = fixture.read_dead_letters(poisons.len());
    let reasons: BTreeMap<String, &str> = letters
        .iter()
        .map(|l| {
            (
                l[header::DLQ_SOURCE_OFFSET].clone(),
                l[header::DLQ_REASON].as_str(),
            )
        })
        .collect();
    assert_eq!(reasons, expected_reasons);
    for letter in &letters {
        assert_eq!(letter[header::DLQ_STAGE], "worker");
        assert_eq!(letter[header::DLQ_SOURCE_TOPIC], fixture.kafka.topic);
        assert!(!letter[header::DLQ_DETAIL].is_empty(), "{letter:?}");
    }
    assert_eq!(
        fixture.wait_for_rows(good.len() as i64, A_MINUTE).await,
        good.len() as i64
    );
    worker.stop().await;
    fixture.assert_stored_exactly_once(&good).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_latest_holds_each_devices_newest_reading() {
    let fixture = Fixture::new(3);
    let records = fixture.records(3000, 7);
    fixture.produce(&records).await;
    let worker = fixture.start_worker(&unique_name("group"));
    assert_eq!(fixture.wait_for_rows(3000, A_MINUTE).await, 3000);
    worker.stop().await;

    let rows = fixture
        .database()
        .await
        .query(
            "SELECT user_id || '/' || device_id, seq, payload::text FROM device_latest ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let mut newest: BTreeMap<String, &Record> = BTreeMap::new();
    for record in &records {
        newest.insert(record.key.clone(), record); // later records overwrite earlier ones
    }
    assert_eq!(rows.len(), 7);
    for row in &rows {
        let key: String = row.get(0);
        let expected: serde_json::Value = serde_json::from_str(&newest[&key].payload).unwrap();
        let stored: serde_json::Value = serde_json::from_str(row.get::<_, &str>(2)).unwrap();
        assert_eq!(stored, expected, "{key}");
        assert_eq!(row.get::<_, i64>(1), expected["seq"].as_i64().unwrap());
    }
}

/// Transactions that stored this fixture's rows: each batch is one, and `ingested_at` is its
/// start time, shared by the batch's rows.
async fn batches_stored(fixture: &Fixture) -> i64 {
    fixture
        .database()
        .await
        .query_one("SELECT count(DISTINCT ingested_at) FROM raw_telemetry", &[])
        .await
        .expect("count batches")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_stores_a_record_without_waiting_out_the_batch_window() {
    let fixture = Fixture::new(2);
    let mut config = fixture.worker_config(&unique_name("group"));
    // A window far longer than the wait below: only the idle writer's linger can store it.
    config.batch.max_wait_ms = 60_000;
    config.batch.linger_ms = 0;
    let worker = fixture.start_worker_with(config);
    let records = fixture.records(1, 1);
    fixture.produce(&records).await;
    assert_eq!(
        fixture.wait_for_rows(1, Duration::from_secs(30)).await,
        1,
        "a lone record waited for the 60 s batch window"
    );
    worker.stop().await;
    fixture.assert_stored_exactly_once(&records).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_stored_in_batches_not_record_by_record() {
    let fixture = Fixture::new(2);
    let records = fixture.records(3000, 30);
    fixture.produce(&records).await;
    let mut config = fixture.worker_config(&unique_name("group"));
    config.batch.linger_ms = 0;
    config.batch.max_records = 1000;
    let worker = fixture.start_worker_with(config);
    assert_eq!(fixture.wait_for_rows(3000, A_MINUTE).await, 3000);
    worker.stop().await;
    fixture.assert_stored_exactly_once(&records).await;
    // Records that wait in the consumer go in the batch being filled, not one at a time.
    let batches = batches_stored(&fixture).await;
    assert!(
        (3..=300).contains(&batches),
        "3000 records took {batches} transactions (at most 1000 records each, 10 or more on average expected)"
    );
}

/// A backlog of large payloads fills batches by bytes, not by count: each batch stops before a
/// record that would take it past `batch.max_bytes`, so a replica's memory stays bounded
/// whatever the payloads weigh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_large_payloads_is_stored_in_batches_under_the_byte_bound() {
    let fixture = Fixture::new(1);
    let records: Vec<Record> = (0..30)
        .map(|seq| Record {
            key: fixture.key(0),
            // A valid reading of about 1,000 bytes: readings are numbers, so a long one.
            payload: format!(r#"{{"seq":{seq},"v":1.{}1}}"#, "0".repeat(1000)),
            received_at_ms: Some(1_764_000_000_000 + seq),
        })
        .collect();
    fixture.produce(&records).await;
    let mut config = fixture.worker_config(&unique_name("group"));
    // Batches close on bytes alone: the count and the window are far away.
    config.batch.max_records = 1000;
    config.batch.max_wait_ms = 2_000;
    config.batch.linger_ms = 2_000;
    config.batch.max_bytes = 4096;
    let worker = fixture.start_worker_with(config);
    assert_eq!(fixture.wait_for_rows(30, A_MINUTE).await, 30);
    worker.stop().await;
    fixture.assert_stored_exactly_once(&records).await;
    let largest: i64 = fixture
        .database()
        .await
        .query_one(
            "SELECT max(n) FROM (SELECT count(*) AS n FROM raw_telemetry GROUP BY ingested_at) b",
            &[],
        )
        .await
        .expect("largest batch")
        .get(0);
    // Each record weighs a little over 1,000 bytes: three fit in 4,096, four do not.
    assert!(
        (1..=3).contains(&largest),
        "a batch held {largest} records of 1 kB with batch.max_bytes = 4096"
    );
}

/// A limit set too low dead-letters good readings, in the worker and in the bridge; after the
/// fix, `redrive` copies the letters of that reason (and only those) back with their original
/// headers and the contract key, and the worker stores them once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_redriven_after_a_fix_are_stored_once_and_other_reasons_stay() {
    use telemetry_core::Shutdown;
    use telemetry_worker::redrive::{redrive, RedriveError, Selection};
    let fixture = Fixture::new(1);
    let received_at = |seq: usize| 1_764_000_000_000 + seq as i64;
    let big = |seq: usize| Record {
        key: fixture.key(0),
        // A valid reading, only longer than the first worker's limit.
        payload: format!(r#"{{"seq":{seq},"v":1.{}1}}"#, "0".repeat(200)),
        received_at_ms: Some(received_at(seq)),
    };
    let small = |seq: usize| Record {
        key: fixture.key(0),
        payload: format!(r#"{{"seq":{seq},"v":2}}"#),
        received_at_ms: Some(received_at(seq)),
    };
    let not_json = Record {
        key: fixture.key(0),
        payload: "not json".into(),
        received_at_ms: Some(received_at(0)),
    };
    fixture
        .produce(&[small(0), big(1), not_json, small(2), big(3)])
        .await;

    let group = unique_name("group");
    let mut too_strict = fixture.worker_config(&group);
    too_strict.max_payload_bytes = 100;
    let worker = fixture.start_worker_with(too_strict);
    fixture.read_dead_letters(3);
    assert_eq!(fixture.wait_for_rows(2, A_MINUTE).await, 2);
    worker.stop().await;
    // Two letters as the bridge writes them, keyed by MQTT topic: one whose topic names a
    // device, one whose topic does not.
    let device_topic = format!("users/{}/devices/d0/telemetry", fixture.run);
    let from_bridge = r#"{"seq":4,"v":3}"#;
    produce_bridge_letter(&fixture, &device_topic, from_bridge, received_at(4)).await;
    produce_bridge_letter(&fixture, "not/a/device/topic", "{}", received_at(5)).await;

    // The fix: the default limit. Then the letters of that reason go back.
    let fixed = fixture.worker_config(&group);
    let selection = Selection {
        reasons: vec!["payload_too_large".into()],
        ..Selection::default()
    };
    let running = Shutdown::new();
    let done = redrive(&fixed, &selection, &running)
        .await
        .expect("redrive");
    assert_eq!(done.len(), 1, "the dead-letter topic has one partition");
    assert_eq!(
        (done[0].read, done[0].redriven, done[0].skipped),
        (5, 3, 1),
        "5 letters: 2 + 1 payload_too_large copied, 1 of them without a device skipped, 1 invalid_json left"
    );
    assert_eq!(done[0].next_offset, Some(5));

    let copies: Vec<_> = test_servers::read_topic(
        &fixture.kafka.brokers,
        &fixture.kafka.topic,
        A_MINUTE,
        |records| records.len() >= 8,
    )
    .into_iter()
    .skip(5)
    .collect();
    let expected = [
        (big(1).key, big(1).payload, received_at(1), None),
        (big(3).key, big(3).payload, received_at(3), None),
        (
            fixture.key(0),
            from_bridge.to_owned(),
            received_at(4),
            Some(&device_topic),
        ),
    ];
    assert_eq!(copies.len(), expected.len(), "{copies:?}");
    for (copy, (key, payload, received, mqtt_topic)) in copies.iter().zip(expected) {
        assert_eq!(
            copy.key, key,
            "the contract key, also for the bridge's letter"
        );
        assert_eq!(copy.payload, payload);
        let mut headers =
            BTreeMap::from([(header::RECEIVED_AT_MS.to_owned(), received.to_string())]);
        if let Some(topic) = mqtt_topic {
            headers.insert(header::MQTT_TOPIC.to_owned(), topic.clone());
        }
        assert_eq!(copy.headers, headers, "the original headers, without dlq_*");
    }

    let worker = fixture.start_worker_with(fixed);
    assert_eq!(fixture.wait_for_rows(5, A_MINUTE).await, 5);
    worker.stop().await;
    let stored = [small(0), big(1), small(2), big(3)]
        .into_iter()
        .chain([Record {
            key: fixture.key(0),
            payload: from_bridge.to_owned(),
            received_at_ms: Some(received_at(4)),
        }])
        .collect::<Vec<_>>();
    fixture.assert_stored_exactly_once(&stored).await;

    // Starting at next_offset finds nothing more to copy, and an empty range is refused before
    // Kafka is asked. (An offset beyond the end cannot be tested here: Kafka answers it with
    // OFFSET_OUT_OF_RANGE, which `auto.offset.reset=error` turns into an error, but Tansu
    // answers with nothing, and the redrive stops after 30 s of silence.)
    let from = |offset: i64| Selection {
        from_offset: Some(offset),
        ..selection.clone()
    };
    let config = fixture.worker_config(&group);
    let again = redrive(&config, &from(5), &running)
        .await
        .expect("second redrive");
    assert_eq!((again[0].read, again[0].redriven), (0, 0));
    let empty = Selection {
        to_offset: Some(3),
        ..from(3)
    };
    assert!(matches!(
        redrive(&config, &empty, &running).await,
        Err(RedriveError::BadRange)
    ));
}

/// A `payload_too_large` dead letter as the bridge writes it: keyed by its MQTT topic.
async fn produce_bridge_letter(fixture: &Fixture, topic: &str, payload: &str, received_at_ms: i64) {
    use rdkafka::message::Header;
    let received = received_at_ms.to_string();
    let headers = [
        (header::MQTT_TOPIC, topic),
        (header::RECEIVED_AT_MS, received.as_str()),
        (header::DLQ_REASON, "payload_too_large"),
        (header::DLQ_STAGE, "bridge"),
    ]
    .into_iter()
    .fold(OwnedHeaders::new(), |headers, (key, value)| {
        headers.insert(Header {
            key,
            value: Some(value),
        })
    });
    let letter = FutureRecord::to(&fixture.kafka.dlq_topic)
        .key(topic)
        .payload(payload)
        .headers(headers);
    fixture
        .producer()
        .send(letter, Timeout::After(A_MINUTE))
        .await
        .map_err(|(e, _)| e)
        .expect("bridge letter produced");
}

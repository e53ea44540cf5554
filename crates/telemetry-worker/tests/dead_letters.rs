//! Dead letters at their edges, on real servers: a source record with two letters is redriven
//! and stored once, and a letter the dead-letter topic refuses for good neither wedges the
//! worker nor is retried forever.

mod support;

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use support::{Fixture, Record};
use telemetry_core::contract::header;
use telemetry_core::Shutdown;
use telemetry_worker::redrive::{redrive, Selection};
use test_servers::unique_name;

const A_MINUTE: Duration = Duration::from_secs(60);

/// A dead letter as the worker writes it for the record at `source_offset` of partition 0.
async fn produce_worker_letter(fixture: &Fixture, source_offset: i64, payload: &str) {
    let offset = source_offset.to_string();
    let headers = [
        (header::RECEIVED_AT_MS, "1764000000000"),
        (header::DLQ_REASON, "payload_too_large"),
        (header::DLQ_DETAIL, "payload is too large"),
        (header::DLQ_STAGE, "worker"),
        (header::DLQ_SOURCE_TOPIC, fixture.kafka.topic.as_str()),
        (header::DLQ_SOURCE_PARTITION, "0"),
        (header::DLQ_SOURCE_OFFSET, offset.as_str()),
    ]
    .into_iter()
    .fold(OwnedHeaders::new(), |headers, (key, value)| {
        headers.insert(Header {
            key,
            value: Some(value),
        })
    });
    let key = fixture.key(0);
    let letter = FutureRecord::to(&fixture.kafka.dlq_topic)
        .key(&key)
        .payload(payload)
        .headers(headers);
    fixture
        .producer()
        .send(letter, Timeout::After(A_MINUTE))
        .await
        .map_err(|(e, _)| e)
        .expect("dead letter produced");
}

async fn rows_with_payload(fixture: &Fixture, payload: &str) -> i64 {
    fixture
        .database()
        .await
        .query_one(
            "SELECT count(*) FROM raw_telemetry WHERE payload = $1::text::jsonb",
            &[&payload],
        )
        .await
        .expect("count rows")
        .get(0)
}

/// A batch's COMMIT that fails after its dead letters went out sends them again, so a record
/// can have two letters. Readings without `seq` have nothing else to tell a copy by: redrive
/// itself must copy the record once, in one run and in the next, and must not copy a record
/// that is stored already.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_with_two_dead_letters_is_redriven_and_stored_once() {
    let fixture = Fixture::new(1);
    let group = unique_name("group");
    // The record at offset 0 is stored; a letter for it is left over from a failed COMMIT.
    let stored = r#"{"v":0}"#;
    fixture
        .produce(&[Record {
            key: fixture.key(0),
            payload: stored.into(),
            received_at_ms: None,
        }])
        .await;
    let worker = fixture.start_worker(&group);
    assert_eq!(fixture.wait_for_rows(1, A_MINUTE).await, 1);
    worker.stop().await;
    let redriven = r#"{"v":1}"#;
    produce_worker_letter(&fixture, 7, redriven).await;
    produce_worker_letter(&fixture, 7, redriven).await;
    produce_worker_letter(&fixture, 0, stored).await;

    let config = fixture.worker_config(&group);
    let running = Shutdown::new();
    let first = redrive(&config, &Selection::default(), &running)
        .await
        .expect("redrive");
    assert_eq!(
        (first[0].read, first[0].redriven, first[0].duplicates),
        (3, 1, 2),
        "offset 7 copied once; its second letter and the stored record's letter skipped"
    );
    let again = redrive(&config, &Selection::default(), &running)
        .await
        .expect("second redrive over the same letters");
    assert_eq!(
        (again[0].read, again[0].redriven, again[0].duplicates),
        (3, 0, 3)
    );

    let worker = fixture.start_worker(&group);
    assert_eq!(fixture.wait_for_rows(2, A_MINUTE).await, 2);
    worker.stop().await;
    assert_eq!(rows_with_payload(&fixture, redriven).await, 1);
    assert_eq!(rows_with_payload(&fixture, stored).await, 1);
}

/// The producer's own limit, as Tansu does not enforce a topic's `max.message.bytes`: librdkafka
/// refuses a larger record with the same error (MSG_SIZE_TOO_LARGE) as a broker would.
fn with_small_messages(config: &mut telemetry_worker::WorkerConfig) {
    config
        .kafka
        .properties
        .insert("message.max.bytes".into(), "1000".into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_for_its_topic_goes_without_its_payload_and_the_rest_flows() {
    let fixture = Fixture::new(1);
    let poison = Record {
        key: fixture.key(0),
        payload: "x".repeat(3000),
        received_at_ms: None,
    };
    let good = fixture.records(20, 2);
    fixture.produce(std::slice::from_ref(&poison)).await;
    fixture.produce(&good).await;
    let mut config = fixture.worker_config(&unique_name("group"));
    with_small_messages(&mut config);
    let worker = fixture.start_worker_with(config);
    assert_eq!(fixture.wait_for_rows(20, A_MINUTE).await, 20);
    let letters = fixture.read_dead_letters(1);
    worker.stop().await;
    let letter = &letters[0];
    assert_eq!(letter[header::DLQ_REASON], "invalid_json");
    assert_eq!(letter[header::DLQ_SOURCE_OFFSET], "0");
    assert_eq!(letter["payload"], "", "the payload was dropped");
    let note = &letter[header::DLQ_TRUNCATED];
    assert!(
        note.contains("3000 bytes") && note.contains("max.message.bytes"),
        "{note}"
    );
    fixture.assert_stored_exactly_once(&good).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_refused_even_without_its_payload_stops_the_worker_saying_what_to_fix() {
    let fixture = Fixture::new(1);
    // Headers alone over the limit: dropping the payload cannot make the letter fit.
    let note = "n".repeat(1500);
    let headers = OwnedHeaders::new().insert(Header {
        key: "note",
        value: Some(note.as_str()),
    });
    let key = fixture.key(0);
    let poison = FutureRecord::to(&fixture.kafka.topic)
        .key(&key)
        .payload("not json")
        .headers(headers);
    fixture
        .producer()
        .send(poison, Timeout::After(A_MINUTE))
        .await
        .map_err(|(e, _)| e)
        .expect("poison produced");
    let mut config = fixture.worker_config(&unique_name("group"));
    with_small_messages(&mut config);
    let stopped = tokio::time::timeout(A_MINUTE, telemetry_worker::run(config, Shutdown::new()))
        .await
        .expect("the worker stops instead of retrying the letter forever");
    let error = stopped
        .expect_err("the worker reports the refusal")
        .to_string();
    assert!(
        error.contains(&format!("'{}'", fixture.kafka.dlq_topic))
            && error.contains("max.message.bytes")
            && error.contains("offset 0"),
        "{error}"
    );
    assert_eq!(fixture.row_count().await, 0);
}

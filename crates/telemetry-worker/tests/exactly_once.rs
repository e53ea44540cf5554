//! Every record stored exactly once through crashes, rebalances and replays, on real servers.

mod support;

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use support::Fixture;
use telemetry_worker::replay::{self, ReplayStart};
use test_servers::{free_addr, unique_name};

const TWO_MINUTES: Duration = Duration::from_secs(120);

fn kill9(child: &mut std::process::Child) {
    child.kill().expect("SIGKILL the worker"); // Child::kill sends SIGKILL on Unix
    child.wait().expect("reap the worker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_batch_and_restarted_stores_every_record_once() {
    let fixture = Fixture::new(3);
    let records = fixture.records(30_000, 20);
    fixture.produce(&records).await;
    let group = unique_name("group");

    for (round, kill_after_rows) in [5_000, 15_000].into_iter().enumerate() {
        let mut worker = fixture.spawn_worker_process(&group, free_addr());
        let deadline = Instant::now() + TWO_MINUTES;
        while fixture.row_count().await < kill_after_rows {
            assert!(Instant::now() < deadline, "round {round}: worker stalled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        kill9(&mut worker);
        let stored = fixture.row_count().await;
        assert!(
            stored < records.len() as i64,
            "round {round}: killed after everything was stored ({stored})"
        );
        println!("round {round}: killed with {stored} rows stored");
    }

    let mut worker = fixture.spawn_worker_process(&group, free_addr());
    let stored = fixture
        .wait_for_rows(records.len() as i64, TWO_MINUTES)
        .await;
    kill9(&mut worker);
    assert_eq!(stored, records.len() as i64);
    fixture.assert_stored_exactly_once(&records).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_on_six_partitions_with_one_joining_and_two_leaving_store_every_record_once()
{
    let fixture = Fixture::new(6);
    let records = fixture.records(24_000, 60);
    let group = unique_name("group");
    let producing = fixture.produce_at(records.clone(), 2_000);

    let mut workers: Vec<_> = (0..3).map(|_| fixture.start_worker(&group)).collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    workers.push(fixture.start_worker(&group));
    tokio::time::sleep(Duration::from_secs(3)).await;
    workers.remove(0).stop().await; // leaves gracefully: flushes its batch
    tokio::time::sleep(Duration::from_secs(2)).await;
    workers.remove(0).abort(); // dies with a batch in flight
    producing.await.unwrap();

    let stored = fixture
        .wait_for_rows(records.len() as i64, TWO_MINUTES)
        .await;
    for worker in workers {
        worker.stop().await;
    }
    assert_eq!(stored, records.len() as i64);
    fixture.assert_stored_exactly_once(&records).await;
}

/// Runs one worker of `group` until the fixture's `expected` rows are stored, then stops it.
async fn store_all(fixture: &Fixture, group: &str, expected: usize) {
    let worker = fixture.start_worker(group);
    assert_eq!(
        fixture.wait_for_rows(expected as i64, TWO_MINUTES).await,
        expected as i64
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_from_the_earliest_offset_restores_deleted_rows_and_duplicates_none() {
    let fixture = Fixture::new(3);
    let records = fixture.records(3_000, 9);
    fixture.produce(&records).await;
    let group = unique_name("group");
    store_all(&fixture, &group, records.len()).await;
    let deleted = fixture
        .database()
        .await
        .execute("DELETE FROM raw_telemetry WHERE seq % 10 = 3", &[])
        .await
        .unwrap();
    assert!(deleted > 0);

    let config = fixture.worker_config(&group);
    let windows = replay::replay(&config, ReplayStart::Earliest, &[])
        .await
        .expect("replay");
    assert!(windows.iter().all(|w| w.from == 0), "{windows:?}");
    assert_eq!(
        windows.iter().map(|w| w.to).sum::<i64>(),
        3_000,
        "{windows:?}"
    );

    let worker = fixture.start_worker(&group);
    fixture.wait_until_replayed(TWO_MINUTES).await;
    worker.stop().await;
    fixture.assert_stored_exactly_once(&records).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_reset_with_kafka_tools_make_the_worker_read_again_without_duplicates() {
    let fixture = Fixture::new(2);
    let mut records = fixture.records(2_000, 4);
    fixture.produce(&records).await;
    let group = unique_name("group");
    store_all(&fixture, &group, records.len()).await;

    // What `kafka-consumer-groups --reset-offsets --to-earliest` or `rpk group seek` does.
    let admin: BaseConsumer = fixture
        .kafka
        .client_config(&[("group.id", group.as_str())])
        .create()
        .unwrap();
    let mut offsets = TopicPartitionList::new();
    for partition in 0..2 {
        offsets
            .add_partition_offset(&fixture.kafka.topic, partition, Offset::Offset(0))
            .unwrap();
    }
    admin.commit(&offsets, CommitMode::Sync).unwrap();
    drop(admin);

    let more = fixture.records(2_100, 4).split_off(2_000);
    // A process of its own, so its metrics count this worker only.
    let http = free_addr();
    let mut worker = fixture.spawn_worker_process(&group, http);
    fixture.produce(&more).await;
    records.extend(more);
    let stored = fixture
        .wait_for_rows(records.len() as i64, TWO_MINUTES)
        .await;
    let (_, metrics) = test_servers::http_get(http, "/metrics")
        .await
        .expect("metrics");
    kill9(&mut worker);
    assert_eq!(stored, records.len() as i64);
    fixture.assert_stored_exactly_once(&records).await;
    let skipped = test_servers::metric_value(&metrics, "telemetry_worker_rows_skipped_total");
    assert!(
        skipped >= 2_000.0,
        "the worker read the reset range again and skipped it: {skipped}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilding_a_time_range_deletes_it_and_ingests_it_again_exactly_once() {
    let fixture = Fixture::new(3);
    // Receive times are 1 ms apart: 3,000 records span 3 s.
    let records = fixture.records(3_000, 9);
    fixture.produce(&records).await;
    let group = unique_name("group");
    store_all(&fixture, &group, records.len()).await;

    let start = 1_764_000_000_000;
    let from = DateTime::<Utc>::from_timestamp_millis(start + 1_000).unwrap();
    let to = DateTime::<Utc>::from_timestamp_millis(start + 2_000).unwrap();
    let rebuilt_at = Utc::now();
    let config = fixture.worker_config(&group);
    let windows = replay::rebuild(&config, from, to, &[])
        .await
        .expect("rebuild");
    let deleted: u64 = windows.iter().map(|w| w.deleted).sum();
    assert_eq!(deleted, 1_000, "{windows:?}");
    assert_eq!(fixture.row_count().await, 2_000);

    let worker = fixture.start_worker(&group);
    fixture.wait_until_replayed(TWO_MINUTES).await;
    worker.stop().await;
    fixture.assert_stored_exactly_once(&records).await;
    let reingested: i64 = fixture
        .database()
        .await
        .query_one(
            "SELECT count(*) FROM raw_telemetry WHERE ingested_at > $1",
            &[&rebuilt_at],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(reingested, 1_000, "exactly the range was ingested again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_refuses_to_run_while_the_group_has_members() {
    let fixture = Fixture::new(1);
    let records = fixture.records(10, 1);
    fixture.produce(&records).await;
    let group = unique_name("group");
    let worker = fixture.start_worker(&group);
    fixture.wait_for_rows(10, TWO_MINUTES).await;
    let error = replay::replay(&fixture.worker_config(&group), ReplayStart::Earliest, &[])
        .await
        .expect_err("a replay while a worker runs");
    assert!(error.to_string().contains("stop every worker"), "{error}");
    worker.stop().await;
}

/// What a bridge crash, an MQTT reconnect or a device retry puts in Kafka: the same reading at
/// two offsets, sometimes in one batch, sometimes far apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_that_reaches_kafka_twice_is_stored_once_and_a_restarted_sequence_is_kept() {
    let fixture = Fixture::new(2);
    let records = fixture.records(3_000, 6);
    // Each record, then right behind it a copy of every fifth one (the same batch), then copies
    // of every seventh one after all of them (later batches).
    let mut sent = Vec::new();
    for (n, record) in records.iter().enumerate() {
        sent.push(record.clone());
        if n % 5 == 0 {
            sent.push(record.clone());
        }
    }
    sent.extend(records.iter().step_by(7).cloned());
    // A device that rebooted: its sequence starts again at 0, with readings of its own.
    let rebooted: Vec<_> = (0..3)
        .map(|seq| support::Record {
            key: fixture.key(0),
            payload: format!(r#"{{"seq":{seq},"temperature":99.5}}"#),
            received_at_ms: Some(1_764_100_000_000 + seq),
        })
        .collect();
    sent.extend(rebooted.iter().cloned());
    // Without seq nothing tells a copy from an equal reading: both are stored.
    let unnumbered = support::Record {
        key: fixture.key(1),
        payload: r#"{"temperature":7.5}"#.into(),
        received_at_ms: Some(1_764_200_000_000),
    };
    sent.push(unnumbered.clone());
    sent.push(unnumbered);
    fixture.produce(&sent).await;

    let expected = records.len() + rebooted.len() + 2;
    let worker = fixture.start_worker(&unique_name("group"));
    let stored = fixture.wait_for_rows(expected as i64, TWO_MINUTES).await;
    worker.stop().await;
    assert_eq!(stored, expected as i64, "{} records sent", sent.len());

    let client = fixture.database().await;
    let copies: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT 1 FROM raw_telemetry WHERE seq IS NOT NULL
             GROUP BY user_id, device_id, seq, payload HAVING count(*) > 1) AS c",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(copies, 0, "readings with seq stored more than once");
    let rebooted_rows: i64 = client
        .query_one(
            "SELECT count(*) FROM raw_telemetry WHERE payload->>'temperature' = '99.5'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        rebooted_rows, 3,
        "the restarted sequence's readings are all stored"
    );
}

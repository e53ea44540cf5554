//! Where a partition starts and what a batch may hold, on real servers: never above what the
//! database stored, never on a log that ends below it, and never the same record twice in one
//! batch.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use support::Fixture;
use telemetry_core::contract::DeviceId;
use telemetry_core::observe::Health;
use telemetry_core::Shutdown;
use telemetry_worker::dlq::{self, DeadLetterProducer};
use telemetry_worker::record::{Batch, Row};
use telemetry_worker::replay;
use telemetry_worker::sink::{Sink, SinkError};
use test_servers::{shared, unique_name, PgBouncer};

const TWO_MINUTES: Duration = Duration::from_secs(120);

/// Runs one worker of `group` until `expected` rows are stored, then stops it.
async fn store_all(fixture: &Fixture, group: &str, expected: usize) {
    let worker = fixture.start_worker(group);
    assert_eq!(
        fixture.wait_for_rows(expected as i64, TWO_MINUTES).await,
        expected as i64
    );
    worker.stop().await;
}

/// What restoring a backup taken before any of the fixture's records were stored leaves: no
/// rows, and each partition's stored position at `next_offset` (no row at all when `None`).
async fn restore_backup_from_before_the_records(fixture: &Fixture, next_offset: Option<i64>) {
    let client = fixture.database().await;
    client
        .batch_execute("TRUNCATE raw_telemetry, device_latest, device_sequences")
        .await
        .expect("empty the restored tables");
    match next_offset {
        Some(next) => client
            .execute(
                "UPDATE ingest_offsets SET next_offset = $1, replay_from = NULL, replay_to = NULL",
                &[&next],
            )
            .await
            .expect("restore the stored positions"),
        None => client
            .execute("DELETE FROM ingest_offsets", &[])
            .await
            .expect("restore the stored positions"),
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restored_from_before_a_partition_had_a_row_reads_it_again_from_the_log_start() {
    let fixture = Fixture::new(2);
    let records = fixture.records(40, 4);
    fixture.produce(&records).await;
    let group = unique_name("group");
    store_all(&fixture, &group, records.len()).await;
    // Kafka's committed offsets are at the end of each partition now; the database has nothing.
    restore_backup_from_before_the_records(&fixture, None).await;

    store_all(&fixture, &group, records.len()).await;
    fixture.assert_stored_exactly_once(&records).await;
}

/// Waits until the consumer group has a member, i.e. a worker has joined and is being assigned
/// its partitions.
fn wait_for_a_member(fixture: &Fixture, group: &str) {
    let admin: BaseConsumer = fixture
        .kafka
        .client_config(&[("group.id", "group-watcher")])
        .create()
        .expect("admin client");
    let deadline = Instant::now() + TWO_MINUTES;
    loop {
        let members: usize = admin
            .fetch_group_list(Some(group), Duration::from_secs(5))
            .map(|list| list.groups().iter().map(|g| g.members().len()).sum())
            .unwrap_or(0);
        if members > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "no worker joined '{group}'");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_read_stored_offsets_at_assignment_waits_for_the_database_instead_of_starting_at_kafkas_offset(
) {
    let servers = shared();
    let pgbouncer = PgBouncer::start(&servers.postgres).expect("private PgBouncer");
    let fixture = Fixture::on(&servers.postgres, &pgbouncer, &servers.kafka, 1);
    let records = fixture.records(20, 2);
    fixture.produce(&records).await;
    let group = unique_name("group");
    store_all(&fixture, &group, records.len()).await;
    restore_backup_from_before_the_records(&fixture, Some(0)).await;

    pgbouncer.stop();
    let mut config = fixture.worker_config(&group);
    config.migrate_on_start = false;
    let worker = fixture.start_worker_with(config);
    tokio::task::block_in_place(|| wait_for_a_member(&fixture, &group));
    // The assignment's lookup fails against the stopped PgBouncer meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    pgbouncer.start_again().expect("PgBouncer back");

    let stored = fixture
        .wait_for_rows(records.len() as i64, Duration::from_secs(60))
        .await;
    worker.stop().await;
    assert_eq!(
        stored,
        records.len() as i64,
        "the gap after the restore was read"
    );
    fixture.assert_stored_exactly_once(&records).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_offset_past_the_end_of_the_log_stops_the_worker_and_the_named_command_recovers_it(
) {
    // What a topic deleted and created again looks like to the worker: ingest_offsets says 500
    // records of partition 0 are stored, and the partition's log holds 10.
    let fixture = Fixture::new(1);
    fixture.migrate().await;
    fixture
        .database()
        .await
        .execute(
            "INSERT INTO ingest_offsets (topic, kafka_partition, next_offset) VALUES ($1, 0, 500)",
            &[&fixture.kafka.topic],
        )
        .await
        .unwrap();
    let records = fixture.records(10, 2);
    fixture.produce(&records).await;
    let group = unique_name("group");

    let error = fixture
        .start_worker(&group)
        .stopped_with_error(Duration::from_secs(90))
        .await;
    for expected in [
        "partition 0",
        "500",
        "log ends at 10",
        "telemetry-worker replay --new-log --partition 0",
    ] {
        assert!(error.contains(expected), "{expected:?} in: {error}");
    }
    assert_eq!(
        fixture.row_count().await,
        0,
        "nothing stored on the wrong log"
    );

    let reset = replay::start_new_log(&fixture.worker_config(&group), &[])
        .await
        .expect("replay --new-log");
    assert_eq!(reset.len(), 1, "{reset:?}");
    assert_eq!((reset[0].from, reset[0].to), (0, 10), "{reset:?}");
    store_all(&fixture, &group, records.len()).await;
    fixture.assert_stored_exactly_once(&records).await;
}

fn row(fixture: &Fixture, partition: i32, offset: i64) -> Row {
    Row {
        device_time: None,
        received_at: chrono::Utc::now(),
        device: DeviceId {
            user: fixture.run.clone(),
            device: format!("d{offset}"),
        },
        seq: None,
        payload: format!(r#"{{"n":{offset}}}"#).into_bytes(),
        partition,
        offset,
    }
}

/// A batch of partition 0 holding `offsets`, as the reader assembles it.
fn batch(fixture: &Fixture, offsets: std::ops::Range<i64>) -> Batch {
    Batch {
        rows: offsets.clone().map(|o| row(fixture, 0, o)).collect(),
        dead: Vec::new(),
        next_offsets: BTreeMap::from([(0, offsets.end)]),
    }
}

async fn sink(fixture: &Fixture) -> Sink {
    fixture.migrate().await;
    let config = fixture.worker_config(&unique_name("group"));
    let pool = telemetry_worker::create_pool(&config.postgres).expect("pool");
    let letters = DeadLetterProducer::new(
        &config.kafka,
        dlq::delivery_timeout(config.postgres.write_timeout()),
    )
    .expect("dead-letter producer");
    Sink::new(pool, config.kafka.topic.clone(), letters, Health::new())
}

async fn stored_next_offset(fixture: &Fixture) -> i64 {
    fixture
        .database()
        .await
        .query_one(
            "SELECT next_offset FROM ingest_offsets WHERE topic = $1 AND kafka_partition = 0",
            &[&fixture.kafka.topic],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_starts_above_the_stored_offset_is_refused_and_stores_nothing() {
    let fixture = Fixture::new(1);
    let sink = sink(&fixture).await;
    let shutdown = Shutdown::new();

    let error = sink
        .store(&batch(&fixture, 5..8), &shutdown)
        .await
        .expect_err("offsets 0..5 were never read");
    assert!(
        matches!(
            error,
            SinkError::StartsAboveStored {
                partition: 0,
                first_offset: 5,
                resume_offset: 0
            }
        ),
        "{error}"
    );
    assert_eq!(fixture.row_count().await, 0);

    sink.store(&batch(&fixture, 0..8), &shutdown)
        .await
        .expect("a batch that starts where the database ends");
    assert_eq!(fixture.row_count().await, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_batch_of_a_partition_never_moves_its_stored_offset_back() {
    let fixture = Fixture::new(1);
    let sink = sink(&fixture).await;
    let shutdown = Shutdown::new();
    sink.store(&batch(&fixture, 0..6), &shutdown).await.unwrap();
    // A replica that lost the partition stores the batch it still held.
    sink.store(&batch(&fixture, 0..3), &shutdown).await.unwrap();
    assert_eq!(stored_next_offset(&fixture).await, 6);
    assert_eq!(fixture.row_count().await, 6);
}

/// Another member of the group that takes partitions for a while and leaves without storing
/// anything, as a replica that starts and is stopped again before its first batch does.
fn join_briefly(fixture: &Fixture, group: &str) {
    let member: BaseConsumer = fixture
        .kafka
        .client_config(&[
            ("group.id", group),
            ("partition.assignment.strategy", "cooperative-sticky"),
            ("enable.auto.commit", "false"),
        ])
        .create()
        .expect("second member");
    member
        .subscribe(&[&fixture.kafka.topic])
        .expect("subscribe");
    let deadline = Instant::now() + TWO_MINUTES;
    while member.assignment().map_or(0, |a| a.count()) == 0 {
        assert!(
            Instant::now() < deadline,
            "the second member got no partition"
        );
        let _ = member.poll(Duration::from_millis(100));
    }
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        let _ = member.poll(Duration::from_millis(100));
    }
    member.unsubscribe();
    // Dropping the consumer closes it: it leaves the group, which hands the partition back.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_revoked_and_handed_back_within_one_batch_window_is_stored_once() {
    let fixture = Fixture::new(2);
    // Without seq, so that nothing but the offsets tells a record read twice from two records.
    let records: Vec<_> = (0..40)
        .map(|n| support::Record {
            key: fixture.key(n % 8),
            payload: format!(r#"{{"n":{n}}}"#),
            received_at_ms: Some(1_764_000_000_000 + n as i64),
        })
        .collect();
    fixture.produce(&records).await;
    let group = unique_name("group");
    // One batch window spans the whole story: the worker reads both partitions, loses one to
    // another member, gets it back and reads it again, all before it writes anything.
    let mut config = fixture.worker_config(&group);
    config.batch.max_wait_ms = 60_000;
    config.batch.linger_ms = 60_000;
    config.batch.max_records = 100_000;
    let worker = fixture.start_worker_with(config);
    tokio::time::sleep(Duration::from_secs(3)).await;

    tokio::task::block_in_place(|| join_briefly(&fixture, &group));
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        fixture.row_count().await,
        0,
        "the batch window was still open"
    );
    // Shutdown hands the open batch over; it is stored and the worker stops.
    worker.stop().await;
    let counts = fixture
        .database()
        .await
        .query_one(
            "SELECT count(*), count(DISTINCT (kafka_partition, kafka_offset)) FROM raw_telemetry",
            &[],
        )
        .await
        .unwrap();
    let (rows, records_stored): (i64, i64) = (counts.get(0), counts.get(1));
    assert_eq!(
        (rows, records_stored),
        (40, 40),
        "rows and distinct records stored"
    );
}

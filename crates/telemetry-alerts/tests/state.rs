//! Device state under two writers at once, on real PostgreSQL through PgBouncer (transaction
//! mode). After partitions are added, one device's readings sit in two partitions, whose
//! batches two writers store side by side; each evaluates its batch with
//! `outbox::evaluate_batch` in its own transaction, as the worker does. The second writer must
//! carry on from the state the first commits, never from the one both read before.

use std::sync::Arc;
use std::time::Duration;

use chrono::DateTime;
use deadpool_postgres::Pool;
use telemetry_alerts::outbox;
use telemetry_alerts::{AlertEvent, EventKind, Reading, RuleSet, RELEASE_SQL, SCHEMA_SQL};
use telemetry_core::contract::DeviceId;
use telemetry_worker::config::PostgresConfig;
use test_servers::{shared, unique_name};
use tokio::time::Instant;

const HIGH_TEMPERATURE: &str = r#"
[[rule]]
name = "high-temperature"
reading = "/temperature"
op = ">"
value = 80.0
clear = 75.0
severity = "warning"
"#;

/// A fresh database with the alerts schema: a pool through PgBouncer, as the worker has, and a
/// direct connection for the test's own checks.
struct Database {
    name: String,
    pool: Pool,
    direct: tokio_postgres::Client,
}

async fn fresh_database() -> Database {
    let servers = shared();
    let name = unique_name("alert_state");
    servers.postgres.create_database(&name).unwrap();
    let (direct, connection) =
        tokio_postgres::connect(&servers.postgres.url(&name), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    direct.batch_execute(SCHEMA_SQL).await.unwrap();
    direct.batch_execute(RELEASE_SQL).await.unwrap();
    let pool = telemetry_worker::create_pool(&PostgresConfig {
        url: servers.pgbouncer.url(&name),
        ..PostgresConfig::default()
    })
    .unwrap();
    Database { name, pool, direct }
}

/// One reading of `device`: partition, offset, seconds after a fixed instant, temperature.
#[derive(Debug, Clone)]
struct Sample {
    device: DeviceId,
    partition: i32,
    offset: i64,
    second: i64,
    payload: String,
}

fn sample(device: &DeviceId, partition: i32, offset: i64, second: i64, temperature: f64) -> Sample {
    Sample {
        device: device.clone(),
        partition,
        offset,
        second,
        payload: format!(r#"{{"temperature":{temperature}}}"#),
    }
}

impl Sample {
    fn reading(&self) -> Reading<'_> {
        Reading {
            device: &self.device,
            payload: self.payload.as_bytes(),
            time: DateTime::from_timestamp(1_764_000_000 + self.second, 0).unwrap(),
            partition: self.partition,
            offset: self.offset,
        }
    }
}

/// A writer storing one batch of one reading, start to commit, as its own task.
fn write_batch(
    pool: Pool,
    rules: Arc<RuleSet>,
    sample: Sample,
) -> tokio::task::JoinHandle<Vec<AlertEvent>> {
    tokio::spawn(async move {
        let mut client = pool.get().await.unwrap();
        let tx = client.transaction().await.unwrap();
        let events = outbox::evaluate_batch(&tx, &rules, &[sample.reading()])
            .await
            .unwrap();
        tx.commit().await.unwrap();
        events
    })
}

impl Database {
    /// Waits until `writer` is done or waits for a lock, whichever comes first: then it has
    /// read whatever it reads without waiting.
    async fn until_done_or_waiting(&self, writer: &tokio::task::JoinHandle<Vec<AlertEvent>>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let waiting: i64 = self
                .direct
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = $1 AND wait_event_type = 'Lock'",
                    &[&self.name],
                )
                .await
                .unwrap()
                .get(0);
            if writer.is_finished() || waiting > 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the second writer neither finished nor waited within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `(event, kafka_partition)` of every stored alert event, in the order stored.
    async fn stored_events(&self) -> Vec<(String, i32)> {
        self.direct
            .query("SELECT event, kafka_partition FROM alerts ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect()
    }

    async fn state_rows(&self) -> i64 {
        self.direct
            .query_one("SELECT count(*) FROM alert_state", &[])
            .await
            .unwrap()
            .get(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_evaluating_one_device_at_once_raise_its_alert_once() {
    let db = fresh_database().await;
    let rules = Arc::new(RuleSet::from_toml(HIGH_TEMPERATURE).unwrap());
    let device = DeviceId::new(&unique_name("owner"), "thermo-1").unwrap();

    // The first writer raises the alert from the old partition, and has not committed yet.
    let mut client = db.pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let first = sample(&device, 0, 500, 1, 90.0);
    let raised = outbox::evaluate_batch(&tx, &rules, &[first.reading()])
        .await
        .unwrap();
    assert_eq!(raised.len(), 1);
    assert_eq!(raised[0].kind, EventKind::Raised);

    // The second writer's batch, from the new partition, breaches too.
    let second = write_batch(
        db.pool.clone(),
        rules.clone(),
        sample(&device, 1, 0, 2, 91.0),
    );
    db.until_done_or_waiting(&second).await;
    tx.commit().await.unwrap();
    let from_second = second.await.unwrap();

    assert!(
        from_second.is_empty(),
        "the second writer raised again: {from_second:?}"
    );
    assert_eq!(db.stored_events().await, [("raised".to_owned(), 0)]);
    assert_eq!(db.state_rows().await, 1, "the open alert is remembered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clear_written_while_another_writer_raises_is_not_lost() {
    let db = fresh_database().await;
    let rules = Arc::new(RuleSet::from_toml(HIGH_TEMPERATURE).unwrap());
    let device = DeviceId::new(&unique_name("owner"), "thermo-1").unwrap();

    // The first writer raises; the second, on the other partition, holds the next reading,
    // which is back to normal.
    let mut client = db.pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let hot = sample(&device, 0, 500, 1, 90.0);
    let raised = outbox::evaluate_batch(&tx, &rules, &[hot.reading()])
        .await
        .unwrap();
    assert_eq!(raised.len(), 1);
    let second = write_batch(
        db.pool.clone(),
        rules.clone(),
        sample(&device, 1, 0, 2, 20.0),
    );
    db.until_done_or_waiting(&second).await;
    tx.commit().await.unwrap();
    let cleared = second.await.unwrap();

    assert_eq!(
        cleared.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [EventKind::Cleared],
        "the clear was lost"
    );
    assert_eq!(cleared[0].alert_id, raised[0].alert_id);
    assert_eq!(
        db.stored_events().await,
        [("raised".to_owned(), 0), ("cleared".to_owned(), 1)]
    );
    assert_eq!(db.state_rows().await, 0, "nothing left to remember");

    // Within one batch holding both partitions, the readings are taken in time order, so the
    // new partition's later reading clears the alert the old one's earlier reading raises.
    let other = DeviceId::new(&device.user, "thermo-2").unwrap();
    let batch = [
        sample(&other, 1, 1, 12, 20.0),
        sample(&other, 0, 501, 11, 95.0),
    ];
    let readings: Vec<Reading> = batch.iter().map(Sample::reading).collect();
    let tx = client.transaction().await.unwrap();
    let events = outbox::evaluate_batch(&tx, &rules, &readings)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [EventKind::Raised, EventKind::Cleared]
    );
    assert_eq!(db.state_rows().await, 0);
}

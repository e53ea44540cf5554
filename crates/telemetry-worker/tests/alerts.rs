//! Alerts end to end on real servers: readings in Kafka, alerts evaluated in the worker's batch
//! transactions, stored in the outbox table and published over MQTT to the device's owner, once,
//! through a SIGKILL of the worker and a replay.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use support::{Fixture, Record};
use telemetry_alerts::{DeviceState, EventKind, Reading, RuleSet};
use telemetry_core::contract::DeviceId;
use telemetry_worker::replay::{self, ReplayStart};
use test_servers::{free_addr, shared, unique_name};

const TWO_MINUTES: Duration = Duration::from_secs(120);

const RULES: &str = r#"
[[rule]]
name = "high-temperature"
reading = "/temperature"
op = ">"
value = 80.0
clear = 75.0
severity = "warning"
"#;

/// Temperatures that cross the threshold now and then: a spell of 85/79/86 (79 is above the
/// clear threshold, so no flapping) every 40 readings, shifted per device.
fn temperature(device: usize, n: usize) -> f64 {
    match (n + device * 7) % 40 {
        10 => 85.0,
        11 => 79.0,
        12 => 86.0,
        _ => 20.0 + (n % 5) as f64,
    }
}

fn readings(fixture: &Fixture, devices: usize, per_device: usize) -> Vec<Record> {
    (0..devices * per_device)
        .map(|n| {
            let (device, k) = (n % devices, n / devices);
            Record {
                key: fixture.key(device),
                payload: format!(r#"{{"seq":{k},"temperature":{}}}"#, temperature(device, k)),
                received_at_ms: Some(1_764_000_000_000 + n as i64),
            }
        })
        .collect()
}

/// The alerts the rules give for these readings, by the engine itself: (alert id, event).
/// Partition and offset are part of an alert id, so they are taken from the stored rows.
async fn expected_alerts(fixture: &Fixture) -> BTreeSet<(String, String)> {
    let rules = RuleSet::from_toml(RULES).unwrap();
    let rows = fixture
        .database()
        .await
        .query(
            "SELECT user_id, device_id, payload::text, received_at, kafka_partition, kafka_offset
             FROM raw_telemetry ORDER BY kafka_partition, kafka_offset",
            &[],
        )
        .await
        .unwrap();
    let mut states: BTreeMap<DeviceId, DeviceState> = BTreeMap::new();
    let mut expected = BTreeSet::new();
    for row in &rows {
        let device = DeviceId {
            user: row.get(0),
            device: row.get(1),
        };
        let payload: &str = row.get(2);
        let state = states.entry(device.clone()).or_default();
        for event in telemetry_alerts::evaluate(
            &rules,
            state,
            &Reading {
                device: &device,
                payload: payload.as_bytes(),
                time: row.get(3),
                partition: row.get(4),
                offset: row.get(5),
            },
        ) {
            expected.insert((event.alert_id, event.kind.as_str().to_owned()));
        }
    }
    expected
}

/// An MQTT subscriber that keeps every alert message it receives.
struct Subscriber {
    received: tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
}

impl Subscriber {
    async fn start(filter: &str) -> Subscriber {
        let servers = shared();
        let mut options = MqttOptions::new(
            unique_name("owner"),
            servers.mosquitto.host(),
            servers.mosquitto.port(),
        );
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let (sender, received) = tokio::sync::mpsc::unbounded_channel();
        let (subscribed, on_subscribed) = tokio::sync::oneshot::channel();
        let mut subscribed = Some(subscribed);
        tokio::spawn(async move {
            let _client = client; // dropping it would end the event loop
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(subscribed) = subscribed.take() {
                            let _ = subscribed.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let body = serde_json::from_slice(&publish.payload).expect("alert JSON");
                        if sender.send(body).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), on_subscribed)
            .await
            .expect("SUBACK within 10 s")
            .unwrap();
        Subscriber { received }
    }

    /// Every message received until none came for `quiet`.
    async fn drain(&mut self, quiet: Duration) -> Vec<serde_json::Value> {
        let mut messages = Vec::new();
        while let Ok(Some(message)) = tokio::time::timeout(quiet, self.received.recv()).await {
            messages.push(message);
        }
        messages
    }
}

/// Flags for a worker with alerts. Every replica of one deployment passes the same `sessions`:
/// a partition's alerts are published on the session named after it, whichever replica holds
/// the partition.
fn worker_flags(rules: &std::path::Path, sessions: &str) -> Vec<String> {
    let mosquitto = &shared().mosquitto;
    vec![
        "--alert-rules".into(),
        rules.display().to_string(),
        "--alerts-mqtt-host".into(),
        mosquitto.host().to_owned(),
        "--alerts-mqtt-port".into(),
        mosquitto.port().to_string(),
        "--alerts-mqtt-client-id".into(),
        sessions.to_owned(),
    ]
}

/// Stops a worker with SIGTERM and checks that it exits cleanly.
fn terminate(mut worker: test_servers::KillOnDrop) {
    let terminated = std::process::Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    assert!(
        worker.wait().unwrap().success(),
        "worker exits cleanly on SIGTERM"
    );
}

async fn unpublished_alerts(fixture: &Fixture) -> i64 {
    fixture
        .database()
        .await
        .query_one(
            "SELECT count(*) FROM alerts WHERE published_at IS NULL",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_their_owner_once_through_a_worker_kill_a_rebalance_and_a_replay() {
    let fixture = Fixture::new(3);
    let rules = test_servers::log_dir().join(format!("{}.toml", unique_name("rules")));
    std::fs::write(&rules, RULES).unwrap();
    let sessions = unique_name("alerts");
    let flags = worker_flags(&rules, &sessions);
    let mut owner = Subscriber::start(&format!("users/{}/devices/+/alerts", fixture.run)).await;
    let records = readings(&fixture, 12, 400);
    let group = unique_name("group");

    // Two replicas share the partitions. One is killed mid-load: the other takes its
    // partitions over (a rebalance), finishing whatever publishing round the killed one left
    // half-done, and a replacement joins later (another rebalance).
    let producing = fixture.produce_at(records.clone(), 1_500);
    let mut killed = fixture.spawn_worker_process_with(&group, free_addr(), &flags);
    let survivor = fixture.spawn_worker_process_with(&group, free_addr(), &flags);
    let deadline = Instant::now() + TWO_MINUTES;
    while fixture.row_count().await < 2_000 {
        assert!(Instant::now() < deadline, "worker stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    killed.kill().unwrap(); // SIGKILL, mid-load
    killed.wait().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let worker = fixture.spawn_worker_process_with(&group, free_addr(), &flags);
    producing.await.unwrap();
    assert_eq!(
        fixture
            .wait_for_rows(records.len() as i64, TWO_MINUTES)
            .await,
        records.len() as i64
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while unpublished_alerts(&fixture).await != 0 {
        assert!(Instant::now() < deadline, "alerts left unpublished");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fixture.assert_stored_exactly_once(&records).await;

    let expected = expected_alerts(&fixture).await;
    assert!(expected.len() >= 12 * 10 * 2, "{} alerts", expected.len());
    let received = owner.drain(Duration::from_secs(3)).await;
    let mut seen = BTreeSet::new();
    let mut duplicated = Vec::new();
    for message in &received {
        let id = (
            message["alert_id"].as_str().unwrap().to_owned(),
            message["event"].as_str().unwrap().to_owned(),
        );
        // What subscribers deduplicate on, e.g. after a database restore.
        let kind = if id.1 == "raised" {
            EventKind::Raised
        } else {
            EventKind::Cleared
        };
        assert_eq!(
            message["event_id"].as_str(),
            Some(telemetry_alerts::event_id(&id.0, kind).as_str()),
            "{message}"
        );
        if !seen.insert(id.clone()) {
            duplicated.push(id);
        }
    }
    let missing: Vec<_> = expected.difference(&seen).collect();
    let unexpected: Vec<_> = seen.difference(&expected).collect();
    assert!(
        missing.is_empty() && unexpected.is_empty() && duplicated.is_empty(),
        "{} expected, {} received; missing {:?}; unexpected {:?}; duplicated {:?}",
        expected.len(),
        received.len(),
        missing,
        unexpected,
        duplicated
    );
    let stored: i64 = fixture
        .database()
        .await
        .query_one("SELECT count(*) FROM alerts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored as usize, expected.len());

    // A replay reads every record again and sends no alert a second time. The workers stop
    // gracefully (SIGTERM), leaving the group, as a replay needs: one, then the other once the
    // group has settled on the one left (two leaving at once, or one leaving during the
    // rebalance the other caused, left the broker's group unable to take a new member).
    terminate(survivor);
    tokio::time::sleep(Duration::from_secs(8)).await;
    terminate(worker);
    fixture
        .database()
        .await
        .execute("DELETE FROM raw_telemetry WHERE seq % 50 = 11", &[])
        .await
        .unwrap();
    replay::replay(&fixture.worker_config(&group), ReplayStart::Earliest, &[])
        .await
        .expect("replay");
    let mut worker = fixture.spawn_worker_process_with(&group, free_addr(), &flags);
    fixture.wait_until_replayed(TWO_MINUTES).await;
    let again = owner.drain(Duration::from_secs(3)).await;
    worker.kill().unwrap();
    worker.wait().unwrap();
    assert!(again.is_empty(), "alerts sent again by a replay: {again:?}");
    fixture.assert_stored_exactly_once(&records).await;
}

#[test]
fn print_config_shows_neither_the_database_nor_the_alert_publishers_password() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_telemetry-worker"))
        .args([
            "--database-url",
            "postgres://worker:db-pass-7f3@pgbouncer:6432/telemetry",
        ])
        .arg("print-config")
        .env(
            "TELEMETRY_WORKER_ALERTS__OUTBOX__MQTT__USERNAME",
            "telemetry-worker",
        )
        .env(
            "TELEMETRY_WORKER_ALERTS__OUTBOX__MQTT__PASSWORD",
            "mqtt-pass-9c1",
        )
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(
        !printed.contains("db-pass-7f3") && !printed.contains("mqtt-pass-9c1"),
        "{printed}"
    );
    // Still useful: what is not secret is shown.
    assert!(
        printed.contains("pgbouncer:6432/telemetry") && printed.contains("password = \"***\""),
        "{printed}"
    );
}

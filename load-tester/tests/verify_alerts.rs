//! `--verify-alerts` against real servers: PostgreSQL through PgBouncer (transaction mode) with
//! the alerts schema, and Mosquitto, in one story behind the local stack's own ACL
//! (`scripts/mosquitto-acl.conf`) with per-user logins. Each test has its own database and
//! user prefix.

use std::collections::HashMap;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::Parser;
use load_tester::alerts::{self, AlertExpectation, Receipt, Receipts};
use load_tester::config::{Args, Config};
use load_tester::stats::Ledger;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use telemetry_alerts::outbox::{self, MqttConfig};
use telemetry_alerts::{evaluate, DeviceState, Outbox, OutboxConfig, Reading, RuleSet};
use telemetry_core::contract::{decode_payload, parse_telemetry_topic, DeviceId};
use telemetry_core::Shutdown;
use test_servers::{unique_name, Mosquitto};
use tokio_postgres::NoTls;

/// The stack's ACL: device owners, the bridge and the worker's alert publisher.
const STACK_ACL: &str = include_str!("../../scripts/mosquitto-acl.conf");

/// The stack's rule (deploy/alerts/rules.toml): above 80.0 raises, below 75.0 clears.
const RULES: &str = include_str!("../../deploy/alerts/rules.toml");

/// A fresh database with the worker's schema, alerts included; returns a direct connection and
/// the PgBouncer URL.
async fn fresh_database() -> (tokio_postgres::Client, String) {
    let servers = test_servers::shared();
    let name = unique_name("alerts_check");
    servers.postgres.create_database(&name).unwrap();
    let (mut client, connection) = tokio_postgres::connect(&servers.postgres.url(&name), NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    telemetry_worker::schema::migrate(&mut client)
        .await
        .unwrap();
    let has_alerts: bool = client
        .query_one("SELECT to_regclass('alerts') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    if !has_alerts {
        client
            .batch_execute(telemetry_alerts::SCHEMA_SQL)
            .await
            .unwrap();
    }
    (client, servers.pgbouncer.url(&name))
}

fn last_json_line(output: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_else(|| {
        panic!(
            "no stdout; stderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_alerts_names_a_missing_and_a_duplicated_alert_row() {
    let (client, pgbouncer) = fresh_database().await;
    // A fake run: 2 users x 2 devices x 8 readings at a quarter; each device raises at reading
    // 3, clears at 4 and raises again at 7. Reading k of device g was due 100 ms x k + g ms
    // after a fixed start.
    let start = Duration::from_millis(1_764_000_000_000);
    let expectation = AlertExpectation::new(
        vec!["fake-1".into(), "fake-2".into()],
        vec!["dev-1".into(), "dev-2".into()],
        0,
        "high-temperature".into(),
        load_tester::payload::AlertPlan::aligned(0.25),
        &(0..4).map(|_| Ledger::confirmed(8)).collect::<Vec<_>>(),
        |g, k| start + Duration::from_millis(100 * k + g as u64),
    );
    assert_eq!(expectation.events().len(), 12);
    // What the worker would have stored and published for them.
    for (n, event) in expectation.events().iter().enumerate() {
        let (user, device) = (
            format!("fake-{}", event.device / 2 + 1),
            format!("dev-{}", event.device % 2 + 1),
        );
        client
            .execute(
                "INSERT INTO alerts (alert_id, event, rule, severity, user_id, device_id,
                                     kafka_partition, kafka_offset, occurred_at, body, published_at)
                 VALUES ($1, $2, 'high-temperature', 'warning', $3, $4, 0, $5,
                         to_timestamp($6::float8 / 1000), '{}', now())",
                &[
                    &format!("alert-{n}"),
                    &event.kind.as_str(),
                    &user,
                    &device,
                    &(n as i64),
                    &(event.occurred_at_ms as f64),
                ],
            )
            .await
            .unwrap();
    }
    // Then one alert goes missing and another is stored a second time under a new id.
    client
        .batch_execute(
            "DELETE FROM alerts WHERE user_id = 'fake-1' AND device_id = 'dev-2' AND event = 'cleared';
             INSERT INTO alerts (alert_id, event, rule, severity, user_id, device_id,
                                 kafka_partition, kafka_offset, occurred_at, body, published_at)
             SELECT 'copy', event, rule, severity, user_id, device_id, kafka_partition,
                    kafka_offset + 100, occurred_at, body, published_at
             FROM alerts WHERE user_id = 'fake-2' AND device_id = 'dev-1'
                           AND occurred_at = (SELECT max(occurred_at) FROM alerts
                                              WHERE user_id = 'fake-2' AND device_id = 'dev-1');",
        )
        .await
        .unwrap();
    // The subscriber got every stored alert once, 20 ms after its reading.
    let receipts = Receipts::default();
    for row in client
        .query(
            "SELECT alert_id, event, user_id, device_id, extract(epoch FROM occurred_at)::float8 FROM alerts",
            &[],
        )
        .await
        .unwrap()
    {
        let (alert_id, event, user, device, at): (String, String, String, String, f64) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        receipts.record(Receipt {
            topic: format!("users/{user}/devices/{device}/alerts"),
            alert_id,
            event,
            at: SystemTime::UNIX_EPOCH + Duration::from_secs_f64(at + 0.020),
        });
    }

    let v = alerts::verify(
        &pgbouncer,
        &expectation,
        &receipts,
        Duration::from_secs(2),
        &Shutdown::new(),
    )
    .await
    .unwrap();

    assert!(!v.passed());
    assert_eq!((v.expected, v.stored), (12, 12));
    assert_eq!(
        (v.missing, v.duplicated, v.unexpected, v.unpublished),
        (1, 1, 0, 0),
        "{v:?}"
    );
    assert_eq!(v.missing_examples, ["fake-1/dev-2 seq 4 cleared"]);
    assert_eq!(
        v.duplicated_examples,
        ["fake-2/dev-1 seq 7 raised (stored 2 times)"]
    );
    assert_eq!(
        (v.received, v.not_received, v.received_twice, v.misdelivered),
        (11, 0, 0, 0),
        "{v:?}"
    );
    assert!(v.timed_out, "a missing alert keeps the check waiting");
    let latency = v.latency.summary().unwrap();
    assert!((latency.p50 - 20.0).abs() < 1.0, "{latency:?}");
}

#[test]
fn alerts_that_never_come_fail_the_run_with_exit_code_3() {
    // Nothing evaluates the readings, so no alert is ever stored or published.
    let (_, pgbouncer) = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(fresh_database());
    let prefix = format!("{}-u", unique_name("noalerts"));
    let port = test_servers::shared().mosquitto.port().to_string();
    let output = Command::new(env!("CARGO_BIN_EXE_load-tester"))
        .args(["--mqtt-host", "127.0.0.1", "--mqtt-port", &port])
        .args(["--rate", "50", "--messages", "6", "--alert-fraction", "0.5"])
        .args(["--user-prefix", &prefix, "--json", "--verify-alerts"])
        .args(["--database-url", &pgbouncer, "--verify-timeout", "1s"])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    let report = last_json_line(&output);
    // Alert readings 1, 3 and 5: raised at 1, 3, 5 and cleared at 2, 4.
    assert_eq!(report["alerts_expected"], 5, "{report}");
    assert_eq!(report["alerts_missing"], 5);
    assert_eq!(
        report["alerts_missing_examples"][0],
        format!("{prefix}1/dev-1 seq 1 raised")
    );
    assert_eq!(report["alerts_timed_out"], true);
    assert_eq!(report["alert_rule"], "high-temperature");
    assert!(report["alert_ms"].is_null(), "nothing arrived: {report}");
    assert_eq!(report["passed"], false);
    assert!(stderr.contains("alert missing"), "{stderr}");
}

/// A broker with the stack's ACL and per-user logins: `<user>` / `secret-<user>` for the
/// device owners, and the two service accounts.
fn broker_with_acl(users: &[String]) -> (Mosquitto, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let passwords = dir.path().join("passwd");
    let mut lines: Vec<String> = users.iter().map(|u| format!("{u}:secret-{u}")).collect();
    lines.push("telemetry-bridge:telemetry-bridge".into());
    lines.push("telemetry-worker:telemetry-worker".into());
    std::fs::write(&passwords, lines.join("\n") + "\n").unwrap();
    let hashed = Command::new("mosquitto_passwd")
        .arg("-U")
        .arg(&passwords)
        .status()
        .expect("mosquitto_passwd runs (apt-get install mosquitto)");
    assert!(hashed.success());
    let acl = dir.path().join("acl");
    std::fs::write(&acl, STACK_ACL).unwrap();
    let broker = Mosquitto::start_with_config(&format!(
        "allow_anonymous false\npassword_file {}\nacl_file {}\n",
        passwords.display(),
        acl.display()
    ))
    .unwrap();
    (broker, dir)
}

/// An MQTT client that has been granted `filter`.
async fn subscribed(port: u16, login: (&str, &str), filter: &str) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(unique_name("alerts-test"), "127.0.0.1", port);
    options.set_credentials(login.0, login.1);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    loop {
        match eventloop.poll().await.unwrap() {
            Event::Incoming(Packet::SubAck(_)) => return (client, eventloop),
            _ => continue,
        }
    }
}

/// The pipeline's alert path without Kafka: reads every device's telemetry with the bridge's
/// login, evaluates each reading with the real rules engine, stores the events with the
/// outbox's own insert, and lets the real outbox publish them with the worker's login.
async fn alert_path(port: u16, pgbouncer: &str, shutdown: Shutdown) {
    let pool = telemetry_worker::create_pool(&telemetry_worker::config::PostgresConfig {
        url: pgbouncer.to_owned(),
        ..Default::default()
    })
    .unwrap();
    let outbox = Outbox::new(OutboxConfig {
        mqtt: MqttConfig {
            host: "127.0.0.1".into(),
            port,
            client_id: unique_name("outbox"),
            username: Some("telemetry-worker".into()),
            password: Some(telemetry_core::config::Secret::new("telemetry-worker")),
            ..MqttConfig::default()
        },
        ..OutboxConfig::default()
    })
    .unwrap();
    let waker = outbox.waker();
    tokio::spawn(outbox.run(pool.clone(), shutdown.clone()));

    let rules = RuleSet::from_toml(RULES).unwrap();
    let (_client, mut eventloop) = subscribed(
        port,
        ("telemetry-bridge", "telemetry-bridge"),
        "users/+/devices/+/telemetry",
    )
    .await;
    tokio::spawn(async move {
        let mut states: HashMap<DeviceId, DeviceState> = HashMap::new();
        let offset = AtomicU64::new(0);
        loop {
            let event = tokio::select! {
                _ = shutdown.wait() => return,
                event = eventloop.poll() => event,
            };
            let Ok(Event::Incoming(Packet::Publish(publish))) = event else {
                continue;
            };
            let device = parse_telemetry_topic(publish.topic.as_bytes()).unwrap();
            let telemetry = decode_payload(&publish.payload, 65536).unwrap();
            let state = states.entry(device.clone()).or_default();
            let events = evaluate(
                &rules,
                state,
                &Reading {
                    device: &device,
                    payload: &publish.payload,
                    time: telemetry.device_time.unwrap(),
                    partition: 0,
                    offset: offset.fetch_add(1, Ordering::Relaxed) as i64,
                },
            );
            if events.is_empty() {
                continue;
            }
            let mut client = pool.get().await.unwrap();
            let tx = client.transaction().await.unwrap();
            outbox::insert_events(&tx, &events).await.unwrap();
            tx.commit().await.unwrap();
            waker.wake();
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_alert_reaches_its_owner_once_through_the_stacks_acl() {
    let (_, pgbouncer) = fresh_database().await;
    let prefix = format!("{}-u", unique_name("acl"));
    let users: Vec<String> = (1..=3).map(|n| format!("{prefix}{n}")).collect();
    let (broker, _dir) = broker_with_acl(&users);
    let port = broker.port();
    let shutdown = Shutdown::new();
    alert_path(port, &pgbouncer, shutdown.clone()).await;
    // User 1 tries to read user 2's alerts: the ACL lets the subscription through but must
    // deliver nothing on it.
    let password = format!("secret-{}", users[0]);
    let (_eavesdropper, mut overheard) = subscribed(
        port,
        (&users[0], &password),
        &format!("users/{}/devices/+/alerts", users[1]),
    )
    .await;
    let overheard_count = Arc::new(AtomicU64::new(0));
    let counting = overheard_count.clone();
    tokio::spawn(async move {
        while let Ok(event) = overheard.poll().await {
            if let Event::Incoming(Packet::Publish(_)) = event {
                counting.fetch_add(1, Ordering::Relaxed);
            }
        }
    });

    let port_flag = port.to_string();
    let argv = [
        "load-tester",
        "--mqtt-host",
        "127.0.0.1",
        "--mqtt-port",
        &port_flag,
        "--users",
        "3",
        "--devices-per-user",
        "2",
        "--rate",
        "20",
        "--messages",
        "40",
        "--alert-fraction",
        "0.2",
        "--user-prefix",
        &prefix,
        "--mqtt-credentials-per-user",
        "{user}:secret-{user}",
        "--verify-alerts",
        "--database-url",
        &pgbouncer,
        "--verify-timeout",
        "20s",
    ];
    let config = Config::from_args(Args::try_parse_from(argv).unwrap()).unwrap();
    let report = load_tester::run(&config, &Shutdown::new()).await.unwrap();
    shutdown.trigger();

    // Eight alert readings per device, spread by the device's place g of 6 in the fleet: the
    // last reading (39) is one only for g = 0 and 1, whose last alert stays raised (8 raises,
    // 7 clears); the other four clear theirs too. A publisher that phased devices by their
    // place on their own connection (0 or 1) would send readings this count does not expect.
    assert_eq!(report.alerts_expected, Some(2 * 15 + 4 * 16), "{report}");
    assert!(report.passed, "{report}");
    assert_eq!(report.alerts_received, Some(94), "{report}");
    assert_eq!(
        (report.alerts_misdelivered, report.alerts_received_twice),
        (Some(0), Some(0))
    );
    let latency = report.alert_ms.expect("alert latency measured");
    assert!(latency.p50 > 0.0 && latency.max < 20_000.0, "{latency:?}");
    assert_eq!(
        overheard_count.load(Ordering::Relaxed),
        0,
        "user 1 received user 2's alerts"
    );
}

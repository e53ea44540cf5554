//! The load tester against a real Mosquitto and a real PostgreSQL (through PgBouncer in
//! transaction mode where the tester would meet it in production). Each test uses its own user
//! prefix and database, so they run in parallel on the shared servers.

use std::collections::HashMap;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use clap::Parser;
use load_tester::config::{Args, Config};
use load_tester::stats::Ledger;
use load_tester::verify::{self, Expectation, VerifyError};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use telemetry_core::Shutdown;
use test_servers::unique_name;
use tokio_postgres::NoTls;

fn mqtt_port() -> String {
    test_servers::shared().mosquitto.port().to_string()
}

/// A run's flags, pointed at the shared Mosquitto.
fn config(flags: &[&str]) -> Config {
    let port = mqtt_port();
    let argv = [
        "load-tester",
        "--mqtt-host",
        "127.0.0.1",
        "--mqtt-port",
        &port,
    ]
    .into_iter()
    .chain(flags.iter().copied());
    Config::from_args(Args::try_parse_from(argv).unwrap()).unwrap()
}

/// Runs the binary with `flags` (plus the shared Mosquitto's address unless told otherwise).
fn load_tester(flags: &[&str]) -> Output {
    let port = mqtt_port();
    Command::new(env!("CARGO_BIN_EXE_load-tester"))
        .args(["--mqtt-host", "127.0.0.1", "--mqtt-port", &port])
        .args(flags)
        .env_remove("DATABASE_URL")
        .output()
        .expect("the load-tester binary runs")
}

/// A fresh database with the worker's schema; returns a direct connection to it and its
/// PgBouncer URL.
async fn fresh_database() -> (tokio_postgres::Client, String) {
    let servers = test_servers::shared();
    let name = unique_name("load_tester");
    servers.postgres.create_database(&name).unwrap();
    let (mut client, connection) = tokio_postgres::connect(&servers.postgres.url(&name), NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    telemetry_worker::schema::migrate(&mut client)
        .await
        .unwrap();
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
async fn the_schedule_holds_the_requested_rate_at_the_broker() {
    // 20 devices x 25 msg/s for 4 s: 2000 messages, one every 2 ms fleet-wide.
    let prefix = format!("{}-u", unique_name("rate"));
    let config = config(&[
        "--users",
        "4",
        "--devices-per-user",
        "5",
        "--rate",
        "25",
        "--duration",
        "4s",
        "--user-prefix",
        &prefix,
    ]);

    let mut options = MqttOptions::new(
        unique_name("rate_subscriber"),
        "127.0.0.1",
        test_servers::shared().mosquitto.port(),
    );
    options.set_keep_alive(Duration::from_secs(5));
    let (subscriber, mut events) = AsyncClient::new(options, 100);
    subscriber
        .subscribe("users/+/devices/+/telemetry", QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = events.poll().await.unwrap() {
            break;
        }
    }
    let ours = format!("users/{prefix}");
    let received = tokio::spawn(async move {
        let mut received: Vec<(Instant, String, i64)> = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while received.len() < 2000 {
            match tokio::time::timeout_at(deadline, events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic.starts_with(&ours) => {
                    let payload: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                    received.push((
                        Instant::now(),
                        p.topic.clone(),
                        payload["seq"].as_i64().unwrap(),
                    ));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("subscriber lost its connection: {e}"),
                Err(_) => break,
            }
        }
        received
    });

    let report = load_tester::run(&config, &Shutdown::new()).await.unwrap();
    let received = received.await.unwrap();

    assert_eq!(
        (report.planned, report.sent, report.acked),
        (2000, 2000, Some(2000)),
        "{report}"
    );
    assert_eq!(received.len(), 2000, "the subscriber got every message");
    let span = received.last().unwrap().0 - received[0].0;
    let rate = (received.len() - 1) as f64 / span.as_secs_f64();
    assert!(
        (rate - 500.0).abs() <= 500.0 * 0.02,
        "received {rate:.1} msg/s, wanted 500 +- 2%\n{report}"
    );

    let mut per_device: HashMap<String, Vec<i64>> = HashMap::new();
    for (_, topic, seq) in received {
        per_device.entry(topic).or_default().push(seq);
    }
    assert_eq!(per_device.len(), 20);
    for (topic, seqs) in per_device {
        assert_eq!(
            seqs,
            (0..100).collect::<Vec<_>>(),
            "{topic} sent its sequence in order without gaps"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_a_deleted_row_and_a_duplicated_row() {
    let (client, pgbouncer) = fresh_database().await;
    // A fake run: 2 users x 2 devices x seq 0..=9, stored 40 ms after it was sent.
    client
        .batch_execute(
            "INSERT INTO raw_telemetry
             SELECT now() - interval '1 minute', now(), now() - interval '1 minute' + interval '40 ms',
                    'fake-' || u, 'dev-' || d, s, jsonb_build_object('seq', s, 'v', 1), 0, s
             FROM generate_series(1, 2) u, generate_series(1, 2) d, generate_series(0, 9) s;
             DELETE FROM raw_telemetry WHERE user_id = 'fake-1' AND device_id = 'dev-2' AND seq = 3;
             INSERT INTO raw_telemetry
             SELECT * FROM raw_telemetry WHERE user_id = 'fake-2' AND device_id = 'dev-1' AND seq = 7;",
        )
        .await
        .unwrap();
    let expectation = Expectation::new(
        vec!["fake-1".into(), "fake-2".into()],
        vec!["dev-1".into(), "dev-2".into()],
        0,
        10,
        (0..4).map(|_| Ledger::confirmed(10)).collect(),
    );

    let started = Instant::now();
    let v = verify::verify(
        &pgbouncer,
        &expectation,
        Duration::from_secs(2),
        &Shutdown::new(),
    )
    .await
    .unwrap();

    assert!(!v.passed());
    assert_eq!((v.expected, v.stored_rows), (40, 40));
    assert_eq!(
        (v.lost, v.duplicated, v.duplicate_rows, v.unexpected),
        (1, 1, 1, 0),
        "{v:?}"
    );
    assert_eq!(v.lost_examples, ["fake-1/dev-2 seq 3"]);
    assert_eq!(
        v.duplicated_examples,
        ["fake-2/dev-1 seq 7 (stored 2 times)"]
    );
    assert!(
        v.timed_out,
        "a missing row keeps the check waiting until its timeout"
    );
    assert!(started.elapsed() >= Duration::from_secs(2));
    let e2e = v.e2e.summary().unwrap();
    assert!((e2e.p50 - 40.0).abs() < 1.0, "{e2e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_refuses_to_start_when_the_run_would_mix_with_earlier_rows() {
    let (client, pgbouncer) = fresh_database().await;
    client
        .batch_execute(
            "INSERT INTO raw_telemetry VALUES
             (now(), now(), now(), 'old-1', 'dev-1', 5, '{\"v\":1}', 0, 0)",
        )
        .await
        .unwrap();
    let config = config(&[
        "--users",
        "2",
        "--user-prefix",
        "old-",
        "--verify",
        "--database-url",
        &pgbouncer,
    ]);

    let error = verify::preflight(&pgbouncer, &config).await.unwrap_err();
    assert!(
        matches!(error, VerifyError::ScopeNotEmpty { rows: 1, .. }),
        "{error}"
    );
    assert!(error.to_string().contains("--user-prefix"), "{error}");
    let later = config_with_seq_start(&config, 6);
    verify::preflight(&pgbouncer, &later).await.unwrap();
}

fn config_with_seq_start(config: &Config, seq_start: i64) -> Config {
    Config {
        seq_start,
        ..config.clone()
    }
}

#[test]
fn json_output_is_one_parsable_object_on_the_last_line() {
    let prefix = format!("{}-u", unique_name("json"));
    let output = load_tester(&[
        "--users",
        "2",
        "--devices-per-user",
        "2",
        "--rate",
        "50",
        "--messages",
        "20",
        "--qos",
        "1",
        "--user-prefix",
        &prefix,
        "--json",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        stdout.lines().count(),
        1,
        "stdout holds only the JSON line: {stdout}"
    );

    let report = last_json_line(&output);
    assert_eq!(report["planned"], 80);
    assert_eq!(report["sent"], 80);
    assert_eq!(report["acked"], 80);
    assert_eq!(report["unacked"], 0);
    assert_eq!(report["not_sent"], 0);
    assert_eq!(report["errors"], 0);
    assert_eq!(report["qos"], 1);
    assert_eq!(report["passed"], true);
    assert!(report["publish_rate"].as_f64().unwrap() > 0.0);
    for figure in ["p50", "p90", "p99", "max"] {
        assert!(
            report["puback_ms"][figure].as_f64().is_some(),
            "puback_ms.{figure}: {report}"
        );
        assert!(
            report["behind_schedule_ms"][figure].as_f64().is_some(),
            "behind_schedule_ms.{figure}"
        );
    }
    assert!(
        report["e2e_ms"].is_null() && report["lost"].is_null(),
        "not verified: {report}"
    );
    // The table went to stderr.
    assert!(String::from_utf8_lossy(&output.stderr).contains("result      PASS"));
}

#[test]
fn qos_0_runs_have_no_acknowledgements_to_report() {
    let prefix = format!("{}-u", unique_name("qos0"));
    let output = load_tester(&[
        "--rate",
        "100",
        "--messages",
        "30",
        "--qos",
        "0",
        "--user-prefix",
        &prefix,
        "--json",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = last_json_line(&output);
    assert_eq!(
        (report["sent"].as_u64(), report["qos"].as_u64()),
        (Some(30), Some(0))
    );
    assert!(
        report["acked"].is_null() && report["puback_ms"].is_null(),
        "{report}"
    );
}

#[test]
fn messages_that_never_reach_the_database_fail_verification() {
    // Nothing moves messages from Mosquitto to this database, so every one is lost.
    let (_, pgbouncer) = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(fresh_database());
    let prefix = format!("{}-u", unique_name("lost"));
    let output = load_tester(&[
        "--rate",
        "100",
        "--messages",
        "10",
        "--user-prefix",
        &prefix,
        "--json",
        "--verify",
        "--database-url",
        &pgbouncer,
        "--verify-timeout",
        "1s",
    ]);
    assert_eq!(
        output.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = last_json_line(&output);
    assert_eq!(
        (report["lost"].as_u64(), report["duplicated"].as_u64()),
        (Some(10), Some(0)),
        "{report}"
    );
    assert_eq!(report["lost_examples"][0], format!("{prefix}1/dev-1 seq 0"));
    assert_eq!(report["verify_timed_out"], true);
    assert_eq!(report["passed"], false);
}

#[test]
fn bad_arguments_are_refused_with_the_flag_named() {
    for (flags, expected) in [
        (&["--rate", "0"][..], "'--rate'"),
        (&["--alert-fraction", "2"], "'--alert-fraction'"),
        (&["--users", "0"], "'--users'"),
        (&["--qos", "2"], "--qos"),
        (&["--duration", "soon"], "--duration"),
        (&["--verify"], "--database-url"),
        (&["--verify-alerts"], "--database-url"),
        (
            &[
                "--verify-alerts",
                "--database-url",
                "postgres://db/x",
                "--rate",
                "2000",
            ],
            "'--rate'",
        ),
    ] {
        let output = load_tester(flags);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{flags:?} should mention {expected}: {stderr}"
        );
        assert!(output.stdout.is_empty(), "{flags:?} printed a report");
    }
}

#[test]
fn an_unreachable_broker_is_an_error_that_names_it() {
    // Port 1 on loopback has no listener (and needs root to open), so the connect is refused.
    let output = Command::new(env!("CARGO_BIN_EXE_load-tester"))
        .args([
            "--mqtt-host",
            "127.0.0.1",
            "--mqtt-port",
            "1",
            "--messages",
            "1",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("could not connect to the MQTT broker at 127.0.0.1:1"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_is_reported_and_the_run_goes_on_after_it() {
    // A private broker, because this test stops it.
    let broker = test_servers::Mosquitto::start().unwrap();
    let port = broker.port().to_string();
    let argv = [
        "load-tester",
        "--mqtt-host",
        "127.0.0.1",
        "--mqtt-port",
        &port,
        "--users",
        "3",
        "--rate",
        "50",
        "--duration",
        "6s",
    ];
    let config = Config::from_args(Args::try_parse_from(argv).unwrap()).unwrap();

    let run = tokio::spawn(async move { load_tester::run(&config, &Shutdown::new()).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let broker = tokio::task::spawn_blocking(move || {
        broker.stop();
        std::thread::sleep(Duration::from_secs(1));
        broker.start_again().unwrap();
        broker
    })
    .await
    .unwrap();
    let report = run.await.unwrap().unwrap();
    drop(broker);

    assert!(report.errors >= 1, "the outage is counted\n{report}");
    assert!(report.first_error.is_some());
    assert_eq!(report.sent + report.not_sent, report.planned, "{report}");
    assert_eq!(
        report.acked.unwrap() + report.unacked.unwrap(),
        report.sent,
        "{report}"
    );
    assert!(
        report.sent >= report.planned / 2,
        "publishing resumed after the restart\n{report}"
    );
    assert!(
        report.not_sent > 0,
        "messages due while the broker was down are not sent\n{report}"
    );
    assert_eq!(report.exit_code(), load_tester::report::EXIT_INCOMPLETE);
}

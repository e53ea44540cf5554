//! Above capacity, while a backlog drains, and through a bridge crash: the whole pipeline on
//! real servers, with the bridge and the worker as their real binaries (their own runtimes, and
//! a kill -9 that is a real crash) and devices from the load-tester. The promise: every reading
//! a device got a PUBACK for is stored exactly once, and the bridge keeps its MQTT session.
//!
//! These tests run one at a time: each saturates both cores on purpose.
//!
//! `make test` runs debug builds, which store about 15,000 readings/s here; `make bench-overload`
//! measures the release builds on the local stack.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use load_tester::config::{Args, Config};
use load_tester::report::Report;
use telemetry_bridge::metrics as bridge_metrics;
use telemetry_core::Shutdown;
use test_servers::{free_addr, http_get, shared, unique_name};

/// One test at a time: they measure the pipeline at full load.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A stage's real binary, built by `cargo test --workspace` beside this test's binary.
struct Stage {
    binary: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    http: SocketAddr,
    log: PathBuf,
    child: Option<Child>,
}

impl Stage {
    fn start(name: &str, args: Vec<String>, env: Vec<(String, String)>) -> Stage {
        let target = std::env::current_exe().expect("this test's path");
        let binary = target
            .parent()
            .and_then(|deps| deps.parent())
            .expect("target directory")
            .join(name);
        assert!(
            binary.exists(),
            "{} is missing: run `cargo test --workspace` (or `cargo build -p {name}`) first",
            binary.display()
        );
        let http = free_addr();
        let log = test_servers::log_dir().join(format!("{}.log", unique_name(name)));
        let mut stage = Stage {
            binary,
            args,
            env,
            http,
            log,
            child: None,
        };
        stage.spawn();
        stage
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("stage log file");
        let child = Command::new(&self.binary)
            .args(&self.args)
            .args(["--http-listen", &self.http.to_string()])
            .env("RUST_LOG", "info,librdkafka=warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("stage starts");
        self.child = Some(child);
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while http_get(self.http, "/readyz").await.map(|(s, _)| s) != Some(200) {
            assert!(
                Instant::now() < deadline,
                "{} not ready within 60 s; log:\n{}",
                self.binary.display(),
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and a clean exit within 40 s.
    fn terminate(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        match test_servers::terminate(&mut child, Duration::from_secs(40)) {
            Some(status) => assert!(
                status.success(),
                "exited with {status}; log:\n{}",
                self.log_text()
            ),
            None => panic!("did not stop within 40 s; log:\n{}", self.log_text()),
        }
    }

    async fn metric(&self, name: &str) -> f64 {
        let page = http_get(self.http, "/metrics")
            .await
            .map(|(_, page)| page)
            .unwrap_or_default();
        test_servers::metric_value(&page, name)
    }

    fn peak_rss_mb(&self) -> f64 {
        let Some(child) = &self.child else { return 0.0 };
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A test's own database, topics, users and stages on this binary's servers.
struct Pipeline {
    database: String,
    user_prefix: String,
    users: u64,
    bridge: Stage,
    worker: Stage,
}

impl Pipeline {
    async fn start(users: u64) -> Pipeline {
        let servers = shared();
        let database = unique_name("overload");
        servers.postgres.create_database(&database).unwrap();
        let topic = unique_name("iot_stream");
        let dlq = format!("{topic}_dlq");
        servers.kafka.create_topic(&topic, 6).unwrap();
        servers.kafka.create_topic(&dlq, 1).unwrap();
        let user_prefix = format!("{}-u", unique_name("load"));
        let brokers = servers.kafka.bootstrap();
        let bridge_config = test_servers::log_dir().join(format!("{}.toml", unique_name("bridge")));
        // This test's users only: a bridge session of another test must not queue their readings.
        let subscriptions: Vec<String> = (1..=users)
            .map(|u| format!("\"users/{user_prefix}{u}/devices/+/telemetry\""))
            .collect();
        std::fs::write(
            &bridge_config,
            format!(
                "[mqtt]\nhost = \"127.0.0.1\"\nport = {}\nclient_id = \"{}\"\nsubscriptions = [{}]\nbroker_stats = true\n",
                servers.mosquitto.port(),
                unique_name("bridge"),
                subscriptions.join(", ")
            ),
        )
        .unwrap();
        let bridge = Stage::start(
            "telemetry-bridge",
            vec![
                "--config".into(),
                bridge_config.display().to_string(),
                "--brokers".into(),
                brokers.clone(),
                "--topic".into(),
                topic.clone(),
                "--dlq-topic".into(),
                dlq.clone(),
            ],
            Vec::new(),
        );
        let worker = Stage::start(
            "telemetry-worker",
            vec![
                "--brokers".into(),
                brokers,
                "--topic".into(),
                topic,
                "--dlq-topic".into(),
                dlq,
                "--group-id".into(),
                unique_name("group"),
                "--database-url".into(),
                servers.pgbouncer.url(&database),
            ],
            Vec::new(),
        );
        worker.wait_ready().await;
        bridge.wait_ready().await;
        Pipeline {
            database,
            user_prefix,
            users,
            bridge,
            worker,
        }
    }

    /// The load-tester's flags for this pipeline's users, verifying against its database.
    fn load(&self, devices_per_user: u64, rate: f64, amount: &[&str]) -> Config {
        let servers = shared();
        let port = servers.mosquitto.port().to_string();
        let users = self.users.to_string();
        let devices = devices_per_user.to_string();
        let rate = rate.to_string();
        let url = servers.pgbouncer.url(&self.database);
        let mut argv = vec![
            "load-tester",
            "--mqtt-host",
            "127.0.0.1",
            "--mqtt-port",
            &port,
            "--users",
            &users,
            "--devices-per-user",
            &devices,
            "--rate",
            &rate,
            "--user-prefix",
            &self.user_prefix,
            "--verify",
            "--database-url",
            &url,
            "--verify-timeout",
            "15m",
        ];
        argv.extend_from_slice(amount);
        Config::from_args(Args::try_parse_from(argv).unwrap()).unwrap()
    }

    async fn rows(&self) -> i64 {
        let url = shared().postgres.url(&self.database);
        let Ok((client, connection)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await
        else {
            return 0;
        };
        tokio::spawn(connection);
        match client
            .query_one("SELECT count(*) FROM raw_telemetry", &[])
            .await
        {
            Ok(row) => row.get(0),
            Err(_) => 0,
        }
    }
}

fn assert_exactly_once(story: &str, report: &Report) {
    println!(
        "{story}: sent {}, acked {:?}, stored {:?}, lost {:?}, duplicated {:?}, publish rate {:.0} msg/s, verify waited {:?} s",
        report.sent,
        report.acked,
        report.stored_rows,
        report.lost,
        report.duplicated,
        report.publish_rate,
        report.verify_waited_s,
    );
    assert!(report.verified, "{story}: the run was verified");
    assert_eq!(
        report.lost,
        Some(0),
        "{story}: lost {:?}",
        report.lost_examples
    );
    assert_eq!(
        report.duplicated,
        Some(0),
        "{story}: duplicated {:?}",
        report.duplicated_examples
    );
    assert_eq!(report.unexpected, Some(0), "{story}: unexpected rows");
}

/// The rows stored `after` the load started: compared with what was published by then, it
/// tells whether the pipeline kept up.
async fn rows_after(pipeline: &Pipeline, after: Duration) -> i64 {
    tokio::time::sleep(after).await;
    pipeline.rows().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_capacity_for_60_s_every_acknowledged_reading_is_stored_once_and_the_bridge_keeps_its_session(
) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let pipeline = Pipeline::start(10).await;
    // 22,500 msg/s offered: 1.5 times what this debug build of the pipeline stores on two cores
    // that also run the brokers, the database and the devices (about 15,000 msg/s); the rows
    // stored when the load ends prove it.
    const SECONDS: u64 = 60;
    let config = pipeline.load(10, 225.0, &["--duration", "60s"]);
    let started = Instant::now();
    let never = Shutdown::new();
    let (report, rows_at_end) = tokio::join!(
        load_tester::run(&config, &never),
        rows_after(&pipeline, Duration::from_secs(SECONDS))
    );
    let report = report.expect("load-tester run");
    let reconnects = pipeline
        .bridge
        .metric(bridge_metrics::MQTT_RECONNECTS)
        .await;
    let held = pipeline.bridge.metric(bridge_metrics::HELD).await;
    println!(
        "overload: {:.0} msg/s published for {SECONDS} s, {rows_at_end} of {} readings stored when the load ended, all drained and verified after {:.0} s, bridge peak RSS {:.0} MB, {reconnects} reconnects",
        report.publish_rate,
        report.sent,
        started.elapsed().as_secs_f64(),
        pipeline.bridge.peak_rss_mb()
    );
    assert_exactly_once("overload", &report);
    assert!(
        (rows_at_end as f64) < 0.85 * report.sent as f64,
        "the pipeline kept up ({rows_at_end} of {} stored when the load ended): this test proves nothing unless the load is above capacity",
        report.sent
    );
    assert_eq!(reconnects, 0.0, "the bridge never lost its MQTT session");
    assert_eq!(held, 0.0, "the bridge holds nothing once drained");
    assert_eq!(
        http_get(pipeline.bridge.http, "/healthz")
            .await
            .map(|(s, _)| s),
        Some(200)
    );
    let mut pipeline = pipeline;
    pipeline.bridge.terminate();
    pipeline.worker.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_500_000_readings_at_the_broker_drains_with_no_duplicate_and_no_reconnect() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut pipeline = Pipeline::start(10).await;
    // The bridge's session and subscriptions stay at the broker while it is away.
    pipeline.bridge.terminate();
    // 100 devices x 5,000 readings, published as fast as the broker takes them; the load-tester
    // verifies after the bridge is back, so it runs in the background.
    let config = pipeline.load(10, 20_000.0, &["--messages", "5000"]);
    let run = tokio::spawn(async move { load_tester::run(&config, &Shutdown::new()).await });
    let deadline = Instant::now() + Duration::from_secs(300);
    let stored_at_broker = loop {
        // Mosquitto's $SYS count, read through a throwaway bridge-less probe: the count of
        // messages it stores, published every 10 s; the load-tester's own progress is on stderr.
        let queued = mosquitto_stored_messages().await;
        if queued >= 500_000 || Instant::now() > deadline {
            break queued;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    assert!(
        stored_at_broker >= 500_000,
        "only {stored_at_broker} readings queued at the broker within 300 s"
    );
    let drain_started = Instant::now();
    pipeline.bridge.spawn();
    pipeline.bridge.wait_ready().await;
    let report = run.await.unwrap().expect("load-tester run");
    let drain_s = drain_started.elapsed().as_secs_f64();
    let reconnects = pipeline
        .bridge
        .metric(bridge_metrics::MQTT_RECONNECTS)
        .await;
    println!(
        "backlog: {stored_at_broker} queued at the broker, drained into the table and verified in {drain_s:.0} s ({:.0} readings/s), bridge peak RSS {:.0} MB, {reconnects} reconnects",
        stored_at_broker as f64 / drain_s,
        pipeline.bridge.peak_rss_mb()
    );
    assert_exactly_once("backlog", &report);
    assert_eq!(report.acked, Some(500_000));
    assert_eq!(reconnects, 0.0, "the bridge never lost its MQTT session");
    pipeline.bridge.terminate();
    pipeline.worker.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_killed_under_load_leaves_every_reading_stored_exactly_once() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut pipeline = Pipeline::start(4).await;
    let config = pipeline.load(5, 100.0, &["--duration", "30s"]);
    let run = tokio::spawn(async move { load_tester::run(&config, &Shutdown::new()).await });
    // Kill it twice, with readings confirmed by Kafka and not yet acknowledged at each kill.
    for _ in 0..2 {
        let deadline = Instant::now() + Duration::from_secs(60);
        let start = pipeline.rows().await;
        while pipeline.rows().await < start + 3_000 {
            assert!(Instant::now() < deadline, "no progress before the kill");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        pipeline.bridge.kill9();
        tokio::time::sleep(Duration::from_secs(2)).await;
        pipeline.bridge.spawn();
        pipeline.bridge.wait_ready().await;
    }
    let report = run.await.unwrap().expect("load-tester run");
    let copies = pipeline
        .worker
        .metric(telemetry_worker::metrics::COPIES_DROPPED)
        .await;
    println!("bridge kill -9 twice: the worker dropped {copies} copies delivered again by MQTT");
    assert_exactly_once("bridge kill -9 under load", &report);
    pipeline.bridge.terminate();
    pipeline.worker.terminate();
}

/// `$SYS/broker/store/messages/count` of the shared Mosquitto (retained, so it arrives at once).
async fn mosquitto_stored_messages() -> u64 {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let servers = shared();
    let mut options = MqttOptions::new(unique_name("probe"), "127.0.0.1", servers.mosquitto.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    client
        .subscribe("$SYS/broker/store/messages/count", QoS::AtMostOnce)
        .await
        .unwrap();
    let count = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    return std::str::from_utf8(&publish.payload)
                        .ok()
                        .and_then(|text| text.trim().parse().ok())
                        .unwrap_or(0);
                }
                Ok(_) => {}
                Err(_) => return 0,
            }
        }
    })
    .await
    .unwrap_or(0);
    let _ = client.try_disconnect();
    count
}

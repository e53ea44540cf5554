//! The first slice end to end, on real servers: devices publish over MQTT, the bridge moves the
//! messages into Kafka, the worker stores them in PostgreSQL through PgBouncer.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::net::SocketAddr;
use telemetry_bridge::BridgeConfig;
use telemetry_core::contract::header;
use telemetry_core::kafka::KafkaConfig;
use telemetry_core::observe::HttpConfig;
use telemetry_core::Shutdown;
use telemetry_worker::WorkerConfig;

use test_servers::{free_addr, http_get, shared, unique_name, Servers};
use tokio::task::JoinHandle;

/// One test's own database, topics and consumer group on the shared servers.
struct Fixture {
    servers: &'static Servers,
    database: String,
    kafka: KafkaConfig,
}

/// A stage running in the background until `stop`.
struct Running {
    shutdown: Shutdown,
    task: JoinHandle<Result<(), String>>,
    /// Its /metrics, /healthz and /readyz server.
    http: SocketAddr,
}

impl Running {
    /// Waits for /readyz; the bridge is ready once the broker acknowledged every subscription,
    /// so nothing published after this is missed.
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(self.http, "/readyz")
            .await
            .map(|(status, _)| status)
            != Some(200)
        {
            if self.task.is_finished() {
                let outcome = (&mut self.task).await;
                panic!("stage stopped before it was ready: {outcome:?}");
            }
            assert!(
                Instant::now() < deadline,
                "stage not ready within 30 s: {:?}",
                http_get(self.http, "/readyz").await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.trigger();
        let result = tokio::time::timeout(Duration::from_secs(30), self.task).await;
        result
            .expect("stage stops within 30 s")
            .expect("stage task")
            .expect("stage ran without error");
    }
}

impl Fixture {
    fn new(partitions: i32) -> Fixture {
        // The stages' logs in the test's captured output, shown when it fails.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info,librdkafka=warn".into()),
            )
            .with_test_writer()
            .try_init();
        let servers = shared();
        let database = unique_name("e2e");
        servers
            .postgres
            .create_database(&database)
            .expect("create database");
        let topic = unique_name("iot_stream");
        let dlq_topic = format!("{topic}_dlq");
        servers
            .kafka
            .create_topic(&topic, partitions)
            .expect("create topic");
        servers
            .kafka
            .create_topic(&dlq_topic, 1)
            .expect("create dead-letter topic");
        let kafka = KafkaConfig {
            brokers: servers.kafka.bootstrap(),
            topic,
            dlq_topic,
            ..KafkaConfig::default()
        };
        Fixture {
            servers,
            database,
            kafka,
        }
    }

    fn start_worker(&self, group: &str) -> Running {
        let mut config = WorkerConfig {
            kafka: self.kafka.clone(),
            group_id: group.to_owned(),
            http: HttpConfig {
                listen: free_addr(),
            },
            ..WorkerConfig::default()
        };
        config.postgres.url = self.servers.pgbouncer.url(&self.database);
        let http = config.http.listen;
        let shutdown = Shutdown::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            telemetry_worker::run(config, stop)
                .await
                .map_err(|e| e.to_string())
        });
        Running {
            shutdown,
            task,
            http,
        }
    }

    fn start_bridge(&self, subscriptions: Vec<String>) -> Running {
        let mut config = BridgeConfig {
            kafka: self.kafka.clone(),
            http: HttpConfig {
                listen: free_addr(),
            },
            ..BridgeConfig::default()
        };
        config.mqtt.host = self.servers.mosquitto.host().to_owned();
        config.mqtt.port = self.servers.mosquitto.port();
        config.mqtt.client_id = unique_name("bridge");
        config.mqtt.subscriptions = subscriptions;
        let http = config.http.listen;
        let shutdown = Shutdown::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            telemetry_bridge::run(config, stop)
                .await
                .map_err(|e| e.to_string())
        });
        Running {
            shutdown,
            task,
            http,
        }
    }

    async fn database(&self) -> tokio_postgres::Client {
        let url = self.servers.postgres.url(&self.database);
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }

    /// Waits until `raw_telemetry` holds at least `expected` rows, or a minute has passed, then
    /// waits a little longer so that rows beyond the expected count would show. Returns the count.
    async fn wait_for_rows(&self, expected: i64) -> i64 {
        let client = self.database().await;
        let count = || async {
            match client
                .query_one("SELECT count(*) FROM raw_telemetry", &[])
                .await
            {
                Ok(row) => row.get::<_, i64>(0),
                Err(_) => 0, // not migrated yet
            }
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while count().await < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        count().await
    }

    /// Reads the dead-letter topic until `count` letters are there: each as header name ->
    /// value, plus "key" and "payload".
    fn read_dead_letters(&self, count: usize) -> Vec<BTreeMap<String, String>> {
        test_servers::read_dead_letters(&self.kafka.brokers, &self.kafka.dlq_topic, count)
    }
}

/// A device fleet on one MQTT connection that publishes with QoS 1 and waits for every PUBACK.
async fn publish_all(servers: &Servers, messages: &[(String, String)]) {
    let mut options = MqttOptions::new(
        unique_name("devices"),
        servers.mosquitto.host(),
        servers.mosquitto.port(),
    );
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(options, 1000);
    let total = messages.len();
    let messages = messages.to_vec();
    let publisher = tokio::spawn(async move {
        for (topic, payload) in messages {
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked < total {
        let event = tokio::time::timeout_at(deadline.into(), eventloop.poll())
            .await
            .expect("PUBACKs within 60 s");
        if let Event::Incoming(Packet::PubAck(_)) = event.expect("mqtt connection") {
            acked += 1;
        }
    }
    let client = publisher.await.unwrap();
    client.disconnect().await.unwrap();
}

fn telemetry_topic(user: &str, device: &str) -> String {
    format!("users/{user}/devices/{device}/telemetry")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_from_nine_devices_land_as_a_thousand_rows() {
    let fixture = Fixture::new(3);
    let run = unique_name("u");
    let users: Vec<String> = (1..=3).map(|i| format!("{run}-{i}")).collect();
    let devices: Vec<(String, String)> = users
        .iter()
        .flat_map(|u| (1..=3).map(move |d| (u.clone(), format!("dev-{d}"))))
        .collect();
    let mut messages = Vec::new();
    let mut expected = BTreeMap::new();
    for n in 0..1000usize {
        let (user, device) = &devices[n % devices.len()];
        let seq = (n / devices.len()) as i64;
        let payload = format!(
            r#"{{"ts":{},"seq":{seq},"temperature":{}.5}}"#,
            1_764_000_000_000i64 + n as i64,
            n % 40
        );
        expected.insert((user.clone(), device.clone(), seq), payload.clone());
        messages.push((telemetry_topic(user, device), payload));
    }
    let subscriptions = users
        .iter()
        .map(|u| format!("users/{u}/devices/+/telemetry"))
        .collect();
    let worker = fixture.start_worker(&unique_name("group"));
    let mut bridge = fixture.start_bridge(subscriptions);
    bridge.wait_ready().await;

    publish_all(fixture.servers, &messages).await;

    assert_eq!(fixture.wait_for_rows(1000).await, 1000);
    let rows = fixture
        .database()
        .await
        .query("SELECT user_id, device_id, seq, payload::text, device_time, received_at FROM raw_telemetry", &[])
        .await
        .unwrap();
    let mut stored = BTreeMap::new();
    for row in &rows {
        let key = (
            row.get::<_, String>(0),
            row.get::<_, String>(1),
            row.get::<_, i64>(2),
        );
        let payload: serde_json::Value = serde_json::from_str(row.get::<_, &str>(3)).unwrap();
        let device_time: chrono::DateTime<chrono::Utc> = row.get(4);
        assert_eq!(Some(device_time.timestamp_millis()), payload["ts"].as_i64());
        assert!(
            stored.insert(key.clone(), payload).is_none(),
            "duplicate row {key:?}"
        );
    }
    for (key, payload) in &expected {
        let stored = stored
            .get(key)
            .unwrap_or_else(|| panic!("row {key:?} missing"));
        assert_eq!(
            stored,
            &serde_json::from_str::<serde_json::Value>(payload).unwrap()
        );
    }
    bridge.stop().await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_messages_go_to_the_dead_letter_topic_with_their_reason_and_valid_ones_are_stored()
{
    let fixture = Fixture::new(1);
    let user = unique_name("u");
    let worker = fixture.start_worker(&unique_name("group"));
    let mut bridge = fixture.start_bridge(vec![format!("users/{user}/#")]);
    bridge.wait_ready().await;

    publish_all(
        fixture.servers,
        &[
            (telemetry_topic(&user, "d1"), r#"{"seq":0,"v":1}"#.into()),
            (telemetry_topic(&user, "d1"), "not json".into()),
            (
                format!("users/{user}/devices/d1/extra/telemetry"),
                r#"{"v":1}"#.into(),
            ),
            (
                telemetry_topic(&user, "d1"),
                r#"{"seq":1,"v":"hot"}"#.into(),
            ),
            (telemetry_topic(&user, "d1"), r#"{"seq":2,"v":3}"#.into()),
        ],
    )
    .await;

    assert_eq!(fixture.wait_for_rows(2).await, 2);
    let mut letters = fixture.read_dead_letters(3);
    letters.sort_by(|a, b| a[header::DLQ_REASON].cmp(&b[header::DLQ_REASON]));
    let reasons: Vec<&str> = letters
        .iter()
        .map(|l| l[header::DLQ_REASON].as_str())
        .collect();
    assert_eq!(
        reasons,
        ["invalid_json", "invalid_reading", "invalid_topic"]
    );
    assert_eq!(letters[0]["payload"], "not json");
    assert_eq!(letters[0]["key"], format!("{user}/d1"));
    assert_eq!(letters[0][header::DLQ_STAGE], "worker");
    assert_eq!(
        letters[0][header::MQTT_TOPIC],
        telemetry_topic(&user, "d1"),
        "original headers are kept"
    );
    assert!(letters[0].contains_key(header::DLQ_SOURCE_OFFSET));
    assert!(
        letters[1][header::DLQ_DETAIL].contains("'v'"),
        "{:?}",
        letters[1]
    );
    assert_eq!(letters[2][header::DLQ_STAGE], "bridge");
    assert!(
        letters[2][header::DLQ_DETAIL].contains("extra"),
        "{:?}",
        letters[2]
    );
    bridge.stop().await;
    worker.stop().await;
}

//! What the bridge's tests share: device fleets that count PUBACKs, a Kafka reader that counts
//! what arrived, and the bridge run in-process or as its real binary.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use telemetry_bridge::BridgeConfig;
use telemetry_core::kafka::KafkaConfig;
use telemetry_core::observe::HttpConfig;
use telemetry_core::Shutdown;
use test_servers::{unique_name, Tansu};
use tokio::task::JoinHandle;

/// A test's own telemetry and dead-letter topics on `kafka`.
pub fn topics(kafka: &Tansu, partitions: i32) -> KafkaConfig {
    let topic = unique_name("iot_stream");
    let dlq_topic = format!("{topic}_dlq");
    kafka
        .create_topic(&topic, partitions)
        .expect("create topic");
    kafka
        .create_topic(&dlq_topic, 1)
        .expect("create dead-letter topic");
    KafkaConfig {
        brokers: kafka.bootstrap(),
        topic,
        dlq_topic,
        ..KafkaConfig::default()
    }
}

/// A bridge config for `kafka` and the broker at `port`, with its own client id.
pub fn bridge_config(
    kafka: &KafkaConfig,
    mqtt_port: u16,
    subscriptions: Vec<String>,
) -> BridgeConfig {
    let mut config = BridgeConfig {
        kafka: kafka.clone(),
        http: HttpConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
        },
        ..BridgeConfig::default()
    };
    config.mqtt.host = "127.0.0.1".into();
    config.mqtt.port = mqtt_port;
    config.mqtt.client_id = unique_name("bridge");
    config.mqtt.subscriptions = subscriptions;
    config
}

/// The bridge running in this process until `stop`.
pub struct InProcess {
    shutdown: Shutdown,
    task: JoinHandle<Result<(), String>>,
    pub http_port: u16,
}

impl InProcess {
    pub fn start(mut config: BridgeConfig) -> InProcess {
        telemetry_core::observe::init_logging(Default::default());
        let http_port = free_port();
        config.http.listen = format!("127.0.0.1:{http_port}").parse().unwrap();
        let shutdown = Shutdown::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            telemetry_bridge::run(config, stop)
                .await
                .map_err(|e| e.to_string())
        });
        InProcess {
            shutdown,
            task,
            http_port,
        }
    }

    /// Waits until the bridge is connected and subscribed.
    pub async fn wait_ready(&self) {
        wait_ready(self.http_port, String::new).await
    }

    pub async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(40), self.task)
            .await
            .expect("the bridge stops within 40 s")
            .expect("bridge task")
            .expect("the bridge ran without error");
    }
}

/// Waits until `/readyz` on `port` answers 200; `log` says what to show when it never does.
pub async fn wait_ready(port: u16, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if http_get(port, "/readyz")
            .await
            .is_some_and(|(status, _)| status == 200)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("bridge not ready within 30 s\n{}", log());
}

/// The real `telemetry-bridge` binary, so a test can kill it with SIGKILL.
pub struct BridgeProcess {
    child: Option<Child>,
    config_file: PathBuf,
    /// Where stderr goes; read back by tests that check what is logged.
    pub log: PathBuf,
    pub http_port: u16,
    env: Vec<(String, String)>,
    _dir: Arc<tempfile::TempDir>,
}

impl BridgeProcess {
    /// Starts the binary with `config` written as its TOML file (plus `env`).
    pub fn start(config: &BridgeConfig, env: &[(&str, &str)]) -> BridgeProcess {
        let dir = tempfile::tempdir().unwrap();
        let http_port = free_port();
        let mut config = config.clone();
        config.http.listen = format!("127.0.0.1:{http_port}").parse().unwrap();
        let config_file = dir.path().join("bridge.toml");
        std::fs::write(&config_file, toml_of(&config)).unwrap();
        let mut process = BridgeProcess {
            child: None,
            log: dir.path().join("bridge.log"),
            config_file,
            http_port,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            _dir: Arc::new(dir),
        };
        process.spawn();
        process
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_telemetry-bridge"))
            .arg("--config")
            .arg(&self.config_file)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the telemetry-bridge binary starts");
        self.child = Some(child);
    }

    /// SIGKILL: no drain, no clean disconnect, exactly like a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Starts the same binary with the same config again (same client id, same session).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the bridge first");
        self.spawn();
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            match test_servers::terminate(&mut child, Duration::from_secs(40)) {
                Some(status) => assert!(
                    status.success(),
                    "bridge exited with {status}; log:\n{}",
                    self.log_text()
                ),
                None => panic!("bridge did not stop within 40 s; log:\n{}", self.log_text()),
            }
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `/readyz` answers 200: connected to the broker and subscribed.
    pub async fn wait_ready(&self) {
        wait_ready(self.http_port, || format!("log:\n{}", self.log_text())).await
    }

    /// A counter from `/metrics` (summed over its labels), 0 when absent.
    pub async fn metric(&self, name: &str) -> f64 {
        self.metrics(&[name]).await[0]
    }

    /// Several counters from one scrape, so that they are read at the same moment.
    pub async fn metrics(&self, names: &[&str]) -> Vec<f64> {
        let (_, body) = http_get(self.http_port, "/metrics")
            .await
            .unwrap_or_default();
        names
            .iter()
            .map(|name| test_servers::metric_value(&body, name))
            .collect()
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The config as its TOML file would say it. Secrets serialize as "***", so configs with a
/// password are written by hand instead.
pub fn toml_of(config: &BridgeConfig) -> String {
    toml::to_string(config).unwrap()
}

pub fn free_port() -> u16 {
    test_servers::free_addr().port()
}

/// GET `path` on a bridge's HTTP server on 127.0.0.1: status and body.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    test_servers::http_get(SocketAddr::from(([127, 0, 0, 1], port)), path).await
}

/// A message a device published and got a PUBACK for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Acked {
    pub device: usize,
    pub seq: u64,
}

/// A fleet of devices, each on its own MQTT 3.1.1 connection, publishing QoS 1 one message at
/// a time and recording which ones the broker acknowledged. A message without a PUBACK within
/// two seconds (the broker went away) is published again, as a device would.
pub struct Fleet {
    pub user: String,
    devices: usize,
    acked: Arc<Mutex<Vec<Acked>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Fleet {
    /// `devices` devices of a fresh user; nothing is published until `start`.
    pub fn new(devices: usize) -> Fleet {
        Fleet {
            user: unique_name("u"),
            devices,
            acked: Arc::new(Mutex::new(Vec::new())),
            tasks: Vec::new(),
        }
    }

    /// The filter that covers this fleet's telemetry and nobody else's.
    pub fn filter(&self) -> String {
        format!("users/{}/devices/+/telemetry", self.user)
    }

    /// Every device publishes `per_device` messages with `pause` between them to the broker at
    /// `port`.
    pub fn start(&mut self, port: u16, per_device: u64, pause: Duration) {
        for device in 0..self.devices {
            let acked = self.acked.clone();
            let topic = format!("users/{}/devices/d{device}/telemetry", self.user);
            let client_id = unique_name("device");
            self.tasks.push(tokio::spawn(async move {
                publish_one_by_one(port, client_id, topic, device, per_device, pause, acked).await
            }));
        }
    }

    pub fn acked_so_far(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until `count` messages were acknowledged.
    pub async fn wait_for_acks(&self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.acked_so_far() < count {
            assert!(
                Instant::now() < deadline,
                "only {} PUBACKs within 120 s",
                self.acked_so_far()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for every device to finish and returns what was acknowledged.
    pub async fn finish(&mut self) -> BTreeSet<Acked> {
        let tasks: Vec<_> = self.tasks.drain(..).collect();
        for task in tasks {
            let finished = tokio::time::timeout(Duration::from_secs(180), task).await;
            assert!(
                finished.is_ok(),
                "devices did not finish within 180 s; PUBACKs so far: {}",
                self.acked_so_far()
            );
        }
        let acked = self.acked.lock().unwrap();
        acked.iter().copied().collect()
    }
}

async fn publish_one_by_one(
    port: u16,
    client_id: String,
    topic: String,
    device: usize,
    count: u64,
    pause: Duration,
    acked: Arc<Mutex<Vec<Acked>>>,
) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    let (pubacks, mut puback) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    if pubacks.send(()).is_err() {
                        return;
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    for seq in 0..count {
        let payload = format!(r#"{{"seq":{seq},"temperature":{}.5}}"#, seq % 40);
        loop {
            client
                .publish(&topic, QoS::AtLeastOnce, false, payload.clone())
                .await
                .unwrap();
            if let Ok(Some(())) = tokio::time::timeout(Duration::from_secs(2), puback.recv()).await
            {
                acked.lock().unwrap().push(Acked { device, seq });
                break;
            }
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
}

/// A record as read back from Kafka.
pub use test_servers::KafkaRecord as Record;

/// Reads `topic` from the start until `done` says enough arrived (or `wait` passes), then a
/// little longer so that records beyond it would show.
pub fn read_topic(
    kafka: &KafkaConfig,
    topic: &str,
    wait: Duration,
    done: impl Fn(&[Record]) -> bool,
) -> Vec<Record> {
    test_servers::read_topic(&kafka.brokers, topic, wait, done)
}

/// What a load test found in Kafka for a fleet.
#[derive(Debug)]
pub struct Tally {
    pub acked: usize,
    pub missing: Vec<Acked>,
    pub duplicates: usize,
    pub records: usize,
}

/// Reads the telemetry topic until every acknowledged message of the fleet is there (or two
/// minutes pass) and counts what is missing and what came twice.
pub fn tally(kafka: &KafkaConfig, user: &str, acked: &BTreeSet<Acked>) -> Tally {
    let parse = |record: &Record| -> Option<Acked> {
        let device = record
            .key
            .strip_prefix(&format!("{user}/d"))?
            .parse()
            .ok()?;
        let payload: serde_json::Value = serde_json::from_str(&record.payload).ok()?;
        Some(Acked {
            device,
            seq: payload["seq"].as_u64()?,
        })
    };
    let records = read_topic(kafka, &kafka.topic, Duration::from_secs(120), |records| {
        // Checked after every record read: only parse them all once there can be enough.
        if records.len() < acked.len() {
            return false;
        }
        let seen: BTreeSet<Acked> = records.iter().filter_map(parse).collect();
        acked.iter().all(|a| seen.contains(a))
    });
    let mut seen = BTreeMap::new();
    for record in &records {
        if let Some(id) = parse(record) {
            *seen.entry(id).or_insert(0usize) += 1;
        }
    }
    Tally {
        acked: acked.len(),
        missing: acked
            .iter()
            .filter(|a| !seen.contains_key(a))
            .copied()
            .collect(),
        duplicates: seen.values().map(|n| n - 1).sum(),
        records: records.len(),
    }
}

impl Tally {
    /// Prints the figures (duplicates are allowed, so they are reported rather than asserted)
    /// and fails if anything acknowledged is missing.
    pub fn assert_nothing_lost(&self, story: &str) {
        println!(
            "{story}: {} messages PUBACKed, {} records in Kafka, {} duplicates, {} missing",
            self.acked,
            self.records,
            self.duplicates,
            self.missing.len()
        );
        assert!(
            self.missing.is_empty(),
            "{story}: {} PUBACKed messages are not in Kafka, e.g. {:?}",
            self.missing.len(),
            &self.missing[..self.missing.len().min(10)]
        );
    }
}

/// Writes `contents` to `path`, creating parent directories.
pub fn write(path: &Path, contents: &str) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    let mut file = std::fs::File::create(path).unwrap();
    file.write_all(contents.as_bytes()).unwrap();
}

impl Fleet {
    /// Every device publishes `per_device` messages as fast as the broker takes them, up to 100
    /// unacknowledged at a time on its connection, and returns once all are acknowledged. The
    /// broker acknowledges in order, so the n-th PUBACK is for the n-th message.
    pub async fn flood(&mut self, port: u16, per_device: u64) -> BTreeSet<Acked> {
        let floods: Vec<_> = (0..self.devices)
            .map(|device| {
                let topic = format!("users/{}/devices/d{device}/telemetry", self.user);
                tokio::spawn(flood_one(port, unique_name("device"), topic, per_device))
            })
            .collect();
        let mut acked = BTreeSet::new();
        for (device, flood) in floods.into_iter().enumerate() {
            let count = tokio::time::timeout(Duration::from_secs(300), flood)
                .await
                .expect("a device's flood finishes within 300 s")
                .expect("flood task");
            acked.extend((0..count).map(|seq| Acked { device, seq }));
        }
        acked
    }
}

async fn flood_one(port: u16, client_id: String, topic: String, count: u64) -> u64 {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(5))
        .set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let publisher = tokio::spawn(async move {
        for seq in 0..count {
            let payload = format!(r#"{{"seq":{seq},"temperature":{}.5}}"#, seq % 40);
            client
                .publish(&topic, QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
        client
    });
    let mut pubacks = 0;
    while pubacks < count {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) => pubacks += 1,
            Ok(_) => {}
            Err(error) => panic!("flood connection failed after {pubacks} PUBACKs: {error}"),
        }
    }
    let client = publisher.await.unwrap();
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
    pubacks
}

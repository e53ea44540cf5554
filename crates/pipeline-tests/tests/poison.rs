//! The poison corpus (`tests/poison/cases.toml`) through the whole pipeline on real servers: a
//! device logged in to a Mosquitto configured like the local stack's (password file and
//! scripts/mosquitto-acl.conf), the bridge, Kafka, the worker and PostgreSQL.
//!
//! The promise: every bad input ends either on the dead-letter topic with its own reason, or is
//! refused by the broker with a reason code the device sees; nothing bad is stored, and every
//! good reading published between the bad ones is stored, so no poison stalls the pipeline.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use support::{Answer, Device};
use telemetry_bridge::BridgeConfig;
use telemetry_core::config::Secret;
use telemetry_core::contract::{header, DeadLetterReason};
use telemetry_core::kafka::KafkaConfig;
use telemetry_core::observe::HttpConfig;
use telemetry_core::Shutdown;
use telemetry_worker::WorkerConfig;
use test_servers::{free_addr, http_get, shared, unique_name};
use tokio::task::JoinHandle;

/// Files over this size are generated at test time from a spec instead of kept in the tree.
const LARGEST_STORED_FILE: u64 = 100 * 1024;

#[derive(Debug, Deserialize)]
struct Manifest {
    case: Vec<Case>,
}

#[derive(Debug, Deserialize)]
struct Case {
    file: Option<String>,
    name: Option<String>,
    generate: Option<Vec<Part>>,
    topic: String,
    #[serde(flatten)]
    outcome: Outcome,
    why: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Part {
    text: String,
    #[serde(default = "once")]
    times: usize,
}

fn once() -> usize {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
enum Outcome {
    DeadLetter { reason: String, stage: String },
    Refused { packet: String, code: u8 },
    Stored,
}

impl Case {
    /// The case's name: its file name without the extension, or `name`.
    fn name(&self) -> String {
        match (&self.file, &self.name) {
            (Some(file), _) => Path::new(file)
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .into_owned(),
            (None, Some(name)) => name.clone(),
            (None, None) => panic!("a case without file or name: {self:?}"),
        }
    }

    fn payload(&self) -> Vec<u8> {
        match (&self.file, &self.generate) {
            (Some(file), None) => std::fs::read(corpus().join(file)).unwrap(),
            (None, Some(parts)) => parts
                .iter()
                .flat_map(|part| part.text.repeat(part.times).into_bytes())
                .collect(),
            _ => panic!("{}: give either file or generate", self.name()),
        }
    }

    fn topic(&self, user: &str) -> Vec<u8> {
        let text = self
            .topic
            .replace("{user}", user)
            .replace("{device}", &self.name());
        // TOML strings are UTF-8; the one byte they cannot say is spelled {xff}.
        let mut bytes = Vec::with_capacity(text.len());
        let mut rest = text.as_bytes();
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix(b"{xff}") {
                bytes.push(0xFF);
                rest = after;
            } else {
                bytes.push(rest[0]);
                rest = &rest[1..];
            }
        }
        bytes
    }
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/poison")
}

fn manifest() -> Manifest {
    let text = std::fs::read_to_string(corpus().join("cases.toml")).unwrap();
    toml::from_str(&text).expect("tests/poison/cases.toml")
}

#[test]
fn the_manifest_covers_every_file_once_and_names_only_contract_reasons() {
    let manifest = manifest();
    assert!(manifest.case.len() >= 30, "{} cases", manifest.case.len());
    let mut names = BTreeSet::new();
    let mut files = BTreeSet::new();
    let codes: BTreeSet<&str> = DeadLetterReason::ALL.iter().map(|r| r.code()).collect();
    for case in &manifest.case {
        assert!(names.insert(case.name()), "two cases named {}", case.name());
        assert!(!case.why.is_empty(), "{}: say why", case.name());
        if let Some(file) = &case.file {
            assert!(files.insert(file.clone()), "{file} listed twice");
        }
        if case.generate.is_some() {
            assert!(case.file.is_none(), "{}: file or generate", case.name());
        }
        match &case.outcome {
            Outcome::DeadLetter { reason, stage } => {
                assert!(codes.contains(reason.as_str()), "{}: {reason}", case.name());
                assert!(["bridge", "worker"].contains(&stage.as_str()));
            }
            Outcome::Refused { packet, code } => {
                assert!(["PUBACK", "DISCONNECT"].contains(&packet.as_str()));
                assert!(*code >= 0x80, "{}: {code:#x} is a success", case.name());
            }
            Outcome::Stored => {}
        }
    }
    let on_disk: BTreeSet<String> = std::fs::read_dir(corpus())
        .unwrap()
        .map(|entry| entry.unwrap())
        .filter(|entry| entry.file_name() != "cases.toml")
        .map(|entry| {
            let size = entry.metadata().unwrap().len();
            let name = entry.file_name().to_string_lossy().into_owned();
            assert!(
                size <= LARGEST_STORED_FILE,
                "{name} is {size} bytes: generate it"
            );
            name
        })
        .collect();
    assert_eq!(on_disk, files, "files on disk vs files in cases.toml");
}

/// A stage running in this process until `stop`.
struct Running {
    shutdown: Shutdown,
    task: JoinHandle<Result<(), String>>,
    http: std::net::SocketAddr,
}

impl Running {
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while http_get(self.http, "/readyz")
            .await
            .map(|(status, _)| status)
            != Some(200)
        {
            if self.task.is_finished() {
                panic!(
                    "stage stopped before it was ready: {:?}",
                    (&mut self.task).await
                );
            }
            assert!(Instant::now() < deadline, "stage not ready within 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(40), self.task)
            .await
            .expect("stage stops within 40 s")
            .expect("stage task")
            .expect("stage ran without error");
    }
}

fn spawn<F>(http: std::net::SocketAddr, run: impl FnOnce(Shutdown) -> F) -> Running
where
    F: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let shutdown = Shutdown::new();
    let task = tokio::spawn(run(shutdown.clone()));
    Running {
        shutdown,
        task,
        http,
    }
}

/// Publishes `payload` on `connection`, connecting first when there is none; a connection the
/// broker closed is dropped, so the next message connects again, as a device would.
async fn publish(
    connection: &mut Option<Device>,
    port: u16,
    login: (&str, &str),
    topic: &[u8],
    payload: &[u8],
) -> Answer {
    if connection.is_none() {
        *connection = Some(
            Device::connect(port, Some(login))
                .await
                .expect("the device logs in"),
        );
    }
    let answer = connection.as_mut().unwrap().publish(topic, payload).await;
    if !matches!(answer, Answer::PubAck(_)) {
        *connection = None;
    }
    answer
}

/// The topic a dead letter came from: the `mqtt_topic` header the bridge sets, or (for letters
/// made from a row PostgreSQL refused, which keep only the key) the telemetry topic of its key.
fn source_topic(letter: &BTreeMap<String, String>) -> String {
    match letter.get(header::MQTT_TOPIC) {
        Some(topic) => topic.clone(),
        None => {
            let (user, device) = letter["key"].split_once('/').unwrap();
            format!("users/{user}/devices/{device}/telemetry")
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_poison_is_dead_lettered_with_its_reason_or_refused_and_every_good_reading_is_stored()
{
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,librdkafka=warn".into()),
        )
        .with_test_writer()
        .try_init();
    let manifest = manifest();
    let servers = shared();
    let user = unique_name("poison");
    let password = unique_name("pw");
    let bridge_password = unique_name("pw");
    let broker = support::broker_with_access_rules(&[
        (&user, &password),
        ("telemetry-bridge", &bridge_password),
    ]);

    let database = unique_name("poison");
    servers.postgres.create_database(&database).unwrap();
    let topic = unique_name("iot_stream");
    let dlq_topic = format!("{topic}_dlq");
    servers.kafka.create_topic(&topic, 2).unwrap();
    servers.kafka.create_topic(&dlq_topic, 1).unwrap();
    let kafka = KafkaConfig {
        brokers: servers.kafka.bootstrap(),
        topic,
        dlq_topic,
        ..KafkaConfig::default()
    };

    let mut worker_config = WorkerConfig {
        kafka: kafka.clone(),
        group_id: unique_name("group"),
        http: HttpConfig {
            listen: free_addr(),
        },
        ..WorkerConfig::default()
    };
    worker_config.postgres.url = servers.pgbouncer.url(&database);
    let mut worker = spawn(worker_config.http.listen, |stop| async move {
        telemetry_worker::run(worker_config, stop)
            .await
            .map_err(|e| e.to_string())
    });
    let mut bridge_config = BridgeConfig {
        kafka: kafka.clone(),
        http: HttpConfig {
            listen: free_addr(),
        },
        ..BridgeConfig::default()
    };
    bridge_config.mqtt.host = broker.host().to_owned();
    bridge_config.mqtt.port = broker.port();
    bridge_config.mqtt.client_id = unique_name("bridge");
    bridge_config.mqtt.username = Some("telemetry-bridge".into());
    bridge_config.mqtt.password = Some(Secret::new(bridge_password.clone()));
    let mut bridge = spawn(bridge_config.http.listen, |stop| async move {
        telemetry_bridge::run(bridge_config, stop)
            .await
            .map_err(|e| e.to_string())
    });
    worker.wait_ready().await;
    bridge.wait_ready().await;

    // Every case, each followed by a good reading from another device of the same user.
    let good_topic = format!("users/{user}/devices/good/telemetry");
    let login = (user.as_str(), password.as_str());
    let mut connection = None;
    let mut goods = 0i64;
    let mut failures = Vec::new();
    let mut expected_letters = BTreeMap::new();
    let mut expected_stored = BTreeSet::new();
    for case in &manifest.case {
        let topic = case.topic(&user);
        let answer = publish(
            &mut connection,
            broker.port(),
            login,
            &topic,
            &case.payload(),
        )
        .await;
        let topic = String::from_utf8_lossy(&topic).into_owned();
        match &case.outcome {
            Outcome::Refused { packet, code } => {
                let expected = match packet.as_str() {
                    "PUBACK" => Answer::PubAck(*code),
                    _ => Answer::Disconnect(*code),
                };
                if answer != expected {
                    failures.push(format!(
                        "{}: broker answered {answer:?}, expected {expected:?}",
                        case.name()
                    ));
                }
            }
            Outcome::DeadLetter { reason, stage } => {
                if !answer.accepted() {
                    failures.push(format!("{}: broker answered {answer:?}", case.name()));
                }
                let previous =
                    expected_letters.insert(topic, (case.name(), reason.clone(), stage.clone()));
                assert!(
                    previous.is_none(),
                    "{}: topic shared with another case",
                    case.name()
                );
            }
            Outcome::Stored => {
                if !answer.accepted() {
                    failures.push(format!("{}: broker answered {answer:?}", case.name()));
                }
                expected_stored.insert(topic);
            }
        }
        let good = format!(r#"{{"seq":{goods},"temperature":21.5}}"#);
        let answer = publish(
            &mut connection,
            broker.port(),
            login,
            good_topic.as_bytes(),
            good.as_bytes(),
        )
        .await;
        assert!(
            answer.accepted(),
            "good reading after {}: {answer:?}",
            case.name()
        );
        goods += 1;
    }
    if let Some(device) = connection {
        device.disconnect().await;
    }

    // Bounded waits on state: every good reading stored, every letter on the dead-letter topic.
    let client = database_client(&servers.postgres.url(&database)).await;
    let expected_rows = goods + expected_stored.len() as i64;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut rows = 0;
    while Instant::now() < deadline {
        rows = client
            .query_one("SELECT count(*) FROM raw_telemetry", &[])
            .await
            .map(|row| row.get::<_, i64>(0))
            .unwrap_or(0);
        if rows >= expected_rows {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let letters =
        test_servers::read_dead_letters(&kafka.brokers, &kafka.dlq_topic, expected_letters.len());
    bridge.stop().await;
    worker.stop().await;

    let stored: Vec<(String, String, Option<i64>)> = client
        .query("SELECT user_id, device_id, seq FROM raw_telemetry", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    let good_seqs: BTreeSet<i64> = stored
        .iter()
        .filter(|(_, device, _)| device == "good")
        .filter_map(|(_, _, seq)| *seq)
        .collect();
    if good_seqs != (0..goods).collect() {
        failures.push(format!(
            "good readings stored: {} of {goods}",
            good_seqs.len()
        ));
    }
    let stored_topics: BTreeSet<String> = stored
        .iter()
        .filter(|(_, device, _)| device != "good")
        .map(|(user, device, _)| format!("users/{user}/devices/{device}/telemetry"))
        .collect();
    if stored_topics != expected_stored {
        failures.push(format!(
            "stored besides the good readings: {stored_topics:#?}\nexpected: {expected_stored:#?}"
        ));
    }
    if rows != expected_rows || stored.len() as i64 != expected_rows {
        failures.push(format!("{} rows, expected {expected_rows}", stored.len()));
    }

    let mut seen = BTreeSet::new();
    for letter in &letters {
        let topic = source_topic(letter);
        let reason = letter.get(header::DLQ_REASON).cloned().unwrap_or_default();
        let stage = letter.get(header::DLQ_STAGE).cloned().unwrap_or_default();
        match expected_letters.get(&topic) {
            None => failures.push(format!(
                "unexpected dead letter from {topic}: {reason} ({stage}): {:?}",
                letter.get(header::DLQ_DETAIL)
            )),
            Some((name, expected_reason, expected_stage)) => {
                if !seen.insert(name.clone()) {
                    failures.push(format!("{name}: dead-lettered twice"));
                }
                if (&reason, &stage) != (expected_reason, expected_stage) {
                    failures.push(format!(
                        "{name}: {reason} from {stage}, expected {expected_reason} from {expected_stage}: {:?}",
                        letter.get(header::DLQ_DETAIL)
                    ));
                }
                if letter.get(header::DLQ_DETAIL).is_none_or(String::is_empty) {
                    failures.push(format!("{name}: no dlq_detail"));
                }
            }
        }
    }
    for (name, reason, _) in expected_letters.values() {
        if !seen.contains(name) {
            failures.push(format!("{name}: no dead letter (expected {reason})"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases went wrong:\n{}",
        failures.len(),
        manifest.case.len(),
        failures.join("\n")
    );
}

async fn database_client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

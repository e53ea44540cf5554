//! What the worker's tests share: a test's own database, topics and consumer groups on real
//! servers, workers run in-process or as processes, a producer that plays the bridge, and the
//! check that every record is stored exactly once.

#![allow(dead_code)] // each test binary uses a different part

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use telemetry_core::kafka::KafkaConfig;
use telemetry_core::observe::HttpConfig;
use telemetry_core::Shutdown;
use telemetry_worker::WorkerConfig;
use test_servers::{
    free_addr, read_topic, shared, unique_name, KillOnDrop, PgBouncer, Postgres, Tansu,
};
use tokio::task::JoinHandle;

/// One test's own database, topics and consumer groups.
pub struct Fixture {
    /// Straight to PostgreSQL, for the test's own checks.
    pub direct_url: String,
    /// Through PgBouncer, as the worker connects.
    pub worker_url: String,
    pub kafka: KafkaConfig,
    /// A tag in every key this fixture produces, so devices never clash between tests.
    pub run: String,
}

/// A worker running in-process until `stop`.
pub struct Running {
    pub shutdown: Shutdown,
    task: JoinHandle<Result<(), String>>,
}

impl Running {
    /// Asks for a graceful shutdown and waits for it.
    pub async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("worker stops within 60 s")
            .expect("worker task")
            .expect("worker ran without error");
    }

    /// Waits for the worker to stop by itself, which it must do with an error; returns it.
    pub async fn stopped_with_error(mut self, within: Duration) -> String {
        let Ok(outcome) = tokio::time::timeout(within, &mut self.task).await else {
            self.task.abort();
            panic!("the worker was still running after {within:?}");
        };
        outcome
            .expect("worker task")
            .expect_err("the worker stops with an error")
    }

    /// Drops the worker mid-work, like a crash inside the process: whatever transaction it has
    /// open is abandoned.
    pub fn abort(self) {
        self.task.abort();
    }
}

impl Fixture {
    /// On the servers shared by the test binary.
    pub fn new(partitions: i32) -> Fixture {
        let servers = shared();
        Fixture::on(
            &servers.postgres,
            &servers.pgbouncer,
            &servers.kafka,
            partitions,
        )
    }

    /// On servers of the test's own, for tests that stop or freeze them.
    pub fn on(
        postgres: &Postgres,
        pgbouncer: &PgBouncer,
        kafka: &Tansu,
        partitions: i32,
    ) -> Fixture {
        init_logging();
        let database = unique_name("worker");
        postgres
            .create_database(&database)
            .expect("create database");
        let topic = unique_name("iot_stream");
        let dlq_topic = format!("{topic}_dlq");
        kafka
            .create_topic(&topic, partitions)
            .expect("create topic");
        kafka
            .create_topic(&dlq_topic, 1)
            .expect("create dead-letter topic");
        Fixture {
            direct_url: postgres.url(&database),
            worker_url: pgbouncer.url(&database),
            kafka: KafkaConfig {
                brokers: kafka.bootstrap(),
                topic,
                dlq_topic,
                ..KafkaConfig::default()
            },
            run: unique_name("r"),
        }
    }

    pub fn worker_config(&self, group: &str) -> WorkerConfig {
        let mut config = WorkerConfig {
            kafka: self.kafka.clone(),
            group_id: group.to_owned(),
            http: HttpConfig {
                listen: free_addr(),
            },
            ..WorkerConfig::default()
        };
        config.postgres.url = self.worker_url.clone();
        config
    }

    pub fn start_worker(&self, group: &str) -> Running {
        self.start_worker_with(self.worker_config(group))
    }

    pub fn start_worker_with(&self, config: WorkerConfig) -> Running {
        let shutdown = Shutdown::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            telemetry_worker::run(config, stop)
                .await
                .map_err(|e| e.to_string())
        });
        Running { shutdown, task }
    }

    /// The real binary, for tests that kill it with SIGKILL. A short session timeout lets the
    /// group notice a killed member in seconds rather than librdkafka's default 45 s.
    pub fn spawn_worker_process(&self, group: &str, http: SocketAddr) -> KillOnDrop {
        self.spawn_worker_process_with(group, http, &[])
    }

    /// The real binary with extra flags.
    pub fn spawn_worker_process_with(
        &self,
        group: &str,
        http: SocketAddr,
        extra: &[String],
    ) -> KillOnDrop {
        let name = unique_name("worker");
        let config = test_servers::log_dir().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            "[kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n",
        )
        .expect("worker config file");
        let log = std::fs::File::create(test_servers::log_dir().join(format!("{name}.log")))
            .expect("worker log file");
        let child = Command::new(env!("CARGO_BIN_EXE_telemetry-worker"))
            .arg("--config")
            .arg(&config)
            .args(["--brokers", &self.kafka.brokers])
            .args(["--topic", &self.kafka.topic])
            .args(["--dlq-topic", &self.kafka.dlq_topic])
            .args(["--group-id", group])
            .args(["--database-url", &self.worker_url])
            .args(["--http-listen", &http.to_string()])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start telemetry-worker");
        KillOnDrop(child)
    }

    pub async fn database(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.direct_url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        tokio::spawn(connection);
        client
    }

    pub async fn migrate(&self) {
        let mut client = self.database().await;
        telemetry_worker::schema::migrate(&mut client)
            .await
            .expect("migrate");
    }

    /// Rows in `raw_telemetry`; 0 before the worker created it.
    pub async fn row_count(&self) -> i64 {
        let Ok(client) = self.try_database().await else {
            return -1;
        };
        match client
            .query_one("SELECT count(*) FROM raw_telemetry", &[])
            .await
        {
            Ok(row) => row.get(0),
            Err(_) => 0,
        }
    }

    async fn try_database(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) =
            tokio_postgres::connect(&self.direct_url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// Waits until `raw_telemetry` holds at least `expected` rows or `within` has passed, then
    /// a little longer so that rows beyond the expected count would show. Returns the count.
    pub async fn wait_for_rows(&self, expected: i64, within: Duration) -> i64 {
        let deadline = Instant::now() + within;
        while self.row_count().await < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.row_count().await
    }

    /// The key of device `d` of this fixture.
    pub fn key(&self, device: usize) -> String {
        format!("{}/d{device}", self.run)
    }

    /// `count` records spread over `devices` devices, each device's `seq` counting from 0, with
    /// a receive time of `start_ms + n`.
    pub fn records(&self, count: usize, devices: usize) -> Vec<Record> {
        (0..count)
            .map(|n| Record {
                key: self.key(n % devices),
                payload: format!(r#"{{"seq":{},"temperature":{}.25}}"#, n / devices, n % 50),
                received_at_ms: Some(1_764_000_000_000 + n as i64),
            })
            .collect()
    }

    /// One record per produce request. Tansu's memory storage answers a fetch only from the
    /// first offset of a stored record batch (a fetch from inside a batch returns nothing), so
    /// a worker restarting mid-batch would stall there; Kafka and Redpanda serve any offset.
    /// Single-record batches keep every offset a batch start.
    pub fn producer(&self) -> FutureProducer {
        let mut config = self.kafka.durable_producer_config();
        config.set("linger.ms", "0").set("batch.num.messages", "1");
        config.create().expect("producer")
    }

    /// Produces records straight to the telemetry topic, as the bridge would.
    pub async fn produce(&self, records: &[Record]) {
        produce(&self.producer(), &self.kafka.topic, records).await;
    }

    /// Produces `records` at about `per_second` in the background.
    pub fn produce_at(&self, records: Vec<Record>, per_second: usize) -> JoinHandle<()> {
        let producer = self.producer();
        let topic = self.kafka.topic.clone();
        tokio::spawn(async move {
            let chunk = (per_second / 20).max(1);
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            for records in records.chunks(chunk) {
                tick.tick().await;
                produce(&producer, &topic, records).await;
            }
        })
    }

    /// Fails unless every record is stored exactly once, with its payload.
    pub async fn assert_stored_exactly_once(&self, records: &[Record]) {
        let client = self.database().await;
        let rows = client
            .query(
                "SELECT user_id || '/' || device_id, seq, payload::text, count(*) OVER (PARTITION BY user_id, device_id, seq)
                 FROM raw_telemetry",
                &[],
            )
            .await
            .expect("read raw_telemetry");
        let mut stored: BTreeMap<(String, i64), serde_json::Value> = BTreeMap::new();
        let mut duplicated = Vec::new();
        for row in &rows {
            let key = (row.get::<_, String>(0), row.get::<_, i64>(1));
            if row.get::<_, i64>(3) > 1 {
                duplicated.push(key.clone());
            }
            stored.insert(key, serde_json::from_str(row.get::<_, &str>(2)).unwrap());
        }
        duplicated.dedup();
        let mut missing = Vec::new();
        for record in records {
            let payload: serde_json::Value = serde_json::from_str(&record.payload).unwrap();
            let key = (record.key.clone(), payload["seq"].as_i64().unwrap());
            match stored.get(&key) {
                Some(value) => assert_eq!(value, &payload, "payload of {key:?}"),
                None => missing.push(key),
            }
        }
        assert!(
            missing.is_empty() && duplicated.is_empty() && rows.len() == records.len(),
            "{} rows for {} records; missing {}: {:?}; duplicated {}: {:?}",
            rows.len(),
            records.len(),
            missing.len(),
            &missing[..missing.len().min(10)],
            duplicated.len(),
            &duplicated[..duplicated.len().min(10)],
        );
    }

    /// Reads the dead-letter topic until `count` letters are there: each as header name ->
    /// value, plus "key" and "payload".
    pub fn read_dead_letters(&self, count: usize) -> Vec<BTreeMap<String, String>> {
        test_servers::read_dead_letters(&self.kafka.brokers, &self.kafka.dlq_topic, count)
    }

    /// Waits until no partition has a replay window left, i.e. every replay was read.
    pub async fn wait_until_replayed(&self, within: Duration) {
        let client = self.database().await;
        let deadline = Instant::now() + within;
        loop {
            let open: i64 = client
                .query_one(
                    "SELECT count(*) FROM ingest_offsets WHERE replay_from IS NOT NULL",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if open == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{open} replay windows still open"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Dead letters on the topic now (reads it for 5 s).
    pub fn count_dead_letters(&self) -> usize {
        tokio::task::block_in_place(|| {
            read_topic(
                &self.kafka.brokers,
                &self.kafka.dlq_topic,
                Duration::from_secs(5),
                |_| false,
            )
        })
        .len()
    }
}

/// Worker logs in the test's captured output (shown when a test fails); RUST_LOG filters.
fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,librdkafka=warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// One record as the bridge would produce it.
#[derive(Debug, Clone)]
pub struct Record {
    pub key: String,
    pub payload: String,
    pub received_at_ms: Option<i64>,
}

pub async fn produce(producer: &FutureProducer, topic: &str, records: &[Record]) {
    use rdkafka::message::{Header, OwnedHeaders};
    let sends = records.iter().map(|record| {
        let received = record.received_at_ms.map(|ms| ms.to_string());
        let mut headers = OwnedHeaders::new();
        if let Some(received) = &received {
            headers = headers.insert(Header {
                key: telemetry_core::contract::header::RECEIVED_AT_MS,
                value: Some(received.as_str()),
            });
        }
        let message = FutureRecord::to(topic)
            .key(&record.key)
            .payload(&record.payload)
            .headers(headers);
        producer.send(message, Timeout::After(Duration::from_secs(60)))
    });
    for result in futures::future::join_all(sends).await {
        result.map_err(|(e, _)| e).expect("record produced");
    }
}

//! `make bench-bridge`: the bridge's MQTT -> Kafka rate against the slower of the two bare legs,
//! and the latency it adds at half its sustained rate, in one run on private servers.
//!
//! - MQTT leg: the publish load (`--clients` devices, QoS 1) read by a plain MQTT 5 subscriber
//!   with the bridge's Receive Maximum.
//! - Kafka leg: the same records (key, headers, payload) produced by a plain producer with the
//!   bridge's producer settings (`acks=all`, idempotent, `linger.ms=5`).
//! - Bridge: the same publish load through the release `telemetry-bridge` binary, run as a child
//!   process so that its peak RSS (VmHWM) is its own, timed until Kafka confirmed the last record
//!   (its `messages_forwarded` counter).
//! - Latency: at half the bridge's sustained rate, publish -> read back from Kafka through the
//!   bridge, against produce -> read back for the Kafka leg at the same rate. The difference is
//!   what the MQTT hop and the bridge add; both sides share the reader's fetch wait.
//! - Schema checks: the cost per message of parsing and validating a typical payload.
//!
//! The servers (Mosquitto 2, Tansu with memory storage) come from `test-servers`. The last line
//! of stdout is one JSON object.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::json;
use telemetry_bridge::config::RouteConfig;
use telemetry_bridge::schema::Schema;
use telemetry_bridge::BridgeConfig;
use telemetry_core::contract::header;
use telemetry_core::kafka::KafkaConfig;
use test_servers::{unique_name, Mosquitto, Tansu};

#[derive(Debug, Parser)]
#[command(about = "Bridge MQTT -> Kafka rate vs the bare legs, added latency, peak RSS")]
struct Args {
    /// Messages per side and round of the throughput measurement.
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Throughput rounds; each runs the MQTT leg, the Kafka leg and the bridge in turn.
    #[arg(long, default_value_t = 2)]
    rounds: u64,
    /// Publishing MQTT clients (one device each).
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Seconds of paced load for the latency measurement.
    #[arg(long, default_value_t = 10)]
    latency_seconds: u64,
    /// Partitions of the Kafka topics.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// The bridge's `max_in_flight` (its MQTT Receive Maximum); the bridge's default if unset.
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// The bridge binary; by default the release build next to this benchmark.
    #[arg(long)]
    bridge_bin: Option<PathBuf>,
}

const TARGET_RATIO: f64 = 0.8;
const TARGET_ADDED_P99_MS: f64 = 10.0;
const TARGET_PEAK_RSS_MB: f64 = 48.0;
/// Unacknowledged MQTT publishes per device, so that publishers are not the bottleneck.
const PUBLISH_WINDOW: u16 = 100;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(args))
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

fn payload(seq: u64) -> String {
    format!(
        r#"{{"ts":{},"seq":{seq},"t":{},"temperature":{}.5,"humidity":41.25}}"#,
        1_764_000_000_000u64 + seq,
        now_micros(),
        seq % 40
    )
}

fn telemetry_topic(user: &str, device: usize) -> String {
    format!("users/{user}/devices/d{device}/telemetry")
}

async fn run(args: Args) -> anyhow::Result<()> {
    let bridge_bin = match &args.bridge_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("benchmark binary has no directory")?
            .join("telemetry-bridge"),
    };
    if !bridge_bin.exists() {
        bail!(
            "{} not found; build it first: cargo build --release -p telemetry-bridge",
            bridge_bin.display()
        );
    }
    eprintln!("starting Mosquitto and Tansu");
    let mosquitto = Mosquitto::start()?;
    let tansu = Tansu::start()?;
    let port = mosquitto.port();
    let topic = |prefix: &str| -> anyhow::Result<String> {
        let name = unique_name(prefix);
        tansu.create_topic(&name, args.partitions)?;
        Ok(name)
    };
    let kafka = KafkaConfig {
        brokers: tansu.bootstrap(),
        topic: topic("bridge_throughput")?,
        dlq_topic: topic("bridge_dlq")?,
        ..KafkaConfig::default()
    };

    // The bridge: one route per phase, each to its own Kafka topic.
    let throughput_user = unique_name("tp");
    let latency_user = unique_name("lat");
    let latency_topic = topic("bridge_latency")?;
    let mut config = BridgeConfig {
        kafka: kafka.clone(),
        ..BridgeConfig::default()
    };
    if let Some(window) = args.max_in_flight {
        config.max_in_flight = window;
    }
    let http_port = free_port()?;
    config.http.listen = format!("127.0.0.1:{http_port}").parse()?;
    config.mqtt.host = "127.0.0.1".into();
    config.mqtt.port = port;
    config.mqtt.client_id = unique_name("bench_bridge");
    config.mqtt.subscriptions = vec![
        format!("users/{throughput_user}/devices/+/telemetry"),
        format!("users/{latency_user}/devices/+/telemetry"),
    ];
    config.routes = vec![
        RouteConfig {
            filter: format!("users/{throughput_user}/devices/+/telemetry"),
            topic: None,
            key: format!("{throughput_user}/{{1}}"),
            schema: None,
        },
        RouteConfig {
            filter: format!("users/{latency_user}/devices/+/telemetry"),
            topic: Some(latency_topic.clone()),
            key: format!("{latency_user}/{{1}}"),
            schema: None,
        },
    ];
    let dir = tempfile::tempdir()?;
    let config_file = dir.path().join("bridge.toml");
    std::fs::write(&config_file, toml::to_string(&config)?)?;
    let bridge = Bridge::start(&bridge_bin, &config_file, http_port)?;
    bridge.wait_ready().await?;
    // Warm up: the bridge's first records wait for Kafka metadata of the topic.
    Fleet::connect(port, &throughput_user, args.clients)
        .await?
        .publish(args.clients as u64, None, true)
        .await?;
    bridge.wait_forwarded(args.clients as f64).await?;

    // Throughput, in rounds that alternate the sides, so that load from other processes on the
    // machine hits all three alike: the two bare legs, then the bridge, N messages each.
    let n = args.messages;
    let kafka_leg_topic = topic("kafka_leg")?;
    let producer = Producer::new(&kafka, &kafka_leg_topic).await?;
    let (mut mqtt_time, mut kafka_time, mut bridge_time) = (0.0, 0.0, 0.0);
    let mut bridge_cpu = 0.0;
    for round in 1..=args.rounds {
        let mqtt = mqtt_leg(port, args.clients, n).await?;
        let kafka_secs = producer
            .produce(&kafka_leg_topic, args.clients, n, None)
            .await?;
        let cpu_before = bridge.cpu_seconds()?;
        let bridge_secs =
            bridge_throughput(&bridge, port, &throughput_user, args.clients, n).await?;
        bridge_cpu += bridge.cpu_seconds()? - cpu_before;
        eprintln!(
            "round {round}: MQTT leg {:.0} msg/s, Kafka leg {:.0} msg/s, bridge {:.0} msg/s",
            n as f64 / mqtt,
            n as f64 / kafka_secs,
            n as f64 / bridge_secs
        );
        mqtt_time += mqtt;
        kafka_time += kafka_secs;
        bridge_time += bridge_secs;
    }
    let total = (n * args.rounds) as f64;
    let (mqtt_rate, kafka_rate, bridge_rate) =
        (total / mqtt_time, total / kafka_time, total / bridge_time);
    let ratio = bridge_rate / mqtt_rate.min(kafka_rate);
    let cpu_us_per_msg = bridge_cpu * 1e6 / total;

    // Latency at half the sustained rate: through the bridge, then straight to Kafka.
    let rate = bridge_rate / 2.0;
    let count = (rate * args.latency_seconds as f64) as u64;
    eprintln!(
        "latency at {rate:.0} msg/s for {} s per side",
        args.latency_seconds
    );
    let mut reader = Reader::start(&kafka, &latency_topic, args.partitions, count)?;
    let fleet = Fleet::connect(port, &latency_user, args.clients).await?;
    Fleet::connect(port, &latency_user, args.clients)
        .await?
        .publish(args.clients as u64, None, true)
        .await?;
    reader.wait_warm().await?;
    fleet.publish(count, Some(rate), false).await?;
    let bridge_latency = reader.finish().await?;
    let direct_topic = topic("kafka_leg_latency")?;
    let mut reader = Reader::start(&kafka, &direct_topic, args.partitions, count)?;
    producer.warm_up(&direct_topic).await?;
    reader.wait_warm().await?;
    producer
        .produce(&direct_topic, args.clients, count, Some(rate))
        .await?;
    let kafka_latency = reader.finish().await?;
    let peak_rss_mb = bridge.peak_rss_mb()?;
    bridge.stop()?;

    let (schema_parse_us, schema_check_us) = schema_cost()?;

    let p = |latencies: &[f64], q: f64| percentile(latencies, q);
    let (bridge_p50, bridge_p99) = (p(&bridge_latency, 0.5), p(&bridge_latency, 0.99));
    let (kafka_p50, kafka_p99) = (p(&kafka_latency, 0.5), p(&kafka_latency, 0.99));
    let (added_p50, added_p99) = (bridge_p50 - kafka_p50, bridge_p99 - kafka_p99);
    eprintln!(
        "MQTT leg {mqtt_rate:.0} msg/s, Kafka leg {kafka_rate:.0} msg/s, bridge {bridge_rate:.0} msg/s: ratio {ratio:.2} (target >= {TARGET_RATIO}); bridge CPU {cpu_us_per_msg:.1} us/msg"
    );
    eprintln!(
        "latency at {rate:.0} msg/s: publish -> read through the bridge p50 {bridge_p50:.2} ms p99 {bridge_p99:.2} ms; produce -> read p50 {kafka_p50:.2} ms p99 {kafka_p99:.2} ms; added p50 {added_p50:.2} ms p99 {added_p99:.2} ms (target <= {TARGET_ADDED_P99_MS})"
    );
    eprintln!("bridge peak RSS {peak_rss_mb:.1} MB (target <= {TARGET_PEAK_RSS_MB})");
    eprintln!(
        "schema check: parse {schema_parse_us:.2} us, parse + validate {schema_check_us:.2} us per message"
    );
    let round2 = |v: f64| (v * 100.0).round() / 100.0;
    let fields: Vec<(&str, serde_json::Value)> = vec![
        ("bench", json!("bridge")),
        ("ratio", json!(round2(ratio))),
        ("msgs_per_s", json!(bridge_rate.round())),
        ("added_p99_ms", json!(round2(added_p99))),
        ("peak_rss_mb", json!(round2(peak_rss_mb))),
        ("added_p50_ms", json!(round2(added_p50))),
        ("mqtt_leg_msgs_per_s", json!(mqtt_rate.round())),
        ("kafka_leg_msgs_per_s", json!(kafka_rate.round())),
        ("bridge_cpu_us_per_msg", json!(round2(cpu_us_per_msg))),
        ("latency_rate_msgs_per_s", json!(rate.round())),
        ("bridge_p50_ms", json!(round2(bridge_p50))),
        ("bridge_p99_ms", json!(round2(bridge_p99))),
        ("kafka_leg_p50_ms", json!(round2(kafka_p50))),
        ("kafka_leg_p99_ms", json!(round2(kafka_p99))),
        ("schema_parse_us", json!(round2(schema_parse_us))),
        ("schema_check_us", json!(round2(schema_check_us))),
        ("messages", json!(n)),
        ("rounds", json!(args.rounds)),
        ("clients", json!(args.clients)),
        ("target_ratio", json!(TARGET_RATIO)),
        ("target_added_p99_ms", json!(TARGET_ADDED_P99_MS)),
        ("target_peak_rss_mb", json!(TARGET_PEAK_RSS_MB)),
    ];
    // Written by hand to keep the keys in this order.
    let line: Vec<String> = fields
        .iter()
        .map(|(key, value)| format!("\"{key}\":{value}"))
        .collect();
    println!("{{{}}}", line.join(","));
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The release bridge as a child process.
struct Bridge {
    child: Child,
    http_port: u16,
}

impl Bridge {
    fn start(binary: &PathBuf, config: &PathBuf, http_port: u16) -> anyhow::Result<Bridge> {
        let child = Command::new(binary)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        Ok(Bridge { child, http_port })
    }

    async fn http_get(&self, path: &str) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.http_port))
            .await
            .ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        Some(response)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(response) = self.http_get("/readyz").await {
                if response.starts_with("HTTP/1.1 200") {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the bridge did not become ready within 30 s")
    }

    /// Records Kafka confirmed (dead letters included; this load has none).
    async fn forwarded(&self) -> f64 {
        let body = self.http_get("/metrics").await.unwrap_or_default();
        body.lines()
            .filter(|l| l.starts_with(telemetry_bridge::metrics::MESSAGES_FORWARDED))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    async fn wait_forwarded(&self, count: f64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.forwarded().await < count {
            if Instant::now() > deadline {
                bail!("the bridge did not forward {count} messages within 300 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// CPU time the bridge process used so far (user + system), in seconds.
    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the command name (which is in parentheses): utime and stime are the
        // 12th and 13th, in clock ticks of 1/100 s (USER_HZ on Linux).
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .context("malformed /proc/<pid>/stat")?
            .1
            .split_whitespace()
            .collect();
        let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
        Ok(ticks / 100.0)
    }

    /// Peak resident set size of the bridge process (VmHWM), in MB.
    fn peak_rss_mb(&self) -> anyhow::Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmHWM in /proc/<pid>/status")?;
        Ok(kb / 1024.0)
    }

    fn stop(mut self) -> anyhow::Result<()> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("the bridge exited with {status}");
        }
        Ok(())
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// Devices of one user, connected (CONNACK received) and ready to publish.
struct Fleet {
    devices: Vec<(rumqttc::AsyncClient, rumqttc::EventLoop, String)>,
}

impl Fleet {
    async fn connect(port: u16, user: &str, clients: usize) -> anyhow::Result<Fleet> {
        let mut devices = Vec::with_capacity(clients);
        for device in 0..clients {
            let mut options =
                rumqttc::MqttOptions::new(unique_name("bench_device"), "127.0.0.1", port);
            options
                .set_keep_alive(Duration::from_secs(30))
                .set_inflight(PUBLISH_WINDOW)
                .set_max_packet_size(1 << 20, 1 << 20);
            let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1000);
            loop {
                if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) =
                    eventloop.poll().await?
                {
                    break;
                }
            }
            devices.push((client, eventloop, telemetry_topic(user, device)));
        }
        Ok(Fleet { devices })
    }

    /// Publishes `total` QoS 1 messages spread over the devices, each with up to
    /// `PUBLISH_WINDOW` unacknowledged, paced to `rate` msg/s overall when given; returns when
    /// every PUBACK arrived. Warm-up messages carry `"t":0` so that readers skip them.
    async fn publish(self, total: u64, rate: Option<f64>, warm_up: bool) -> anyhow::Result<()> {
        let clients = self.devices.len() as u64;
        let mut tasks = Vec::new();
        for (index, (client, mut eventloop, topic)) in self.devices.into_iter().enumerate() {
            let share = total / clients + u64::from((index as u64) < total % clients);
            let interval = rate.map(|r| Duration::from_secs_f64(clients as f64 / r));
            tasks.push(tokio::spawn(async move {
                let publisher = tokio::spawn(async move {
                    let mut ticker = interval.map(|i| {
                        let mut t = tokio::time::interval(i);
                        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                        t
                    });
                    for seq in 0..share {
                        if let Some(ticker) = ticker.as_mut() {
                            ticker.tick().await;
                        }
                        let body = if warm_up {
                            warm_up_payload()
                        } else {
                            payload(seq)
                        };
                        client
                            .publish(&topic, rumqttc::QoS::AtLeastOnce, false, body)
                            .await?;
                    }
                    anyhow::Ok(client)
                });
                let mut acked = 0;
                while acked < share {
                    if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) =
                        eventloop.poll().await?
                    {
                        acked += 1;
                    }
                }
                let client = publisher.await??;
                client.disconnect().await?;
                let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
                anyhow::Ok(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        Ok(())
    }
}

fn warm_up_payload() -> String {
    r#"{"seq":0,"t":0,"temperature":1}"#.to_owned()
}

/// The MQTT leg: seconds from the first publish to the subscriber's last message.
async fn mqtt_leg(port: u16, clients: usize, total: u64) -> anyhow::Result<f64> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    let user = unique_name("mqtt_leg");
    let mut options =
        rumqttc::v5::MqttOptions::new(unique_name("bench_subscriber"), "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_receive_maximum(Some(BridgeConfig::default().max_in_flight as u16))
        .set_max_packet_size(Some(1 << 20));
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 1000);
    client
        .subscribe(
            format!("users/{user}/devices/+/telemetry"),
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        )
        .await?;
    loop {
        if let rumqttc::v5::Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await? {
            break;
        }
    }
    let received = tokio::spawn(async move {
        let mut count = 0;
        while count < total {
            if let rumqttc::v5::Event::Incoming(Packet::Publish(_)) = eventloop.poll().await? {
                count += 1;
            }
        }
        anyhow::Ok(Instant::now())
    });
    let fleet = Fleet::connect(port, &user, clients).await?;
    let started = Instant::now();
    fleet.publish(total, None, false).await?;
    let done = tokio::time::timeout(Duration::from_secs(300), received)
        .await
        .context("the subscriber did not get every message within 300 s")???;
    client.disconnect().await.ok();
    Ok((done - started).as_secs_f64())
}

/// Headers as the bridge sets them.
fn headers(topic: &str) -> OwnedHeaders {
    let received = (now_micros() / 1000).to_string();
    OwnedHeaders::new_with_capacity(5)
        .insert(Header {
            key: header::MQTT_TOPIC,
            value: Some(topic),
        })
        .insert(Header {
            key: header::RECEIVED_AT_MS,
            value: Some(&received),
        })
        .insert(Header {
            key: header::MQTT_QOS,
            value: Some("1"),
        })
        .insert(Header {
            key: header::MQTT_RETAIN,
            value: Some("false"),
        })
        .insert(Header {
            key: header::MQTT_DUP,
            value: Some("false"),
        })
}

/// The Kafka leg: a plain producer with the bridge's settings, producing records like the
/// bridge's.
struct Producer {
    producer: FutureProducer,
    user: String,
}

impl Producer {
    /// Creates the producer and waits until a first record is confirmed, so that connecting
    /// and getting a producer id are not timed.
    async fn new(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<Producer> {
        let producer = Producer {
            producer: kafka.durable_producer_config().create()?,
            user: unique_name("kafka_leg"),
        };
        producer.warm_up(topic).await?;
        Ok(producer)
    }

    async fn warm_up(&self, topic: &str) -> anyhow::Result<()> {
        let body = warm_up_payload();
        let key = format!("{}/d0", self.user);
        self.producer
            .send(
                FutureRecord::to(topic).key(&key).payload(&body),
                Duration::from_secs(60),
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("warm-up record failed: {e}"))?;
        Ok(())
    }

    /// Produces `total` records (`clients` devices round robin) to `topic`, paced to `rate`
    /// when given; returns the seconds until Kafka confirmed them all.
    async fn produce(
        &self,
        topic: &str,
        clients: usize,
        total: u64,
        rate: Option<f64>,
    ) -> anyhow::Result<f64> {
        let (confirmations, mut confirmed) = tokio::sync::mpsc::channel(65_536);
        let waiter = tokio::spawn(async move {
            let mut count = 0u64;
            while let Some(delivery) = confirmed.recv().await {
                let delivery: rdkafka::producer::DeliveryFuture = delivery;
                delivery
                    .await
                    .context("producer gone")?
                    .map_err(|(e, _)| anyhow::anyhow!("delivery failed: {e}"))?;
                count += 1;
            }
            anyhow::Ok(count)
        });
        let mut ticker = rate.map(|r| {
            let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / r));
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            t
        });
        let mqtt_topics: Vec<String> = (0..clients)
            .map(|d| telemetry_topic(&self.user, d))
            .collect();
        let started = Instant::now();
        for seq in 0..total {
            if let Some(ticker) = ticker.as_mut() {
                ticker.tick().await;
            }
            let device = (seq % clients as u64) as usize;
            let key = format!("{}/d{device}", self.user);
            let body = payload(seq);
            let mut record = FutureRecord::to(topic)
                .key(&key)
                .payload(&body)
                .headers(headers(&mqtt_topics[device]));
            let delivery = loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => break delivery,
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull,
                        ),
                        returned,
                    )) => {
                        record = returned;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err((error, _)) => bail!("produce failed: {error}"),
                }
            };
            confirmations.send(delivery).await?;
        }
        drop(confirmations);
        let count = waiter.await??;
        if count != total {
            bail!("{count} of {total} records confirmed");
        }
        Ok(started.elapsed().as_secs_f64())
    }
}

/// The bridge: seconds from the first publish until Kafka confirmed the last record.
async fn bridge_throughput(
    bridge: &Bridge,
    port: u16,
    user: &str,
    clients: usize,
    total: u64,
) -> anyhow::Result<f64> {
    let target = bridge.forwarded().await + total as f64;
    let fleet = Fleet::connect(port, user, clients).await?;
    let started = Instant::now();
    let publishing = tokio::spawn(fleet.publish(total, None, false));
    bridge.wait_forwarded(target).await?;
    let elapsed = started.elapsed();
    publishing.await??;
    Ok(elapsed.as_secs_f64())
}

/// Reads a topic's partitions from the start on a thread of its own and records, per record,
/// the time from the `t` in its payload (when it was published or produced) to when it was
/// read, in ms. Warm-up records (`"t":0`) only tell that the reader is fetching.
struct Reader {
    thread: std::thread::JoinHandle<anyhow::Result<Vec<f64>>>,
    warm: tokio::sync::oneshot::Receiver<()>,
}

impl Reader {
    fn start(
        kafka: &KafkaConfig,
        topic: &str,
        partitions: i32,
        expected: u64,
    ) -> anyhow::Result<Reader> {
        let consumer: BaseConsumer = kafka
            .client_config(&[
                ("group.id", &unique_name("bench_reader")),
                ("enable.auto.commit", "false"),
                // The reader's own delay is part of both sides; keep it small.
                ("fetch.wait.max.ms", "1"),
                ("fetch.error.backoff.ms", "1"),
            ])
            .create()?;
        let mut assignment = TopicPartitionList::new();
        for partition in 0..partitions {
            assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        let (warm_tx, warm) = tokio::sync::oneshot::channel();
        let thread = std::thread::spawn(move || {
            let mut warm_tx = Some(warm_tx);
            let mut latencies = Vec::with_capacity(expected as usize);
            let deadline = Instant::now() + Duration::from_secs(300);
            while (latencies.len() as u64) < expected {
                if Instant::now() > deadline {
                    bail!(
                        "read {} of {expected} records within 300 s",
                        latencies.len()
                    );
                }
                let Some(message) = consumer.poll(Duration::from_millis(100)) else {
                    continue;
                };
                let read_at = now_micros();
                let message = message?;
                let body: serde_json::Value =
                    serde_json::from_slice(message.payload().unwrap_or_default())?;
                match body["t"].as_u64().context("payload without t")? {
                    0 => {
                        if let Some(tx) = warm_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    sent => latencies.push(read_at.saturating_sub(sent) as f64 / 1000.0),
                }
            }
            Ok(latencies)
        });
        Ok(Reader { thread, warm })
    }

    /// Waits until the reader has read a warm-up record.
    async fn wait_warm(&mut self) -> anyhow::Result<()> {
        tokio::time::timeout(Duration::from_secs(60), &mut self.warm)
            .await
            .context("the reader saw no warm-up record within 60 s")?
            .context("the reader stopped")
    }

    async fn finish(self) -> anyhow::Result<Vec<f64>> {
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the reader thread panicked"))?
    }
}

fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let index = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

/// Microseconds per message to parse a typical payload, and to parse and validate it against a
/// typical schema, as a route with `schema` does.
fn schema_cost() -> anyhow::Result<(f64, f64)> {
    let schema = Schema::compile(
        "telemetry.json".into(),
        &json!({
            "type": "object",
            "required": ["seq", "temperature"],
            "properties": {
                "ts": {"type": "integer", "minimum": 0},
                "seq": {"type": "integer", "minimum": 0},
                "temperature": {"type": "number", "minimum": -50, "maximum": 150},
                "humidity": {"type": "number", "minimum": 0, "maximum": 100},
                "gps": {"type": "object", "properties": {
                    "lat": {"type": "number", "minimum": -90, "maximum": 90},
                    "lon": {"type": "number", "minimum": -180, "maximum": 180}
                }}
            }
        }),
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let payloads: Vec<String> = (0..10_000).map(payload).collect();
    let rounds = 20;
    let started = Instant::now();
    let mut members = 0usize;
    for _ in 0..rounds {
        for p in &payloads {
            let value: serde_json::Value = serde_json::from_slice(p.as_bytes())?;
            members += value.as_object().map_or(0, |o| o.len());
        }
    }
    let parse = started.elapsed().as_secs_f64() * 1e6 / (rounds * payloads.len()) as f64;
    let started = Instant::now();
    for _ in 0..rounds {
        for p in &payloads {
            if schema.check(p.as_bytes()).is_err() {
                bail!("the benchmark payload breaks its schema: {p}");
            }
        }
    }
    let check = started.elapsed().as_secs_f64() * 1e6 / (rounds * payloads.len()) as f64;
    std::hint::black_box(members);
    Ok((parse, check))
}

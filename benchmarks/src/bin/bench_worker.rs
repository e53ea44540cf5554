//! `make bench-worker`: the worker's write path against `psql \copy`, and the worker's full drain
//! of a topic against a consumer that discards, in one run.
//!
//! The topic is filled first with N messages as the bridge produces them (key `{user}/{device}`,
//! the bridge's headers, `received_at_ms` among them, and a JSON reading of about 85 bytes),
//! produced in large batches. Then:
//!
//! - **Write path.** The rows those messages become (decoded with the contract's own functions,
//!   partition and offset from the producer's delivery reports) are cut into transactions of up
//!   to 1,000 rows of one partition, as the consumer hands them out, and stored through the same
//!   PgBouncer by: `psql \copy` (the baseline: a script of `BEGIN; \copy ...; COMMIT;` per
//!   transaction, text format); tokio-postgres' `BinaryCopyInWriter`; the worker's COPY encoder
//!   alone (`copy::encode`, one buffer per transaction); and the worker's whole write path,
//!   `Sink::store`, which also locks and advances `ingest_offsets` and by default upserts
//!   `device_latest`: with one writer, one writer without `device_latest`, one writer over the
//!   same rows without `seq` (no check for copies: the cost of exactly-once by `seq`), and as the worker
//!   runs it, with `batch.writers` (default 2) loops at once, each on its own connection and
//!   given the partitions `kafka::share_of` gives it. The tables are emptied before every run; runs
//!   alternate in rounds, and each side's rate is that of its fastest round, because load from
//!   other processes on a shared machine only ever slows a run down. Each side's client CPU
//!   (this process, or psql) is reported per row.
//! - **Drain.** Each round, a plain `StreamConsumer` with a fresh group reads the topic from the
//!   earliest offset and discards each message; then the release `telemetry-worker` binary
//!   starts as a child process on a fresh database and group, and the bench polls
//!   `ingest_offsets` until every record is stored, then checks the row count. Rates are taken
//!   from the first record (or first stored batch) to the last, so that start-up (migrations,
//!   group join) stays apart. The worker's peak RSS is its `VmHWM` from `/proc/<pid>/status`.
//!   One worker only: a second replica would take over partitions mid-topic, which Tansu's
//!   memory storage does not serve correctly from batched records.
//!
//! The last line printed is one JSON object:
//! `{"bench":"worker","copy_ratio":R1,"drain_ratio":R2,"rows_per_s":N,"peak_rss_mb":M,...}`,
//! where `copy_ratio` is the worker's write path's rows/s (`Sink::store` with the default
//! number of writers) over `psql \copy` rows/s (target at least 1.0),
//! `drain_ratio` the worker's stored rows/s over the discarding consumer's messages/s (target
//! at least 0.8), `rows_per_s` the write path's rows/s and `peak_rss_mb` the worker process's
//! peak resident memory (target at most 64). Targets are reported, never asserted.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use clap::{Parser, ValueEnum};
use deadpool_postgres::Pool;
use futures::{SinkExt, StreamExt};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde_json::value::RawValue;
use serde_json::Value;
use telemetry_core::contract::{self, header};
use telemetry_core::kafka::{self, KafkaConfig};
use telemetry_core::observe::Health;
use telemetry_core::Shutdown;
use telemetry_worker::config::{BatchConfig, PostgresConfig};
use telemetry_worker::copy;
use telemetry_worker::dlq::DeadLetterProducer;
use telemetry_worker::record::{Batch, Row};
use telemetry_worker::sink::Sink;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{Json, ToSql, Type};

#[derive(Debug, Parser)]
#[command(about = "The worker's write path vs psql \\copy, and its drain vs a discarding consumer")]
struct Args {
    /// Messages in the topic; every write run stores all of them.
    #[arg(long, default_value_t = 200_000)]
    messages: usize,
    /// Devices sending them, 10 per user, each reporting in turn.
    #[arg(long, default_value_t = 1_000)]
    devices: usize,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Rows per transaction on every write side (the worker's batch.max_records).
    #[arg(long, default_value_t = 1_000)]
    transaction_rows: usize,
    /// Rounds; each round runs every write side once, then the two drain sides. Each side's
    /// rate is its fastest round's.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Run only one part.
    #[arg(long)]
    only: Option<Part>,
    /// An extra librdkafka property for the worker process (its kafka.properties), as
    /// `name=value`; repeat for several. Used to try queue sizes without rebuilding the worker.
    #[arg(long = "worker-property", value_name = "NAME=VALUE", value_parser = property)]
    worker_properties: Vec<(String, String)>,
    /// The psql that runs the baseline.
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin/psql")]
    psql: PathBuf,
    /// The worker binary; by default the `telemetry-worker` next to this benchmark's binary.
    #[arg(long)]
    worker_bin: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    Write,
    Drain,
}

fn property(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("'{text}' is not name=value")),
    }
}

/// 2025-11-24T16:00:00Z: the device clock of the first message.
const START_MS: i64 = 1_764_000_000_000;

/// One message as the bridge produces it.
#[derive(Debug)]
struct Message {
    key: String,
    mqtt_topic: String,
    payload: String,
    received_at_ms: i64,
}

/// The fleet reporting in turn: message `n` comes from device `n % devices`, one message per
/// millisecond overall, so each device reports about once a second when there are 1,000.
fn messages(count: usize, devices: usize) -> Vec<Message> {
    (0..count)
        .map(|n| {
            let d = n % devices;
            let (user, device) = (format!("user-{}", d / 10), format!("sensor-{}", d % 10));
            let ts = START_MS + n as i64;
            let payload = format!(
                r#"{{"ts":{ts},"seq":{},"temperature":{:.1},"humidity":{:.1},"battery":{:.2}}}"#,
                n / devices,
                15.0 + (n * 7 % 150) as f64 / 10.0,
                30.0 + (n * 13 % 400) as f64 / 10.0,
                3.3 + (n % 90) as f64 / 100.0,
            );
            Message {
                mqtt_topic: format!("users/{user}/devices/{device}/telemetry"),
                key: format!("{user}/{device}"),
                payload,
                // The network and the broker between device and bridge: 20 to 80 ms.
                received_at_ms: ts + 20 + (n % 61) as i64,
            }
        })
        .collect()
}

/// Produces every message in large batches and returns where each landed (partition, offset).
/// Batching matters twice: it is how a busy bridge produces, and Tansu's memory storage serves
/// fetches well from batch starts (reading from offset 0, as every side here does, is fine).
async fn fill(kafka: &KafkaConfig, messages: &[Message]) -> anyhow::Result<Vec<(i32, i64)>> {
    let mut config = kafka.durable_producer_config();
    config
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("batch.size", "1048576")
        .set("queue.buffering.max.messages", "200000");
    let producer: FutureProducer = config.create().context("cannot create the producer")?;
    let producer = &producer;
    let topic = kafka.topic.as_str();
    futures::stream::iter(messages)
        .map(|message| async move {
            let received_at = message.received_at_ms.to_string();
            let headers = OwnedHeaders::new_with_capacity(5)
                .insert(Header {
                    key: header::MQTT_TOPIC,
                    value: Some(&message.mqtt_topic),
                })
                .insert(Header {
                    key: header::RECEIVED_AT_MS,
                    value: Some(&received_at),
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
                });
            let record = FutureRecord::to(topic)
                .key(&message.key)
                .payload(&message.payload)
                .headers(headers);
            let delivery = producer
                .send(record, Timeout::Never)
                .await
                .map_err(|(error, _)| error)
                .context("cannot produce a message")?;
            Ok::<_, anyhow::Error>((delivery.partition, delivery.offset))
        })
        .buffered(20_000)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// The rows the worker makes of the messages, decoded by the contract's own functions, in the
/// order a consumer hands them out (partition by partition).
fn rows(messages: &[Message], positions: &[(i32, i64)]) -> anyhow::Result<Vec<Row>> {
    let mut rows = messages
        .iter()
        .zip(positions)
        .map(|(message, &(partition, offset))| {
            let telemetry = contract::decode_payload(
                message.payload.as_bytes(),
                contract::DEFAULT_MAX_PAYLOAD_BYTES,
            )?;
            Ok(Row {
                device_time: telemetry.device_time,
                received_at: DateTime::from_timestamp_millis(message.received_at_ms)
                    .context("receive time out of range")?,
                device: contract::parse_kafka_key(message.key.as_bytes())?,
                seq: telemetry.seq,
                payload: message.payload.as_bytes().to_vec(),
                partition,
                offset,
            })
        })
        .collect::<anyhow::Result<Vec<Row>>>()?;
    rows.sort_by_key(|row| (row.partition, row.offset));
    Ok(rows)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.messages > 0 && args.devices > 0 && args.partitions > 0,
        "--messages, --devices and --partitions must be at least 1"
    );
    ensure!(
        args.transaction_rows > 0 && args.rounds > 0,
        "--transaction-rows and --rounds must be at least 1"
    );
    // Start the servers before the runtime: starting blocks.
    let servers = test_servers::shared();
    let topic = test_servers::unique_name("bench_worker_stream");
    servers.kafka.create_topic(&topic, args.partitions)?;
    servers.kafka.create_topic(&format!("{topic}_dlq"), 1)?;
    let write_db = test_servers::unique_name("bench_worker_write");
    servers.postgres.create_database(&write_db)?;
    // A fresh database per drain round: the worker starts from nothing each time.
    let mut drain = Vec::new();
    let drain_rounds = if args.only == Some(Part::Write) {
        0
    } else {
        args.rounds
    };
    for _ in 0..drain_rounds {
        let name = test_servers::unique_name("bench_worker_drain");
        servers.postgres.create_database(&name)?;
        drain.push(DrainDatabase {
            direct: servers.postgres.url(&name),
            pooled: servers.pgbouncer.url(&name),
        });
    }
    let kafka = KafkaConfig {
        brokers: servers.kafka.bootstrap(),
        dlq_topic: format!("{topic}_dlq"),
        topic,
        ..KafkaConfig::default()
    };
    let databases = Databases {
        write_direct: servers.postgres.url(&write_db),
        write_pooled: servers.pgbouncer.url(&write_db),
        drain,
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(args, kafka, databases))
}

#[derive(Debug)]
struct Databases {
    write_direct: String,
    write_pooled: String,
    drain: Vec<DrainDatabase>,
}

#[derive(Debug)]
struct DrainDatabase {
    direct: String,
    pooled: String,
}

async fn bench(args: Args, kafka: KafkaConfig, databases: Databases) -> anyhow::Result<()> {
    let messages = messages(args.messages, args.devices);
    let started = Instant::now();
    let positions = fill(&kafka, &messages).await?;
    println!(
        "filled {} with {} messages from {} devices over {} partitions in {:.1} s",
        kafka.topic,
        messages.len(),
        args.devices.min(args.messages),
        args.partitions,
        started.elapsed().as_secs_f64()
    );
    // Where each partition ends: the worker is done when ingest_offsets says the same.
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    for &(partition, offset) in &positions {
        let end = ends.entry(partition).or_insert(0);
        *end = (*end).max(offset + 1);
    }
    let rows = rows(&messages, &positions)?;
    drop(messages);

    let write = match args.only {
        Some(Part::Drain) => None,
        _ => Some(write_path(&args, &kafka, &databases, &rows).await?),
    };
    drop(rows);
    let drain = match args.only {
        Some(Part::Write) => None,
        _ => Some(drain(&args, &kafka, &databases, &ends).await?),
    };
    report(&args, write.as_ref(), drain.as_ref());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (a) The write path.

/// The sides of the write runs, in the order of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Writer {
    /// `psql \copy` in text format, one `BEGIN; \copy; COMMIT;` per transaction.
    Psql,
    /// tokio-postgres' `BinaryCopyInWriter`, a row at a time.
    BinaryCopyIn,
    /// The worker's encoder alone: `copy::encode` of the whole transaction, one COPY.
    WorkerCopy,
    /// One `Sink::store` loop (device_latest kept).
    Sink,
    /// One `Sink::store` loop with `.keep_device_latest(false)`.
    SinkWithoutLatest,
    /// One `Sink::store` loop over the same rows without `seq`, which skips the check for
    /// copies (`dedup`): the difference to `Sink` is what exactly-once by `seq` costs.
    SinkWithoutSeq,
    /// The worker's write path: `batch.writers` `Sink::store` loops at once, each on its own
    /// connection, with the partitions `kafka::share_of` assigns it.
    Worker,
}

const WRITERS: [Writer; 7] = [
    Writer::Psql,
    Writer::BinaryCopyIn,
    Writer::WorkerCopy,
    Writer::Sink,
    Writer::SinkWithoutLatest,
    Writer::SinkWithoutSeq,
    Writer::Worker,
];

impl Writer {
    fn label(self) -> &'static str {
        match self {
            Writer::Psql => "psql \\copy (baseline)",
            Writer::BinaryCopyIn => "BinaryCopyInWriter",
            Writer::WorkerCopy => "worker COPY encoder alone",
            Writer::Sink => "Sink::store, one writer",
            Writer::SinkWithoutLatest => "one writer, no device_latest",
            Writer::SinkWithoutSeq => "one writer, rows without seq",
            Writer::Worker => "worker (default batch.writers)",
        }
    }
}

/// What one writer took over all rounds.
#[derive(Debug, Default, Clone, Copy)]
struct Measured {
    /// Rows/s of the fastest round: load from other processes only ever slows a run down, so
    /// the fastest round is the closest to what the side can do.
    best_rate: f64,
    /// CPU time of this process and of the children it waited for (psql) during the runs.
    client_cpu: Duration,
}

#[derive(Debug)]
struct WriteFigures {
    /// Rows stored over all rounds, per writer.
    rows: usize,
    measured: BTreeMap<Writer, Measured>,
}

impl WriteFigures {
    fn rate(&self, writer: Writer) -> f64 {
        self.measured.get(&writer).map_or(0.0, |m| m.best_rate)
    }

    fn client_cpu_us_per_row(&self, writer: Writer) -> f64 {
        self.measured
            .get(&writer)
            .map_or(0.0, |m| m.client_cpu.as_secs_f64() * 1e6 / self.rows as f64)
    }
}

/// The transactions every writer stores: up to `per_transaction` rows of one partition each,
/// as the consumer hands them out.
fn transactions(rows: &[Row], per_transaction: usize) -> Vec<Batch> {
    rows.chunk_by(|a, b| a.partition == b.partition)
        .flat_map(|partition| partition.chunks(per_transaction))
        .map(|chunk| {
            let mut next_offsets = BTreeMap::new();
            for row in chunk {
                next_offsets.insert(row.partition, row.offset + 1);
            }
            Batch {
                rows: chunk.to_vec(),
                dead: Vec::new(),
                next_offsets,
            }
        })
        .collect()
}

async fn write_path(
    args: &Args,
    kafka: &KafkaConfig,
    databases: &Databases,
    rows: &[Row],
) -> anyhow::Result<WriteFigures> {
    let direct = connect(&databases.write_direct).await?;
    {
        let mut migrating = connect(&databases.write_direct).await?;
        telemetry_worker::schema::migrate(&mut migrating).await?;
    }
    let pool = telemetry_worker::create_pool(&PostgresConfig {
        url: databases.write_pooled.clone(),
        ..PostgresConfig::default()
    })?;
    // Everything each side needs is built before its clock starts.
    let batches = transactions(rows, args.transaction_rows);
    let unnumbered: Vec<Batch> = batches
        .iter()
        .map(|batch| Batch {
            rows: batch
                .rows
                .iter()
                .map(|row| Row {
                    seq: None,
                    ..row.clone()
                })
                .collect(),
            dead: Vec::new(),
            next_offsets: batch.next_offsets.clone(),
        })
        .collect();
    let files = tempfile::tempdir()?;
    let script = psql_script(files.path(), &batches)?;
    let payloads: Vec<Vec<Box<RawValue>>> = batches
        .iter()
        .map(|batch| {
            batch
                .rows
                .iter()
                .map(|row| {
                    Ok(RawValue::from_string(String::from_utf8(
                        row.payload.clone(),
                    )?)?)
                })
                .collect::<anyhow::Result<_>>()
        })
        .collect::<anyhow::Result<_>>()?;
    let sink = |keep_latest: bool| -> anyhow::Result<Sink> {
        Ok(Sink::new(
            pool.clone(),
            kafka.topic.clone(),
            DeadLetterProducer::new(
                kafka,
                telemetry_worker::dlq::delivery_timeout(Duration::from_secs(60)),
            )?,
            Health::new(),
        )
        .keep_device_latest(keep_latest)
        .write_timeout(Duration::from_secs(60)))
    };
    let (sink_latest, sink_plain) = (sink(true)?, sink(false)?);
    let shutdown = Shutdown::new();

    let mut measured: BTreeMap<Writer, Measured> = BTreeMap::new();
    for round in 1..=args.rounds {
        // Every other round runs backwards, so no side always follows the same one.
        let mut order = WRITERS.to_vec();
        if round % 2 == 0 {
            order.reverse();
        }
        let mut line = format!("round {round}:");
        for writer in order {
            empty_tables(&direct).await?;
            let cpu_before = process_cpu()?;
            let started = Instant::now();
            match writer {
                Writer::Psql => run_psql(&args.psql, &databases.write_pooled, &script).await?,
                Writer::BinaryCopyIn => binary_copy_in_writer(&pool, &batches, &payloads).await?,
                Writer::WorkerCopy => worker_copy(&pool, &batches).await?,
                Writer::Sink => store_all(&sink_latest, batches.iter(), &shutdown).await?,
                Writer::SinkWithoutLatest => {
                    store_all(&sink_plain, batches.iter(), &shutdown).await?
                }
                Writer::SinkWithoutSeq => {
                    store_all(&sink_latest, unnumbered.iter(), &shutdown).await?
                }
                Writer::Worker => {
                    let writers = BatchConfig::default().writers;
                    let of = |writer: usize| {
                        batches.iter().filter(move |batch| {
                            kafka::share_of(batch.rows[0].partition, writers) == writer
                        })
                    };
                    futures::future::try_join_all(
                        (0..writers).map(|writer| store_all(&sink_latest, of(writer), &shutdown)),
                    )
                    .await?;
                }
            }
            let took = started.elapsed();
            let cpu = process_cpu()?.saturating_sub(cpu_before);
            let stored: i64 = direct
                .query_one("SELECT count(*) FROM raw_telemetry", &[])
                .await?
                .get(0);
            ensure!(
                stored == rows.len() as i64,
                "{} stored {stored} rows, not {}",
                writer.label(),
                rows.len()
            );
            let entry = measured.entry(writer).or_default();
            entry.best_rate = entry.best_rate.max(rows.len() as f64 / took.as_secs_f64());
            entry.client_cpu += cpu;
            let _ = write!(
                line,
                " {} {:.0}/s;",
                writer.label(),
                rows.len() as f64 / took.as_secs_f64()
            );
        }
        println!("{}", line.trim_end_matches(';'));
    }
    empty_tables(&direct).await?;
    Ok(WriteFigures {
        rows: rows.len() * args.rounds,
        measured,
    })
}

async fn store_all(
    sink: &Sink,
    batches: impl Iterator<Item = &Batch>,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    for batch in batches {
        sink.store(batch, shutdown).await?;
    }
    Ok(())
}

/// Every side starts from empty tables, and from a checkpoint, so that none pays for the
/// previous one's dirty pages.
async fn empty_tables(direct: &tokio_postgres::Client) -> anyhow::Result<()> {
    direct
        .batch_execute(
            "TRUNCATE raw_telemetry, device_latest, device_sequences, ingest_offsets; CHECKPOINT;",
        )
        .await
        .context("cannot empty the tables between runs")
}

/// CPU time (user and system) of this process plus the children it has waited for, from
/// `/proc/self/stat`, in clock ticks of 10 ms (Linux's USER_HZ).
fn process_cpu() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // The fields after the command name, which is in parentheses and may hold spaces: state is
    // field 3, utime 14, stime 15, cutime 16, cstime 17.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("no ')' in /proc/self/stat")?
        .1
        .split_whitespace()
        .collect();
    let mut ticks = 0u64;
    for field in 14..=17 {
        ticks += fields
            .get(field - 3)
            .context("/proc/self/stat is too short")?
            .parse::<u64>()?;
    }
    Ok(Duration::from_millis(ticks * 10))
}

const COLUMNS: &str =
    "device_time, received_at, user_id, device_id, seq, payload, kafka_partition, kafka_offset";

/// Writes each transaction's rows as a text-format file and a psql script that copies each in
/// its own transaction; returns the script's path.
fn psql_script(dir: &Path, batches: &[Batch]) -> anyhow::Result<PathBuf> {
    let mut script = String::new();
    for (i, batch) in batches.iter().enumerate() {
        let path = dir.join(format!("rows-{i:05}.txt"));
        let mut text = String::with_capacity(batch.rows.len() * 200);
        for row in &batch.rows {
            let _ = writeln!(
                text,
                "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                row.device_time.map_or("\\N".into(), timestamp_text),
                timestamp_text(row.received_at),
                copy_text(&row.device.user),
                copy_text(&row.device.device),
                row.seq.map_or("\\N".into(), |s| s.to_string()),
                copy_text(std::str::from_utf8(&row.payload)?),
                row.partition,
                row.offset,
            );
        }
        std::fs::write(&path, text)?;
        let _ = writeln!(
            script,
            "BEGIN;\n\\copy raw_telemetry ({COLUMNS}) FROM '{}'\nCOMMIT;",
            path.display()
        );
    }
    let path = dir.join("copy.sql");
    std::fs::write(&path, script)?;
    Ok(path)
}

fn timestamp_text(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string()
}

/// COPY's text format escapes (<https://www.postgresql.org/docs/15/sql-copy.html>).
fn copy_text(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

async fn run_psql(psql: &Path, url: &str, script: &Path) -> anyhow::Result<()> {
    let output = tokio::process::Command::new(psql)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-f"])
        .arg(script)
        .stdout(Stdio::null())
        .output()
        .await
        .with_context(|| format!("cannot run {}", psql.display()))?;
    ensure!(
        output.status.success(),
        "psql failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

async fn binary_copy_in_writer(
    pool: &Pool,
    batches: &[Batch],
    payloads: &[Vec<Box<RawValue>>],
) -> anyhow::Result<()> {
    let types = [
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::TEXT,
        Type::TEXT,
        Type::INT8,
        Type::JSONB,
        Type::INT4,
        Type::INT8,
    ];
    let mut client = pool.get().await?;
    for (batch, payloads) in batches.iter().zip(payloads) {
        let tx = client.transaction().await?;
        let sink = tx.copy_in(copy::COPY_RAW_TELEMETRY).await?;
        let writer = BinaryCopyInWriter::new(sink, &types);
        let mut writer = std::pin::pin!(writer);
        for (row, payload) in batch.rows.iter().zip(payloads) {
            let payload = Json(payload.as_ref());
            let values: [&(dyn ToSql + Sync); 8] = [
                &row.device_time,
                &row.received_at,
                &row.device.user,
                &row.device.device,
                &row.seq,
                &payload,
                &row.partition,
                &row.offset,
            ];
            writer.as_mut().write(&values).await?;
        }
        writer.finish().await?;
        tx.commit().await?;
    }
    Ok(())
}

/// What `Sink::store` does for COPY, without the rest of its transaction.
async fn worker_copy(pool: &Pool, batches: &[Batch]) -> anyhow::Result<()> {
    let mut client = pool.get().await?;
    for batch in batches {
        let tx = client.transaction().await?;
        let sink = tx.copy_in::<_, Bytes>(copy::COPY_RAW_TELEMETRY).await?;
        let mut sink = std::pin::pin!(sink);
        sink.send(copy::encode(&batch.rows)).await?;
        sink.as_mut().finish().await?;
        tx.commit().await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (b) The drain.

#[derive(Debug, Default)]
struct DrainRun {
    /// From the consumer's creation (or the process's start) to the last record.
    wall: Duration,
    /// From the first record (or first stored batch) to the last.
    window: Duration,
    /// Records read (or stored) inside `window`.
    in_window: u64,
}

impl DrainRun {
    fn add(&mut self, other: &DrainRun) {
        self.wall += other.wall;
        self.window += other.window;
        self.in_window += other.in_window;
    }

    fn rate(&self) -> f64 {
        self.in_window as f64 / self.window.as_secs_f64()
    }
}

/// Sums over all drain rounds, the fastest round of each side (see [`Measured::best_rate`]), and
/// the highest peak RSS of any round.
#[derive(Debug, Default)]
struct DrainFigures {
    baseline: DrainRun,
    worker: DrainRun,
    baseline_best: f64,
    worker_best: f64,
    peak_rss_kb: u64,
}

async fn drain(
    args: &Args,
    kafka: &KafkaConfig,
    databases: &Databases,
    ends: &BTreeMap<i32, i64>,
) -> anyhow::Result<DrainFigures> {
    let mut figures = DrainFigures::default();
    for (round, database) in (1..).zip(&databases.drain) {
        let baseline = discard_all(kafka, args.messages).await?;
        let (worker, peak_rss_kb) = worker_drain(args, kafka, database, ends).await?;
        println!(
            "drain round {round}: consume-and-discard {:.0} msgs/s ({:.2} s after the first, \
             {:.2} s from start); telemetry-worker {:.0} rows/s ({:.2} s after the first batch, \
             {:.2} s from start), peak RSS {:.1} MB",
            baseline.rate(),
            baseline.window.as_secs_f64(),
            baseline.wall.as_secs_f64(),
            worker.rate(),
            worker.window.as_secs_f64(),
            worker.wall.as_secs_f64(),
            peak_rss_kb as f64 / 1024.0
        );
        figures.baseline.add(&baseline);
        figures.worker.add(&worker);
        figures.baseline_best = figures.baseline_best.max(baseline.rate());
        figures.worker_best = figures.worker_best.max(worker.rate());
        figures.peak_rss_kb = figures.peak_rss_kb.max(peak_rss_kb);
    }
    Ok(figures)
}

/// The baseline: a plain consumer in a fresh group, from the earliest offset, that drops every
/// message as it comes.
async fn discard_all(kafka: &KafkaConfig, count: usize) -> anyhow::Result<DrainRun> {
    let started = Instant::now();
    let consumer: StreamConsumer = kafka
        .client_config(&[
            ("group.id", &test_servers::unique_name("bench_discard")),
            ("auto.offset.reset", "earliest"),
            ("enable.auto.commit", "false"),
            // As the worker: read_committed fails on some Kafka-compatible brokers.
            ("isolation.level", "read_uncommitted"),
        ])
        .create()?;
    consumer.subscribe(&[&kafka.topic])?;
    let mut first = None;
    let mut bytes = 0usize;
    for _ in 0..count {
        let message = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
            .await
            .context("the discarding consumer got nothing for 60 s")??;
        bytes += message.payload_len();
        first.get_or_insert_with(Instant::now);
    }
    let last = Instant::now();
    ensure!(bytes > 0, "the messages were empty");
    let first = first.unwrap_or(last);
    Ok(DrainRun {
        wall: last - started,
        window: last - first,
        in_window: count.saturating_sub(1) as u64,
    })
}

/// Starts the release worker on a fresh database and group, waits until `ingest_offsets`
/// reaches every partition's end, checks the row count, and stops it with SIGTERM.
async fn worker_drain(
    args: &Args,
    kafka: &KafkaConfig,
    database: &DrainDatabase,
    ends: &BTreeMap<i32, i64>,
) -> anyhow::Result<(DrainRun, u64)> {
    let binary = match &args.worker_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the benchmark binary has no directory")?
            .join("telemetry-worker"),
    };
    ensure!(
        binary.is_file(),
        "{} not found; build it with `cargo build --release -p telemetry-worker` (or pass --worker-bin)",
        binary.display()
    );
    let logs = test_servers::log_dir();
    let group = test_servers::unique_name("bench_worker");
    let config = logs.join(format!("{group}.toml"));
    let log = logs.join(format!("{group}.log"));
    let mut toml = String::from("[kafka.properties]\n");
    for (property, value) in &args.worker_properties {
        let _ = writeln!(toml, "{property:?} = {value:?}");
    }
    std::fs::write(&config, toml)?;
    let expected: i64 = ends.values().sum();
    let direct = connect(&database.direct).await?;

    let started = Instant::now();
    let mut child = tokio::process::Command::new(&binary)
        .arg("--config")
        .arg(&config)
        .args(["--brokers", &kafka.brokers])
        .args(["--topic", &kafka.topic])
        .args(["--dlq-topic", &kafka.dlq_topic])
        .args(["--group-id", &group])
        .args(["--database-url", &database.pooled])
        .args(["--http-listen", &free_addr()?])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let pid = child.id().context("the worker exited at once")?;
    let deadline = started + Duration::from_secs(120 + args.messages as u64 / 1_000);
    let mut first: Option<(Instant, i64)> = None;
    let last = loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the worker exited ({status}) before storing everything; its log: {}",
                tail(&log)
            );
        }
        ensure!(
            Instant::now() < deadline,
            "the worker did not store {expected} records in time; its log: {}",
            tail(&log)
        );
        // Until the worker has migrated the table does not exist: nothing is stored.
        let stored: i64 = match direct
            .query_one(
                "SELECT coalesce(sum(next_offset), 0)::int8 FROM ingest_offsets WHERE topic = $1",
                &[&kafka.topic],
            )
            .await
        {
            Ok(row) => row.get(0),
            Err(_) => 0,
        };
        let now = Instant::now();
        if stored > 0 && first.is_none() {
            first = Some((now, stored));
        }
        if stored >= expected {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let peak_rss = peak_rss_kb(pid).context("cannot read the worker's VmHWM")?;
    let stop = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    ensure!(stop.success(), "cannot send SIGTERM to the worker ({pid})");
    match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
        Ok(status) => ensure!(
            status?.success(),
            "the worker failed on SIGTERM; its log: {}",
            tail(&log)
        ),
        Err(_) => bail!("the worker did not stop within 30 s of SIGTERM"),
    }
    let rows: i64 = direct
        .query_one("SELECT count(*) FROM raw_telemetry", &[])
        .await?
        .get(0);
    ensure!(
        rows == args.messages as i64,
        "the worker stored {rows} rows for {} messages; offsets without a row: {}",
        args.messages,
        missing_offsets(&direct, ends).await?
    );
    let (first_at, first_stored) = first.unwrap_or((last, 0));
    Ok((
        DrainRun {
            wall: last - started,
            window: last - first_at,
            in_window: (expected - first_stored) as u64,
        },
        peak_rss,
    ))
}

/// Ranges of offsets, per partition, that have no row in `raw_telemetry`.
async fn missing_offsets(
    direct: &tokio_postgres::Client,
    ends: &BTreeMap<i32, i64>,
) -> anyhow::Result<String> {
    let mut found = Vec::new();
    for (&partition, &end) in ends {
        let gaps = direct
            .query(
                "SELECT min(o), max(o) FROM (
                   SELECT o, o - row_number() OVER (ORDER BY o) AS run
                   FROM generate_series(0::int8, $2::int8 - 1) AS o
                   WHERE NOT EXISTS (SELECT 1 FROM raw_telemetry
                                     WHERE kafka_partition = $1::int4 AND kafka_offset = o)) AS m
                 GROUP BY run ORDER BY 1",
                &[&partition, &end],
            )
            .await?;
        for gap in gaps {
            let (from, to): (i64, i64) = (gap.get(0), gap.get(1));
            found.push(format!("partition {partition} {from}..={to}"));
        }
    }
    Ok(found.join(", "))
}

/// The process's peak resident set size (`VmHWM`), in kB.
fn peak_rss_kb(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .context("no VmHWM line")?;
    let kb = line
        .split_whitespace()
        .nth(1)
        .context("an empty VmHWM line")?;
    Ok(kb.parse()?)
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let start = text.len().saturating_sub(2_000);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}\n{}", log.display(), &text[start..])
}

fn free_addr() -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.to_string())
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    tokio::spawn(connection);
    Ok(client)
}

// ---------------------------------------------------------------------------------------------
// The report.

fn report(args: &Args, write: Option<&WriteFigures>, drain: Option<&DrainFigures>) {
    let round2 = |v: f64| Value::from((v * 100.0).round() / 100.0);
    let whole = |v: f64| Value::from(v.round() as u64);
    let mut fields: Vec<(&str, Value)> = vec![("bench", "worker".into())];
    let (mut copy_ratio, mut drain_ratio) = (Value::Null, Value::Null);
    let (mut rows_per_s, mut peak_rss_mb) = (Value::Null, Value::Null);
    let mut extra: Vec<(&str, Value)> = Vec::new();
    if let Some(write) = write {
        let rate = |writer| write.rate(writer);
        let cpu = |writer| round2(write.client_cpu_us_per_row(writer));
        let (one, plain, unnumbered, worker) = (
            rate(Writer::Sink),
            rate(Writer::SinkWithoutLatest),
            rate(Writer::SinkWithoutSeq),
            rate(Writer::Worker),
        );
        let seq_cost = (1.0 - one / unnumbered) * 100.0;
        let writers = BatchConfig::default().writers;
        let (psql, bcw, encoder) = (
            rate(Writer::Psql),
            rate(Writer::BinaryCopyIn),
            rate(Writer::WorkerCopy),
        );
        let latest_cost = (1.0 - one / plain) * 100.0;
        println!(
            "write path, {} rows in transactions of up to {} rows of one partition, fastest of {} \
             round(s):",
            args.messages, args.transaction_rows, args.rounds
        );
        println!("  {:<32} {:>9}  client CPU", "", "rows/s");
        for writer in WRITERS {
            println!(
                "  {:<32} {:>9.0}  {:.2} us/row",
                writer.label(),
                write.rate(writer),
                write.client_cpu_us_per_row(writer)
            );
        }
        println!(
            "  copy_ratio {:.2} (worker with {writers} writers / psql; target >= 1.0); one writer / \
             psql {:.2}; one writer / BinaryCopyInWriter {:.2}; encoder alone / \
             BinaryCopyInWriter {:.2}, / psql {:.2}; device_latest costs {latest_cost:.1}%; \
             exactly-once by seq costs {seq_cost:.1}%",
            worker / psql,
            one / psql,
            one / bcw,
            encoder / bcw,
            encoder / psql,
        );
        copy_ratio = round2(worker / psql);
        rows_per_s = whole(worker);
        extra.extend([
            ("psql_copy_rows_per_s", whole(psql)),
            ("binary_copy_in_writer_rows_per_s", whole(bcw)),
            ("writers", writers.into()),
            ("one_writer_rows_per_s", whole(one)),
            ("one_writer_copy_ratio", round2(one / psql)),
            ("one_writer_vs_binary_writer", round2(one / bcw)),
            ("worker_copy_rows_per_s", whole(encoder)),
            ("worker_copy_vs_binary_writer", round2(encoder / bcw)),
            ("worker_copy_vs_psql", round2(encoder / psql)),
            ("without_device_latest_rows_per_s", whole(plain)),
            ("device_latest_cost_pct", round2(latest_cost)),
            ("without_seq_rows_per_s", whole(unnumbered)),
            ("seq_dedup_cost_pct", round2(seq_cost)),
            ("psql_cpu_us_per_row", cpu(Writer::Psql)),
            ("binary_writer_cpu_us_per_row", cpu(Writer::BinaryCopyIn)),
            ("worker_copy_cpu_us_per_row", cpu(Writer::WorkerCopy)),
            ("one_writer_cpu_us_per_row", cpu(Writer::Sink)),
            ("worker_cpu_us_per_row", cpu(Writer::Worker)),
        ]);
    }
    if let Some(drain) = drain {
        let ratio = drain.worker_best / drain.baseline_best;
        let per_round = |run: &DrainRun| round2(run.wall.as_secs_f64() / args.rounds as f64);
        println!(
            "drain of {} messages, fastest of {} round(s): telemetry-worker {:.0} rows/s, \
             consume-and-discard {:.0} msgs/s",
            args.messages, args.rounds, drain.worker_best, drain.baseline_best
        );
        println!(
            "  drain_ratio {ratio:.2} (target >= 0.8); worker peak RSS {:.1} MB (target <= 64)",
            drain.peak_rss_kb as f64 / 1024.0
        );
        drain_ratio = round2(ratio);
        peak_rss_mb = round2(drain.peak_rss_kb as f64 / 1024.0);
        extra.extend([
            ("drain_rows_per_s", whole(drain.worker_best)),
            ("baseline_drain_msgs_per_s", whole(drain.baseline_best)),
            ("drain_wall_s", per_round(&drain.worker)),
            ("baseline_drain_wall_s", per_round(&drain.baseline)),
        ]);
    }
    fields.extend([
        ("copy_ratio", copy_ratio),
        ("drain_ratio", drain_ratio),
        ("rows_per_s", rows_per_s),
        ("peak_rss_mb", peak_rss_mb),
    ]);
    fields.extend(extra);
    fields.extend([
        ("messages", args.messages.into()),
        ("devices", args.devices.into()),
        ("partitions", args.partitions.into()),
        ("transaction_rows", args.transaction_rows.into()),
        ("rounds", args.rounds.into()),
        ("target_copy_ratio", 1.0.into()),
        ("target_drain_ratio", 0.8.into()),
        ("target_peak_rss_mb", 64.into()),
    ]);
    // Written field by field so that the headline figures come first, in the documented order.
    let body: Vec<String> = fields
        .iter()
        .map(|(name, value)| format!("{}:{value}", Value::from(*name)))
        .collect();
    println!("{{{}}}", body.join(","));
}

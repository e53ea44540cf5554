//! `make bench-api`: latest-value reads through the API against the same reads as plain
//! queries, in one run.
//!
//! Both sides read one device's row of `device_latest` per request, with the same SQL, through
//! the same PgBouncer and the very same connection pool (the API's), at the same fixed
//! concurrency. The baseline is a task per slot that takes a pooled connection, runs the
//! `SELECT` and decodes the row; the API side is a task per slot with its own keep-alive HTTP
//! connection sending `GET /v1/devices/{user}/{device}/latest` with a token. The difference is
//! what the API adds: HTTP, the token check, JSON. Rounds alternate baseline and API so that
//! load from other processes hits both alike.
//!
//! The last line printed is one JSON object:
//! `{"bench":"api","ratio":R,"requests_per_s":N,"p99_ms":L,...}` where `ratio` is the API's
//! requests/s over the baseline's (target >= 0.7) and `p99_ms` the API's 99th percentile
//! latency (target <= 20 ms). Targets are reported, never asserted.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use deadpool_postgres::Pool;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::value::RawValue;
use telemetry_api::ApiConfig;
use telemetry_core::kafka::KafkaConfig;
use telemetry_core::observe::HttpConfig;
use telemetry_core::Shutdown;
use tokio_postgres::types::{Json, Type};

#[derive(Debug, Parser)]
#[command(about = "Latest-value requests through the API vs plain SELECTs on the same pool")]
struct Args {
    /// Devices in device_latest; requests cycle through them.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Requests in flight at any moment, on each side.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Connections in the API's pool (postgres.pool_size), shared by both sides.
    #[arg(long, default_value_t = 16)]
    pool_size: usize,
    /// Seconds each side runs per round.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds of baseline-then-API.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// The table the worker keeps, as the worker's migration defines it.
const DEVICE_LATEST: &str = "CREATE TABLE IF NOT EXISTS device_latest (
  user_id text NOT NULL, device_id text NOT NULL,
  received_at timestamptz NOT NULL, device_time timestamptz, seq bigint,
  payload jsonb NOT NULL, kafka_partition integer NOT NULL, kafka_offset bigint NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (user_id, device_id))";

/// The baseline: what the API runs for `/latest`, as a plain query.
const LATEST: &str =
    "SELECT received_at, device_time, seq, payload, kafka_partition, kafka_offset, updated_at \
     FROM device_latest WHERE user_id = $1 AND device_id = $2";

const USER: &str = "bench";

/// What one side measured over all rounds.
#[derive(Debug, Default)]
struct Side {
    requests: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Side {
    fn add(&mut self, (requests, elapsed, latencies): (u64, Duration, Vec<Duration>)) {
        self.requests += requests;
        self.elapsed += elapsed;
        self.latencies.extend(latencies);
    }

    fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile_ms(&mut self, p: f64) -> f64 {
        self.latencies.sort_unstable();
        let index = ((self.latencies.len() as f64 * p).ceil() as usize).saturating_sub(1);
        self.latencies
            .get(index)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Start the servers before the runtime: starting blocks.
    let servers = test_servers::shared();
    let database = test_servers::unique_name("bench_api");
    servers.postgres.create_database(&database)?;
    let topic = test_servers::unique_name("bench_api_stream");
    servers.kafka.create_topic(&topic, 1)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(args, servers, database, topic))
}

async fn bench(
    args: Args,
    servers: &'static test_servers::Servers,
    database: String,
    topic: String,
) -> anyhow::Result<()> {
    let direct = connect(&servers.postgres.url(&database)).await?;
    direct.batch_execute(DEVICE_LATEST).await?;
    // One row per device with a payload of typical size (about 120 bytes of JSON).
    direct
        .execute(
            "INSERT INTO device_latest (user_id, device_id, received_at, device_time, seq, payload, kafka_partition, kafka_offset)
             SELECT $1, 'device-' || i, now(), now(), i,
                    jsonb_build_object('ts', 1764000000000 + i, 'seq', i, 'temperature', 20 + i % 10,
                                       'humidity', 40.5, 'battery', 3.7,
                                       'gps', jsonb_build_object('lat', 52.37, 'lon', 4.89)),
                    0, i
             FROM generate_series(0, $2 - 1) AS i",
            &[&USER, &(args.devices as i32)],
        )
        .await?;

    let mut config = ApiConfig {
        listen: "127.0.0.1:0".parse()?,
        http: HttpConfig {
            listen: "127.0.0.1:0".parse()?,
        },
        kafka: KafkaConfig {
            brokers: servers.kafka.bootstrap(),
            dlq_topic: format!("{topic}_dlq"),
            topic,
            ..KafkaConfig::default()
        },
        ..ApiConfig::default()
    };
    config.postgres.url = servers.pgbouncer.url(&database);
    config.postgres.pool_size = args.pool_size;
    let shutdown = Shutdown::new();
    let api = telemetry_api::start(config, shutdown.clone()).await?;
    let token = telemetry_api::tokens::create(&direct, USER, "bench")
        .await?
        .token;
    let pool = api.pool().clone();
    let addr = api.addr;

    // Warm up both sides: connections, caches, the token.
    run_baseline(&pool, &args, Duration::from_secs(1)).await?;
    run_api(addr, &token, &args, Duration::from_secs(1)).await?;

    let window = Duration::from_secs(args.seconds);
    let (mut baseline, mut through_api) = (Side::default(), Side::default());
    for round in 1..=args.rounds {
        let b = run_baseline(&pool, &args, window).await?;
        let a = run_api(addr, &token, &args, window).await?;
        println!(
            "round {round}: baseline {:.0} req/s, API {:.0} req/s",
            b.0 as f64 / b.1.as_secs_f64(),
            a.0 as f64 / a.1.as_secs_f64()
        );
        baseline.add(b);
        through_api.add(a);
    }
    shutdown.trigger();
    api.wait().await?;

    let ratio = through_api.per_second() / baseline.per_second();
    let (api_p50, api_p99) = (
        through_api.percentile_ms(0.50),
        through_api.percentile_ms(0.99),
    );
    let (base_p50, base_p99) = (baseline.percentile_ms(0.50), baseline.percentile_ms(0.99));
    println!(
        "baseline (plain SELECT, same pool): {:.0} req/s, p50 {base_p50:.2} ms, p99 {base_p99:.2} ms",
        baseline.per_second()
    );
    println!(
        "API GET /latest:                    {:.0} req/s, p50 {api_p50:.2} ms, p99 {api_p99:.2} ms",
        through_api.per_second()
    );
    println!("ratio {ratio:.2} (target >= 0.7), API p99 {api_p99:.2} ms (target <= 20 ms)");
    let round2 = |v: f64| (v * 100.0).round() / 100.0;
    // Written out by hand so that the headline fields come first, in the documented order.
    println!(
        "{{\"bench\":\"api\",\"ratio\":{},\"requests_per_s\":{},\"p99_ms\":{},\"p50_ms\":{},\
         \"baseline_requests_per_s\":{},\"baseline_p99_ms\":{},\"baseline_p50_ms\":{},\
         \"concurrency\":{},\"pool_size\":{},\"devices\":{},\"seconds_per_side\":{},\
         \"target_ratio\":0.7,\"target_p99_ms\":20}}",
        round2(ratio),
        through_api.per_second().round() as u64,
        round2(api_p99),
        round2(api_p50),
        baseline.per_second().round() as u64,
        round2(base_p99),
        round2(base_p50),
        args.concurrency,
        args.pool_size,
        args.devices,
        args.seconds * args.rounds as u64,
    );
    Ok(())
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    tokio::spawn(connection);
    Ok(client)
}

fn device(slot: usize, i: usize, devices: usize) -> String {
    // Slots walk the devices at different offsets so that they do not all read one row.
    format!("device-{}", (slot * 7919 + i) % devices)
}

/// `concurrency` loops of plain queries for `window`; returns (requests, elapsed, latencies).
async fn run_baseline(
    pool: &Pool,
    args: &Args,
    window: Duration,
) -> anyhow::Result<(u64, Duration, Vec<Duration>)> {
    let started = Instant::now();
    let deadline = started + window;
    let mut tasks = Vec::new();
    for slot in 0..args.concurrency {
        let pool = pool.clone();
        let devices = args.devices;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = 0;
            while Instant::now() < deadline {
                let device = device(slot, i, devices);
                let sent = Instant::now();
                let client = pool.get().await?;
                let rows = client
                    .query_typed(LATEST, &[(&USER, Type::TEXT), (&device, Type::TEXT)])
                    .await?;
                let row = rows.first().context("the device has no row")?;
                // Decode what the API decodes, so that only what the API adds differs.
                type Time = chrono::DateTime<chrono::Utc>;
                let _: Time = row.try_get(0)?;
                let _: Option<Time> = row.try_get(1)?;
                let _: Option<i64> = row.try_get(2)?;
                let _: Json<Box<RawValue>> = row.try_get(3)?;
                let _: i32 = row.try_get(4)?;
                let _: i64 = row.try_get(5)?;
                let _: Time = row.try_get(6)?;
                drop(client);
                latencies.push(sent.elapsed());
                i += 1;
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    collect(tasks, started).await
}

/// `concurrency` loops of `GET .../latest` for `window`, each on its own keep-alive connection.
async fn run_api(
    addr: SocketAddr,
    token: &str,
    args: &Args,
    window: Duration,
) -> anyhow::Result<(u64, Duration, Vec<Duration>)> {
    let started = Instant::now();
    let deadline = started + window;
    let mut tasks = Vec::new();
    for slot in 0..args.concurrency {
        let authorization = format!("Bearer {token}");
        let devices = args.devices;
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            let mut latencies = Vec::new();
            let mut i = 0;
            while Instant::now() < deadline {
                let path = format!("/v1/devices/{USER}/{}/latest", device(slot, i, devices));
                let request = hyper::Request::get(path)
                    .header("host", "bench")
                    .header("authorization", &authorization)
                    .body(Empty::<Bytes>::new())?;
                let sent = Instant::now();
                let response = sender.send_request(request).await?;
                let status = response.status();
                let body = response.into_body().collect().await?.to_bytes();
                anyhow::ensure!(
                    status == 200,
                    "GET latest answered {status}: {}",
                    String::from_utf8_lossy(&body)
                );
                latencies.push(sent.elapsed());
                i += 1;
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    collect(tasks, started).await
}

async fn collect(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Vec<Duration>>>>,
    started: Instant,
) -> anyhow::Result<(u64, Duration, Vec<Duration>)> {
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    Ok((latencies.len() as u64, started.elapsed(), latencies))
}

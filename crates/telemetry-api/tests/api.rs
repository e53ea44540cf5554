//! The API on real servers: PostgreSQL through PgBouncer for reads, Tansu for HTTP ingest, and
//! the real worker for the readings that HTTP ingest sends on. Each test has its own database
//! and topic.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use telemetry_api::{tokens, ApiConfig, Running};
use telemetry_core::kafka::KafkaConfig;
use telemetry_core::observe::HttpConfig;
use telemetry_core::Shutdown;
use telemetry_worker::WorkerConfig;
use test_servers::{shared, unique_name, Servers};
use tokio_postgres::error::SqlState;

/// The tables the API reads but does not own, as the worker and the alerting stage define
/// them. `IF NOT EXISTS`: the worker's migrations may already have created them.
const FOREIGN_TABLES: &str = "
CREATE TABLE IF NOT EXISTS device_latest (
  user_id text NOT NULL, device_id text NOT NULL,
  received_at timestamptz NOT NULL, device_time timestamptz, seq bigint,
  payload jsonb NOT NULL, kafka_partition integer NOT NULL, kafka_offset bigint NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (user_id, device_id));
CREATE TABLE IF NOT EXISTS alerts (id bigserial PRIMARY KEY, alert_id text NOT NULL,
  event text NOT NULL CHECK (event IN ('raised','cleared')), rule text NOT NULL,
  severity text NOT NULL, user_id text NOT NULL, device_id text NOT NULL,
  kafka_partition integer NOT NULL, kafka_offset bigint NOT NULL,
  occurred_at timestamptz NOT NULL, body jsonb NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(), published_at timestamptz,
  UNIQUE (alert_id, event));";

/// One test's database and topic, with the worker's tables in place.
struct Fixture {
    servers: &'static Servers,
    database: String,
    kafka: KafkaConfig,
}

impl Fixture {
    async fn new() -> Fixture {
        let servers = shared();
        let database = unique_name("api");
        servers.postgres.create_database(&database).unwrap();
        let topic = unique_name("iot_stream");
        servers.kafka.create_topic(&topic, 2).unwrap();
        servers
            .kafka
            .create_topic(&format!("{topic}_dlq"), 1)
            .unwrap();
        let fixture = Fixture {
            servers,
            kafka: KafkaConfig {
                brokers: servers.kafka.bootstrap(),
                dlq_topic: format!("{topic}_dlq"),
                topic,
                ..KafkaConfig::default()
            },
            database,
        };
        let mut client = fixture.direct().await;
        telemetry_worker::schema::migrate(&mut client)
            .await
            .unwrap();
        client.batch_execute(FOREIGN_TABLES).await.unwrap();
        fixture
    }

    fn config(&self) -> ApiConfig {
        let mut config = ApiConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            http: HttpConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
            },
            kafka: self.kafka.clone(),
            ..ApiConfig::default()
        };
        config.postgres.url = self.servers.pgbouncer.url(&self.database);
        config
    }

    async fn start(&self, config: ApiConfig) -> Api {
        let shutdown = Shutdown::new();
        let running = telemetry_api::start(config, shutdown.clone())
            .await
            .expect("API starts");
        Api { running, shutdown }
    }

    /// A direct connection (not through PgBouncer), as the postgres superuser.
    async fn direct(&self) -> tokio_postgres::Client {
        connect(&self.servers.postgres.url(&self.database)).await
    }

    async fn token(&self, user: &str) -> String {
        tokens::create(&self.direct().await, user, "test")
            .await
            .unwrap()
            .token
    }

    /// Stores readings of one device as the worker would: (received_at, partition, offset, seq).
    async fn store_readings(&self, user: &str, device: &str, rows: &[(DateTime<Utc>, i32, i64)]) {
        let client = self.direct().await;
        for (i, (at, partition, offset)) in rows.iter().enumerate() {
            let payload = json!({"seq": i, "temperature": 20.0 + i as f64});
            client
                .execute(
                    "INSERT INTO raw_telemetry (received_at, user_id, device_id, seq, payload, kafka_partition, kafka_offset)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    &[at, &user, &device, &(i as i64), &payload, partition, offset],
                )
                .await
                .unwrap();
        }
    }

    async fn store_latest(&self, user: &str, device: &str, at: DateTime<Utc>, payload: Value) {
        self.direct()
            .await
            .execute(
                "INSERT INTO device_latest (user_id, device_id, received_at, device_time, seq, payload, kafka_partition, kafka_offset)
                 VALUES ($1, $2, $3, $4, 7, $5, 0, 41)",
                &[&user, &device, &at, &(at - TimeDelta::seconds(1)), &payload],
            )
            .await
            .unwrap();
    }
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

struct Api {
    running: Running,
    shutdown: Shutdown,
}

impl Api {
    async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        call(self.running.addr, "GET", path, token, "").await
    }

    async fn post(&self, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
        call(self.running.addr, "POST", path, token, body).await
    }

    /// Shuts down and checks that the server stops cleanly and promptly.
    async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(20), self.running.wait())
            .await
            .expect("API stops within 20 s")
            .expect("API stopped without error");
    }
}

/// One HTTP/1.1 request on a fresh connection; the body parsed as JSON (null if it is not).
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "api.test")
        .header("content-type", "application/json");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Plain-text GET, for the metrics and health server.
async fn get_text(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    (status, response)
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// Now, in whole milliseconds like the receive times the bridge and the API stamp.
fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms(Utc::now())).unwrap()
}

#[tokio::test]
async fn latest_and_history_are_served_from_the_stored_rows() {
    let fixture = Fixture::new().await;
    let api = fixture.start(fixture.config()).await;
    let token = fixture.token("alice").await;
    let now = now();
    let base = now - TimeDelta::hours(1);
    fixture
        .store_readings(
            "alice",
            "thermo-1",
            &[
                (base, 0, 10),
                (base + TimeDelta::seconds(1), 0, 11),
                (base + TimeDelta::seconds(2), 1, 5),
            ],
        )
        .await;
    fixture
        .store_latest(
            "alice",
            "thermo-1",
            base + TimeDelta::seconds(2),
            json!({"seq": 7, "temperature": 22.5, "gps": {"lat": 52.37, "lon": 4.89}}),
        )
        .await;

    let (status, latest) = api
        .get("/v1/devices/alice/thermo-1/latest", Some(&token))
        .await;
    assert_eq!(status, 200, "{latest}");
    assert_eq!(latest["user"], "alice");
    assert_eq!(latest["device"], "thermo-1");
    assert_eq!(latest["seq"], 7);
    assert_eq!(
        latest["payload"],
        json!({"seq": 7, "temperature": 22.5, "gps": {"lat": 52.37, "lon": 4.89}})
    );
    let received: DateTime<Utc> = latest["received_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(received, base + TimeDelta::seconds(2));

    let (status, page) = api
        .get("/v1/devices/alice/thermo-1/telemetry", Some(&token))
        .await;
    assert_eq!(status, 200, "{page}");
    let offsets: Vec<(i64, i64)> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["kafka_partition"].as_i64().unwrap(),
                r["kafka_offset"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(offsets, [(1, 5), (0, 11), (0, 10)], "newest first");
    assert_eq!(page["items"][0]["payload"]["temperature"], 22.0);
    assert_eq!(page["next_cursor"], Value::Null);

    // A window that ends before the readings is empty but the device is known: 200, not 404.
    let before = ms(base) - 1;
    let (status, empty) = api
        .get(
            &format!("/v1/devices/alice/thermo-1/telemetry?to={before}"),
            Some(&token),
        )
        .await;
    assert_eq!((status, empty["items"].as_array().unwrap().len()), (200, 0));

    let (status, missing) = api
        .get("/v1/devices/alice/no-such-device/latest", Some(&token))
        .await;
    assert_eq!(
        (status, missing["error"].as_str()),
        (404, Some("not_found"))
    );
    let (status, _) = api
        .get("/v1/devices/alice/no-such-device/telemetry", Some(&token))
        .await;
    assert_eq!(status, 404);
    api.stop().await;
}

#[tokio::test]
async fn pagination_returns_every_row_exactly_once_across_pages() {
    let fixture = Fixture::new().await;
    let api = fixture.start(fixture.config()).await;
    let token = fixture.token("bob").await;
    let base = now() - TimeDelta::hours(2);
    // 103 readings over 20 distinct timestamps: many share received_at (same millisecond on
    // different partitions, as two bridges can produce), so only the full key orders them.
    let rows: Vec<(DateTime<Utc>, i32, i64)> = (0..103)
        .map(|i| {
            (
                base + TimeDelta::milliseconds(i / 6),
                (i % 2) as i32,
                1_000 + i,
            )
        })
        .collect();
    fixture.store_readings("bob", "meter", &rows).await;

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            None => "/v1/devices/bob/meter/telemetry?limit=7".to_owned(),
            Some(c) => format!("/v1/devices/bob/meter/telemetry?limit=7&cursor={c}"),
        };
        let (status, page) = api.get(&path, Some(&token)).await;
        assert_eq!(status, 200, "{page}");
        pages += 1;
        for item in page["items"].as_array().unwrap() {
            seen.push((
                item["received_at"]
                    .as_str()
                    .unwrap()
                    .parse::<DateTime<Utc>>()
                    .unwrap(),
                item["kafka_partition"].as_i64().unwrap() as i32,
                item["kafka_offset"].as_i64().unwrap(),
            ));
        }
        if pages == 3 {
            // Readings that arrive while a caller pages must not shift or repeat later pages.
            fixture
                .store_readings("bob", "meter", &[(now() - TimeDelta::minutes(1), 0, 9_999)])
                .await;
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 15, "103 rows at 7 per page");
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "pages come newest first, in key order");
    let unique: BTreeSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no row is repeated");
    let expected: BTreeSet<_> = rows.iter().collect();
    assert_eq!(
        unique, expected,
        "every row is returned, and the late one is not"
    );
    api.stop().await;
}

#[tokio::test]
async fn a_token_reads_only_its_own_users_devices() {
    let fixture = Fixture::new().await;
    let mut config = fixture.config();
    config.auth.token_cache_seconds = 0;
    let api = fixture.start(config).await;
    let alice = fixture.token("alice").await;
    let bob = fixture.token("bob").await;
    let at = now() - TimeDelta::minutes(5);
    fixture
        .store_latest("alice", "a1", at, json!({"v": 1}))
        .await;
    fixture.store_latest("bob", "b1", at, json!({"v": 2})).await;

    let (status, body) = api.get("/v1/devices/bob/b1/latest", Some(&alice)).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
    // Whether bob's device exists or not, alice learns nothing: 403 both times.
    let (status, _) = api
        .get("/v1/devices/bob/nothing/latest", Some(&alice))
        .await;
    assert_eq!(status, 403);
    for path in [
        "/v1/devices/bob/b1/telemetry",
        "/v1/devices/bob/b1/alerts",
        "/v1/users/bob/devices",
    ] {
        assert_eq!(api.get(path, Some(&alice)).await.0, 403, "{path}");
    }
    let (status, _) = api
        .post("/v1/devices/bob/b1/telemetry", Some(&alice), r#"{"v":1}"#)
        .await;
    assert_eq!(status, 403, "no ingest into another user's device");

    let (status, body) = api.get("/v1/devices/alice/a1/latest", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );
    let forged = format!("tpa_{}", "0".repeat(64));
    assert_eq!(
        api.get("/v1/devices/alice/a1/latest", Some(&forged))
            .await
            .0,
        401
    );
    assert_eq!(
        api.get("/v1/devices/alice/a1/latest", Some("garbage"))
            .await
            .0,
        401
    );

    let (status, body) = api.get("/v1/devices/alice/a1/latest", Some(&alice)).await;
    assert_eq!((status, body["payload"]["v"].as_i64()), (200, Some(1)));
    let (status, body) = api.get("/v1/users/bob/devices", Some(&bob)).await;
    assert_eq!(status, 200);
    let devices: Vec<&str> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device"].as_str().unwrap())
        .collect();
    assert_eq!(devices, ["b1"], "bob sees only his own devices");

    // A revoked token stops working (at once here: this API caches no tokens).
    let client = fixture.direct().await;
    let id: i64 = client
        .query_one(
            "SELECT id FROM api_tokens WHERE token_hash = $1",
            &[&tokens::hash(&alice).as_slice()],
        )
        .await
        .unwrap()
        .get(0);
    assert!(tokens::revoke(&client, id).await.unwrap());
    assert_eq!(
        api.get("/v1/devices/alice/a1/latest", Some(&alice)).await.0,
        401
    );
    api.stop().await;
}

#[tokio::test]
async fn bad_query_parameters_are_refused_naming_the_field() {
    let fixture = Fixture::new().await;
    let api = fixture.start(fixture.config()).await;
    let token = fixture.token("carol").await;
    fixture
        .store_readings("carol", "d1", &[(now() - TimeDelta::minutes(1), 0, 1)])
        .await;
    let alerts_cursor = telemetry_api::cursor::Cursor::Alert {
        occurred_at: now(),
        id: 1,
    }
    .encode();
    let cases = [
        ("/v1/devices/carol/d1/telemetry?limit=0", "limit"),
        ("/v1/devices/carol/d1/telemetry?limit=100000", "limit"),
        ("/v1/devices/carol/d1/telemetry?limit=ten", "limit"),
        ("/v1/devices/carol/d1/telemetry?from=yesterday", "from"),
        (
            "/v1/devices/carol/d1/telemetry?to=2025-13-01T00:00:00Z",
            "to",
        ),
        (
            "/v1/devices/carol/d1/telemetry?from=2020-01-01T00:00:00Z",
            "from",
        ),
        (
            "/v1/devices/carol/d1/telemetry?from=1764000001000&to=1764000000000",
            "from",
        ),
        (
            "/v1/devices/carol/d1/telemetry?cursor=not-a-cursor",
            "cursor",
        ),
        (
            &format!("/v1/devices/carol/d1/telemetry?cursor={alerts_cursor}"),
            "cursor",
        ),
        ("/v1/devices/carol/d1/telemetry?limt=5", "limt"),
        ("/v1/devices/carol/d1/telemetry?limit=5&limit=6", "limit"),
        ("/v1/devices/carol/d1/alerts?limit=-1", "limit"),
        ("/v1/users/carol/devices?from=0", "from"),
        ("/v1/devices/carol/d+1/latest", "device"),
        ("/v1/devices/carol/d%2F1/telemetry", "device"),
    ];
    for (path, field) in cases {
        let (status, body) = api.get(path, Some(&token)).await;
        assert_eq!(status, 422, "{path}: {body}");
        assert_eq!(body["error"], "invalid_parameter", "{path}: {body}");
        assert_eq!(body["field"], field, "{path}: {body}");
        assert!(!body["message"].as_str().unwrap().is_empty());
    }
    // The same parameters, valid, pass.
    let (status, body) = api
        .get(
            "/v1/devices/carol/d1/telemetry?limit=5&from=0",
            Some(&token),
        )
        .await;
    assert_eq!(
        status, 422,
        "from=0 (1970) is far wider than the range limit: {body}"
    );
    let (status, body) = api
        .get("/v1/devices/carol/d1/telemetry?limit=5", Some(&token))
        .await;
    assert_eq!((status, body["items"].as_array().unwrap().len()), (200, 1));
    api.stop().await;
}

#[tokio::test]
async fn alerts_and_device_lists_page_through_the_stored_rows() {
    let fixture = Fixture::new().await;
    let api = fixture.start(fixture.config()).await;
    let token = fixture.token("dave").await;
    let client = fixture.direct().await;
    let at = now() - TimeDelta::hours(3);
    for i in 0..5i64 {
        let event = if i % 2 == 0 { "raised" } else { "cleared" };
        let occurred = at + TimeDelta::minutes(i / 2);
        client
            .execute(
                "INSERT INTO alerts (alert_id, event, rule, severity, user_id, device_id, kafka_partition, kafka_offset, occurred_at, body, published_at)
                 VALUES ($1, $2, 'temperature_high', 'warning', 'dave', 'boiler', 0, $3, $4, $5, CASE WHEN $3::bigint < 3 THEN now() END)",
                &[&format!("alert-{}", i / 2), &event, &i, &occurred, &json!({"value": 90 + i})],
            )
            .await
            .unwrap();
    }
    for device in ["boiler", "fridge", "attic", "cellar"] {
        fixture
            .store_latest("dave", device, at, json!({"v": 1}))
            .await;
    }

    let mut events = Vec::new();
    let mut path = "/v1/devices/dave/boiler/alerts?limit=2".to_owned();
    loop {
        let (status, page) = api.get(&path, Some(&token)).await;
        assert_eq!(status, 200, "{page}");
        for alert in page["items"].as_array().unwrap() {
            events.push((
                alert["alert_id"].as_str().unwrap().to_owned(),
                alert["event"].as_str().unwrap().to_owned(),
                alert["body"]["value"].as_i64().unwrap(),
            ));
        }
        match page["next_cursor"].as_str() {
            Some(next) => path = format!("/v1/devices/dave/boiler/alerts?limit=2&cursor={next}"),
            None => break,
        }
    }
    let values: Vec<i64> = events.iter().map(|e| e.2).collect();
    assert_eq!(
        values,
        [94, 93, 92, 91, 90],
        "every event once, newest first"
    );
    assert_eq!(events[0], ("alert-2".into(), "raised".into(), 94));

    let window = format!(
        "/v1/devices/dave/boiler/alerts?from={}",
        ms(at + TimeDelta::minutes(1))
    );
    let (_, page) = api.get(&window, Some(&token)).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 3);

    // A known device without alerts is an empty list; an unknown one is 404.
    let (status, page) = api
        .get("/v1/devices/dave/fridge/alerts", Some(&token))
        .await;
    assert_eq!((status, page["items"].as_array().unwrap().len()), (200, 0));
    assert_eq!(
        api.get("/v1/devices/dave/garage/alerts", Some(&token))
            .await
            .0,
        404
    );

    let (status, first) = api
        .get("/v1/users/dave/devices?limit=3", Some(&token))
        .await;
    assert_eq!(status, 200, "{first}");
    let names = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["device"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(&first), ["attic", "boiler", "cellar"]);
    let last_seen: DateTime<Utc> = first["items"][0]["last_seen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(last_seen, at);
    let next = first["next_cursor"].as_str().unwrap();
    let (_, second) = api
        .get(
            &format!("/v1/users/dave/devices?limit=3&cursor={next}"),
            Some(&token),
        )
        .await;
    assert_eq!(names(&second), ["fridge"]);
    assert_eq!(second["next_cursor"], Value::Null);
    api.stop().await;
}

#[tokio::test]
async fn http_ingest_lands_in_postgres_exactly_once() {
    let fixture = Fixture::new().await;
    let api = fixture.start(fixture.config()).await;
    let mut worker_config = WorkerConfig {
        kafka: fixture.kafka.clone(),
        group_id: unique_name("worker"),
        http: HttpConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
        },
        ..WorkerConfig::default()
    };
    worker_config.postgres.url = fixture.servers.pgbouncer.url(&fixture.database);
    let worker_shutdown = Shutdown::new();
    let worker = tokio::spawn(telemetry_worker::run(
        worker_config,
        worker_shutdown.clone(),
    ));
    let token = fixture.token("erin").await;

    let mut accepted = Vec::new();
    for seq in 0..20 {
        let device = if seq % 2 == 0 { "pump-1" } else { "pump-2" };
        let body = json!({"ts": 1_764_000_000_000i64 + seq, "seq": seq, "pressure": 1.5, "gps": {"lat": 1.0, "lon": 2.0}});
        let (status, answer) = api
            .post(
                &format!("/v1/devices/erin/{device}/telemetry"),
                Some(&token),
                &body.to_string(),
            )
            .await;
        assert_eq!(status, 202, "{answer}");
        assert_eq!(answer["device"], device);
        accepted.push((
            answer["kafka_partition"].as_i64().unwrap() as i32,
            answer["kafka_offset"].as_i64().unwrap(),
            device,
            seq,
        ));
    }
    // What breaks the contract is refused with the contract's reason, and never reaches Kafka.
    for (body, reason) in [
        (r#"{"ts": 1, "seq": 1}"#, "no_readings"),
        (r#"{"temperature": "warm"}"#, "invalid_reading"),
        ("[1, 2]", "not_an_object"),
        ("{\"v\": 1", "invalid_json"),
    ] {
        let (status, answer) = api
            .post("/v1/devices/erin/pump-1/telemetry", Some(&token), body)
            .await;
        assert_eq!(status, 422, "{body}: {answer}");
        assert_eq!(
            (answer["error"].as_str(), answer["reason"].as_str()),
            (Some("invalid_payload"), Some(reason))
        );
    }
    let oversize = format!("{{\"v\": 1, \"pad\": \"{}\"}}", "x".repeat(70 * 1024));
    let (status, answer) = api
        .post("/v1/devices/erin/pump-1/telemetry", Some(&token), &oversize)
        .await;
    assert_eq!(
        (status, answer["reason"].as_str()),
        (413, Some("payload_too_large"))
    );

    let client = fixture.direct().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let count = || async {
        client
            .query_one("SELECT count(*) FROM raw_telemetry", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    while count().await < 20 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Wait a little longer, so that a duplicate would show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rows = client
        .query(
            "SELECT kafka_partition, kafka_offset, device_id, seq, payload, device_time, received_at FROM raw_telemetry ORDER BY seq",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        rows.len(),
        20,
        "each accepted reading stored once, nothing else"
    );
    for (row, (partition, offset, device, seq)) in rows.iter().zip(&accepted) {
        assert_eq!(row.get::<_, i32>(0), *partition);
        assert_eq!(row.get::<_, i64>(1), *offset);
        assert_eq!(row.get::<_, String>(2), *device);
        assert_eq!(row.get::<_, i64>(3), *seq);
        assert_eq!(row.get::<_, Value>(4)["gps"]["lon"], 2.0);
        let device_time: DateTime<Utc> = row.get(5);
        assert_eq!(device_time.timestamp_millis(), 1_764_000_000_000 + seq);
        let received: DateTime<Utc> = row.get(6);
        assert!(
            Utc::now() - received < TimeDelta::minutes(2),
            "received_at is the API's clock"
        );
    }

    // And the owner reads them back through the API.
    let (status, page) = api
        .get("/v1/devices/erin/pump-2/telemetry?limit=100", Some(&token))
        .await;
    assert_eq!(status, 200);
    let seqs: Vec<i64> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs.len(), 10);
    assert!(seqs.iter().all(|s| s % 2 == 1));

    worker_shutdown.trigger();
    tokio::time::timeout(Duration::from_secs(30), worker)
        .await
        .expect("worker stops")
        .unwrap()
        .expect("worker ran without error");
    api.stop().await;
}

#[tokio::test]
async fn the_read_only_role_serves_every_read_and_cannot_write() {
    let fixture = Fixture::new().await;
    // Start-up migrates as the superuser, which creates the role and grants it SELECT.
    let admin = fixture.start(fixture.config()).await;
    admin.stop().await;
    let token = fixture.token("frank").await;
    fixture
        .store_latest(
            "frank",
            "f1",
            now() - TimeDelta::minutes(1),
            json!({"v": 3}),
        )
        .await;

    // The shared PgBouncer knows only the postgres user, so the role connects directly here;
    // in the local stack and the compose file it goes through PgBouncer like every client.
    let reader_url = format!(
        "postgres://telemetry_reader@127.0.0.1:{}/{}",
        fixture.servers.postgres.port(),
        fixture.database
    );
    let reader = connect(&reader_url).await;
    reader
        .simple_query("SELECT count(*) FROM raw_telemetry")
        .await
        .unwrap();
    let write = reader
        .simple_query("INSERT INTO api_tokens (user_id, token_hash) VALUES ('x', sha256('x'))")
        .await
        .unwrap_err();
    assert_eq!(
        write.code(),
        Some(&SqlState::READ_ONLY_SQL_TRANSACTION),
        "{write:?}"
    );
    // Even with read-only sessions switched off, the grants allow nothing but SELECT.
    reader
        .batch_execute("SET default_transaction_read_only = off")
        .await
        .unwrap();
    let write = reader
        .simple_query("INSERT INTO api_tokens (user_id, token_hash) VALUES ('x', sha256('x'))")
        .await
        .unwrap_err();
    assert_eq!(
        write.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{write:?}"
    );

    let mut config = fixture.config();
    config.postgres.url = reader_url;
    config.migrate_on_start = false;
    let api = fixture.start(config).await;
    for path in [
        "/v1/devices/frank/f1/latest",
        "/v1/devices/frank/f1/telemetry",
        "/v1/devices/frank/f1/alerts",
        "/v1/users/frank/devices",
    ] {
        let (status, body) = api.get(path, Some(&token)).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    api.stop().await;
}

#[tokio::test]
async fn health_metrics_and_the_openapi_document_are_served() {
    let fixture = Fixture::new().await;
    let api = fixture.start(fixture.config()).await;
    let (status, doc) = api.get("/v1/openapi.json", None).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert!(doc["paths"]["/v1/devices/{user}/{device}/latest"]["get"].is_object());

    let (status, body) = call(
        api.running.addr,
        "DELETE",
        "/v1/devices/a/b/latest",
        None,
        "",
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (405, Some("method_not_allowed"))
    );
    let (status, body) = api.get("/v1/nothing-here", None).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));

    let metrics = api.running.metrics_addr;
    assert_eq!(get_text(metrics, "/healthz").await.0, 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    while get_text(metrics, "/readyz").await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "{}",
            get_text(metrics, "/readyz").await.1
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, text) = get_text(metrics, "/metrics").await;
    assert!(
        text.contains("telemetry_api_requests_total{route=\"/v1/openapi.json\",status=\"200\"}"),
        "{text}"
    );
    api.stop().await;
}

#[tokio::test]
async fn the_token_command_prints_a_token_once_that_the_api_accepts() {
    let fixture = Fixture::new().await;
    let url = fixture.servers.pgbouncer.url(&fixture.database);
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_telemetry-api"))
            .args(args)
            .args(["--database-url", &url])
            .output()
            .unwrap()
    };
    let migrated = cli(&["migrate"]);
    assert!(migrated.status.success(), "{migrated:?}");
    let created = cli(&["token", "create", "--user", "gina", "--label", "cli"]);
    assert!(created.status.success(), "{created:?}");
    let stdout = String::from_utf8(created.stdout).unwrap();
    let token = stdout.trim();
    assert_eq!(
        stdout.lines().count(),
        1,
        "only the token on stdout: {stdout}"
    );
    assert!(token.starts_with(tokens::PREFIX), "{token}");
    let stored: Vec<Vec<u8>> = fixture
        .direct()
        .await
        .query(
            "SELECT token_hash FROM api_tokens WHERE user_id = 'gina'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        stored,
        [tokens::hash(token).to_vec()],
        "only the hash is stored"
    );

    let refused = cli(&["token", "create", "--user", "a/b"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("'a/b' cannot own a token"));

    let api = fixture.start(fixture.config()).await;
    fixture
        .store_latest("gina", "g1", now(), json!({"v": 1}))
        .await;
    assert_eq!(
        api.get("/v1/devices/gina/g1/latest", Some(token)).await.0,
        200
    );
    api.stop().await;
}

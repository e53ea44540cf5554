//! The Grafana dashboard plots only metrics that the services really export.
//!
//! Metrics appear in /metrics only after their first use, so the story runs the pipeline for
//! real on throwaway servers: a worker and a bridge in this process, devices publishing good
//! readings, a reading the worker must dead-letter, one the bridge must dead-letter, a reading
//! above the alert threshold and one below its clear level, a second bridge that cannot reach
//! its broker (reconnects), and a PgBouncer outage (worker retries). Then every metric name in
//! the dashboard's PromQL must be among the samples the two /metrics endpoints serve, except
//! those of Vector and Redpanda, which cannot run here: their names must be documented ones,
//! and the components and topics they select must exist in this repository's configuration.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use deploy_check::{
    exposition_sample_names, json, load_stage_config, promql_metric_names, repo_root,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use telemetry_bridge::BridgeConfig;
use telemetry_core::kafka::KafkaConfig;
use telemetry_core::observe::HttpConfig;
use telemetry_core::Shutdown;
use telemetry_worker::WorkerConfig;
use test_servers::{shared, unique_name, PgBouncer};

const DASHBOARD: &str = "deploy/grafana/dashboards/telemetry-pipeline.json";

/// Series that Prometheus itself adds to every scrape, not exported by any service.
const PROMETHEUS_BUILT_INS: &[&str] = &["up"];

/// Metrics of the services that cannot run here, by their exporter's prefix: the names their
/// documentation gives (Vector's `internal_metrics` component counters, Redpanda's
/// `/public_metrics`), and the label whose values must name a part of this repository.
const THIRD_PARTY: &[ThirdParty] = &[
    ThirdParty {
        prefix: "vector_",
        metrics: &[
            "vector_component_received_events_total",
            "vector_component_sent_events_total",
            "vector_component_errors_total",
        ],
        label: "component_id",
        selected: &[
            "vector_component_received_events_total",
            "vector_component_sent_events_total",
        ],
    },
    // EMQX's own counters of messages it dropped (v5.8.6 apps/emqx_prometheus/src/
    // emqx_prometheus.erl l.845-850), scraped by the `emqx` job.
    ThirdParty {
        prefix: "emqx_",
        metrics: &[
            "emqx_delivery_dropped_queue_full",
            "emqx_delivery_dropped_too_large",
        ],
        label: "node",
        selected: &[],
    },
    ThirdParty {
        prefix: "redpanda_",
        metrics: &["redpanda_kafka_records_produced_total"],
        label: "redpanda_topic",
        selected: &["redpanda_kafka_records_produced_total"],
    },
];

struct ThirdParty {
    prefix: &'static str,
    metrics: &'static [&'static str],
    label: &'static str,
    /// Metrics that mean nothing summed over every component or topic, so a panel must select
    /// one with `label="..."`.
    selected: &'static [&'static str],
}

fn third_party(name: &str) -> Option<&'static ThirdParty> {
    THIRD_PARTY.iter().find(|t| name.starts_with(t.prefix))
}

fn dashboard_expressions() -> Vec<(String, String)> {
    let dashboard = json(DASHBOARD).unwrap();
    let mut expressions = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            expressions.push((
                panel["title"].as_str().unwrap_or_default().to_owned(),
                target["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    expressions
}

fn dashboard_metric_names() -> BTreeSet<String> {
    dashboard_expressions()
        .iter()
        .flat_map(|(_, expr)| promql_metric_names(expr))
        .filter(|name| !PROMETHEUS_BUILT_INS.contains(&name.as_str()))
        .filter(|name| third_party(name).is_none())
        .collect()
}

/// One label matcher of a selector: label, operator (`=`, `!=`, `=~`, `!~`) and value.
type Matcher = (String, String, String);

/// The selectors of an expression: each metric name written with `{...}` and its matchers.
fn selectors(expr: &str) -> Vec<(String, Vec<Matcher>)> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(open) = rest.find('{') {
        let name: String = rest[..open]
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let (matchers, after) = parse_matchers(&rest[open + 1..]);
        found.push((name, matchers));
        rest = after;
    }
    found
}

/// Reads `label op "value", ...}` and returns the matchers and the text after the `}`.
fn parse_matchers(mut text: &str) -> (Vec<Matcher>, &str) {
    let mut matchers = Vec::new();
    loop {
        text = text.trim_start_matches([' ', ',']);
        if let Some(after) = text.strip_prefix('}') {
            return (matchers, after);
        }
        let label_end = text
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .expect("a label matcher");
        let label = text[..label_end].to_owned();
        text = text[label_end..].trim_start();
        let op_end = text.find('"').expect("a quoted label value");
        let op = text[..op_end].trim().to_owned();
        text = &text[op_end + 1..];
        let value_end = text.find('"').expect("a closed label value");
        matchers.push((label, op, text[..value_end].to_owned()));
        text = &text[value_end + 1..];
    }
}

/// The component ids of the Vector configuration files the compose stack loads.
fn vector_components() -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for file in ["vector/vector.toml", "deploy/vector/observability.toml"] {
        let config: toml::Table = deploy_check::read(file).unwrap().parse().unwrap();
        for kind in ["sources", "transforms", "sinks"] {
            if let Some(components) = config.get(kind).and_then(|c| c.as_table()) {
                ids.extend(components.keys().cloned());
            }
        }
    }
    ids
}

#[test]
fn selectors_are_read_with_their_matchers() {
    let expr =
        r#"sum by (component_id) (rate(m{component_id="emqx", x_id !~ "a,b"}[5m])) + n{ a = "}" }"#;
    let matcher = |l: &str, o: &str, v: &str| (l.to_owned(), o.to_owned(), v.to_owned());
    assert_eq!(
        selectors(expr),
        [
            (
                "m".to_owned(),
                vec![
                    matcher("component_id", "=", "emqx"),
                    matcher("x_id", "!~", "a,b")
                ]
            ),
            ("n".to_owned(), vec![matcher("a", "=", "}")]),
        ]
    );
    assert!(selectors("sum(rate(m[5m]))").is_empty());
}

/// Vector (the compose stack's default bridge) and Redpanda cannot run here, so the panels
/// about them are checked against what can be: their metric names against the documented
/// ones, and every component or topic they select against this repository's configuration, so
/// renaming a Vector component or a topic breaks this test, not the dashboard in production.
#[test]
fn panels_about_vector_and_redpanda_select_components_and_topics_that_exist() {
    let components = vector_components();
    let topics = [
        telemetry_core::contract::DEFAULT_TOPIC,
        telemetry_core::contract::DEFAULT_DLQ_TOPIC,
    ];
    let mut plotted = BTreeSet::new();
    for (title, expr) in dashboard_expressions() {
        let selected = selectors(&expr);
        for name in promql_metric_names(&expr) {
            let Some(exporter) = third_party(&name) else {
                continue;
            };
            assert!(
                exporter.metrics.contains(&name.as_str()),
                "panel '{title}': {name} is not among the documented metrics {:?}",
                exporter.metrics
            );
            plotted.insert(name.clone());
            let chosen: Vec<&Matcher> = selected
                .iter()
                .filter(|(metric, _)| *metric == name)
                .flat_map(|(_, matchers)| matchers.iter())
                .filter(|(label, _, _)| label == exporter.label)
                .collect();
            if exporter.selected.contains(&name.as_str()) {
                assert!(
                    !chosen.is_empty(),
                    "panel '{title}': {name} must select one {} with {}=\"...\"",
                    exporter.label,
                    exporter.label
                );
            }
            for (label, op, value) in chosen {
                // Only an exact match can be checked against the configuration.
                assert_eq!(
                    op, "=",
                    "panel '{title}': {label}{op}\"{value}\" cannot be checked"
                );
                let known = match exporter.prefix {
                    "vector_" => components.contains(value),
                    _ => topics.contains(&value.as_str()),
                };
                assert!(
                    known,
                    "panel '{title}' selects {label}=\"{value}\", which names no Vector component \
                     ({components:?}) or topic ({topics:?})"
                );
            }
        }
    }
    for &metric in THIRD_PARTY.iter().flat_map(|exporter| exporter.metrics) {
        assert!(
            plotted.contains(metric),
            "the dashboard does not plot {metric}"
        );
    }
}

#[test]
fn the_dashboard_is_provisionable_and_covers_what_operators_watch() {
    let dashboard = json(DASHBOARD).unwrap();
    assert_eq!(dashboard["uid"], "telemetry-pipeline");
    let provisioned =
        deploy_check::yaml("deploy/grafana/provisioning/datasources/prometheus.yml").unwrap();
    let datasource_uid = &provisioned["datasources"][0]["uid"];
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate panel id"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            &panel["datasource"]["uid"], datasource_uid,
            "panel '{}' must use the provisioned datasource",
            panel["title"]
        );
        assert!(
            panel["targets"].as_array().is_some_and(|t| !t.is_empty()),
            "panel '{}' has no query",
            panel["title"]
        );
    }
    let names = dashboard_metric_names();
    for (topic, metric) in [
        ("ingest rate", "telemetry_worker_rows_written_total"),
        ("batch sizes", "telemetry_worker_batch_records_bucket"),
        ("flush latency", "telemetry_worker_flush_seconds_bucket"),
        ("consumer lag", "telemetry_worker_consumer_lag"),
        ("dead letters", "telemetry_worker_dead_letters_total"),
        ("alerts", "telemetry_alerts_raised_total"),
        (
            "end-to-end latency",
            "telemetry_worker_record_age_seconds_bucket",
        ),
    ] {
        assert!(
            names.contains(metric),
            "the dashboard does not plot {topic} ({metric})"
        );
    }
}

/// A free port on 127.0.0.1, so the test knows where each /metrics server listens.
fn free_address() -> SocketAddr {
    test_servers::free_addr()
}

/// The body of a 200 answer.
async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    test_servers::http_get(addr, path)
        .await
        .filter(|(status, _)| *status == 200)
        .map(|(_, body)| body)
}

struct Running {
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.trigger();
        let stopped = tokio::time::timeout(Duration::from_secs(40), self.task).await;
        stopped
            .expect("stage stops within 40 s")
            .expect("stage task")
            .expect("stage ran without error");
    }
}

fn start_worker(config: WorkerConfig) -> Running {
    let shutdown = Shutdown::new();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        telemetry_worker::run(config, stop)
            .await
            .map_err(|e| e.to_string())
    });
    Running { shutdown, task }
}

fn start_bridge(config: BridgeConfig) -> Running {
    let shutdown = Shutdown::new();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        telemetry_bridge::run(config, stop)
            .await
            .map_err(|e| e.to_string())
    });
    Running { shutdown, task }
}

/// Publishes with QoS 1 as one device owner and waits for every PUBACK.
async fn publish(host: &str, port: u16, messages: &[(String, Vec<u8>)]) {
    let mut options = MqttOptions::new(unique_name("devices"), host, port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(1024 * 1024, 1024 * 1024);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    for (topic, payload) in messages {
        client
            .publish(topic, QoS::AtLeastOnce, false, payload.clone())
            .await
            .unwrap();
    }
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked < messages.len() {
        let event = tokio::time::timeout_at(deadline.into(), eventloop.poll())
            .await
            .expect("PUBACKs within 60 s")
            .expect("MQTT connection");
        if let Event::Incoming(Packet::PubAck(_)) = event {
            acked += 1;
        }
    }
    client.disconnect().await.unwrap();
}

/// Scrapes both endpoints until `done` says the samples are complete, or a deadline passes.
async fn scrape_until(
    endpoints: &[SocketAddr],
    within: Duration,
    done: impl Fn(&BTreeSet<String>) -> bool,
) -> BTreeSet<String> {
    let deadline = Instant::now() + within;
    loop {
        let mut names = BTreeSet::new();
        for endpoint in endpoints {
            if let Some(body) = http_get(*endpoint, "/metrics").await {
                names.extend(exposition_sample_names(&body));
            }
        }
        if done(&names) || Instant::now() > deadline {
            return names;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn stored_rows(url: &str) -> i64 {
    let Ok((client, connection)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await else {
        return 0;
    };
    tokio::spawn(connection);
    match client
        .query_one("SELECT count(*) FROM raw_telemetry", &[])
        .await
    {
        Ok(row) => row.get(0),
        Err(_) => 0, // not migrated yet
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_plots_is_exported_by_a_running_worker_and_bridge() {
    let servers = shared();
    let database = unique_name("dashboard");
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
    // A PgBouncer of this test's own, so that stopping it disturbs no other test.
    let pgbouncer = PgBouncer::start(&servers.postgres).unwrap();

    // The worker as docker-compose.yml configures it, pointed at the throwaway servers: the
    // alert settings go through the same environment-variable path as in the compose file.
    let worker_http = free_address();
    let rules = repo_root().join("deploy/alerts/rules.toml");
    let env: BTreeMap<String, String> = [
        ("KAFKA__BROKERS", kafka.brokers.clone()),
        ("KAFKA__TOPIC", kafka.topic.clone()),
        ("KAFKA__DLQ_TOPIC", kafka.dlq_topic.clone()),
        ("GROUP_ID", unique_name("worker")),
        ("POSTGRES__URL", pgbouncer.url(&database)),
        ("HTTP__LISTEN", worker_http.to_string()),
        ("ALERTS__RULES__PATH", rules.display().to_string()),
        (
            "ALERTS__OUTBOX__MQTT__HOST",
            servers.mosquitto.host().to_owned(),
        ),
        (
            "ALERTS__OUTBOX__MQTT__PORT",
            servers.mosquitto.port().to_string(),
        ),
        ("ALERTS__OUTBOX__MQTT__CLIENT_ID", unique_name("alerts")),
    ]
    .into_iter()
    .map(|(k, v)| (format!("TELEMETRY_WORKER_{k}"), v))
    .collect();
    let worker_config: WorkerConfig = load_stage_config("worker", None, &env, "TELEMETRY_WORKER_")
        .unwrap_or_else(|e| panic!("{e}"));
    let worker = start_worker(worker_config);

    let bridge_http = free_address();
    let mut bridge_config = BridgeConfig {
        kafka: kafka.clone(),
        http: HttpConfig {
            listen: bridge_http,
        },
        max_payload_bytes: 4096,
        ..BridgeConfig::default()
    };
    bridge_config.mqtt.host = servers.mosquitto.host().to_owned();
    bridge_config.mqtt.port = servers.mosquitto.port();
    bridge_config.mqtt.client_id = unique_name("bridge");
    // As the local stack runs it: Mosquitto's counters through the bridge.
    bridge_config.mqtt.broker_stats = true;
    let bridge = start_bridge(bridge_config.clone());

    // A bridge whose broker is unreachable counts reconnects (both bridges share the process's
    // metrics registry, as the worker does).
    let mut lost = bridge_config.clone();
    lost.mqtt.port = free_address().port();
    lost.mqtt.client_id = unique_name("lost_bridge");
    lost.http.listen = "127.0.0.1:0".parse().unwrap();
    let lost_bridge = start_bridge(lost);

    let endpoints = [worker_http, bridge_http];
    let ready = scrape_until(&endpoints, Duration::from_secs(30), |names| {
        names.contains("telemetry_bridge_mqtt_reconnects_total")
    })
    .await;
    assert!(
        !ready.is_empty(),
        "neither /metrics endpoint answered within 30 s"
    );
    // Give the bridge time to subscribe before devices publish.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let user = unique_name("owner");
    let topic_of = |device: &str| format!("users/{user}/devices/{device}/telemetry");
    let mut messages: Vec<(String, Vec<u8>)> = (0..20)
        .map(|seq| {
            (
                topic_of("thermo-1"),
                format!(r#"{{"seq":{seq},"temperature":21.5}}"#).into_bytes(),
            )
        })
        .collect();
    // Above the alert threshold (80.0), then below its clear level (75.0).
    messages.push((
        topic_of("thermo-2"),
        br#"{"seq":1,"temperature":85.0}"#.to_vec(),
    ));
    messages.push((
        topic_of("thermo-2"),
        br#"{"seq":2,"temperature":70.0}"#.to_vec(),
    ));
    // Not JSON: the worker dead-letters it (invalid_json).
    messages.push((topic_of("thermo-3"), b"not json".to_vec()));
    // Larger than the bridge's max_payload_bytes: the bridge dead-letters it.
    messages.push((topic_of("thermo-3"), vec![b' '; 5000]));
    publish(
        servers.mosquitto.host(),
        servers.mosquitto.port(),
        &messages,
    )
    .await;

    let direct_url = servers.postgres.url(&database);
    let deadline = Instant::now() + Duration::from_secs(60);
    while stored_rows(&direct_url).await < 22 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        stored_rows(&direct_url).await,
        22,
        "the good readings are stored"
    );

    // An outage: the worker retries instead of dead-lettering, and stores the record after.
    pgbouncer.stop();
    publish(
        servers.mosquitto.host(),
        servers.mosquitto.port(),
        &[(
            topic_of("thermo-1"),
            br#"{"seq":100,"temperature":22.0}"#.to_vec(),
        )],
    )
    .await;
    let during_outage = scrape_until(&endpoints, Duration::from_secs(60), |names| {
        names.contains("telemetry_worker_retries_total")
    })
    .await;
    pgbouncer.start_again().unwrap();
    assert!(
        during_outage.contains("telemetry_worker_retries_total"),
        "the worker counted no retry while PgBouncer was down"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while stored_rows(&direct_url).await < 23 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        stored_rows(&direct_url).await,
        23,
        "stored after the outage"
    );

    // Consumer lag comes from librdkafka's statistics, every 5 s.
    let wanted = dashboard_metric_names();
    let exported = scrape_until(&endpoints, Duration::from_secs(30), |names| {
        wanted.is_subset(names)
    })
    .await;

    lost_bridge.stop().await;
    bridge.stop().await;
    worker.stop().await;

    let missing: Vec<&String> = wanted.difference(&exported).collect();
    let expressions = dashboard_expressions();
    let mut report = String::new();
    for name in &missing {
        let users: Vec<&str> = expressions
            .iter()
            .filter(|(_, expr)| promql_metric_names(expr).contains(*name))
            .map(|(title, _)| title.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        report.push_str(&format!("\n  {name} (panels: {})", users.join(", ")));
    }
    assert!(
        missing.is_empty(),
        "the dashboard plots metrics that the worker and bridge do not export:{report}\nexported: {exported:?}"
    );
}

#[test]
fn the_dashboard_json_is_the_one_grafana_mounts() {
    let compose = deploy_check::yaml("docker-compose.yml").unwrap();
    let home = compose["services"]["grafana"]["environment"]
        ["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
        .as_str()
        .unwrap();
    assert!(home.ends_with("/telemetry-pipeline.json"));
    let _: Value = json(DASHBOARD).unwrap();
}

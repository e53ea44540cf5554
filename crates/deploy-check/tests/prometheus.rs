//! `deploy/prometheus/prometheus.yml` scrapes every service of the compose file, at a port the
//! service listens on.

use std::collections::BTreeSet;

use deploy_check::yaml;
use serde_json::Value;

/// (job, host, port) of every scrape target, static or found by DNS.
fn targets(config: &Value) -> Vec<(String, String, u16)> {
    let mut targets = Vec::new();
    for job in config["scrape_configs"].as_array().expect("scrape_configs") {
        let name = job["job_name"].as_str().expect("job_name").to_owned();
        for statics in job["static_configs"].as_array().into_iter().flatten() {
            for target in statics["targets"].as_array().expect("targets") {
                let (host, port) = target.as_str().unwrap().split_once(':').unwrap();
                targets.push((name.clone(), host.to_owned(), port.parse().unwrap()));
            }
        }
        for dns in job["dns_sd_configs"].as_array().into_iter().flatten() {
            for host in dns["names"].as_array().expect("names") {
                let port = dns["port"].as_u64().expect("dns_sd_configs port") as u16;
                targets.push((name.clone(), host.as_str().unwrap().to_owned(), port));
            }
        }
    }
    targets
}

#[test]
fn every_scrape_target_is_a_service_and_every_service_is_scraped() {
    let config = yaml("deploy/prometheus/prometheus.yml").unwrap();
    let compose = yaml("docker-compose.yml").unwrap();
    let services = compose["services"].as_object().unwrap();
    let targets = targets(&config);
    let mut scraped = BTreeSet::new();
    for (job, host, _port) in &targets {
        if host == "localhost" && job == "prometheus" {
            scraped.insert("prometheus".to_owned());
            continue;
        }
        assert!(
            services.contains_key(host),
            "job {job} scrapes '{host}', which is not a compose service"
        );
        scraped.insert(host.clone());
    }
    // A service is covered when it is scraped itself or through the exporter that reads it.
    let exporters = [
        ("timescaledb", "postgres-exporter"),
        ("pgbouncer", "pgbouncer-exporter"),
    ];
    for (name, service) in services {
        if service["restart"].as_str() == Some("no") {
            continue; // a one-shot job, gone before the first scrape
        }
        let covered = scraped.contains(name)
            || exporters
                .iter()
                .any(|(s, exporter)| s == name && scraped.contains(*exporter));
        assert!(covered, "service {name} is not scraped by Prometheus");
    }
}

#[test]
fn our_services_are_scraped_where_they_serve_metrics() {
    let config = yaml("deploy/prometheus/prometheus.yml").unwrap();
    let targets = targets(&config);
    let port_of = |host: &str| {
        targets
            .iter()
            .find(|(_, h, _)| h == host)
            .map(|(_, _, p)| *p)
    };
    // The defaults of WorkerConfig and BridgeConfig, and the compose file's settings.
    assert_eq!(
        port_of("worker"),
        Some(telemetry_worker::WorkerConfig::default().http.listen.port())
    );
    assert_eq!(
        port_of("bridge"),
        Some(telemetry_bridge::BridgeConfig::default().http.listen.port())
    );
    let compose = yaml("docker-compose.yml").unwrap();
    let api_listen = compose["services"]["telemetry-api"]["environment"]
        ["TELEMETRY_API_HTTP__LISTEN"]
        .as_str()
        .expect("telemetry-api sets its metrics address");
    assert_eq!(
        Some(api_listen.rsplit(':').next().unwrap().parse().unwrap()),
        port_of("telemetry-api")
    );
}

/// Vector and Redpanda cannot run here; the dashboard plots their metrics (see dashboard.rs),
/// so Prometheus must scrape them where they serve those: Vector's `prometheus_exporter` sink
/// of `deploy/vector/observability.toml`, Redpanda's `/public_metrics`.
#[test]
fn vector_and_redpanda_are_scraped_where_they_serve_metrics() {
    let config = yaml("deploy/prometheus/prometheus.yml").unwrap();
    let exporter: toml::Table = deploy_check::read("deploy/vector/observability.toml")
        .unwrap()
        .parse()
        .unwrap();
    let address = exporter["sinks"]
        .as_table()
        .unwrap()
        .values()
        .find(|sink| sink["type"].as_str() == Some("prometheus_exporter"))
        .expect("a prometheus_exporter sink")["address"]
        .as_str()
        .unwrap()
        .to_owned();
    let vector_port: u16 = address.rsplit(':').next().unwrap().parse().unwrap();
    assert!(
        targets(&config).contains(&("vector".to_owned(), "vector".to_owned(), vector_port)),
        "no job scrapes vector:{vector_port}"
    );
    let redpanda = config["scrape_configs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|job| job["job_name"].as_str() == Some("redpanda"))
        .expect("a redpanda job");
    assert_eq!(redpanda["metrics_path"].as_str(), Some("/public_metrics"));
}

#[test]
fn the_grafana_datasource_points_at_the_prometheus_service() {
    let datasources = yaml("deploy/grafana/provisioning/datasources/prometheus.yml").unwrap();
    let url = datasources["datasources"][0]["url"].as_str().unwrap();
    assert_eq!(url, "http://prometheus:9090");
    let providers = yaml("deploy/grafana/provisioning/dashboards/telemetry.yml").unwrap();
    let path = providers["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    let compose = yaml("docker-compose.yml").unwrap();
    let mounted = compose["services"]["grafana"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .any(|v| v == format!("./deploy/grafana/dashboards:{path}:ro"));
    assert!(
        mounted,
        "grafana must mount deploy/grafana/dashboards at {path}"
    );
}

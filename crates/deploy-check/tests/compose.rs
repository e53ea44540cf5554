//! `docker-compose.yml`: it parses as a Compose file, starts in the right order, can be scaled,
//! and every setting it passes to our binaries is a real config field with a value that
//! passes the binary's own checks.

use std::collections::{BTreeMap, BTreeSet};

use deploy_check::{image_is_pinned, load_stage_config, read, yaml};
use serde_json::Value;
use telemetry_api::ApiConfig;
use telemetry_bridge::BridgeConfig;
use telemetry_worker::WorkerConfig;

fn compose() -> Value {
    yaml("docker-compose.yml").expect("docker-compose.yml parses")
}

fn services(compose: &Value) -> &serde_json::Map<String, Value> {
    compose["services"]
        .as_object()
        .expect("docker-compose.yml has services")
}

/// Services that run once and exit (they have `restart: "no"`), like `redpanda-init`.
fn one_shot(service: &Value) -> bool {
    service["restart"].as_str() == Some("no")
}

fn environment(service: &Value) -> BTreeMap<String, String> {
    match &service["environment"] {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), value)
            })
            .collect(),
        Value::Array(items) => items
            .iter()
            .filter_map(Value::as_str)
            .filter_map(|item| item.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// The host port of each `ports` entry ("1883:1883", "127.0.0.1:8081:8080" or long syntax).
fn host_ports(service: &Value) -> Vec<u16> {
    let Some(ports) = service["ports"].as_array() else {
        return Vec::new();
    };
    ports
        .iter()
        .map(|entry| match entry {
            Value::String(short) => {
                let parts: Vec<&str> = short.split('/').next().unwrap().split(':').collect();
                assert!(
                    parts.len() >= 2,
                    "port '{short}' publishes a random host port; name one"
                );
                parts[parts.len() - 2].parse().expect("numeric host port")
            }
            long => long["published"]
                .as_str()
                .map(|p| p.parse().expect("numeric host port"))
                .or_else(|| long["published"].as_u64().map(|p| p as u16))
                .expect("long-syntax port names its published port"),
        })
        .collect()
}

#[test]
fn the_compose_file_is_a_valid_compose_file() {
    let text = read("docker-compose.yml").unwrap();
    // compose_spec rejects unknown keys (anything not in the Compose Specification and not an
    // `x-` extension) and checks the networks and volumes that services use are declared.
    let parsed = compose_spec::Compose::options()
        .apply_merge(true)
        .from_yaml_str(&text)
        .unwrap_or_else(|e| panic!("docker-compose.yml is not a valid Compose file: {e}"));
    parsed
        .validate_all()
        .unwrap_or_else(|e| panic!("docker-compose.yml: {e}"));
}

#[test]
fn every_service_the_readme_names_exists_and_every_service_is_named_there() {
    let readme = read("README.md").unwrap();
    let section = readme
        .split("\n## Run it with Docker")
        .nth(1)
        .expect("README.md has a '## Run it with Docker' section");
    let section = section.split("\n## ").next().unwrap();
    // The section's table lists the services in its first column, each in backticks.
    let named: BTreeSet<String> = section
        .lines()
        .filter(|line| line.starts_with("| `"))
        .filter_map(|line| line.split('`').nth(1))
        .map(str::to_owned)
        .collect();
    let compose = compose();
    let defined: BTreeSet<String> = services(&compose).keys().cloned().collect();
    let missing: Vec<_> = named.difference(&defined).collect();
    assert!(
        missing.is_empty(),
        "README.md names services that docker-compose.yml lacks: {missing:?}"
    );
    let unnamed: Vec<_> = defined.difference(&named).collect();
    assert!(
        unnamed.is_empty(),
        "README.md's Docker section does not list these services: {unnamed:?}"
    );
}

#[test]
fn no_two_services_publish_the_same_host_port() {
    let compose = compose();
    let mut owners: BTreeMap<u16, Vec<&str>> = BTreeMap::new();
    for (name, service) in services(&compose) {
        for port in host_ports(service) {
            owners.entry(port).or_default().push(name);
        }
    }
    let clashes: Vec<_> = owners.iter().filter(|(_, names)| names.len() > 1).collect();
    assert!(clashes.is_empty(), "host ports used twice: {clashes:?}");
    // The query API is mapped away from Redpanda Console's 8080.
    assert_eq!(owners.get(&8080).map(Vec::as_slice), Some(&["console"][..]));
    assert_eq!(
        owners.get(&8081).map(Vec::as_slice),
        Some(&["telemetry-api"][..])
    );
}

#[test]
fn every_image_is_pinned_to_a_version() {
    let compose = compose();
    for (name, service) in services(&compose) {
        let image = service["image"]
            .as_str()
            .unwrap_or_else(|| panic!("service {name} names no image"));
        assert!(
            image_is_pinned(image),
            "service {name}: image '{image}' is not pinned to a version (no `latest`, no bare major)"
        );
    }
}

#[test]
fn every_long_running_service_has_a_healthcheck_and_dependents_wait_for_it() {
    let compose = compose();
    let services = services(&compose);
    for (name, service) in services {
        if one_shot(service) {
            assert!(
                service["healthcheck"].is_null(),
                "{name} runs once; a health check would never pass"
            );
        } else {
            let test = &service["healthcheck"]["test"];
            assert!(
                test.is_array() || test.is_string(),
                "long-running service {name} has no healthcheck"
            );
            assert_ne!(
                service["healthcheck"]["disable"],
                Value::Bool(true),
                "{name} disables its healthcheck"
            );
        }
        let Some(depends_on) = service["depends_on"].as_object() else {
            assert!(
                service["depends_on"].is_null(),
                "{name}: depends_on must use the long form with a condition"
            );
            continue;
        };
        for (dependency, how) in depends_on {
            let target = services
                .get(dependency)
                .unwrap_or_else(|| panic!("{name} depends on {dependency}, which does not exist"));
            let expected = if one_shot(target) {
                "service_completed_successfully"
            } else {
                "service_healthy"
            };
            assert_eq!(
                how["condition"].as_str(),
                Some(expected),
                "{name} must wait for {dependency} with condition {expected}"
            );
        }
    }
}

#[test]
fn the_worker_and_the_bridge_can_be_scaled() {
    let compose = compose();
    for name in ["worker", "bridge"] {
        let service = &services(&compose)[name];
        assert!(
            service["container_name"].is_null(),
            "{name} has a container_name, so `--scale {name}=3` would fail"
        );
        assert!(
            host_ports(service).is_empty(),
            "{name} publishes a host port, so a second replica could not start"
        );
    }
    // Every worker replica names its alert publishing sessions from one fixed prefix: a
    // per-replica prefix would leave a crashed replica's half-published alerts on a session no
    // other replica opens.
    let worker = &services(&compose)["worker"];
    let prefix = &worker["environment"]["TELEMETRY_WORKER_ALERTS__OUTBOX__MQTT__CLIENT_ID"];
    assert!(
        prefix
            .as_str()
            .is_some_and(|p| !p.is_empty() && !p.contains('$')),
        "worker replicas need one fixed alert client id prefix: {prefix}"
    );
    assert_eq!(
        services(&compose)["bridge"]["profiles"],
        serde_json::json!(["native-bridge"]),
        "the native bridge is the alternative to Vector, under its own profile"
    );
}

#[test]
fn vector_runs_the_repository_config_at_the_path_it_is_told() {
    let compose = compose();
    let vector = &services(&compose)["vector"];
    let mount = vector["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .find(|v| v.starts_with("./vector/vector.toml:"))
        .expect("vector mounts ./vector/vector.toml");
    let in_container = mount.split(':').nth(1).unwrap();
    let args: Vec<&str> = vector["command"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--config" && w[1] == in_container),
        "vector's command must load {in_container}: {args:?}"
    );
    // When the config reads environment variables, compose must set them (or the config gives
    // a default with `${NAME:-default}`).
    let Ok(config) = read("vector/vector.toml") else {
        return; // written separately; nothing more to compare yet
    };
    let env = environment(vector);
    for name in vector_env_references(&config) {
        assert!(
            env.contains_key(&name),
            "vector/vector.toml reads ${{{name}}}, which docker-compose.yml does not set for vector"
        );
    }
}

/// `${NAME}` and `$NAME` references in a Vector config, without those that give a default.
fn vector_env_references(config: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in config.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let mut rest = line;
        while let Some(at) = rest.find('$') {
            rest = &rest[at + 1..];
            if rest.starts_with('$') {
                rest = &rest[1..]; // `$$` is a literal dollar
                continue;
            }
            let braced = rest.starts_with('{');
            let body = if braced { &rest[1..] } else { rest };
            let end = body
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(body.len());
            let name = &body[..end];
            let has_default =
                braced && (body[end..].starts_with(":-") || body[end..].starts_with('-'));
            if !name.is_empty() && !has_default {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

#[test]
fn the_worker_environment_is_a_valid_worker_config() {
    let compose = compose();
    let env = environment(&services(&compose)["worker"]);
    let config: WorkerConfig =
        load_stage_config("compose service worker", None, &env, "TELEMETRY_WORKER_")
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.kafka.brokers, "redpanda:9092");
    assert_eq!(config.kafka.topic, telemetry_core::contract::DEFAULT_TOPIC);
    assert_eq!(
        config.kafka.dlq_topic,
        telemetry_core::contract::DEFAULT_DLQ_TOPIC
    );
    assert_eq!(config.http.listen.port(), 9101);
    assert!(config.postgres.url.contains("@pgbouncer:6432/"));
}

#[test]
fn the_bridge_environment_is_a_valid_bridge_config() {
    let compose = compose();
    let env = environment(&services(&compose)["bridge"]);
    let config: BridgeConfig =
        load_stage_config("compose service bridge", None, &env, "TELEMETRY_BRIDGE_")
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.mqtt.host, "emqx");
    assert_eq!(config.kafka.topic, telemetry_core::contract::DEFAULT_TOPIC);
    assert_eq!(config.http.listen.port(), 9102);
    assert!(
        config.mqtt.shared_group.is_some(),
        "bridge replicas must share the subscription"
    );
}

#[test]
fn the_api_environment_is_a_valid_api_config() {
    let compose = compose();
    let env = environment(&services(&compose)["telemetry-api"]);
    let config: ApiConfig = load_stage_config(
        "compose service telemetry-api",
        None,
        &env,
        "TELEMETRY_API_",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.listen.port(), 8080);
    assert_eq!(config.http.listen.port(), 9104);
    assert!(config
        .postgres
        .url
        .contains("telemetry_reader@pgbouncer:6432/"));
}

/// Every `host:port` and URL host in our services' settings is a service of the file.
#[test]
fn every_host_our_services_connect_to_is_a_service() {
    let compose = compose();
    let services = services(&compose);
    for name in [
        "worker",
        "bridge",
        "telemetry-api",
        "vector",
        "redpanda-init",
    ] {
        for (key, value) in environment(&services[name]) {
            for host in hosts_in(&value) {
                assert!(
                    services.contains_key(&host),
                    "{name}: {key} points at '{host}', which is not a service"
                );
            }
        }
    }
}

/// Hosts in `host:port` lists and `scheme://[user[:pw]@]host[:port]/...` URLs.
fn hosts_in(value: &str) -> Vec<String> {
    let after_scheme = value.split_once("://").map_or(value, |(_, rest)| rest);
    let authority = after_scheme.split('/').next().unwrap_or_default();
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    authority
        .split(',')
        .filter_map(|item| item.split_once(':'))
        .filter(|(host, port)| {
            !host.is_empty()
                && host.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                && port.chars().all(|c| c.is_ascii_digit())
        })
        .map(|(host, _)| host.to_owned())
        .collect()
}

/// MQTT logins in the compose file exist in EMQX's user list with the same password, and
/// database logins in PgBouncer's, so nothing fails to authenticate on first start.
#[test]
fn every_login_in_the_compose_file_exists_where_it_is_checked() {
    let mqtt_users: BTreeMap<String, String> = read("deploy/emqx/users.csv")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split(',');
            Some((fields.next()?.to_owned(), fields.next()?.to_owned()))
        })
        .collect();
    let pgbouncer_users: BTreeMap<String, String> = read("deploy/pgbouncer/userlist.txt")
        .unwrap()
        .lines()
        .filter_map(|line| {
            let mut quoted = line.split('"').skip(1).step_by(2);
            Some((quoted.next()?.to_owned(), quoted.next()?.to_owned()))
        })
        .collect();
    let compose = compose();
    for (name, service) in services(&compose) {
        let env = environment(service);
        for (user_key, password_key) in [
            (
                "TELEMETRY_WORKER_ALERTS__OUTBOX__MQTT__USERNAME",
                "TELEMETRY_WORKER_ALERTS__OUTBOX__MQTT__PASSWORD",
            ),
            (
                "TELEMETRY_BRIDGE_MQTT__USERNAME",
                "TELEMETRY_BRIDGE_MQTT__PASSWORD",
            ),
            ("MQTT_USERNAME", "MQTT_PASSWORD"),
        ] {
            if let Some(user) = env.get(user_key) {
                assert_eq!(
                    mqtt_users.get(user),
                    env.get(password_key),
                    "{name}: MQTT login '{user}' must be in deploy/emqx/users.csv with the same password"
                );
            }
        }
        for value in env.values().filter(|v| v.contains("@pgbouncer:")) {
            let credentials = value
                .split_once("://")
                .and_then(|(_, rest)| rest.split_once('@'))
                .map(|(credentials, _)| credentials)
                .unwrap();
            let (user, password) = credentials.split_once(':').unwrap();
            assert_eq!(
                pgbouncer_users.get(user).map(String::as_str),
                Some(password),
                "{name}: database login '{user}' must be in deploy/pgbouncer/userlist.txt with the same password"
            );
        }
    }
}

#[test]
fn the_acl_lets_users_reach_only_their_own_devices() {
    let acl = read("deploy/emqx/acl.conf").unwrap();
    let rules: Vec<String> = acl
        .lines()
        .filter(|l| !l.trim_start().starts_with("%%"))
        .collect::<Vec<_>>()
        .join(" ")
        .split("}.")
        .map(|rule| rule.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|rule| !rule.is_empty())
        .collect();
    let owner_publish = rules
        .iter()
        .position(|r| r == "{allow, all, publish, [\"users/${username}/devices/+/telemetry\"]");
    let owner_subscribe = rules
        .iter()
        .position(|r| r == "{allow, all, subscribe, [\"users/${username}/devices/+/alerts\"]");
    assert!(
        owner_publish.is_some() && owner_subscribe.is_some(),
        "owners must publish only users/{{own}}/devices/+/telemetry and subscribe only users/{{own}}/devices/+/alerts: {rules:#?}"
    );
    assert_eq!(
        rules.last().map(String::as_str),
        Some("{deny, all"),
        "the last rule denies everything else"
    );
    // No rule before the owners' grants everyone a wildcard.
    for rule in &rules[..owner_publish.unwrap()] {
        assert!(!rule.starts_with("{allow, all"), "too broad: {rule}");
    }
    let emqx_conf = read("deploy/emqx/emqx.conf").unwrap();
    assert!(
        emqx_conf.contains("no_match = deny"),
        "EMQX must deny what the ACL does not allow"
    );
}

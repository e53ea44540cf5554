//! The bridge's settings; defaults work with the local stack (`make demo`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use telemetry_core::config::{self as core_config, ConfigError, Secret, Validate};
use telemetry_core::contract::{DEFAULT_MAX_PAYLOAD_BYTES, TELEMETRY_FILTER};
use telemetry_core::kafka::KafkaConfig;
use telemetry_core::observe::{HttpConfig, LogFormat};

use crate::route::{Filter, KeyTemplate};

/// Largest `max_payload_bytes`: a dead letter carries the payload, and together with its
/// headers it must still fit Kafka's default `message.max.bytes` of 1,000,000.
pub const MAX_PAYLOAD_LIMIT: usize = 900_000;

/// The MQTT 5 Maximum Packet Size the bridge announces: larger than any packet the brokers of
/// our stacks accept (EMQX `mqtt.max_packet_size = 900KB` in deploy/emqx/emqx.conf, Mosquitto
/// `max_packet_size 921600` in scripts/stack.sh), so a broker never has to drop a message it
/// acknowledged to a device because the bridge could not take it (a broker drops such a
/// message silently: Mosquitto 2.0.11 `send__real_publish`, EMQX `delivery.dropped.too_large`).
/// Payloads above `max_payload_bytes` that the broker accepted are dead-lettered; larger ones are
/// refused by the broker at the door, with a reason the device sees.
pub const MAX_PACKET_BYTES: u32 = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BridgeConfig {
    pub mqtt: MqttConfig,
    pub kafka: KafkaConfig,
    /// Where each MQTT topic goes in Kafka, tried exact filters first, then filters with
    /// wildcards in the order given. A message whose topic matches none is dead-lettered.
    pub routes: Vec<RouteConfig>,
    /// MQTT messages received but not yet confirmed by Kafka. Sent to the broker as MQTT 5
    /// Receive Maximum, so when Kafka is slow the broker itself holds further messages back.
    /// The broker refills the window only as PUBACKs come back, and the MQTT client sends one
    /// per turn of its event loop, so a small window throttles the bridge: `make bench-bridge`
    /// measured about 27k msg/s with 1,000 and about 40k with 10,000. Memory grows with it
    /// (window x message size): lower it for large payloads.
    pub max_in_flight: usize,
    /// Payloads larger than this go to the dead-letter topic, payload and all. The broker must
    /// refuse packets larger than [`MAX_PACKET_BYTES`] at the door (see there).
    pub max_payload_bytes: usize,
    /// How long messages may be held with none confirmed by Kafka or acknowledged before
    /// `/healthz` fails, so that an orchestrator restarts a bridge that stopped making progress.
    /// A Kafka outage longer than this also fails it; the restart is harmless (the broker keeps
    /// every unacknowledged message) and readiness names the outage.
    pub stall_timeout_secs: u64,
    pub http: HttpConfig,
    pub log_format: LogFormat,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            mqtt: MqttConfig::default(),
            kafka: KafkaConfig::default(),
            routes: vec![RouteConfig::telemetry()],
            max_in_flight: 10_000,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            stall_timeout_secs: 120,
            http: HttpConfig {
                listen: "0.0.0.0:9102".parse().expect("valid address"),
            },
            log_format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    /// Stable client id: the broker keeps this session's subscriptions and unacknowledged
    /// messages while the bridge is away, which is what makes a restart lose nothing. Each
    /// replica needs its own.
    pub client_id: String,
    pub username: Option<String>,
    /// Best given through the environment (`TELEMETRY_BRIDGE_MQTT__PASSWORD`) or
    /// `password_file`; never logged or printed.
    pub password: Option<Secret>,
    /// File holding the password (e.g. a mounted Kubernetes secret).
    pub password_file: Option<PathBuf>,
    /// TLS to the broker; plain TCP when absent.
    pub tls: Option<MqttTlsConfig>,
    /// Topic filters to subscribe to.
    pub subscriptions: Vec<String>,
    /// Share the subscriptions among bridge replicas (`$share/{group}/{filter}`, MQTT 5); unset
    /// means this bridge receives every message.
    pub shared_group: Option<String>,
    pub keep_alive_secs: u64,
    /// How long the broker keeps the session, and the messages queued for it, while the bridge
    /// is away (MQTT 5 Session Expiry Interval). Outages longer than this lose messages.
    pub session_expiry_secs: u32,
    /// Read Mosquitto's `$SYS` counters of messages stored and dropped, and export them as
    /// `telemetry_bridge_broker_*` gauges. For Mosquitto, which has no Prometheus endpoint;
    /// the broker must let the bridge read `$SYS/broker/publish/messages/dropped` and
    /// `$SYS/broker/store/messages/#`.
    pub broker_stats: bool,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: "telemetry-bridge".into(),
            username: None,
            password: None,
            password_file: None,
            tls: None,
            subscriptions: vec![TELEMETRY_FILTER.into()],
            shared_group: None,
            keep_alive_secs: 30,
            session_expiry_secs: 7 * 24 * 3600,
            broker_stats: false,
        }
    }
}

impl MqttConfig {
    /// The filters as subscribed, with the shared-subscription prefix when configured.
    pub fn subscription_filters(&self) -> Vec<String> {
        let share = |filter: &String| match &self.shared_group {
            Some(group) => format!("$share/{group}/{filter}"),
            None => filter.clone(),
        };
        self.subscriptions.iter().map(share).collect()
    }

    /// The password from `password` or `password_file`.
    pub fn resolved_password(&self) -> Result<Option<Secret>, ConfigError> {
        core_config::resolve_secret(
            "mqtt.password",
            self.password.as_ref(),
            "mqtt.password_file",
            self.password_file.as_deref(),
        )
    }
}

/// TLS to the MQTT broker. The server certificate must name `mqtt.host` (DNS name or IP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttTlsConfig {
    /// PEM file with the CA certificates that signed the broker's certificate; for brokers with
    /// a public certificate, the system bundle (`/etc/ssl/certs/ca-certificates.crt`).
    pub ca_file: PathBuf,
    /// PEM client certificate, for brokers that authenticate clients by certificate.
    pub client_cert_file: Option<PathBuf>,
    /// Unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1) of the client certificate. A
    /// secret: only its path is ever printed.
    pub client_key_file: Option<PathBuf>,
}

/// One mapping from MQTT topics to Kafka.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// MQTT topic filter: `+` matches one level, a final `#` any number of levels.
    pub filter: String,
    /// Kafka topic; `kafka.topic` when absent. Records for `kafka.topic` must carry the wire
    /// contract's key `{user}/{device}`, so a key that breaks it is dead-lettered here instead
    /// of at the worker.
    #[serde(default)]
    pub topic: Option<String>,
    /// Kafka key: text with `{1}`, `{2}`, ... standing for the levels matched by the filter's
    /// wildcards, in order (a `#` stands for all the levels it matched, joined by `/`).
    pub key: String,
    /// JSON Schema file the payload must satisfy; messages that fail it are dead-lettered with
    /// the failing location and keyword.
    #[serde(default)]
    pub schema: Option<PathBuf>,
}

impl RouteConfig {
    /// The wire contract's route: device telemetry to `kafka.topic`, keyed `{user}/{device}`.
    pub fn telemetry() -> Self {
        RouteConfig {
            filter: TELEMETRY_FILTER.into(),
            topic: None,
            key: "{1}/{2}".into(),
            schema: None,
        }
    }
}

impl Validate for BridgeConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.kafka.validate()?;
        let mqtt = &self.mqtt;
        if mqtt.host.is_empty() {
            return Err(ConfigError::invalid("mqtt.host", "is empty"));
        }
        if mqtt.client_id.is_empty() || mqtt.client_id.len() > 23 * 4 {
            return Err(ConfigError::invalid(
                "mqtt.client_id",
                "must be 1 to 92 characters and stable across restarts",
            ));
        }
        if mqtt.subscriptions.is_empty() {
            return Err(ConfigError::invalid(
                "mqtt.subscriptions",
                format!("needs at least one filter, e.g. [\"{TELEMETRY_FILTER}\"]"),
            ));
        }
        for filter in &mqtt.subscriptions {
            Filter::parse(filter).map_err(|why| {
                ConfigError::invalid("mqtt.subscriptions", format!("'{filter}': {why}"))
            })?;
        }
        if let Some(group) = &mqtt.shared_group {
            if group.is_empty() || group.contains(['/', '+', '#']) {
                return Err(ConfigError::invalid(
                    "mqtt.shared_group",
                    format!("'{group}' must be non-empty without '/', '+' or '#'"),
                ));
            }
        }
        if !(5..=3600).contains(&mqtt.keep_alive_secs) {
            return Err(ConfigError::invalid(
                "mqtt.keep_alive_secs",
                "must be between 5 and 3600",
            ));
        }
        if mqtt.session_expiry_secs == 0 {
            return Err(ConfigError::invalid(
                "mqtt.session_expiry_secs",
                "must be at least 1: with 0 the broker forgets unacknowledged messages when the bridge disconnects",
            ));
        }
        if mqtt.password.is_some() || mqtt.password_file.is_some() {
            if mqtt.username.is_none() {
                return Err(ConfigError::invalid(
                    "mqtt.username",
                    "is needed when a password is set",
                ));
            }
            mqtt.resolved_password()?;
        }
        if let Some(tls) = &mqtt.tls {
            for (field, path) in [
                ("mqtt.tls.ca_file", Some(&tls.ca_file)),
                ("mqtt.tls.client_cert_file", tls.client_cert_file.as_ref()),
                ("mqtt.tls.client_key_file", tls.client_key_file.as_ref()),
            ] {
                if let Some(path) = path {
                    if !path.is_file() {
                        return Err(ConfigError::invalid(
                            field,
                            format!("{} is not a readable file", path.display()),
                        ));
                    }
                }
            }
            if tls.client_cert_file.is_some() != tls.client_key_file.is_some() {
                return Err(ConfigError::invalid(
                    "mqtt.tls.client_key_file",
                    "client_cert_file and client_key_file go together",
                ));
            }
        }
        if self.routes.is_empty() {
            return Err(ConfigError::invalid(
                "routes",
                "needs at least one route, e.g. { filter = \"users/+/devices/+/telemetry\", key = \"{1}/{2}\" }",
            ));
        }
        for (index, route) in self.routes.iter().enumerate() {
            let invalid = |why: String| {
                ConfigError::invalid(
                    "routes",
                    format!("route {} ('{}'): {why}", index + 1, route.filter),
                )
            };
            let filter = Filter::parse(&route.filter).map_err(invalid)?;
            KeyTemplate::parse(&route.key, filter.wildcards()).map_err(invalid)?;
            match &route.topic {
                Some(topic) if topic.is_empty() => return Err(invalid("topic is empty".into())),
                Some(topic) if *topic == self.kafka.dlq_topic => {
                    return Err(invalid(format!("topic '{topic}' is the dead-letter topic")))
                }
                _ => {}
            }
            if let Some(path) = &route.schema {
                crate::schema::Schema::load(path).map_err(|e| invalid(e.to_string()))?;
            }
        }
        if !(1..=65_535).contains(&self.max_in_flight) {
            return Err(ConfigError::invalid(
                "max_in_flight",
                "must be between 1 and 65535 (the MQTT 5 Receive Maximum)",
            ));
        }
        if !(30..=86_400).contains(&self.stall_timeout_secs) {
            return Err(ConfigError::invalid(
                "stall_timeout_secs",
                "must be between 30 and 86400: shorter than 30 s would restart a bridge that waits out a Kafka leader election",
            ));
        }
        if !(1..=MAX_PAYLOAD_LIMIT).contains(&self.max_payload_bytes) {
            return Err(ConfigError::invalid(
                "max_payload_bytes",
                format!("must be between 1 and {MAX_PAYLOAD_LIMIT}, so that a dead letter fits a Kafka record"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(change: impl FnOnce(&mut BridgeConfig)) -> String {
        let mut config = BridgeConfig::default();
        change(&mut config);
        config.validate().unwrap_err().to_string()
    }

    #[test]
    fn the_defaults_are_valid_and_route_the_contract_topic() {
        let config = BridgeConfig::default();
        config.validate().unwrap();
        assert_eq!(config.routes, vec![RouteConfig::telemetry()]);
    }

    #[test]
    fn wrong_routes_name_the_route_and_the_problem() {
        let e = invalid(|c| c.routes[0].key = "{3}".into());
        assert!(e.contains("route 1") && e.contains("{3}"), "{e}");
        let e = invalid(|c| c.routes[0].filter = "users/#/x".into());
        assert!(e.contains("route 1") && e.contains('#'), "{e}");
        let e = invalid(|c| c.routes[0].topic = Some(c.kafka.dlq_topic.clone()));
        assert!(e.contains("dead-letter"), "{e}");
        let e = invalid(|c| c.routes[0].schema = Some("/nonexistent/s.json".into()));
        assert!(e.contains("/nonexistent/s.json"), "{e}");
        let e = invalid(|c| c.routes.clear());
        assert!(e.contains("routes"), "{e}");
    }

    #[test]
    fn a_password_needs_a_username_and_only_one_source() {
        let e = invalid(|c| c.mqtt.password = Some(Secret::new("pw")));
        assert!(e.contains("mqtt.username"), "{e}");
        let e = invalid(|c| {
            c.mqtt.username = Some("bridge".into());
            c.mqtt.password = Some(Secret::new("pw"));
            c.mqtt.password_file = Some("/etc/hostname".into());
        });
        assert!(e.contains("not both"), "{e}");
    }

    #[test]
    fn a_session_that_expires_on_disconnect_is_refused() {
        let e = invalid(|c| c.mqtt.session_expiry_secs = 0);
        assert!(e.contains("mqtt.session_expiry_secs"), "{e}");
    }

    #[test]
    fn a_stall_timeout_shorter_than_a_leader_election_is_refused() {
        let e = invalid(|c| c.stall_timeout_secs = 5);
        assert!(e.contains("stall_timeout_secs"), "{e}");
    }

    #[test]
    fn payload_limits_that_cannot_be_dead_lettered_are_refused() {
        let e = invalid(|c| c.max_payload_bytes = 2_000_000);
        assert!(e.contains("max_payload_bytes"), "{e}");
    }
}

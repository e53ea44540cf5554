//! The bridge's settings; defaults work with the local stack (`make demo`).

use serde::{Deserialize, Serialize};
use telemetry_core::config::{ConfigError, Validate};
use telemetry_core::contract::{DEFAULT_MAX_PAYLOAD_BYTES, TELEMETRY_FILTER};
use telemetry_core::kafka::KafkaConfig;
use telemetry_core::observe::{HttpConfig, LogFormat};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BridgeConfig {
    pub mqtt: MqttConfig,
    pub kafka: KafkaConfig,
    /// MQTT messages received but not yet confirmed by Kafka. When the window is full the bridge
    /// stops reading from MQTT until Kafka catches up.
    pub max_in_flight: usize,
    /// Payloads larger than this go to the dead-letter topic.
    pub max_payload_bytes: usize,
    pub http: HttpConfig,
    pub log_format: LogFormat,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            mqtt: MqttConfig::default(),
            kafka: KafkaConfig::default(),
            max_in_flight: 1000,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
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
    /// messages while the bridge is away, which is what makes a restart lose nothing.
    pub client_id: String,
    pub username: Option<String>,
    /// Never logged or printed.
    pub password: Option<String>,
    /// Topic filters to subscribe to.
    pub subscriptions: Vec<String>,
    /// Share the subscription among bridge replicas (`$share/{group}/{filter}`); unset means this
    /// bridge receives every message.
    pub shared_group: Option<String>,
    pub keep_alive_secs: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: "telemetry-bridge".into(),
            username: None,
            password: None,
            subscriptions: vec![TELEMETRY_FILTER.into()],
            shared_group: None,
            keep_alive_secs: 30,
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
}

impl Validate for BridgeConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.kafka.validate()?;
        if self.mqtt.host.is_empty() {
            return Err(ConfigError::invalid("mqtt.host", "is empty"));
        }
        if self.mqtt.client_id.is_empty() || self.mqtt.client_id.len() > 23 * 4 {
            return Err(ConfigError::invalid(
                "mqtt.client_id",
                "must be 1 to 92 characters and stable across restarts",
            ));
        }
        if self.mqtt.subscriptions.is_empty()
            || self.mqtt.subscriptions.iter().any(String::is_empty)
        {
            return Err(ConfigError::invalid(
                "mqtt.subscriptions",
                "needs at least one non-empty filter, e.g. [\"users/+/devices/+/telemetry\"]",
            ));
        }
        if let Some(group) = &self.mqtt.shared_group {
            if group.is_empty() || group.contains(['/', '+', '#']) {
                return Err(ConfigError::invalid(
                    "mqtt.shared_group",
                    format!("'{group}' must be non-empty without '/', '+' or '#'"),
                ));
            }
        }
        if !(5..=3600).contains(&self.mqtt.keep_alive_secs) {
            return Err(ConfigError::invalid(
                "mqtt.keep_alive_secs",
                "must be between 5 and 3600",
            ));
        }
        if !(1..=65_535).contains(&self.max_in_flight) {
            return Err(ConfigError::invalid(
                "max_in_flight",
                "must be between 1 and 65535",
            ));
        }
        if self.max_payload_bytes == 0 {
            return Err(ConfigError::invalid(
                "max_payload_bytes",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

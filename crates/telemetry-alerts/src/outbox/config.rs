//! The outbox publisher's settings; the defaults work with the local stack (`make demo`).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use telemetry_core::config::{ConfigError, Secret, Validate};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    pub mqtt: MqttConfig,
    /// How often, in milliseconds, to look for unpublished alerts when nothing woke the
    /// publisher: alerts written by other replicas, or left over while the broker was down.
    /// Alerts of this replica's own batches are published at once, whatever this is.
    pub poll_interval_ms: u64,
    /// Most alerts published in one round (one transaction).
    pub batch_size: usize,
    /// How long, in milliseconds, the broker may take to answer each step of a round
    /// (connecting, receiving a group of messages, releasing them) before the round is
    /// abandoned and retried.
    pub ack_timeout_ms: u64,
    /// Most messages of one partition's session that the broker holds unreleased at once. Keep
    /// it within what the broker acknowledges at once per client: Mosquitto's
    /// `max_inflight_messages` (20 by default; it queues the rest without PUBREC, and the round
    /// times out), EMQX's `mqtt.max_awaiting_rel` (100 by default). Each group costs one
    /// database write.
    pub max_in_flight: usize,
    /// Rounds run side by side, each on its share of the partitions (partition mod
    /// publishers). Each round holds two database connections.
    pub publishers: usize,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            mqtt: MqttConfig::default(),
            poll_interval_ms: 1_000,
            batch_size: 500,
            ack_timeout_ms: 10_000,
            max_in_flight: 20,
            publishers: 2,
        }
    }
}

impl OutboxConfig {
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }

    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.ack_timeout_ms)
    }
}

/// The broker alerts are published to. Its user needs write access to
/// `users/+/devices/+/alerts`; a broker that denies a publish may still acknowledge it (MQTT
/// 3.1.1 has no way to say no), and the alert would then count as published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    /// Prefix of the publishing sessions, the same on every replica of a deployment: a
    /// partition's alerts are published on the persistent session `{client_id}-p{partition}`,
    /// so whichever replica publishes the partition next can finish what a crashed one left
    /// half-done. Replicas never connect with the same id at once: a session is used only by
    /// the replica holding its partition's lock.
    pub client_id: String,
    pub username: Option<String>,
    /// Shown as `***` in `print-config` and logs.
    pub password: Option<Secret>,
    pub keep_alive_secs: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: "telemetry-alerts".into(),
            username: None,
            password: None,
            keep_alive_secs: 30,
        }
    }
}

impl Validate for OutboxConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let mqtt = &self.mqtt;
        if mqtt.host.is_empty() {
            return Err(ConfigError::invalid("alerts.outbox.mqtt.host", "is empty"));
        }
        if mqtt.port == 0 {
            return Err(ConfigError::invalid(
                "alerts.outbox.mqtt.port",
                "must be between 1 and 65535",
            ));
        }
        if mqtt.client_id.is_empty() || mqtt.client_id.len() > 80 {
            return Err(ConfigError::invalid(
                "alerts.outbox.mqtt.client_id",
                "must be 1 to 80 characters (the partition is appended), the same on every replica",
            ));
        }
        if mqtt.password.is_some() && mqtt.username.is_none() {
            return Err(ConfigError::invalid(
                "alerts.outbox.mqtt.username",
                "is missing; a password needs a username",
            ));
        }
        if !(5..=3600).contains(&mqtt.keep_alive_secs) {
            return Err(ConfigError::invalid(
                "alerts.outbox.mqtt.keep_alive_secs",
                "must be between 5 and 3600",
            ));
        }
        if !(10..=3_600_000).contains(&self.poll_interval_ms) {
            return Err(ConfigError::invalid(
                "alerts.outbox.poll_interval_ms",
                "must be between 10 and 3600000",
            ));
        }
        if !(1..=10_000).contains(&self.batch_size) {
            return Err(ConfigError::invalid(
                "alerts.outbox.batch_size",
                "must be between 1 and 10000",
            ));
        }
        if !(100..=600_000).contains(&self.ack_timeout_ms) {
            return Err(ConfigError::invalid(
                "alerts.outbox.ack_timeout_ms",
                "must be between 100 and 600000",
            ));
        }
        if !(1..=1_000).contains(&self.max_in_flight) {
            return Err(ConfigError::invalid(
                "alerts.outbox.max_in_flight",
                "must be between 1 and 1000, and within what the broker holds per session",
            ));
        }
        if !(1..=64).contains(&self.publishers) {
            return Err(ConfigError::invalid(
                "alerts.outbox.publishers",
                "must be between 1 and 64",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_bad_values_are_named() {
        OutboxConfig::default().validate().unwrap();
        let config = OutboxConfig {
            batch_size: 0,
            ..OutboxConfig::default()
        };
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("alerts.outbox.batch_size"));
        let mut config = OutboxConfig::default();
        config.mqtt.password = Some(Secret::new("secret"));
        let message = config.validate().unwrap_err().to_string();
        assert!(
            message.contains("alerts.outbox.mqtt.username") && !message.contains("secret"),
            "{message}"
        );
    }
}

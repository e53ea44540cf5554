//! Kafka client settings shared by every stage that talks to the broker.

use std::collections::BTreeMap;

use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated `host:port`.
    pub brokers: String,
    /// Topic that carries telemetry records.
    pub topic: String,
    /// Topic that takes records that break the contract.
    pub dlq_topic: String,
    /// Extra librdkafka properties (e.g. `security.protocol`, `sasl.mechanism`), applied last.
    /// See <https://github.com/confluentinc/librdkafka/blob/master/CONFIGURATION.md>.
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic: crate::contract::DEFAULT_TOPIC.into(),
            dlq_topic: crate::contract::DEFAULT_DLQ_TOPIC.into(),
            properties: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.brokers.trim().is_empty() {
            return Err(ConfigError::invalid(
                "kafka.brokers",
                "is empty; give at least one host:port",
            ));
        }
        if self.topic.is_empty() {
            return Err(ConfigError::invalid("kafka.topic", "is empty"));
        }
        if self.dlq_topic.is_empty() || self.dlq_topic == self.topic {
            return Err(ConfigError::invalid(
                "kafka.dlq_topic",
                format!("must be set and differ from kafka.topic ('{}')", self.topic),
            ));
        }
        Ok(())
    }

    /// A librdkafka config with the brokers, `defaults`, and then the operator's extra
    /// properties, which win over both.
    pub fn client_config(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        config.set("client.id", "telemetry-pipeline");
        for (key, value) in defaults {
            config.set(*key, *value);
        }
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }

    /// `client_config` for a producer that loses nothing: every replica confirms (`acks=all`),
    /// retries cannot duplicate or reorder (idempotence), and a record is retried until the
    /// broker takes it (`message.timeout.ms=0`), because the callers only release their input
    /// after delivery and would rather wait out an outage than drop.
    pub fn durable_producer_config(&self) -> ClientConfig {
        self.client_config(&[
            ("acks", "all"),
            ("enable.idempotence", "true"),
            ("message.timeout.ms", "0"),
            ("linger.ms", "5"),
        ])
    }
}

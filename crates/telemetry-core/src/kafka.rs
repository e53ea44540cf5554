//! Kafka client settings shared by every stage that talks to the broker.

//!
//! SASL and TLS go through librdkafka's own properties (`security.protocol`, `sasl.mechanism`,
//! `sasl.username`, `ssl.ca.location`, ...). Secrets among them are best kept in files
//! (`secret_files`): they are read at start-up, and neither they nor secret-looking inline
//! `properties` are ever printed.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize, Serializer};

use crate::config::{read_secret_file, ConfigError, REDACTED};

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
    /// Values of secret-looking properties (`sasl.password`, `ssl.key.password`, ...) print as
    /// `***`; prefer `secret_files` for them.
    #[serde(serialize_with = "serialize_redacted")]
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties whose values are read from files at start-up, e.g.
    /// `"sasl.password" = "/run/secrets/kafka-password"`: secrets stay out of the config file,
    /// the environment and the output of `print-config`.
    pub secret_files: BTreeMap<String, PathBuf>,
}

/// Whether a librdkafka property holds a secret (passwords, private keys, JAAS and OAuth
/// settings), judged by its name so that properties added by later librdkafka versions are
/// covered too.
pub fn is_secret_property(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "password",
        "secret",
        "jaas",
        "oauthbearer.config",
        "key.pem",
    ]
    .iter()
    .any(|part| name.contains(part))
}

fn serialize_redacted<S: Serializer>(
    properties: &BTreeMap<String, String>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(properties.iter().map(|(name, value)| {
        let shown = if is_secret_property(name) {
            REDACTED
        } else {
            value.as_str()
        };
        (name, shown)
    }))
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic: crate::contract::DEFAULT_TOPIC.into(),
            dlq_topic: crate::contract::DEFAULT_DLQ_TOPIC.into(),
            properties: BTreeMap::new(),
            secret_files: BTreeMap::new(),
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
        for (name, path) in &self.secret_files {
            if self.properties.contains_key(name) {
                return Err(ConfigError::invalid(
                    "kafka.secret_files",
                    format!("'{name}' is also set in kafka.properties; keep one of the two"),
                ));
            }
            // Read now so that a wrong path stops start-up instead of failing authentication.
            read_secret_file("kafka.secret_files", path)?;
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
        for (key, path) in &self.secret_files {
            match read_secret_file("kafka.secret_files", path) {
                Ok(secret) => {
                    config.set(key, secret.expose());
                }
                // `validate` read it at start-up, so the file went away since; the broker will
                // refuse the connection, and this says why.
                Err(error) => tracing::error!(property = %key, %error, "secret file unreadable"),
            }
        }
        config
    }

    /// `client_config` for a producer that loses nothing: every replica confirms (`acks=all`),
    /// retries cannot duplicate or reorder (idempotence), and a record is retried until the
    /// broker takes it (`message.timeout.ms=0`), because the callers only release their input
    /// after delivery and would rather wait out an outage than drop. Nagle's algorithm is off:
    /// with it, a small produce request can wait for the broker's delayed ACK (tens of ms),
    /// which showed as a p99 of over 100 ms in `make bench-bridge`.
    pub fn durable_producer_config(&self) -> ClientConfig {
        self.client_config(&[
            ("acks", "all"),
            ("enable.idempotence", "true"),
            ("message.timeout.ms", "0"),
            ("linger.ms", "5"),
            ("socket.nagle.disable", "true"),
        ])
    }
}

/// Which of `shares` tasks of one process handles a partition: partition mod shares. Fixed for
/// each partition, so one task sees all of a partition's records, in order. The worker's writers
/// and the alert outbox's publishers split partitions this way, so with as many of each, a
/// writer's alerts go to one publisher.
pub fn share_of(partition: i32, shares: usize) -> usize {
    partition.rem_euclid(shares.max(1) as i32) as usize
}

/// The one place that decides whether Kafka refused a record for good, so that sending it again
/// as it is can only fail again (too large for the topic or the producer's `message.max.bytes`,
/// a record the broker finds invalid, no right to write to the topic), or whether the failure
/// may pass (a broker down, a leader election, a timeout), which is retried. Stages retry the
/// second kind and must not retry the first forever: it would stop everything behind the record.
pub fn is_permanent_produce_error(error: &KafkaError) -> bool {
    let code = match error {
        KafkaError::MessageProduction(code) => *code,
        _ => return false,
    };
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::MessageBatchTooLarge
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::PolicyViolation
            | RDKafkaErrorCode::UnsupportedForMessageFormat
    )
}

/// What an operator can do about a permanent produce error on `topic`.
pub fn permanent_error_fix(error: &KafkaError, topic: &str) -> String {
    match error {
        KafkaError::MessageProduction(
            RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed,
        ) => format!("grant this client write access to topic '{topic}'"),
        KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::MessageBatchTooLarge,
        ) => format!(
            "raise max.message.bytes of topic '{topic}' (and message.max.bytes in \
             kafka.properties, librdkafka's own limit)"
        ),
        _ => format!("check the settings of topic '{topic}' and the broker's log"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_partition_has_one_share_in_range() {
        assert_eq!(share_of(4, 2), 0);
        assert_eq!(share_of(5, 2), 1);
        assert_eq!(share_of(7, 1), 0);
        assert_eq!(share_of(7, 0), 0);
        assert!((0..12).all(|p| share_of(p, 5) < 5));
    }

    #[test]
    fn secret_properties_print_as_stars_and_secret_files_reach_librdkafka() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kafka-password");
        std::fs::write(&path, "s3cr3t-from-file\n").unwrap();
        let mut config = KafkaConfig::default();
        config
            .properties
            .insert("sasl.username".into(), "bridge".into());
        config
            .properties
            .insert("ssl.key.password".into(), "inline-s3cr3t".into());
        config
            .secret_files
            .insert("sasl.password".into(), path.clone());
        config.validate().unwrap();
        let printed = serde_json::to_string(&config).unwrap();
        assert!(!printed.contains("s3cr3t"), "{printed}");
        assert!(
            printed.contains("\"sasl.username\":\"bridge\""),
            "{printed}"
        );
        assert!(printed.contains(&path.display().to_string()), "{printed}");
        let client = config.client_config(&[]);
        assert_eq!(client.get("sasl.password"), Some("s3cr3t-from-file"));
        assert_eq!(client.get("ssl.key.password"), Some("inline-s3cr3t"));
    }

    #[test]
    fn a_missing_secret_file_stops_start_up_with_its_path() {
        let mut config = KafkaConfig::default();
        config
            .secret_files
            .insert("sasl.password".into(), "/nonexistent/kafka".into());
        let error = config.validate().unwrap_err().to_string();
        assert!(
            error.contains("kafka.secret_files") && error.contains("/nonexistent/kafka"),
            "{error}"
        );
    }

    #[test]
    fn records_kafka_refuses_for_good_are_told_from_outages() {
        use rdkafka::error::{KafkaError, RDKafkaErrorCode as Code};
        for code in [
            Code::MessageSizeTooLarge,
            Code::InvalidRecord,
            Code::TopicAuthorizationFailed,
            Code::PolicyViolation,
        ] {
            assert!(
                is_permanent_produce_error(&KafkaError::MessageProduction(code)),
                "{code:?}"
            );
        }
        for code in [
            Code::MessageTimedOut,
            Code::QueueFull,
            Code::NotLeaderForPartition,
            Code::BrokerTransportFailure,
            Code::AllBrokersDown,
        ] {
            assert!(
                !is_permanent_produce_error(&KafkaError::MessageProduction(code)),
                "{code:?}"
            );
        }
        assert!(!is_permanent_produce_error(&KafkaError::Canceled));
        let size = KafkaError::MessageProduction(Code::MessageSizeTooLarge);
        assert!(permanent_error_fix(&size, "dlq").contains("max.message.bytes of topic 'dlq'"));
    }
}

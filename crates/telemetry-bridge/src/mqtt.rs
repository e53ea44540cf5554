//! The MQTT 5 session the bridge keeps with the broker.
//!
//! - Clean Start off and a Session Expiry Interval: the broker keeps the subscriptions and
//!   every unacknowledged message while the bridge is away, and delivers them again.
//! - Manual acknowledgements: the bridge sends PUBACK itself, after Kafka confirmed.
//! - Receive Maximum = `max_in_flight`: the broker never has more unacknowledged messages out
//!   to the bridge than that, so a slow Kafka holds messages back at the broker, not in the
//!   bridge's memory.
//! - Maximum Packet Size = [`MAX_PACKET_BYTES`], above what the brokers accept, so every message
//!   a broker acknowledged reaches the bridge: an oversize payload is dead-lettered here, and
//!   one beyond the broker's limit is refused at the door.

use std::path::Path;
use std::time::Duration;

use rumqttc::v5::MqttOptions;
use rumqttc::{TlsConfiguration, Transport};

use crate::config::{BridgeConfig, MAX_PACKET_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum MqttSetupError {
    #[error(transparent)]
    Config(#[from] telemetry_core::config::ConfigError),
    #[error("cannot read {field} {path}: {source}")]
    Read {
        field: &'static str,
        path: String,
        source: std::io::Error,
    },
}

/// Session options from the config; reads the password and TLS files.
pub fn options(config: &BridgeConfig) -> Result<MqttOptions, MqttSetupError> {
    let mqtt = &config.mqtt;
    let mut options = MqttOptions::new(&mqtt.client_id, &mqtt.host, mqtt.port);
    options
        .set_clean_start(false)
        .set_session_expiry_interval(Some(mqtt.session_expiry_secs))
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(mqtt.keep_alive_secs))
        .set_receive_maximum(Some(config.max_in_flight.min(u16::MAX as usize) as u16))
        .set_max_packet_size(Some(MAX_PACKET_BYTES))
        .set_connection_timeout(10);
    if let Some(username) = &mqtt.username {
        let password = mqtt.resolved_password()?;
        options.set_credentials(
            username,
            password.as_ref().map(|p| p.expose()).unwrap_or_default(),
        );
    }
    if let Some(tls) = &mqtt.tls {
        let ca = read("mqtt.tls.ca_file", &tls.ca_file)?;
        let client_auth = match (&tls.client_cert_file, &tls.client_key_file) {
            (Some(cert), Some(key)) => Some((
                read("mqtt.tls.client_cert_file", cert)?,
                read("mqtt.tls.client_key_file", key)?,
            )),
            _ => None,
        };
        options.set_transport(Transport::Tls(TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth,
        }));
    }
    Ok(options)
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, MqttSetupError> {
    std::fs::read(path).map_err(|source| MqttSetupError::Read {
        field,
        path: path.display().to_string(),
        source,
    })
}

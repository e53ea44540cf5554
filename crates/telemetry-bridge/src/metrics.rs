//! Every metric the bridge exports, named in one place. Labels stay low-cardinality: a reason
//! code or a Kafka topic, never a device.

use std::time::Duration;

use telemetry_core::contract::DeadLetterReason;

pub const MESSAGES_RECEIVED: &str = "telemetry_bridge_messages_received_total";
pub const MESSAGES_FORWARDED: &str = "telemetry_bridge_messages_forwarded_total";
pub const DEAD_LETTERS: &str = "telemetry_bridge_dead_letters_total";
pub const MQTT_RECONNECTS: &str = "telemetry_bridge_mqtt_reconnects_total";
/// Messages confirmed by Kafka after their MQTT connection was gone: not acknowledged, since
/// the broker delivers them again on the new connection (each becomes a duplicate in Kafka).
pub const STALE_ACKS_SKIPPED: &str = "telemetry_bridge_stale_acks_skipped_total";
pub const IN_FLIGHT: &str = "telemetry_bridge_in_flight_messages";
/// From receipt over MQTT to Kafka's confirmation.
pub const DELIVERY_LATENCY: &str = "telemetry_bridge_delivery_seconds";

pub fn received() {
    metrics::counter!(MESSAGES_RECEIVED).increment(1);
}

pub fn dead_letter(reason: DeadLetterReason) {
    metrics::counter!(DEAD_LETTERS, "reason" => reason.code()).increment(1);
}

pub fn delivered(took: Duration) {
    metrics::counter!(MESSAGES_FORWARDED).increment(1);
    metrics::histogram!(DELIVERY_LATENCY).record(took.as_secs_f64());
}

pub fn in_flight(count: usize) {
    metrics::gauge!(IN_FLIGHT).set(count as f64);
}

pub fn reconnect() {
    metrics::counter!(MQTT_RECONNECTS).increment(1);
}

pub fn stale_ack_skipped() {
    metrics::counter!(STALE_ACKS_SKIPPED).increment(1);
}
